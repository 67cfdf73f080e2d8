"""Benchmark requests: the simulator's seeded workloads, made concrete as token-id prompts.

Prompts are token-id lists (which /v1/completions accepts), so every prompt has exactly its
planned length on every server without a tokenizer, and `ignore_eos` makes every server emit
exactly `max_tokens` tokens: the systems compared do the same work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from alignedserve.batcher.sim.workload import WORKLOADS, SimRequest, fixed
from alignedserve.common.errors import ConfigError

# The input/output grid every serving benchmark reports; any fixed-PROMPT-OUTPUT also works.
FIXED_GRID = ("fixed-128-128", "fixed-128-2048", "fixed-2048-128", "fixed-2048-2048")
_FIXED = re.compile(r"fixed-(\d+)-(\d+)")

# Token ids are drawn away from both ends of the vocabulary: low ids are usually special and
# byte tokens, the top ones added specials, and a prompt of those can trip a server's checks.
SAFE_MARGIN_TOKENS = 1000
MIN_VOCAB_SIZE = 8


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    arrival_s: float  # after the run's start; 0 for every request of an offline run
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


def workload_names() -> list[str]:
    return [*sorted(WORKLOADS), *FIXED_GRID]


def is_workload(name: str) -> bool:
    return name in WORKLOADS or _FIXED.fullmatch(name) is not None


def sim_requests(
    name: str, num_requests: int, seed: int, rate_per_s: float | None
) -> list[SimRequest]:
    """Lengths and arrival times (None: offline) of a named workload."""
    if name in WORKLOADS:
        return WORKLOADS[name](num_requests, seed, rate_per_s)
    match = _FIXED.fullmatch(name)
    if match is None:
        raise ConfigError(f"workload={name!r}: expected one of {workload_names()} or fixed-P-O")
    prompt_tokens, output_tokens = int(match[1]), int(match[2])
    return fixed(num_requests, prompt_tokens, output_tokens, rate_per_s, seed)


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the prompt ids: SAFE_MARGIN_TOKENS from both ends, or a quarter of a
    vocabulary too small for that."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size} below {MIN_VOCAB_SIZE}")
    margin = min(SAFE_MARGIN_TOKENS, vocab_size // 4)
    return margin, vocab_size - margin


def to_bench_requests(
    sims: list[SimRequest], vocab_size: int, prompt_seed: int | tuple[int, ...]
) -> list[BenchRequest]:
    """Each request's prompt: `prompt_tokens` seeded random ids, drawn in request order."""
    low, high = token_id_range(vocab_size)
    rng = np.random.default_rng(prompt_seed)
    return [
        BenchRequest(
            request_id=sim.request_id,
            arrival_s=sim.arrival_s,
            prompt_token_ids=tuple(rng.integers(low, high, size=sim.prompt_tokens).tolist()),
            max_tokens=sim.output_tokens,
        )
        for sim in sims
    ]


def make_requests(
    name: str,
    num_requests: int,
    seed: int,
    rate_per_s: float | None,
    vocab_size: int,
    run_index: int = 0,
) -> list[BenchRequest]:
    """The runs of one sweep share lengths (the seed) but not prompt ids (seed, run_index):
    a server with a prefix cache must not serve a later run from an earlier run's prompts."""
    sims = sim_requests(name, num_requests, seed, rate_per_s)
    return to_bench_requests(sims, vocab_size, (seed, run_index))
