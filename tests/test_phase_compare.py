"""benchmarks/phase_compare.py's workload arguments and its table (on hand-made summaries);
the servers it starts are e2e_servers.py's, tested in test_e2e_servers.py."""

from __future__ import annotations

import argparse

import pytest

from factories import benchmark_module


@pytest.fixture(scope="module")
def phase_compare():
    return benchmark_module("phase_compare")


def test_a_workload_is_a_name_and_a_request_count(phase_compare):
    assert phase_compare.parse_workload("fixed-2048-1:240") == ("fixed-2048-1", 240)
    for bad in ("paper-90", "paper-90:", ":8", "paper-90:0", "paper-90:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:REQUESTS"):
            phase_compare.parse_workload(bad)


def test_the_table_gives_each_variant_its_ratio_to_the_first_and_marks_what_is_missing(
    phase_compare,
):
    def summary(tok_s, tpot_p99_s):
        return {
            "output_tokens_per_s": tok_s,
            "total_tokens_per_s": 10 * tok_s,
            "ttft_s": {"p50": 1.5},
            "tpot_s": None if tpot_p99_s is None else {"p50": 0.02, "p99": tpot_p99_s},
        }

    results = {
        "fixed-128-512:256": {"vllm-samekv": summary(5000, 0.05), "fcfs": summary(4000, 0.04)},
        "fixed-2048-1:240": {"vllm-samekv": summary(240, None)},  # fcfs failed to start
    }
    text = phase_compare.markdown(results, ["vllm-samekv", "fcfs"], "1 × H200")
    decode = text.split("## fixed-2048-1:240")[0]
    assert "| vllm-samekv | 5,000.00 | 50,000.00 | 1.50 | 20.00 | 50.00 | 1.00× |" in decode
    assert "| fcfs | 4,000.00 | 40,000.00 | 1.50 | 20.00 | 40.00 | 0.80× |" in decode
    prefill = text.split("## fixed-2048-1:240")[1]
    assert "| vllm-samekv | 240.00 | 2,400.00 | 1.50 | – | – | 1.00× |" in prefill
    assert "| fcfs | – | – | – | – | – | – |" in prefill
