"""How many prompt tokens the prefill device gets per step.

The prefill device runs its chunks while the decode device runs its step, and the step ends
when both are done. A chunk longer than the decode step therefore stretches the time per
output token of every running request: the very cost a prefill device is there to remove.
So while requests decode, each step's prefill budget is what the prefill device computes in
the time a decode step takes, both measured from the worker's recent steps (the worker's
`prefill_s` and `compute_s`); while nothing decodes it is the full budget. A floor keeps the
chunks long enough to use the GPU's matmul units well.

Pure arithmetic over the numbers it is shown; the engine feeds it every step.
"""

from __future__ import annotations


class PrefillPacer:
    def __init__(self, max_tokens: int, min_tokens: int = 512, smoothing: float = 0.25):
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self.smoothing = smoothing  # weight of the newest sample in each moving average
        self.tokens_per_s: float | None = None  # the prefill device's prompt tokens per second
        self.decode_s: float | None = None  # a decode-only step's forward pass

    def observe(self, prefill_tokens: int, prefill_s: float, decoding: bool, compute_s: float):
        """One step's numbers. `decoding`: the decode device's pass was decode only (a mixed
        chunk in it would inflate compute_s beyond a decode step's)."""
        if prefill_tokens > 0 and prefill_s > 0:
            self.tokens_per_s = self._average(self.tokens_per_s, prefill_tokens / prefill_s)
        if decoding and compute_s > 0:
            self.decode_s = self._average(self.decode_s, compute_s)

    def budget(self, decoding: bool) -> int:
        """The next step's prefill tokens; `decoding`: the decode device has members to run."""
        if not decoding or self.tokens_per_s is None or self.decode_s is None:
            return self.max_tokens
        fits = min(self.max_tokens, self.tokens_per_s * self.decode_s)  # float: may be huge
        return max(self.min_tokens, int(fits))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
