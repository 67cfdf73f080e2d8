"""The decode device's two ceilings, measured once when the worker starts: its bf16 matmul
rate and its HBM read rate. Their ratio, the ridge in FLOPs per byte, tells the batcher's
scheduler what one more member of a decode batch costs beside its KV
(batcher/scheduler/config.py, `ridge_flops_per_byte`). It differs by GPU kind: an H200 gives
~190 (790 TFLOP/s over 4.23 TB/s, docs/benchmarks.md), and an H100 reads its HBM slower."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

READ_BYTES = 1 << 30  # far beyond any L2, so every byte comes from HBM
MATMUL_MNK = (8192, 8192, 4096)  # a large bf16 GEMM runs at the GPU's matmul rate
ITERS = 10
ROUNDS = 3


@dataclass(frozen=True)
class Ceilings:
    matmul_flops_per_s: float
    hbm_read_bytes_per_s: float

    @property
    def ridge_flops_per_byte(self) -> int:
        return max(1, round(self.matmul_flops_per_s / self.hbm_read_bytes_per_s))


def _seconds_per_call(fn: Callable[[], object]) -> float:
    """The fastest of ROUNDS rounds of ITERS calls: the first calls of a process ran up to 4 %
    slower on an H200 (clocks still rising)."""
    fn()  # the first call picks its kernel and allocates
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_s = float("inf")
    for _ in range(ROUNDS):
        start.record()
        for _ in range(ITERS):
            fn()
        end.record()
        end.synchronize()
        best_s = min(best_s, start.elapsed_time(end) / 1e3 / ITERS)
    return best_s


def _read_s(device: torch.device) -> float:
    x = torch.randn(READ_BYTES // 2, dtype=torch.bfloat16, device=device)  # [n] bf16
    return _seconds_per_call(lambda: x.sum(dtype=torch.float32))


def _matmul_s(device: torch.device) -> float:
    m, n, k = MATMUL_MNK
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)  # [M, K]
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device)  # [K, N]
    return _seconds_per_call(lambda: a @ b)


def measure(device: str | torch.device) -> Ceilings | None:
    """`device`'s ceilings (about 0.1 s), or None off a GPU. Its scratch (1 GiB)
    goes back to the device before the KV cache is allocated."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        # The GEMM first: cuBLAS keeps its workspace for the process, and made after the
        # read it would sit in the read's 1 GiB segment and keep all of it from the KV cache.
        matmul_s, read_s = _matmul_s(device), _read_s(device)
        torch.cuda.empty_cache()
    m, n, k = MATMUL_MNK
    return Ceilings(2 * m * n * k / matmul_s, READ_BYTES / read_s)
