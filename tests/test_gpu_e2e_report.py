"""benchmarks/e2e_report.py (e2e_report.py's report) over repeated offline runs: each run is its
own row, and the spread line compares the variants' medians (on hand-made bench results)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from factories import benchmark_module


@pytest.fixture(scope="module")
def e2e_report():
    return benchmark_module("e2e_report")


def write_run(
    work: Path,
    variant: str,
    part: str,
    load: str,
    tok_s: float,
    duration_s: float = 0.0,
    num_failed: int = 0,
    num_not_sent: int = 0,
) -> None:
    summary = {"output_tokens_per_s": tok_s, "requests_per_s": tok_s / 100, "tpot_s": None}
    summary.update(ttft_s=None, num_failed=num_failed, num_not_sent=num_not_sent)
    if duration_s:
        summary["duration_s"] = duration_s
    out = work / variant / part
    out.mkdir(parents=True)
    run = {"load": load, "shape": {}, "summary": summary, "requests": []}
    (out / "bench.json").write_text(json.dumps({"runs": [run]}))


def report_args() -> SimpleNamespace:
    """gpu_e2e's command line, as make_report reads it."""
    return SimpleNamespace(
        model_shape="llama3-8b",
        tiny=True,
        policies=["fcfs-dp2", "aligned"],
        baseline="fcfs-dp2",
        device="cpu",
        prefetch_device="",
        workload="paper-90",
        num_requests=8,
        rate=[],
        rate_fraction=[],
        pool_gib=1.0,
        device_kv_gib=1.0,
        peer_requests=0,
        offline_repeats=1,
        num_clients=3,
        num_routers=2,
    )


def test_repeated_offline_runs_are_rows_of_their_own_and_their_medians_are_compared(
    e2e_report, tmp_path
):
    for variant, values in (("aligned", [5100, 4600, 4900]), ("fcfs-dp2", [4500, 5300, 5000])):
        for k, tok_s in enumerate(values, start=1):
            write_run(tmp_path, variant, e2e_report.offline_part(k), "offline", tok_s)
        write_run(tmp_path, variant, "online", "25 req/s", values[0] - 100)
    write_run(tmp_path, "aligned", "offline-x", "offline", 1.0)  # not a repeat: ignored
    runs = e2e_report.load_runs(tmp_path)
    assert list(runs) == ["offline", "offline #2", "offline #3", "25 req/s"]
    assert runs["offline #3"]["fcfs-dp2"]["summary"]["output_tokens_per_s"] == 5000
    spread = e2e_report.offline_spread(runs, "fcfs-dp2")
    assert spread["output_tokens_per_s"] == {
        "aligned": [5100, 4600, 4900],
        "fcfs-dp2": [4500, 5300, 5000],
    }
    assert spread["median_ratio"] == pytest.approx(4900 / 5000)
    assert (spread["min_ratio"], spread["max_ratio"]) == pytest.approx((4600 / 5300, 5100 / 4500))
    line = e2e_report.offline_spread_line(spread, "fcfs-dp2", 1.2)
    assert "**0.98×** (≥ 1.2×: missed)" in line and "0.87–1.13×" in line


def test_one_offline_run_has_no_spread(e2e_report, tmp_path):
    write_run(tmp_path, "aligned", "offline", "offline", 5100)
    write_run(tmp_path, "fcfs-dp2", "offline", "offline", 4500)
    write_run(tmp_path, "fcfs-dp2", e2e_report.offline_part(2), "offline", 4600)
    runs = e2e_report.load_runs(tmp_path)
    assert list(runs) == ["offline", "offline #2"]
    assert e2e_report.offline_spread(runs, "fcfs-dp2") is None  # aligned ran once


def test_a_variant_that_failed_is_reported_with_its_reason(e2e_report, tmp_path):
    """A variant whose server never became ready leaves its reason; the report names it."""
    (tmp_path / "aligned").mkdir()
    (tmp_path / "aligned" / e2e_report.FAILED).write_text("TimeoutError: never ready")
    assert e2e_report.failures(tmp_path) == {"aligned": "TimeoutError: never ready"}
    args = report_args()
    runs = e2e_report.load_runs(tmp_path)
    report = e2e_report.make_report(args, tmp_path, runs, {}, 8, "cpu")
    assert report["failures"] == {"aligned": "TimeoutError: never ready"}
    markdown = e2e_report.render_markdown(report)
    assert "**aligned failed**: TimeoutError: never ready" in markdown
    assert "3 bench client processes; 2 router process(es)" in markdown


