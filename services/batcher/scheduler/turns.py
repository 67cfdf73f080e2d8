"""The decode GPU's prefill turns beside a prefill device, and the share of its time they take.

On a prompt-heavy load (the paper's 90 %-short mix has 4.3 prompt tokens per output token)
one prefill device cannot keep up: requests wait to be prefilled while the decode GPU runs
small batches. A *turn* is one step in which the decode GPU also prefills a full batch of
prompts (`prefill_tokens_per_step`, as efficient as the prefill device's own), beside the
group it decodes; their KV goes to the pool like the prefill device's. A turn stretches that
one step by a prefill batch's time (~0.25 s for 8k tokens of Llama-3-8B on an H200), so the
residents wait through it: `PrefillShare` keeps the turns' time within a share of the
decode GPU's busy time, which bounds what they add to each resident's time per output token
(at most 1 / (1 - share) times). Small chunks mixed into every step were tried first
(ninth session) and stretched every step instead, for less prefill.

The times are the worker's own (`StepResponse.compute_s`, the decode device's time for the
step), observed as steps are answered. Pure Python: no torch.
"""

from __future__ import annotations


class PrefillShare:
    """A debt of decode-GPU seconds: a turn that decoded residents adds its time, and every
    other decode step pays back share / (1 - share) of its own. A turn may start when the
    debt is paid and no turn is unanswered. A turn while nothing decodes stretches no one
    and costs nothing."""

    def __init__(self, share: float):
        if not 0 <= share < 1:
            raise ValueError(f"share={share} must be in [0, 1)")
        self.share = share
        self.debt_s = 0.0
        self.num_unanswered = 0  # turns sent, not yet answered

    def may_take(self, decodes: bool) -> bool:
        """May the next step be a turn? `decodes`: it also decodes residents."""
        if self.share == 0 or self.num_unanswered:
            return False
        return not decodes or self.debt_s <= 0

    def took(self) -> None:
        self.num_unanswered += 1

    def observe(self, is_turn: bool, decoded: bool, seconds: float) -> None:
        """A step was answered: it took the decode device `seconds`."""
        if is_turn:
            self.num_unanswered = max(0, self.num_unanswered - 1)
            if decoded:
                self.debt_s += seconds
        elif decoded:
            self.debt_s -= seconds * self.share / (1 - self.share)
            if self.debt_s < 1e-9:  # paid (within rounding)
                self.debt_s = 0.0

    def steps_lost(self) -> None:
        """The worker was lost with the steps in flight: none of them will be answered."""
        self.num_unanswered = 0
