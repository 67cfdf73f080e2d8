"""The periodic stats lines: their cadence setting, the batcher's account of whether the
prefill device was fed, and both services' lines from a real run (worker + batcher on
loopback, prefill on a second CPU replica)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from test_batcher_service import generate, greedy, stack

from alignedserve.batcher import engine_stats
from alignedserve.common import stats_line
from alignedserve.common.errors import ConfigError
from alignedserve.serve import free_port

from factories import benchmark_module, random_prompts


@pytest.mark.parametrize(("raw", "expected"), [("", 10.0), ("0.25", 0.25), ("3", 3.0)])
def test_interval_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(stats_line.ENV, raw)
    assert stats_line.interval_s() == expected


@pytest.mark.parametrize("raw", ["often", "0", "-1", "nan"])
def test_a_bad_interval_is_a_config_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(stats_line.ENV, raw)
    with pytest.raises(ConfigError, match=stats_line.ENV):
        stats_line.interval_s()


def test_the_prefill_queue_is_integrated_over_time(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(engine_stats.time, "perf_counter", lambda: clock[0])
    stats = engine_stats.EngineStats(max_prefill_batches=2)

    def at(t, unplanned, batches):
        clock[0] = 100.0 + t
        stats.observe(unplanned, batches)

    at(0, 5, 0)  # from 0: waiting, nothing queued
    at(2, 5, 1)  # from 2: one batch queued, a slot free
    at(3, 5, 2)  # from 3: full
    at(7, 0, 1)  # from 7: nothing waits
    at(8, 3, None)  # from 8: no prefill device at all (never counted)
    at(9, 3, None)
    assert stats.sums.unfed_s == pytest.approx(2.0)
    assert stats.sums.underfed_s == pytest.approx(3.0)  # 2 unfed + 1 with a slot free


def test_both_services_log_their_lines(model_dir, monkeypatch, caplog):
    monkeypatch.setenv(stats_line.ENV, "0.05")
    caplog.set_level(logging.INFO)
    prompts = random_prompts((40, 17, 90, 33, 64, 8, 120, 25), seed=7)

    async def main():
        async with stack(model_dir, free_port(), "cpu", "cpu") as (stub, _):
            return await asyncio.gather(
                *(generate(stub, f"s{i}", p, greedy(12)) for i, p in enumerate(prompts))
            )

    results = asyncio.run(main())
    assert all(len(tokens) == 12 for tokens, _, _ in results)
    batcher = [r.getMessage() for r in caplog.records if r.name.endswith("batcher.engine")]
    worker = [r.getMessage() for r in caplog.records if r.name.endswith("worker.service")]
    batcher_lines = [m for m in batcher if "steps" in m and "prefill device" in m]
    worker_lines = [m for m in worker if "ms apart" in m]
    assert batcher_lines and worker_lines, (batcher, worker)
    # every answered token is counted once, in one window or another (the last, partial
    # window is written when the services stop)
    rate = re.compile(r"([\d.]+) tokens/s; (\d+) steps ([\d.]+) ms apart")
    steps = sum(int(rate.search(m).group(2)) for m in batcher_lines)
    assert steps > 0
    for line in batcher_lines:
        shares = re.findall(r"(\d+)% of the time, with one slot free (\d+)%", line)
        assert shares and all(0 <= int(v) <= 100 for v in shares[0]), line
    # the GPU benchmark's reader of these lines (benchmarks/device_busy.py) parses them all
    busy = load_device_busy().device_busy(worker)
    assert busy is not None and busy["window_s"] > 0
    assert 0 < busy["decode_busy"] <= 1.5 and 0 < busy["prefill_busy"] <= 1.5, busy
    worker_steps = sum(int(re.search(r"; (\d+) steps", m).group(1)) for m in worker_lines)
    # the batcher counts the steps it had answered; the worker every step it answered
    # (the batcher's idle probes and its last release step included)
    assert worker_steps >= steps
    assert all(re.search(r"idle (\d+)%", m) for m in worker_lines)
    # the host's share of a step: a part of its time from plan to answer, and > 0 where the
    # window ran forward passes
    queued = []
    for line in worker_lines:
        m = re.search(
            r"([\d.]+) ms from plan to answer \(([\d.]+) ms queueing it on the host", line
        )
        assert m is not None, line
        assert float(m.group(2)) <= float(m.group(1)), line
        queued.append(float(m.group(2)))
    assert max(queued) > 0


def load_device_busy():
    return benchmark_module("device_busy")


def test_device_busy_sums_the_windows_with_tokens():
    line = (
        "{tps} tokens/s, 9 resident requests, device KV 1.2% used; {steps} steps {apart} ms "
        "apart (59 launched before the previous was answered): 10.2 ms from plan to answer, "
        "decode device {dec} ms, prefill device {pre} ms; idle 57%; 0.0 s capturing graphs"
    )
    lines = [
        "unrelated",
        line.format(tps=0.0, steps=1, apart=1000.0, dec=0.0, pre=0.0),  # idle: left out
        line.format(tps=900.0, steps=100, apart=10.0, dec=9.0, pre=5.0),
        line.format(tps=500.0, steps=50, apart=20.0, dec=10.0, pre=0.0),
    ]
    busy = load_device_busy().device_busy(lines)
    assert busy == pytest.approx({"window_s": 2.0, "decode_busy": 0.7, "prefill_busy": 0.25})
    assert load_device_busy().device_busy(lines[:2]) is None
