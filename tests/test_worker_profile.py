"""Where the worker's host time goes: the opt-in profile of its step thread
(worker/profiling.py), and the log line of a slow step's phases (worker/executor.py), from a
real run: worker + batcher on loopback."""

from __future__ import annotations

import asyncio
import logging
import pstats
import re
import time

from test_batcher_service import generate, greedy, stack

from alignedserve.serve import free_port
from alignedserve.worker import profiling

from factories import random_prompts


def run_stack(model_dir, prefill_device=None) -> None:
    prompts = random_prompts((30, 12), seed=3)

    async def main():
        async with stack(model_dir, free_port(), "cpu", prefill_device) as (stub, _):
            return await asyncio.gather(
                *(generate(stub, f"p{i}", p, greedy(5)) for i, p in enumerate(prompts))
            )

    assert all(len(tokens) == 5 for tokens, _, _ in asyncio.run(main()))


def test_the_step_thread_profile_holds_the_launches_and_finishes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(profiling.ENV, str(tmp_path / "steps"))
    run_stack(model_dir)
    # written on the session's step thread once its last step is done
    for _ in range(100):
        written = sorted(tmp_path.glob("steps.*"))
        if written:
            break
        time.sleep(0.05)
    assert written, "no profile written"
    stats = pstats.Stats(str(written[0])).stats.items()
    called = {func[2]: stat[1] for func, stat in stats if func[0].endswith("executor.py")}
    called["forward"] = sum(stat[1] for func, stat in stats if func[2] == "forward")
    # every step went through both halves, and the model's forward pass ran inside them;
    # only a step still in flight when the stack shut the stream (the batcher plans one
    # step ahead) may have launched without being answered
    assert called["launch"] >= 6, called
    assert called["launch"] - 1 <= called["finish"] <= called["launch"], called
    # each request's 5 tokens take 5 passes (its prefill, then 4 decodes); the two requests
    # share passes when they arrive in one step, so 5 is the fewest
    assert called["forward"] >= 5


def test_no_profile_without_the_setting(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run_stack(model_dir)
    assert profiling.StepProfile().wrap(len) is len
    assert list(tmp_path.iterdir()) == []


def test_a_slow_steps_host_time_is_logged_by_phase(model_dir, monkeypatch, caplog):
    monkeypatch.setattr(profiling, "SLOW_STEP_S", 0.0)  # every step is slow
    with caplog.at_level(logging.INFO, logger=profiling.__name__):
        run_stack(model_dir, prefill_device="cpu")
    lines = [r.getMessage() for r in caplog.records if "to queue" in r.getMessage()]
    # at most one a second (the run takes a few), each with every phase of the step
    assert 1 <= len(lines) <= 10, lines
    phases = ("releases", "loads", "prefill device's batch", "lane 0's pass")
    assert all(all(f"{p} " in line for p in phases) for line in lines), lines
    assert re.search(
        r"step \d+ \(\d+ loads, \d+ prefill chunks, \d+ decodes\) took [\d.]+ ms to queue: "
        r"releases [\d.]+, loads [\d.]+",
        lines[0],
    )
