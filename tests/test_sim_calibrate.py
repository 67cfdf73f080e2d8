"""benchmarks/sim_calibrate.py: served decode steps read from the worker's stats lines, and a
calibration of the simulator's step fitted to them."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest

from alignedserve.batcher.sim.cost_model import SHAPES, GpuSpec

from factories import benchmark_module

cal = benchmark_module("sim_calibrate")

# Copied from docs/results/session36/call1_gpu_e2e_opt-13b.tar.gz, aligned/logs/serve.log.
SERVING = (
    "2026-11-23 07:10:24,815 INFO alignedserve.worker.server: worker serving opt-13b-random "
    "on 127.0.0.1:37223 (cuda:0)"
)
SCHEDULER = (
    "2026-11-23 07:10:44,149 INFO alignedserve.batcher.engine: scheduler: aligned policy, 7208 "
    "device blocks, decode cost balanced with weights = 31559 KV tokens"
)
IDLE = (
    "2026-11-23 07:11:22,543 INFO alignedserve.worker.service: 11.0 tokens/s, 1 resident "
    "requests, device KV 0.5% used; 11 steps 91.1 ms apart (10 launched before the previous was "
    "answered): 37.1 ms from plan to answer (13.1 ms queueing it on the host), decode device "
    "13.0 ms, prefill device 11.7 ms; idle 66%; 0.0 s capturing graphs; loads 47% over the "
    "decode device's own link"
)
BUSY = [
    "2026-11-23 07:12:19,414 INFO alignedserve.worker.service: 2475.5 tokens/s, 42 resident "
    "requests, device KV 39.6% used; 58 steps 17.5 ms apart (58 launched before the previous "
    "was answered): 33.3 ms from plan to answer (3.0 ms queueing it on the host), decode device "
    "17.5 ms, prefill device 17.6 ms; idle 0%; 0.0 s capturing graphs; loads 49% over the "
    "decode device's own link",
    "2026-11-23 07:12:20,432 INFO alignedserve.worker.service: 2350.2 tokens/s, 42 resident "
    "requests, device KV 43.3% used; 55 steps 18.5 ms apart (55 launched before the previous "
    "was answered): 35.4 ms from plan to answer (3.1 ms queueing it on the host), decode device "
    "18.5 ms, prefill device 8.8 ms; idle 0%; 0.0 s capturing graphs; loads 50% over the "
    "decode device's own link",
]
BATCHER = (
    "2026-11-23 07:12:16,356 INFO alignedserve.batcher.engine: 2174.1 tokens/s; 64 steps 15.7 ms "
    "apart: planning 0.6 ms, sending 0.3 ms, waiting for the worker 14.2 ms, applying answers "
    "0.5 ms each; requests: 1 waiting for prefill, 1 pooled, 42 on the device; KV pool 17.0% "
    "used; prefill device: requests waited with no batch queued there 0% of the time, with one "
    "slot free 4%; decode GPU prefill turns: 0, 0% of the time"
)
LOG = [SERVING, SCHEDULER, IDLE, *BUSY, BATCHER]


def test_a_worker_stats_line_is_read_field_by_field():
    line = cal.parse_worker_line(BUSY[1])
    assert line == cal.StatsLine(
        num_residents=42,
        kv_used_fraction=pytest.approx(0.433),
        num_steps=55,
        apart_s=pytest.approx(0.0185),
        decode_s=pytest.approx(0.0185),
        idle_fraction=0.0,
    )
    assert cal.parse_worker_line(IDLE).idle_fraction == pytest.approx(0.66)
    assert cal.parse_worker_line(IDLE).decode_s == pytest.approx(0.013)
    assert cal.parse_worker_line(BATCHER) is None  # the batcher's line, not the worker's
    assert cal.parse_worker_line(SCHEDULER) is None


def test_windows_take_the_model_and_kv_size_from_the_log_and_join_two_snapshots():
    idle, busy = cal.windows_from_log(LOG, "call1")
    assert idle.model == busy.model == "opt-13b" and busy.source == "call1"
    assert busy.residents == (42, 42) and busy.num_steps == 55
    # 7208 blocks of 16 tokens, less half a block per resident
    expected = [(f * 7208 - 21) * 16 for f in (0.396, 0.433)]
    assert busy.kv_tokens == pytest.approx(expected)
    assert busy.mean_kv_tokens == pytest.approx(sum(expected) / 2)
    assert busy.gap_s == pytest.approx(0.0)
    assert cal.is_steady(busy) and not cal.is_steady(idle)  # 66 % idle, 11 steps


def test_no_window_before_the_log_says_which_model_and_how_many_blocks():
    assert cal.windows_from_log([IDLE, *BUSY], "x") == []
    assert cal.shape_of("llama3-8b-random") == "llama3-8b"
    with pytest.raises(ValueError):
        cal.shape_of("mistral-7b")


def test_a_window_whose_kv_moved_a_lot_is_not_steady():
    (w,) = cal.windows_from_log([SERVING, SCHEDULER, *BUSY], "x")
    assert cal.is_steady(w)
    moved = dataclasses.replace(w, kv_tokens=(w.kv_tokens[0], 2 * w.kv_tokens[0]))
    assert not cal.is_steady(moved)
    assert not cal.is_steady(dataclasses.replace(w, num_steps=cal.MIN_STEPS - 1))
    assert not cal.is_steady(dataclasses.replace(w, residents=(0, 42)))


def archive(tmp_path, members: dict[str, str]):
    path = tmp_path / "call9_gpu_e2e_opt-13b.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_gives_every_aligned_variants_windows_and_no_fcfs_worker(tmp_path):
    log = "\n".join(LOG)
    path = archive(
        tmp_path,
        {
            "gpu_e2e_opt-13b/aligned/logs/serve.log": log,
            "gpu_e2e_opt-13b/aligned-pool80/logs/serve.log": log,
            "gpu_e2e_opt-13b/fcfs-dp2/logs/worker-0.log": log,
            "gpu_e2e_opt-13b/aligned/offline/bench.json": "{}",
        },
    )
    windows = cal.read_archive(path)
    sources = [w.source for w in windows]
    prefix = f"{tmp_path.name}/call9_opt-13b"
    assert sorted(sources) == [f"{prefix}/aligned"] * 2 + [f"{prefix}/aligned-pool80"] * 2


def synthetic(truth, rng: np.random.Generator, num_per_model: int = 60) -> list:
    """Windows over both models whose served step is exactly `truth`'s."""
    windows = []
    for model, max_kv in (("opt-13b", 90_000), ("llama3-8b", 120_000)):
        for _ in range(num_per_model):
            n = int(rng.integers(1, 120))
            kv = float(rng.uniform(100 * n, max_kv))
            decode_s = truth.decode_s(model, n, kv)
            windows.append(cal.Window("syn", model, (n, n), (kv, kv), 100, decode_s, decode_s, 0.0))
    return windows


