"""Throughput and latency of one run, by the definitions vLLM `bench serve`, SGLang
`bench_serving`, GuideLLM and AIPerf share, so our numbers read like theirs. Pure functions
of the records.

- throughput: tokens (or requests) of the successful requests over the run's wall time,
  from the first send to the last end;
- TTFT: send → first chunk carrying a token;
- TPOT: (E2E − TTFT) / (n − 1) per request with n > 1 output tokens;
- ITL: the gaps between streamed chunks; a chunk carrying k tokens gives k gaps of gap / k,
  so the mean ITL of a request spans its whole stream, as TPOT does;
- goodput: successful requests per second that meet every SLO given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignedserve.bench.records import RequestRecord, RunRecords

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p90: float
    p99: float


def stats(values: Sequence[float]) -> Stats | None:
    """Mean and percentiles (numpy's linear interpolation, as the peers use); None if empty."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, PERCENTILES)
    return Stats(float(array.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Slo:
    """Service-level objectives; None: not judged."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def is_set(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


def ttft_s(record: RequestRecord) -> float | None:
    first = record.first_token_s
    return None if first is None else first - record.send_s


def e2e_s(record: RequestRecord) -> float:
    return record.end_s - record.send_s


def tpot_s(record: RequestRecord) -> float | None:
    """None for a request with fewer than 2 output tokens: it has no time per output token."""
    ttft = ttft_s(record)
    if ttft is None or record.completion_tokens < 2:
        return None
    return (e2e_s(record) - ttft) / (record.completion_tokens - 1)


def itls_s(record: RequestRecord) -> list[float]:
    itls: list[float] = []
    for before, chunk in zip(record.chunks, record.chunks[1:], strict=False):
        gap = chunk.time_s - before.time_s
        itls.extend([gap / chunk.num_tokens] * chunk.num_tokens)
    return itls


def meets(record: RequestRecord, slo: Slo) -> bool:
    """A request with one output token has no TPOT, so it meets any TPOT objective (as in
    vLLM's goodput, where its TPOT counts as 0)."""
    ttft, tpot = ttft_s(record), tpot_s(record)
    if slo.ttft_s is not None and (ttft is None or ttft > slo.ttft_s):
        return False
    return slo.tpot_s is None or tpot is None or tpot <= slo.tpot_s


@dataclass(frozen=True)
class Summary:
    num_ok: int
    num_failed: int  # sent, then an error or the run's timeout
    num_not_sent: int  # the run's timeout came first
    duration_s: float
    prompt_tokens: int  # of the successful requests, as are the throughputs
    completion_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    goodput_requests_per_s: float | None  # None: no SLO given
    ttft_s: Stats | None
    tpot_s: Stats | None
    itl_s: Stats | None
    e2e_s: Stats | None


def summarize(run: RunRecords, slo: Slo) -> Summary:
    records = run.records
    ok = [r for r in records if r.is_ok]
    duration = max(r.end_s for r in records) - min(r.send_s for r in records) if records else 0.0

    def per_s(count: float) -> float:
        return count / duration if duration > 0 else 0.0

    prompt_tokens = sum(r.prompt_tokens for r in ok)
    completion_tokens = sum(r.completion_tokens for r in ok)
    ttfts = [t for t in map(ttft_s, ok) if t is not None]
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    return Summary(
        num_ok=len(ok),
        num_failed=len(records) - len(ok),
        num_not_sent=run.num_not_sent,
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        requests_per_s=per_s(len(ok)),
        output_tokens_per_s=per_s(completion_tokens),
        total_tokens_per_s=per_s(prompt_tokens + completion_tokens),
        goodput_requests_per_s=per_s(sum(meets(r, slo) for r in ok)) if slo.is_set else None,
        ttft_s=stats(ttfts),
        tpot_s=stats(tpots),
        itl_s=stats([itl for r in ok for itl in itls_s(r)]),
        e2e_s=stats([e2e_s(r) for r in ok]),
    )
