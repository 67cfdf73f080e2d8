"""y = x @ w.T (+ bias) for a handful of tokens: a Triton GEMM beside its torch twin.

At the decode step's smallest batches (M ≤ 32 tokens) every projection only reads its
weight, and cuBLAS's kernels read it at 57-91 % of HBM speed: their tiles are built for
more rows than there are tokens. Here the weight rows are the MMA's M side and the tokens
its N side ("swap AB"), so a program covers BLOCK_N weight rows against all the tokens (a
16-32 wide tile) and streams its K with a deep pipeline. On an H200 at M = 1-32 it read o
at 69-73 % of HBM speed (cuBLASLt 57-67 %), qkv at 73-81 % (67-76 %) and down at 88-94 %
(81-91 %), and decode steps of 1-32 requests took 3-7 % less time
(docs/benchmarks.md, "Issue 5, twentieth session"). A split-K variant, more programs per
weight, was slower. Past 32 tokens cuBLAS is as fast or faster: at 64 and 128 tokens no
tile shape, warp count, pipeline depth or TMA load of this kernel beat cuBLASLt's step total
by more than 1-2 % (twenty-first session). Folding RMSNorm into the GEMM as a prologue
doubled qkv's time (measured, not kept; same section).

The models build their projections as `layers.Linear`, whose forward takes this kernel for
CUDA inputs of at most MAX_TOKENS rows and nn.Linear otherwise.

Shape letters: M tokens, N output features, K input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from alignedserve.worker.kernels.device import num_sms

MAX_TOKENS = 32  # decode steps of 1-32 were 3-7 % faster with it (H200); 0 turns it off
BLOCK_N = 64  # weight rows per program
MAX_BLOCK_K = 128
STAGE_BYTES_BUDGET = 192 * 1024  # shared memory for the pipeline (H100/H200 allow 227 KiB)


@dataclass(frozen=True)
class Tiles:
    """One launch's shape: weight rows per program, K per pipeline stage, warps, pipeline
    stages (None: `pipeline_stages`), and the most tokens one program covers. The default is
    the measured choice; kernel_probe.py --tile-sweep times the others."""

    block_n: int = BLOCK_N
    block_k: int = MAX_BLOCK_K
    num_warps: int = 4
    num_stages: int | None = None
    max_block_m: int = 64


def pipeline_stages(num_programs: int, num_sms: int, stage_bytes: int) -> int:
    """Loads in flight per program: the fewer programs an SM holds (o and down: 64 for 132
    SMs; qkv: 96), the deeper each one's pipeline must be to keep HBM busy; with many (gate_up,
    lm_head) shallow ones leave room for more programs at once. Capped by shared memory."""
    if num_programs <= num_sms:
        want = 8
    elif num_programs <= 2 * num_sms:
        want = 6
    else:
        want = 4
    return max(2, min(want, STAGE_BYTES_BUDGET // stage_bytes))


def linear_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """The twin: nn.Linear's arithmetic, fp32 accumulation, one rounding to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _skinny_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]: read when HAS_BIAS
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr,  # cdiv(K, BLOCK_K): one compile per weight shape
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask on K
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 (torch does not use tf32 by default)
):
    """One program = BLOCK_N weight rows x BLOCK_M tokens of y.T, over all of K."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    mask_n, mask_m = offs_n < N, offs_m < M
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y.T's tile
    for k in range(0, K_TILES):
        if EVEN_K:
            w = tl.load(w_tile, mask=mask_n[:, None], other=0.0)
            x = tl.load(x_tile, mask=mask_m[:, None], other=0.0)
        else:
            in_k = (k * BLOCK_K + offs_k) < K
            w = tl.load(w_tile, mask=mask_n[:, None] & in_k[None, :], other=0.0)
            x = tl.load(x_tile, mask=mask_m[:, None] & in_k[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # [BN, BM]
        w_tile += BLOCK_K
        x_tile += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_tile = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]  # [BN, BM]
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def skinny_linear(
    x: torch.Tensor,  # [M, K], rows contiguous
    weight: torch.Tensor,  # [N, K], rows contiguous, x's dtype
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N]
    tiles: Tiles = Tiles(),
) -> torch.Tensor:  # [M, N] in x's dtype
    """`linear_ref` as one Triton launch; grid (N / block_n, M / block_m)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"want x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"x.dtype={x.dtype} != weight.dtype={weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need contiguous rows")
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    block_m = max(16, min(triton.next_power_of_2(m), tiles.max_block_m))  # 16: tl.dot's least
    block_k = min(tiles.block_k, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, block_m))
    num_stages = tiles.num_stages
    if num_stages is None:
        sms = num_sms(x.device.index) if x.is_cuda else 1
        stage_bytes = (tiles.block_n + block_m) * block_k * x.element_size()
        num_stages = pipeline_stages(grid[0] * grid[1], sms, stage_bytes)
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=tiles.block_n, BLOCK_M=block_m, BLOCK_K=block_k,
        K_TILES=triton.cdiv(k, block_k), EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y
