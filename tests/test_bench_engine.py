"""`alignedserve bench --target engine`: the workload's token ids straight into the batcher
engine, its worker a child process as `alignedserve serve` runs it, the tiny model on CPU.
Both policies through the whole command; exact output lengths and a run's timeout against the
target itself; the same sampling as the HTTP target's; a worker that cannot start."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignedserve.batcher.engine import BatcherEngine
from alignedserve.batcher.service import BatcherConfig
from alignedserve.bench.cli import add_arguments, config_from_args, run_bench
from alignedserve.bench.engine_target import EngineTarget, EngineTargetConfig, sampling_params
from alignedserve.bench.metrics import Slo, summarize
from alignedserve.bench.runner import run_load
from alignedserve.bench.shapes import Offline
from alignedserve.bench.targets import completion_body
from alignedserve.bench.workload import BenchRequest, make_requests
from alignedserve.common.errors import ConfigError, UnavailableError
from alignedserve.router.preprocess import Limits, completion_inputs
from alignedserve.router.schemas import CompletionRequest
from alignedserve.serve import free_port
from alignedserve.worker.tiny import VOCAB

POOL_GIB = "0.05"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


# ---- configuration ---------------------------------------------------------------------------


def test_engine_flags_make_the_engine_config_and_need_the_engine_target():
    config = config_from_args(parse("--target", "engine", "--policy", "fcfs", "--pool-gib", "2"))
    assert config.engine == EngineTargetConfig(policy="fcfs", pool_gib=2.0)
    knobs = ("--min-batch", "3", "--max-batch-kv-fraction", "0.5")
    config = config_from_args(parse("--target", "engine", *knobs))
    assert config.engine == EngineTargetConfig(min_batch=3, max_batch_kv_fraction=0.5)
    assert config_from_args(parse()).engine is None  # the OpenAI target by default
    with pytest.raises(ConfigError, match="--device, --policy: only with --target engine"):
        config_from_args(parse("--policy", "fcfs", "--device", "cuda"))
    with pytest.raises(ConfigError, match="--min-batch: only with --target engine"):
        config_from_args(parse("--min-batch", "2"))
    with pytest.raises(ConfigError, match=r"base_url=.*the engine target has no URL"):
        config_from_args(parse("--target", "engine", "--base-url", "http://h:1"))
    with pytest.raises(SystemExit):  # argparse's choices
        parse("--target", "engine", "--policy", "lifo")
    for bad, match in (({"dtype": "int8"}, "dtype="), ({"max_waiting": 0}, "max_waiting=")):
        with pytest.raises(ConfigError, match=match):
            EngineTargetConfig(**bad)


def test_sampling_is_what_the_router_makes_of_the_http_targets_request():
    (request,) = make_requests("fixed-12-7", 1, seed=3, rate_per_s=None, vocab_size=VOCAB)
    body = completion_body("tiny", request)
    wire_json = json.loads(json.dumps(body))  # what the target sends
    limits = Limits(max_model_len=2048, vocab_size=VOCAB, default_max_tokens=16)
    gens = completion_inputs(CompletionRequest.model_validate(wire_json), None, limits, "r")
    (routed,) = gens.inputs
    assert routed.prompt_ids == request.prompt_token_ids
    assert routed.params == sampling_params(request)
    assert routed.params.ignore_eos and routed.params.max_tokens == 7


def test_the_engine_target_imports_no_torch_and_no_http_client():
    """The GPU machines have no openai or httpx: the engine target must not need them (the
    worker, a child process, imports torch)."""
    modules = [f"alignedserve.bench.{m}" for m in ("cli", "runner", "engine_target")]
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "assert not {'torch', 'openai', 'httpx'} & set(sys.modules), sys.modules.keys()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- real runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_offline_and_poisson_runs_on_the_engine(model_dir, policy, tmp_path, capsys):
    argv = ["--target", "engine", "--model", model_dir, "--policy", policy]
    argv += ["--pool-gib", POOL_GIB, "--workload", "fixed-24-6", "--num-requests", "10"]
    argv += ["--max-concurrency", "4", "--rate", "inf", "--rate", "40", "--out", str(tmp_path)]
    assert run_bench(parse(*argv)) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    config = report["config"]
    assert config["model"] == Path(model_dir).name  # the worker's name for it
    assert config["engine"]["policy"] == policy
    assert config["vocab_size"] == VOCAB  # the default 32000 fitted to the model's
    title = (tmp_path / "bench.md").read_text().split("\n", 1)[0]
    assert f"on the in-process engine ({policy}, worker on cpu)" in title
    assert title in capsys.readouterr().out
    assert [run["load"] for run in report["runs"]] == ["offline", "40 req/s"]
    for run in report["runs"]:
        rows, summary = run["requests"], run["summary"]
        assert sorted(r["request_id"] for r in rows) == [f"req-{i:06d}" for i in range(10)]
        assert all(r["error"] is None for r in rows)
        assert all((r["prompt_tokens"], r["completion_tokens"]) == (24, 6) for r in rows)
        assert all(r["num_chunks"] == 6 for r in rows)  # one delta per step, one token each
        assert (summary["num_ok"], summary["num_failed"], summary["num_not_sent"]) == (10, 0, 0)
        assert (summary["prompt_tokens"], summary["completion_tokens"]) == (240, 60)
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            s = summary[metric]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"], metric


def request(request_id: str, prompt_tokens: int, max_tokens: int) -> BenchRequest:
    prompt = tuple(100 + (7 * i) % 100 for i in range(prompt_tokens))
    return BenchRequest(request_id, 0.0, prompt, max_tokens)


def test_exact_lengths_then_a_timeout_aborts_in_the_engine(model_dir):
    lengths = {"a": (5, 1), "b": (40, 17), "c": (9, 3), "d": (130, 30), "e": (23, 8), "f": (64, 2)}
    requests = [request(rid, p, o) for rid, (p, o) in lengths.items()]
    long = request("long", 8, 1800)  # thousands of ms on a CPU: the 0.3 s timeout cuts it

    async def main():
        # the aligned knobs reach the live scheduler
        config = EngineTargetConfig(
            pool_gib=float(POOL_GIB), min_batch=2, max_batch_kv_fraction=0.8
        )
        async with EngineTarget(config, model_dir) as target:
            scheduler = target.engine.scheduler.config
            assert (scheduler.min_batch_size, scheduler.max_resident_kv_fraction) == (2, 0.8)
            run = await run_load(target, requests, Offline(4), timeout_s=60)
            cut = await run_load(target, [long, request("late", 8, 2)], Offline(1), 0.3)
            engine_after_cut = (target.engine.num_live, target.engine.load())
            again = await run_load(target, [request("again", 8, 3)], Offline(1), 60)
            return run, cut, engine_after_cut, again

    run, cut, (num_live, load), again = asyncio.run(main())
    for r in run.records:
        prompt_tokens, max_tokens = lengths[r.request_id]
        assert r.is_ok, r.error
        assert (r.prompt_tokens, r.completion_tokens) == (prompt_tokens, max_tokens)
        assert sum(c.num_tokens for c in r.chunks) == max_tokens
        times = [r.send_s, *(c.time_s for c in r.chunks), r.end_s]
        assert times == sorted(times)
    s = summarize(run, Slo())
    assert (s.num_ok, s.completion_tokens) == (6, 1 + 17 + 3 + 30 + 8 + 2)
    assert s.ttft_s is not None and s.tpot_s is not None  # the shared metrics, from the deltas
    (cancelled,) = cut.records
    assert cancelled.request_id == "long" and "timeout" in cancelled.error
    assert cut.num_not_sent == 1  # "late" waited for the slot
    assert num_live == 0 and load["kv_pool_usage"] == 0.0  # aborted, its blocks freed
    assert load["num_running"] == 0 and load["num_waiting"] == 0
    (served,) = again.records  # the engine keeps serving
    assert served.is_ok and served.completion_tokens == 3


class DyingWorker:
    """A worker Supervisor whose worker exits at once (as on a bad model directory) and is
    restarted: what the target sees while the engine retries its connection."""

    def __init__(self):
        self.restarts = 0
        self.process = SimpleNamespace(returncode=1)

    async def run(self) -> None:
        await asyncio.sleep(0.2)
        self.restarts = 1


def test_a_worker_that_cannot_start_fails_the_target_at_once():
    async def main():
        target = EngineTarget(EngineTargetConfig(pool_gib=float(POOL_GIB)))
        # nothing listens there: the engine keeps reconnecting for worker_recovery_s (60 s)
        batcher = BatcherConfig(worker=f"127.0.0.1:{free_port()}", pool_gib=float(POOL_GIB))
        target.engine = BatcherEngine(batcher.engine_config())
        worker = DyingWorker()
        dying = asyncio.create_task(worker.run())
        try:
            await target._start_engine(worker)
        finally:
            await dying
            await target.engine.stop()

    start_s = time.monotonic()
    with pytest.raises(UnavailableError, match=r"the worker exited while starting \(code 1\)"):
        asyncio.run(main())
    assert time.monotonic() - start_s < 5