@pytest.mark.parametrize(
    ("truth", "free"),
    [
        (cal.Calibration(hbm_efficiency=0.87, fixed_s=0.6e-3), ("hbm", "fixed")),
        (cal.Calibration(hbm_efficiency=0.93, per_layer_s=20e-6), ("hbm", "per_layer")),
        (cal.Calibration(hbm_efficiency=0.8), ("hbm",)),
        (cal.Calibration(fixed_s=1.5e-3, graph_batch=True), ("fixed",)),
    ],
)
def test_the_fit_recovers_the_parameters_that_made_the_windows(truth, free):
    windows = synthetic(truth, np.random.default_rng(7))
    found = cal.fit(windows, free, graph_batch=truth.graph_batch)
    assert found.hbm_efficiency == pytest.approx(truth.hbm_efficiency, rel=1e-9)
    assert found.fixed_s == pytest.approx(truth.fixed_s, rel=1e-9)
    assert found.per_layer_s == pytest.approx(truth.per_layer_s, rel=1e-9, abs=1e-15)
    for model in SHAPES:
        assert cal.ratios(windows, found, model) == pytest.approx(1.0)


def test_a_fit_without_the_graph_batch_misses_windows_made_with_it():
    truth = cal.Calibration(graph_batch=True)
    windows = synthetic(truth, np.random.default_rng(3))
    found = cal.fit(windows, ("hbm", "fixed"))
    assert max(abs(cal.ratios(windows, found, "opt-13b") - 1)) > 0.01


