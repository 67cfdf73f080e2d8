"""y = x @ w.T on a bounded number of SMs: a persistent Triton GEMM beside its torch twin,
for bounded_overlap_probe.py (measured, not served: see docs/benchmarks.md, "forty-second
session").

Why it exists (issue 5's last four decode cells): at B = 128-512 a decode step's
projections are compute-bound and its attention memory-bound, and they run one after the
other, so the step takes their sum where the roofline is their max. They could share the
GPU only if the GEMMs left SMs free for the attention, and cuBLAS takes every SM (torch's
SM carveout did not change its kernels' times; fortieth session). This kernel launches
exactly `num_programs` programs, each walking the output tiles `num_programs` apart, so
the rest of the GPU stays free for a kernel on another stream. bounded_overlap_probe.py
times it against cuBLAS and beside the decode attention.

Loads go through TMA descriptors (Hopper's bulk tensor copies), built on the host. The
tiles are walked column-major over the few M tiles a decode step has (M ≤ 512), so
programs running at once share each weight tile in L2 and the weight is read from HBM once.
Partial tiles at the edges read zeros and store only what lies inside (TMA clips).

Shape letters: M tokens, N output features, K input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class GemmTiles:
    """One launch's tile shape and pipeline. The probe sweeps these per (M, N, K)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_stages: int = 4
    num_warps: int = 8
    warp_specialize: bool = False


def persistent_linear_ref(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [N, K]
) -> torch.Tensor:  # [M, N]
    return torch.nn.functional.linear(x, w)


@triton.jit
def _persistent_linear_kernel(
    x_desc,  # [M, K] blocks [BLOCK_M, BLOCK_K]
    w_desc,  # [N, K] blocks [BLOCK_N, BLOCK_K]
    y_desc,  # [M, N] blocks [BLOCK_M, BLOCK_N]
    M,
    N,
    K,
    NUM_PROGRAMS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(
        tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE
    ):
        # column-major: neighbouring programs take the M tiles of one weight tile
        off_m = (tile % num_m) * BLOCK_M
        off_n = (tile // num_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            a = x_desc.load([off_m, kk * BLOCK_K])  # [BLOCK_M, BLOCK_K]
            b = w_desc.load([off_n, kk * BLOCK_K])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc)
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def num_tiles(m: int, n: int, tiles: GemmTiles) -> int:
    return triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)


def persistent_linear(
    x: torch.Tensor,  # [M, K], contiguous
    w: torch.Tensor,  # [N, K], contiguous
    num_programs: int,
    tiles: GemmTiles = GemmTiles(),
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"x has K={k} but w has K={w.shape[1]}")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    grid = min(num_programs, num_tiles(m, n, tiles))
    _persistent_linear_kernel[(grid,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]),
        m,
        n,
        k,
        grid,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        WARP_SPECIALIZE=tiles.warp_specialize,
        num_stages=tiles.num_stages,
        num_warps=tiles.num_warps,
    )
    return y
