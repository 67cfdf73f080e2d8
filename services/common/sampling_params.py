"""Per-request generation settings, validated where they are made (router or engine)."""

from __future__ import annotations

from dataclasses import dataclass

from alignedserve.common.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # same seed + same prompt -> same tokens, on any worker
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks: every system emits exactly max_tokens
    logprobs: bool = False
    # The router filled max_tokens in because the client set none: then it is a cap, not the
    # client's word on how long the output runs, and the scheduler does not rank by it.
    is_default_max_tokens: bool = False
    # Sampled rows drop tokens less likely than min_p x the most likely one (after temperature).
    min_p: float = 0.0
    # (token id, added to its logit) in ascending id order, before greedy or sampled choice;
    # logprobs stay the model's. OpenAI's range: [-100, 100] (-100 bans, 100 forces).
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            (
                "logit_bias",
                all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
                "must map token ids to values in [-100, 100]",
            ),
        )
        for name, ok, rule in checks:
            if not ok:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r} {rule}", param=name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def finish_reason(
    params: SamplingParams,
    token_id: int,
    num_generated: int,
    num_tokens: int,
    eos_token_ids: tuple[int, ...],
    max_model_len: int,
) -> str | None:
    """Why a request stops after emitting `token_id` (OpenAI's "stop" / "length"), or None.

    num_generated counts generated tokens including token_id; num_tokens adds the prompt.
    """
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if num_generated >= params.max_tokens or num_tokens >= max_model_len:
        return "length"
    return None
