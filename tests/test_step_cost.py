"""benchmarks/step_cost.py on stats lines in the services' own formats: which windows are
pure decode, and the line through them."""

from __future__ import annotations

import pytest

from factories import benchmark_module


@pytest.fixture(scope="module")
def step_cost():
    return benchmark_module("step_cost")


def worker(at: str, residents: int, kv_percent: float, steps: int, ms: float, idle: int = 0):
    return (
        f"2026-11-21 17:07:{at} INFO alignedserve.worker.service: 9751.3 tokens/s, {residents} "
        f"resident requests, device KV {kv_percent}% used; {steps} steps {ms} ms apart (50 "
        f"launched before the previous was answered): 33.2 ms from plan to answer, decode "
        f"device {ms} ms, prefill device 0.0 ms; idle {idle}%; 0.0 s capturing graphs"
    )


def batcher(at: str, waiting: int):
    return (
        f"2026-11-21 17:07:{at} INFO alignedserve.batcher.engine: 10907.7 tokens/s; 54 steps "
        f"18.6 ms apart: planning 2.2 ms, sending 0.7 ms, waiting for the worker 13.6 ms, "
        f"applying answers 2.1 ms each; requests: {waiting} waiting for prefill, 0 pooled, "
        f"221 on the device; KV pool 52.8% used; prefill device: requests waited with no "
        f"batch queued there 0% of the time, with one slot free 1%"
    )


def test_pure_decode_windows_and_their_cost_per_gib(step_cost):
    workers = [
        worker("01,000", 50, 10.0, 60, 8.0),  # 8.8 GiB, nobody waits: counts
        worker("02,000", 80, 20.0, 60, 10.0),  # 17.6 GiB: counts
        worker("03,000", 90, 30.0, 60, 12.0),  # 26.4 GiB: counts
        worker("05,000", 90, 30.0, 60, 50.0),  # a prompt waits nearby: a mixed window
        worker("07,000", 3, 1.0, 60, 6.0),  # too few residents
        worker("09,000", 90, 30.0, 10, 12.0),  # too few steps
        worker("11,000", 90, 30.0, 60, 12.0, idle=40),  # the worker idled
        worker("20,000", 90, 30.0, 60, 12.0),  # no batcher line near it
    ]
    batchers = [batcher(at, 0) for at in ("01,100", "02,100", "03,100", "07,100", "09,100")]
    batchers += [batcher("05,100", 0), batcher("05,900", 3), batcher("11,100", 0)]
    windows = step_cost.decode_windows(workers, batchers, device_kv_gib=88.0)
    assert [w[0] for w in windows] == [50, 80, 90]
    assert [w[1] for w in windows] == pytest.approx([8.8, 17.6, 26.4])
    assert [w[2] for w in windows] == [8.0, 10.0, 12.0]
    base, per_gib = step_cost.fit(windows)
    assert (base, per_gib) == pytest.approx((6.0, 2.0 / 8.8))
    with pytest.raises(ValueError, match="too few"):
        step_cost.fit(windows[:1])