def test_one_model_weighs_as_much_as_the_other_however_many_windows_it_has():
    rng = np.random.default_rng(5)
    opt = [w for w in synthetic(cal.Calibration(hbm_efficiency=0.8), rng, 200) if "opt" in w.model]
    llama = [
        w for w in synthetic(cal.Calibration(hbm_efficiency=1.0), rng, 10) if "llama" in w.model
    ]
    found = cal.fit(opt + llama, ("hbm",))
    assert 0.87 < found.hbm_efficiency < 0.91  # between the two, not at OPT's 0.8


def test_free_terms_must_be_known():
    with pytest.raises(ValueError):
        cal.fit([], ("hbm", "ridge"))
    with pytest.raises(ValueError):
        cal.fit([], ())


def test_the_gap_is_each_models_median_and_their_mean():
    def window(model, gap_s):
        return cal.Window("g", model, (4, 4), (1e3, 1e3), 50, 0.01, 0.01 + gap_s, 0.0)

    windows = [window("opt-13b", g) for g in (1e-3, 2e-3, 9e-3)] + [window("llama3-8b", 0.0)]
    gaps = cal.gaps_s(windows)
    assert gaps == pytest.approx({"opt-13b": 2e-3, "llama3-8b": 0.0, "both": 1e-3})


def test_the_calibration_becomes_a_gpu_spec_the_simulator_takes():
    c = cal.Calibration(hbm_efficiency=0.9, fixed_s=0.2e-3, per_layer_s=10e-6, gap_s=0.3e-3)
    gpu = c.gpu("opt-13b")
    assert gpu.hbm_read_bytes_per_s == pytest.approx(0.9 * GpuSpec().hbm_read_bytes_per_s)
    assert gpu.step_overhead_s == pytest.approx(0.2e-3 + 40 * 10e-6 + 0.3e-3)
    assert gpu.matmul_flops_per_s == GpuSpec().matmul_flops_per_s
    # the simulator's step with it is the calibrated step plus the gap
    step_s = c.cost("opt-13b").decode_step_s(np.full(30, 1000.0))
    assert step_s == pytest.approx(c.decode_s("opt-13b", 30, 30_000) + c.gap_s)


def test_a_graph_batch_step_pays_the_empty_rows_flops_and_no_kv():
    plain = cal.cost_model("llama3-8b")
    graph = cal.cost_model("llama3-8b", graphs="pow2")  # powers of two, as served then
    three, four = plain.step_cost([500, 500, 500]), plain.step_cost([500, 500, 500, 0])
    assert graph.step_cost([500, 500, 500]) == four
    assert graph.step_cost([500] * 4) == plain.step_cost([500] * 4)
    assert four.memory_s == three.memory_s and four.compute_s > three.compute_s
    # a mixed step runs without a graph
    assert graph.step_cost([500] * 3, prefill_tokens=64) == plain.step_cost([500] * 3, 64)
    assert plain.gpu.step_overhead_s == 30e-6  # the uncalibrated model: the simulator's then


def test_the_report_names_both_fits_and_the_simulators_parameters():
    windows = synthetic(cal.Calibration(hbm_efficiency=0.9), np.random.default_rng(1), 30)
    text = "\n".join(cal.report(windows))
    assert "| hbm + fixed |" in text and "For the simulator: HBM x0.900" in text
