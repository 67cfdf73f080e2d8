"""benchmarks/step_profile.py's account of where a step's device time goes between kernels,
on a hand-made kernel timeline (what torch.profiler's events give on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from factories import benchmark_module


def kernel(name: str, start_us: float, end_us: float, device=torch.autograd.DeviceType.CUDA):
    return SimpleNamespace(
        name=name, device_type=device, time_range=SimpleNamespace(start=start_us, end=end_us)
    )


def test_idle_time_is_summed_by_kernel_pair_per_step_and_overlap_counts_as_none():
    step_profile = benchmark_module("step_profile")
    # two replays of gemm -> attention -> gemm; the second attention overlaps its gemm
    events = [
        kernel("gemm", 0, 10), kernel("attention", 12, 20), kernel("gemm", 25, 30),
        kernel("gemm", 40, 50), kernel("attention", 49, 60), kernel("gemm", 61, 70),
        kernel("host op", 0, 70, device=torch.autograd.DeviceType.CPU),  # not a kernel
    ]  # fmt: skip
    prof = SimpleNamespace(events=lambda: events)
    idle = dict(step_profile.idle_between_kernels(prof, replays=2))
    # per step: attention -> gemm 5 and 1 us; gemm -> attention 2 and 0 (overlap); the gap
    # between the replays (gemm -> gemm, 10 us) is counted once over two steps
    assert idle[("attention", "gemm")] == (0.003, 1)
    assert idle[("gemm", "attention")] == (0.001, 1)
    assert idle[("gemm", "gemm")] == (0.005, 0)
    assert list(dict(step_profile.idle_between_kernels(prof, 2))) == [
        ("gemm", "gemm"), ("attention", "gemm"), ("gemm", "attention"),
    ]  # fmt: skip
