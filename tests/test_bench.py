"""`alignedserve bench`: the metrics on hand-made records (exactly as defined), the workloads'
exact prompts, the load shapes against a fake target, and a whole run against the real stack
on a tiny model."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import time

import pytest
from test_e2e import Stack

from alignedserve.batcher.sim.workload import paper_mix
from alignedserve.bench.cli import BenchConfig, add_arguments, config_from_args, run_bench
from alignedserve.bench.clients import run_load_in_processes, split_shape
from alignedserve.bench.metrics import Slo, itls_s, stats, summarize, tpot_s
from alignedserve.bench.records import Chunk, RequestRecord, RunRecords
from alignedserve.bench.runner import run_load
from alignedserve.bench.shapes import Concurrency, Offline, Poisson
from alignedserve.bench.targets import OpenAITarget, _chunk_tokens
from alignedserve.bench.workload import (
    FIXED_GRID,
    BenchRequest,
    make_requests,
    token_id_range,
    workload_names,
)
from alignedserve.common.errors import ConfigError
from alignedserve.serve import ServeConfig
from alignedserve.worker.tiny import VOCAB, init_tiny

# ---- metrics ---------------------------------------------------------------------------------


def record(
    send_s: float,
    chunks: list[tuple[float, int]],
    end_s: float,
    error: str | None = None,
    prompt_tokens: int = 10,
) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{send_s}",
        send_s=send_s,
        end_s=end_s,
        chunks=tuple(Chunk(t, n) for t, n in chunks),
        prompt_tokens=prompt_tokens,
        completion_tokens=sum(n for _, n in chunks),
        error=error,
    )


# Four tokens, the last chunk carrying two; one token; one failure that ends the run at 2.0 s.
FOUR = record(0.0, [(0.1, 1), (0.2, 1), (0.4, 2)], end_s=0.5)
ONE = record(1.0, [(1.3, 1)], end_s=1.3)
FAILED = record(0.5, [(0.6, 1)], end_s=2.0, error="APIError: boom")
RUN = RunRecords((FOUR, ONE, FAILED), num_not_sent=3)


def test_per_request_metrics():
    assert tpot_s(FOUR) == pytest.approx((0.5 - 0.1) / 3)
    assert tpot_s(ONE) is None  # a single output token has no time per output token
    assert itls_s(FOUR) == pytest.approx([0.1, 0.1, 0.1])  # the 2-token chunk: 2 gaps of 0.1
    assert itls_s(ONE) == []


def test_percentiles_interpolate_linearly():
    s = stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.mean, s.p50, s.p90, s.p99) == pytest.approx((3.0, 3.0, 4.6, 4.96))
    assert stats([]) is None


def test_summary_counts_only_successes_over_the_whole_wall_time():
    s = summarize(RUN, Slo())
    assert (s.num_ok, s.num_failed, s.num_not_sent) == (2, 1, 3)
    assert s.duration_s == pytest.approx(2.0)  # first send (0.0) to last end (2.0)
    assert (s.prompt_tokens, s.completion_tokens) == (20, 5)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.output_tokens_per_s == pytest.approx(2.5)
    assert s.total_tokens_per_s == pytest.approx(12.5)
    assert s.goodput_requests_per_s is None  # no SLO given
    assert s.ttft_s.p50 == pytest.approx(0.2)  # of 0.1 and 0.3
    assert s.tpot_s.p99 == pytest.approx(0.4 / 3)  # ONE left out
    assert s.itl_s.mean == pytest.approx(0.1)
    assert s.e2e_s.p50 == pytest.approx(0.4)  # of 0.5 and 0.3


@pytest.mark.parametrize(
    ("slo", "goodput"),
    [
        (Slo(ttft_s=0.2), 0.5),  # FOUR (0.1 s) meets it, ONE (0.3 s) does not
        (Slo(tpot_s=0.1), 0.5),  # FOUR (0.133 s) misses; ONE has no TPOT, so meets it
        (Slo(ttft_s=0.2, tpot_s=0.1), 0.0),
        (Slo(ttft_s=1.0, tpot_s=1.0), 1.0),
    ],
)
def test_goodput_counts_successes_meeting_every_slo(slo, goodput):
    assert summarize(RUN, slo).goodput_requests_per_s == pytest.approx(goodput)


def chunk(text: str, finish: str | None = None, usage: int | None = None, choices: bool = True):
    """A streamed /v1/completions chunk as parsed from its server-sent event."""
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "object": "text_completion",
        "choices": [choice] if choices else [],
        "usage": None
        if usage is None
        else {"prompt_tokens": 4, "completion_tokens": usage, "total_tokens": 4 + usage},
    }


def test_chunk_tokens_from_usage_else_one_per_chunk():
    assert _chunk_tokens(chunk("ab", usage=3), num_counted=1) == 2  # per-chunk usage: exact
    assert _chunk_tokens(chunk("", usage=3, choices=False), num_counted=3) == 0  # usage only
    assert _chunk_tokens(chunk("a"), num_counted=5) == 1
    assert _chunk_tokens(chunk("", finish="length"), num_counted=5) == 1
    assert _chunk_tokens(chunk(""), num_counted=5) == 0


# ---- workloads -------------------------------------------------------------------------------


def test_fixed_workload_prompts_are_exact_and_seeded():
    requests = make_requests("fixed-32-8", 16, seed=3, rate_per_s=None, vocab_size=VOCAB)
    low, high = token_id_range(VOCAB)
    assert len(requests) == 16
    for r in requests:
        assert len(r.prompt_token_ids) == 32 and r.max_tokens == 8 and r.arrival_s == 0.0
        assert all(low <= t < high for t in r.prompt_token_ids)
    assert requests == make_requests("fixed-32-8", 16, seed=3, rate_per_s=None, vocab_size=VOCAB)
    assert requests != make_requests("fixed-32-8", 16, seed=4, rate_per_s=None, vocab_size=VOCAB)


def test_named_workload_keeps_the_simulators_lengths():
    sims = paper_mix(50, 0.9, seed=1)
    requests = make_requests("paper-90", 50, seed=1, rate_per_s=None, vocab_size=32000)
    assert [len(r.prompt_token_ids) for r in requests] == [s.prompt_tokens for s in sims]
    assert [r.max_tokens for r in requests] == [s.output_tokens for s in sims]


def test_runs_of_a_sweep_share_lengths_not_prompts():
    offline = make_requests("sharegpt", 20, seed=0, rate_per_s=None, vocab_size=32000)
    online = make_requests("sharegpt", 20, 0, rate_per_s=5.0, vocab_size=32000, run_index=1)
    assert [len(r.prompt_token_ids) for r in online] == [len(r.prompt_token_ids) for r in offline]
    assert all(
        a.prompt_token_ids != b.prompt_token_ids for a, b in zip(offline, online, strict=True)
    )
    arrivals = [r.arrival_s for r in online]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_workload_names_and_token_ranges():
    assert {"paper-70", "paper-95", "sharegpt", "long-context", *FIXED_GRID} <= set(
        workload_names()
    )
    assert token_id_range(32000) == (1000, 31000)
    assert token_id_range(VOCAB) == (80, 240)
    with pytest.raises(ConfigError, match="workload='nope'"):
        make_requests("nope", 1, 0, None, 32000)


# ---- configuration ---------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_map_onto_the_config_and_its_shapes():
    config = config_from_args(
        parse("--rate", "inf", "--rate", "2.5", "--concurrency", "4", "--max-concurrency", "9")
    )
    assert config.shapes() == [Offline(9), Poisson(2.5), Concurrency(4)]
    assert config_from_args(parse()) == BenchConfig()
    assert BenchConfig().shapes() == [Offline(BenchConfig().max_concurrency)]


@pytest.mark.parametrize(
    "bad",
    [
        {"workload": "fixed-1"},
        {"num_requests": 0},
        {"rates": (0.0,)},
        {"rates": (float("nan"),)},
        {"concurrencies": (0,)},
        {"timeout_s": 0.0},
        {"slo_tpot_s": -1.0},
        {"num_clients": 0},
        {"num_clients": 4, "max_concurrency": 3},
        {"num_clients": 2, "concurrencies": (1,)},
    ],
)
def test_bad_config_is_a_clean_error(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        BenchConfig(**bad)


# ---- load shapes, against a fake target ------------------------------------------------------


class FakeTarget:
    """Streams max_tokens tokens one per gap_s; counts the requests in flight."""

    def __init__(self, gap_s: float):
        self.gap_s = gap_s
        self.num_in_flight = 0
        self.max_in_flight = 0

    async def run(self, request: BenchRequest) -> RequestRecord:
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        send_s, chunks = time.perf_counter(), []
        try:
            for _ in range(request.max_tokens):
                await asyncio.sleep(self.gap_s)
                chunks.append(Chunk(time.perf_counter(), 1))
        finally:
            self.num_in_flight -= 1
        return RequestRecord(request.request_id, send_s, time.perf_counter(), tuple(chunks), 4, 2)


def fixed_requests(n: int, rate_per_s: float | None = None) -> list[BenchRequest]:
    return make_requests("fixed-4-2", n, seed=0, rate_per_s=rate_per_s, vocab_size=VOCAB)


@pytest.mark.parametrize(("shape", "bound"), [(Offline(3), 3), (Concurrency(2), 2)])
def test_slots_bound_the_requests_in_flight_and_keep_their_order(shape, bound):
    target = FakeTarget(gap_s=0.005)
    run = asyncio.run(run_load(target, fixed_requests(10), shape, timeout_s=10))
    assert target.max_in_flight == bound
    assert all(r.is_ok for r in run.records) and run.num_not_sent == 0
    assert [r.request_id for r in sorted(run.records, key=lambda r: r.send_s)] == [
        r.request_id for r in run.records
    ]


def test_poisson_sends_each_request_at_its_arrival():
    requests = fixed_requests(8, rate_per_s=50.0)
    before_s = time.perf_counter()  # the run starts later: arrivals count from then
    run = asyncio.run(run_load(FakeTarget(gap_s=0.001), requests, Poisson(50.0), timeout_s=10))
    for sent, planned in zip(run.records, requests, strict=True):
        assert sent.send_s - before_s >= planned.arrival_s - 0.002  # never early


def test_timeout_cancels_requests_out_and_counts_those_never_sent():
    target = FakeTarget(gap_s=0.25)  # 0.5 s per request
    run = asyncio.run(run_load(target, fixed_requests(6), Offline(2), timeout_s=0.2))
    assert len(run.records) == 2 and run.num_not_sent == 4
    assert all(r.error is not None and "timeout" in r.error for r in run.records)
    s = summarize(run, Slo())
    assert (s.num_ok, s.num_failed, s.num_not_sent, s.requests_per_s) == (0, 2, 4, 0.0)


def test_a_shape_is_shared_among_clients():
    assert split_shape(Offline(10), 3) == [Offline(4), Offline(3), Offline(3)]
    assert split_shape(Concurrency(4), 4) == [Concurrency(1)] * 4
    assert split_shape(Poisson(2.5), 2) == [Poisson(2.5)] * 2  # the arrival times travel
    with pytest.raises(ConfigError, match="cannot be shared"):
        split_shape(Concurrency(2), 3)


def test_bench_modules_import_no_torch():
    modules = [f"alignedserve.bench.{m}" for m in ("cli", "runner", "targets", "plots", "clients")]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nassert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- end to end, against the real stack ------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model_dir = str(init_tiny(tmp_path_factory.mktemp("tiny"), arch="llama"))
    s = Stack(ServeConfig(model=model_dir, port=0, pool_gib=0.1, drain_s=5))
    yield s
    s.close()


def test_offline_and_poisson_runs_against_the_stack(stack, tmp_path, capsys):
    argv = ["--base-url", stack.url, "--workload", "fixed-32-8", "--num-requests", "16"]
    argv += ["--vocab-size", str(VOCAB), "--max-concurrency", "8", "--rate", "inf"]
    argv += ["--rate", "40", "--slo-ttft-s", "10", "--out", str(tmp_path)]
    assert run_bench(parse(*argv)) == 0
    if importlib.util.find_spec("matplotlib"):  # plots are optional: made when it is there
        assert {"tpot_cdf.png", "itl_hist.png"} <= {p.name for p in tmp_path.glob("*.png")}
    table = (tmp_path / "bench.md").read_text()
    assert "| offline |" in table and "| 40 req/s |" in table
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out  # the table is printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["model"] == stack.model and report["config"]["rates"] == ["inf", 40]
    assert [run["load"] for run in report["runs"]] == ["offline", "40 req/s"]
    for run in report["runs"]:
        rows, summary = run["requests"], run["summary"]
        assert len(rows) == 16
        assert all(r["error"] is None and r["completion_tokens"] == 8 for r in rows)
        assert all(r["prompt_tokens"] == 32 for r in rows)
        assert (summary["num_ok"], summary["num_failed"], summary["num_not_sent"]) == (16, 0, 0)
        assert summary["completion_tokens"] == 16 * 8
        for rate in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert summary[rate] > 0
        assert summary["goodput_requests_per_s"] == pytest.approx(summary["requests_per_s"])
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            s = summary[metric]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"], metric


@pytest.mark.parametrize("shape", [Offline(6), Poisson(40.0), Concurrency(3)])
def test_client_processes_share_a_run_and_merge_its_records(stack, shape):
    """Three client processes: every request is sent once, by one of them, within its share
    of the bound; the merged records are the run's, on one clock."""
    rate = shape.rate_per_s if isinstance(shape, Poisson) else None
    requests = make_requests("fixed-32-8", 12, seed=0, rate_per_s=rate, vocab_size=VOCAB)
    done = []
    before_s = time.perf_counter()
    run = asyncio.run(
        run_load_in_processes(stack.url, stack.model, requests, shape, 60, 3, done.append)
    )
    after_s = time.perf_counter()
    assert sorted(r.request_id for r in run.records) == sorted(r.request_id for r in requests)
    assert done == list(run.records) and run.num_not_sent == 0
    for r in run.records:  # (the stream may carry several tokens in one chunk)
        assert r.is_ok and r.completion_tokens == 8 == sum(c.num_tokens for c in r.chunks)
    assert all(before_s < r.send_s < r.chunks[0].time_s <= r.end_s < after_s for r in run.records)
    if isinstance(shape, Poisson):  # one start for all: each sent at its arrival, never early
        start_s = min(r.send_s for r in run.records) - requests[0].arrival_s
        by_id = {r.request_id: r for r in run.records}
        for planned in requests:
            assert by_id[planned.request_id].send_s - start_s >= planned.arrival_s - 0.05


