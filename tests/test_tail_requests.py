"""benchmarks/tail_requests.py: a run's slowest requests, from a bench's JSON or an archive."""

from __future__ import annotations

import io
import json
import tarfile

from factories import benchmark_module

tail = benchmark_module("tail_requests")


def bench(tpots_ms: list[float | None]) -> dict:
    requests = [
        {
            "request_id": f"r{i}",
            "send_s": 0.5,
            "ttft_s": 1.0,
            "tpot_s": None if t is None else t / 1e3,
            "e2e_s": 2.0 + i,
            "prompt_tokens": 100 + i,
            "completion_tokens": 10 + i,
            "error": "timeout" if i == 1 else None,
        }
        for i, t in enumerate(tpots_ms)
    ]
    summary = {"tpot_s": {"p99": 0.0425}}
    return {"runs": [{"load": "offline", "summary": summary, "requests": requests}]}


def test_the_slowest_requests_come_first_without_failed_or_one_token_ones(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench([20.0, 99.0, 41.0, None, 30.0])))
    (name, loaded), *rest = tail.bench_files(path)
    lines = tail.report(name, loaded, top=2)
    assert not rest and len(lines) == 3
    assert lines[0].endswith("[offline]: 3 requests, p99 TPOT 42.5 ms")
    assert "TPOT   41.0 ms  output   12  prompt   102" in lines[1]  # r1 failed: left out
    assert "done at   4.50 s" in lines[1]
    assert "TPOT   30.0 ms  output   14" in lines[2]


def test_an_archive_yields_each_bench_by_variant_and_load(tmp_path):
    path = tmp_path / "gpu_e2e_opt-13b.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for variant in ("fcfs-dp2", "aligned"):
            data = json.dumps(bench([25.0])).encode()
            member = tarfile.TarInfo(f"gpu_e2e_opt-13b/{variant}/offline/bench.json")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    names = [name for name, _ in tail.bench_files(path)]
    assert names == ["aligned/offline", "fcfs-dp2/offline"]
