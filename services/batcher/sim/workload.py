"""Synthetic request streams for the simulator: lengths and arrival times, seeded.

Every generator draws lengths first and arrival times last from one numpy Generator, so the
same seed gives the same requests offline and online: only when they arrive changes, which
keeps an offline-vs-online comparison about timing alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # tokens to generate (the request's max_tokens; no early EOS)


def _check(num_requests: int, rate_per_s: float | None) -> None:
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError("rate_per_s must be > 0 (or None for offline)")


def _arrivals_s(rng: np.random.Generator, n: int, rate_per_s: float | None) -> np.ndarray:
    """Offline: everyone at 0. Online: a Poisson process, i.e. exponential gaps of mean 1/rate."""
    if rate_per_s is None:
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))


def _build(prompts: np.ndarray, outputs: np.ndarray, arrivals_s: np.ndarray) -> list[SimRequest]:
    return [
        SimRequest(f"req-{i:06d}", float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(arrivals_s, prompts, outputs, strict=True))
    ]


def _uniform(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    """Integers uniform on lo..hi, both ends included."""
    return rng.integers(lo, hi + 1, size=n)


SHORT_PROMPT_TOKENS = (32, 1023)
LONG_PROMPT_TOKENS = (1024, 8192)
MIN_OUTPUT_TOKENS = 16


def paper_mix(
    num_requests: int,
    short_fraction: float,
    seed: int,
    rate_per_s: float | None = None,
    max_output_tokens: int = 512,
) -> list[SimRequest]:
    """The AlignedServe paper's synthetic mix: short (< 1k) prompts with probability
    short_fraction, else long (1k..8k); outputs uniform 16..max_output_tokens.

    The paper's "X % short" workloads are what make length alignment matter: a few long
    requests in an fcfs batch set the pace for many short ones.
    """
    _check(num_requests, rate_per_s)
    if not 0.0 <= short_fraction <= 1.0:
        raise ValueError("short_fraction must be in [0, 1]")
    if max_output_tokens < MIN_OUTPUT_TOKENS:
        raise ValueError(f"max_output_tokens must be >= {MIN_OUTPUT_TOKENS}")
    rng = np.random.default_rng(seed)
    is_short = rng.random(num_requests) < short_fraction
    short = _uniform(rng, *SHORT_PROMPT_TOKENS, num_requests)
    long = _uniform(rng, *LONG_PROMPT_TOKENS, num_requests)
    prompts = np.where(is_short, short, long)
    outputs = _uniform(rng, MIN_OUTPUT_TOKENS, max_output_tokens, num_requests)
    return _build(prompts, outputs, _arrivals_s(rng, num_requests, rate_per_s))


# ShareGPT-like lengths: an approximation by lognormals, not the dataset. Prompt median 200
# tokens with sigma 1.0 (mean ≈ 330, 99th percentile ≈ 2,050, 99.9th ≈ 4,400); output median
# 150 with sigma 1.0 (mean ≈ 250, 99th percentile ≈ 1,540). Clipped to the ranges below.
SHAREGPT_PROMPT_MEDIAN_TOKENS = 200.0
SHAREGPT_PROMPT_SIGMA = 1.0
SHAREGPT_PROMPT_TOKENS = (4, 8192)
SHAREGPT_OUTPUT_MEDIAN_TOKENS = 150.0
SHAREGPT_OUTPUT_SIGMA = 1.0
SHAREGPT_OUTPUT_TOKENS = (1, 2048)


def _lognormal_tokens(
    rng: np.random.Generator, median: float, sigma: float, bounds: tuple[int, int], n: int
) -> np.ndarray:
    draws = rng.lognormal(mean=np.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(draws), *bounds).astype(np.int64)


def sharegpt_like(
    num_requests: int, seed: int, rate_per_s: float | None = None
) -> list[SimRequest]:
    """Chat-like lengths: mostly short prompts and answers, a long tail of both."""
    _check(num_requests, rate_per_s)
    rng = np.random.default_rng(seed)
    prompts = _lognormal_tokens(
        rng,
        SHAREGPT_PROMPT_MEDIAN_TOKENS,
        SHAREGPT_PROMPT_SIGMA,
        SHAREGPT_PROMPT_TOKENS,
        num_requests,
    )
    outputs = _lognormal_tokens(
        rng,
        SHAREGPT_OUTPUT_MEDIAN_TOKENS,
        SHAREGPT_OUTPUT_SIGMA,
        SHAREGPT_OUTPUT_TOKENS,
        num_requests,
    )
    return _build(prompts, outputs, _arrivals_s(rng, num_requests, rate_per_s))


LONG_CONTEXT_PROMPT_TOKENS = (8192, 32768)
LONG_CONTEXT_OUTPUT_TOKENS = (64, 512)


def long_context(num_requests: int, seed: int, rate_per_s: float | None = None) -> list[SimRequest]:
    """Long documents, short answers: KV bytes and PCIe traffic dominate."""
    _check(num_requests, rate_per_s)
    rng = np.random.default_rng(seed)
    prompts = _uniform(rng, *LONG_CONTEXT_PROMPT_TOKENS, num_requests)
    outputs = _uniform(rng, *LONG_CONTEXT_OUTPUT_TOKENS, num_requests)
    return _build(prompts, outputs, _arrivals_s(rng, num_requests, rate_per_s))


def fixed(
    num_requests: int,
    prompt_tokens: int,
    output_tokens: int,
    rate_per_s: float | None = None,
    seed: int = 0,
) -> list[SimRequest]:
    """Identical requests: for calibration and for tests with a known answer."""
    _check(num_requests, rate_per_s)
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("prompt_tokens and output_tokens must be >= 1")
    rng = np.random.default_rng(seed)
    prompts = np.full(num_requests, prompt_tokens)
    outputs = np.full(num_requests, output_tokens)
    return _build(prompts, outputs, _arrivals_s(rng, num_requests, rate_per_s))


Workload = Callable[[int, int, float | None], list[SimRequest]]


def _paper(short_fraction: float) -> Workload:
    def make(num_requests: int, seed: int, rate_per_s: float | None = None) -> list[SimRequest]:
        return paper_mix(num_requests, short_fraction, seed, rate_per_s)

    return make


# Named workloads, all called as (num_requests, seed, rate_per_s).
WORKLOADS: dict[str, Workload] = {
    "paper-70": _paper(0.70),
    "paper-80": _paper(0.80),
    "paper-90": _paper(0.90),
    "paper-95": _paper(0.95),
    "sharegpt": sharegpt_like,
    "long-context": long_context,
}
