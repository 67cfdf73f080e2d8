"""The decode device's ceilings, measured when the worker starts (worker/ceilings.py): their
ratio is the ridge the batcher's scheduler prices a member with. The measurement itself needs
a GPU; off one there is nothing to measure."""

from __future__ import annotations

import pytest
import torch

from alignedserve.worker.ceilings import Ceilings, measure


def test_nothing_is_measured_off_a_gpu():
    assert measure("cpu") is None


def test_the_ridge_is_matmul_rate_over_read_rate_rounded():
    assert Ceilings(790e12, 4.23e12).ridge_flops_per_byte == 187
    assert Ceilings(1e9, 1e12).ridge_flops_per_byte == 1  # never 0: it divides


@pytest.mark.gpu
def test_a_gpus_ceilings_are_its_own_and_leave_no_memory_behind():
    torch.cuda.init()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    got = measure("cuda")
    # the 1 GiB scratch went back to the device; only cuBLAS's workspace (~32 MiB) stays
    assert torch.cuda.memory_allocated() - allocated <= 64 << 20
    assert torch.cuda.memory_reserved() - reserved <= 64 << 20
    # H100 SXM / H200: HBM 3.3-4.8 TB/s peak, bf16 dense ~990 TFLOP/s peak
    assert 2e12 < got.hbm_read_bytes_per_s < 5e12, got
    assert 4e14 < got.matmul_flops_per_s < 1e15, got
    print(torch.cuda.get_device_name(), got, got.ridge_flops_per_byte)
