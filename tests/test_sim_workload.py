"""Workload generators for the simulator: seeded, in range, right mix, right arrival process."""

from __future__ import annotations

import numpy as np
import pytest

from alignedserve.batcher.sim.workload import (
    WORKLOADS,
    fixed,
    long_context,
    paper_mix,
    sharegpt_like,
)

GENERATORS = [
    lambda n, seed, rate=None: paper_mix(n, 0.8, seed, rate),
    sharegpt_like,
    long_context,
]


@pytest.mark.parametrize("make", GENERATORS)
def test_seeded(make):
    assert make(500, 7, 3.0) == make(500, 7, 3.0)
    assert make(500, 7) == make(500, 7)
    assert make(500, 7, 3.0) != make(500, 8, 3.0)


@pytest.mark.parametrize("make", GENERATORS)
def test_lengths_do_not_depend_on_rate(make):
    offline, online = make(300, 3), make(300, 3, 10.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in offline] == [
        (r.prompt_tokens, r.output_tokens) for r in online
    ]


@pytest.mark.parametrize("fraction", [0.7, 0.8, 0.9, 0.95])
def test_paper_short_fraction(fraction):
    reqs = paper_mix(10_000, fraction, seed=1)
    short = np.mean([r.prompt_tokens < 1024 for r in reqs])
    assert abs(short - fraction) <= 0.03


def test_paper_ranges():
    reqs = paper_mix(10_000, 0.5, seed=2, max_output_tokens=300)
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    short, long = prompts[prompts < 1024], prompts[prompts >= 1024]
    assert short.min() >= 32 and short.max() <= 1023
    assert long.min() >= 1024 and long.max() <= 8192
    assert outputs.min() >= 16 and outputs.max() <= 300
    # Uniform: both ends are reached in 10k draws of ~300 values.
    assert outputs.min() == 16 and outputs.max() == 300


def test_sharegpt_ranges_and_shape():
    reqs = sharegpt_like(20_000, seed=3)
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    assert prompts.min() >= 4 and prompts.max() <= 8192
    assert outputs.min() >= 1 and outputs.max() <= 2048
    assert 170 <= np.median(prompts) <= 230
    assert 125 <= np.median(outputs) <= 175
    assert prompts.max() > 2000  # a long tail


def test_long_context_ranges():
    reqs = long_context(5_000, seed=4)
    assert all(8192 <= r.prompt_tokens <= 32768 for r in reqs)
    assert all(64 <= r.output_tokens <= 512 for r in reqs)


def test_fixed():
    reqs = fixed(10, 100, 20)
    assert all((r.prompt_tokens, r.output_tokens, r.arrival_s) == (100, 20, 0.0) for r in reqs)
    assert len({r.request_id for r in reqs}) == 10


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_offline_arrivals_are_zero(name):
    assert all(r.arrival_s == 0.0 for r in WORKLOADS[name](200, 0, None))


@pytest.mark.parametrize("rate", [0.5, 20.0])
def test_poisson_arrivals(rate):
    reqs = paper_mix(20_000, 0.9, seed=5, rate_per_s=rate)
    arrivals = np.array([r.arrival_s for r in reqs])
    assert np.all(np.diff(arrivals) >= 0)
    assert arrivals[0] > 0
    mean_gap = arrivals[-1] / len(arrivals)
    assert mean_gap == pytest.approx(1.0 / rate, rel=0.05)
    # Exponential gaps: standard deviation ≈ mean.
    gaps = np.diff(arrivals)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_registry(name):
    reqs = WORKLOADS[name](123, 9, 4.0)
    assert len(reqs) == 123
    assert len({r.request_id for r in reqs}) == 123
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in reqs)
    assert WORKLOADS[name](0, 9, None) == []


def test_registry_names():
    assert set(WORKLOADS) == {
        "paper-70",
        "paper-80",
        "paper-90",
        "paper-95",
        "sharegpt",
        "long-context",
    }


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        paper_mix(10, 1.5, seed=0)
    with pytest.raises(ValueError):
        paper_mix(10, 0.5, seed=0, rate_per_s=0.0)
    with pytest.raises(ValueError):
        fixed(-1, 10, 10)