def test_client_processes_record_a_server_they_cannot_reach_as_failed_requests():
    requests = fixed_requests(3)
    run = asyncio.run(run_load_in_processes("http://127.0.0.1:9", "m", requests, Offline(2), 10, 2))
    assert sorted(r.request_id for r in run.records) == sorted(r.request_id for r in requests)
    assert all(r.error and "ConnectError" in r.error for r in run.records)


def test_the_http_target_records_the_servers_error_and_counts_exact_tokens(stack):
    """Each answer of the server ends in a record: an error answer's OpenAI message is kept
    (the request failed, not the run), and a good stream's tokens are counted exactly."""
    (good,) = fixed_requests(1)
    too_long = BenchRequest("too-long", 0.0, good.prompt_token_ids, max_tokens=1 << 20)

    async def send() -> list[RequestRecord]:
        async with OpenAITarget(stack.url, stack.model, max_connections=2) as target:
            records = [await target.run(good), await target.run(too_long)]
        async with OpenAITarget(stack.url, "no-such-model", max_connections=1) as target:
            return [*records, await target.run(good)]

    ok, rejected, unknown = asyncio.run(send())
    assert ok.error is None and ok.completion_tokens == 2 and len(ok.chunks) == 2
    assert (ok.prompt_tokens, sum(c.num_tokens for c in ok.chunks)) == (4, 2)
    assert rejected.error.startswith("HTTP 400: ") and "max_tokens" in rejected.error
    assert unknown.error.startswith("HTTP 404: ") and "no-such-model" in unknown.error
    assert not rejected.chunks and not unknown.chunks