def test_a_run_cut_short_is_not_judged_nor_counted_in_the_spread(e2e_report, tmp_path):
    """A bench run stopped at its time cap with requests unfinished (as gpu_e2e's deadline
    did to fcfs-dp2 on 2xH200 in the thirty-second session: 77 of 160 unfinished, so 927
    tok/s) measured the cap, not the server: its ratio gets no verdict, and the offline
    spread leaves it out."""
    for k, (a, b) in enumerate([(2100, 2400), (2200, 2500), (2140, 930)], start=1):
        write_run(tmp_path, "aligned", e2e_report.offline_part(k), "offline", a)
        unsent = 77 if k == 3 else 0  # never sent, as unfinished as failed ones
        part = e2e_report.offline_part(k)
        write_run(tmp_path, "fcfs-dp2", part, "offline", b, num_not_sent=unsent)
    runs = e2e_report.load_runs(tmp_path)
    spread = e2e_report.offline_spread(runs, "fcfs-dp2")
    assert spread["output_tokens_per_s"]["fcfs-dp2"] == [2400, 2500]
    assert spread["median_ratio"] == pytest.approx(2140 / 2450)
    report = e2e_report.make_report(report_args(), tmp_path, runs, {}, 8, "cpu")
    cut = report["cells"][2]
    assert cut["throughput_ratio"] == pytest.approx(2140 / 930)
    assert cut["throughput_met"] is cut["tpot_met"] is None
    assert cut["unjudged"] == e2e_report.UNJUDGED
    assert report["cells"][0]["throughput_met"] is False
    markdown = e2e_report.render_markdown(report)
    assert "2.30× (≥ 1.2×: not judged, requests unfinished or failed)" in markdown
    assert e2e_report.offline_capacity(runs, "fcfs-dp2") == pytest.approx(21.0)
    runs["offline"] = runs["offline #3"]  # a cut-short run sets no capacity
    assert e2e_report.offline_capacity(runs, "fcfs-dp2") is None
    assert "– (≥ 2×: not judged, requests unfinished or failed)" in markdown
    assert "fcfs-dp2: 77 requests unfinished (run timeout)" in markdown
    assert "met)" not in markdown.split("### ")[0]


def write_worker_log(work: Path, variant: str, name: str, seconds_with_tokens: int) -> None:
    """A worker's 1 s stats lines: this many windows with tokens, then two idle ones."""
    line = (
        "2026-11-21 00:00:00,000 INFO alignedserve.worker.service: {tok} tokens/s, 120 resident "
        "requests, device KV 5.0% used; 100 steps 10.0 ms apart (100 launched before the "
        "previous was answered): 14.0 ms from plan to answer (3.0 ms queueing it on the host), "
        "decode device 9.0 ms, prefill device 0.0 ms; idle 0%; 0.0 s capturing graphs"
    )
    logs = work / variant / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lines = [line.format(tok="12000.0")] * seconds_with_tokens + [line.format(tok="0.0")] * 2
    (logs / f"{name}.log").write_text("\n".join(lines) + "\n")


def test_a_variant_whose_workers_finished_long_before_its_bench_is_flagged_front_end_bound(
    e2e_report, tmp_path
):
    """fcfs-dp2's workers made tokens for 25 s of a 40 s bench (its clients still reading
    what the router had not yet sent, as on 2xH200 in the fourteenth session): the report
    says so, since its tokens/s then measure the front end. aligned's 27 s of 28 s is not."""
    write_run(tmp_path, "fcfs-dp2", "offline", "offline", 12152, duration_s=40.4)
    write_run(tmp_path, "aligned", "offline", "offline", 18011, duration_s=27.3)
    for name in ("worker-0", "worker-1"):
        write_worker_log(tmp_path, "fcfs-dp2", name, 25)
    write_worker_log(tmp_path, "aligned", "serve", 27)
    runs = e2e_report.load_runs(tmp_path)
    busy = e2e_report.gpu_busy(tmp_path, ["fcfs-dp2", "aligned"], runs)
    assert busy["fcfs-dp2"]["front_end_bound"] and not busy["aligned"]["front_end_bound"]
    assert busy["fcfs-dp2"]["bench_s"] == pytest.approx(40.4)
    assert busy["aligned"]["logs"]["serve"]["window_s"] == pytest.approx(27.0)
    report = e2e_report.make_report(report_args(), tmp_path, runs, {}, 8, "cpu")
    assert report["gpu_busy"] == busy
    markdown = e2e_report.render_markdown(report)
    assert "**Front-end bound**: fcfs-dp2's workers made tokens for 25 s of its bench's 40 s" in (
        markdown
    )
    assert "aligned's workers" not in markdown


def test_every_variant_is_described_in_the_report_and_the_runner(e2e_report):
    """A variant added to the list is also said in words: in the report's text and in
    gpu_e2e.py's docstring (its --help), as an item of its list of variants."""
    assert set(e2e_report.VARIANT_TEXT) == set(e2e_report.VARIANTS)
    doc = benchmark_module("gpu_e2e").__doc__
    listed = set(re.findall(r"^- ([a-z0-9-]+)[:( ]", doc, flags=re.MULTILINE))
    assert set(e2e_report.VARIANTS) <= listed, set(e2e_report.VARIANTS) - listed


def test_against_another_projects_server_every_variant_gets_ratios_and_no_verdict(
    e2e_report, tmp_path
):
    """With vLLM as the baseline, each of our variants is compared with it load by load;
    issue 6's targets are against fcfs, so no cell says met or missed."""
    for variant, tok_s in (("aligned", 1800), ("fcfs", 2400), ("vllm", 2000)):
        write_run(tmp_path, variant, "offline", "offline", tok_s)
    (tmp_path / "vllm" / "offline" / "bench.md").write_text("| vllm's bench table |")
    args = report_args()
    args.policies, args.baseline = ["vllm", "fcfs", "aligned"], "vllm"
    runs = e2e_report.load_runs(tmp_path)
    markdown = e2e_report.render_markdown(
        e2e_report.make_report(args, tmp_path, runs, {}, 8, "cpu")
    )
    assert "| offline | fcfs | 1.20× | –× |" in markdown
    assert "| offline | aligned | 0.90× | –× |" in markdown
    assert "| offline | vllm | " not in markdown.split("÷ vllm output tok/s")[1]
    assert "met)" not in markdown and "missed)" not in markdown
    assert "### vllm/offline\n\n| vllm's bench table |" in markdown  # the tables follow
