"""y = x @ w.T (+ bias) for a handful of tokens: a Triton GEMM beside its torch twin, with
the decoder layer's neighbouring small ops folded in.

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
by more than 1-2 % (twenty-first session).

At those batches a kernel's launch, ramp and tail cost about as much as its work, so the
same kernel also takes over the small ops around a projection (`normed_linear`,
`linear_residual`): RMSNorm as a prologue, SiLU(gate) * up as an epilogue (a program
accumulates a gate tile and the matching up tile), and the residual add as an epilogue.
The prologue only sums each token's squares over the K loop; rsqrt of their mean then
scales the accumulator (a per-token scale commutes with the GEMM). The norm's weight is not
applied here: the loader folds it into the weight's columns (`layers.fold_norm_weight`).
Scaling each K tile of x by it inside the loop had doubled qkv's time (twenty-first
session). Folded, each fused form beat the separate kernels it replaces on an H200 (qkv
0.51-0.58 against 0.57-0.60 ms over 32 layers at M = 1-32, o 0.36-0.39 against 0.41-0.45),
and decode steps of 1-32 requests took 0.9-3.2 % less time (twenty-second session).

The models build their projections as `layers.Linear`, whose forward takes this kernel for
CUDA inputs of at most MAX_TOKENS rows and nn.Linear otherwise; the Llama layer takes the
fused forms at the same sizes.

Shape letters: M tokens, N output features, K input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from alignedserve.worker.kernels.device import num_sms
from alignedserve.worker.kernels.fused import fused_add_rms_norm_ref, silu_and_mul_ref

MAX_TOKENS = 32  # decode steps of 1-32 were 3-7 % faster with it (H200); 0 turns it off
FUSED_OPS = True  # the Llama layer's fused forms at those sizes; False: separate kernels
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


def normed_linear_ref(
    x: torch.Tensor,  # [M, K]
    eps: float,
    weight: torch.Tensor,  # [N, K] (the norm's weight folded in), or [2N, K] gate | up
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:  # [M, N]
    """The unfused layer's arithmetic on folded weights: RMSNorm with weight 1, the
    projection, then silu(gate) * up."""
    ones = x.new_ones(x.shape[1])
    y = linear_ref(fused_add_rms_norm_ref(x, None, ones, eps)[0], weight, bias)
    return silu_and_mul_ref(y) if silu_mul else y


def linear_residual_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor,  # [M, N]
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N]
    """The projection, rounded to x's dtype, plus the residual in that dtype."""
    return linear_ref(x, weight, bias) + residual


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _load_rows(ptrs, row_mask, in_k, EVEN_K: tl.constexpr):
    """A [rows, BK] tile, 0 past the rows (and past K unless EVEN_K)."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_mask[:, None] & in_k[None, :], other=0.0)
    return tile


@triton.jit
def _skinny_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]; [2N, K] (gate rows, then up rows) when SILU_MUL
    bias_ptr,  # [N] or [2N]: read when HAS_BIAS
    res_ptr,  # [M, N]: read when HAS_RESIDUAL
    y_ptr,  # [M, N]
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_TILES: tl.constexpr,  # cdiv(K, BLOCK_K): one compile per weight shape
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask on K
    HAS_BIAS: tl.constexpr,
    RMS_NORM: tl.constexpr,  # y = rms_norm(x) @ w.T (the norm's weight folded into w)
    SILU_MUL: tl.constexpr,  # y = silu(gate) * up of the projection's two halves
    HAS_RESIDUAL: tl.constexpr,  # y = projection + residual
    PRECISION: tl.constexpr,  # "ieee" for fp32 (torch does not use tf32 by default)
):
    """One program = BLOCK_N output features x BLOCK_M tokens of y.T, over all of K."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    dtype = y_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    mask_n, mask_m = offs_n < N, offs_m < M
    w_tile = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    up_rows = N.to(tl.int64) * stride_wn  # gate row n's up row is n + N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y.T's tile (the gate's with SILU_MUL)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # the up half's (SILU_MUL)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)  # each token's sum of x^2 (RMS_NORM)
    for k in range(0, K_TILES):
        in_k = (k * BLOCK_K + offs_k) < K  # [BK]; unused when EVEN_K
        x = _load_rows(x_tile, mask_m, in_k, EVEN_K)  # [BM, BK]
        w = _load_rows(w_tile, mask_n, in_k, EVEN_K)  # [BN, BK]
        if RMS_NORM:
            x32 = x.to(tl.float32)
            sum_sq += tl.sum(x32 * x32, axis=1)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # [BN, BM]
        if SILU_MUL:
            w_up = _load_rows(w_tile + up_rows, mask_n, in_k, EVEN_K)  # [BN, BK]
            acc_up = tl.dot(w_up, tl.trans(x), acc_up, input_precision=PRECISION)
        w_tile += BLOCK_K
        x_tile += BLOCK_K
    if RMS_NORM:
        scale = tl.rsqrt(sum_sq / K + eps)  # [BM]; padding K columns added nothing
        acc = acc * scale[None, :]
        acc_up = acc_up * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            up_bias = tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0)
            acc_up += up_bias.to(tl.float32)[:, None]
    if SILU_MUL:  # rounded where the unfused path stores gate_up, then silu_and_mul's way
        gate, up = _round(acc, dtype), _round(acc_up, dtype)
        acc = _round(gate / (1.0 + tl.exp(-gate)), dtype) * up
    mask = mask_n[:, None] & mask_m[None, :]
    if HAS_RESIDUAL:  # the projection rounded, then the add in the dtype
        res_tile = res_ptr + offs_m[None, :].to(tl.int64) * stride_rm + offs_n[:, None]
        acc = _round(acc, dtype) + tl.load(res_tile, mask=mask, other=0.0).to(tl.float32)
    y_tile = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]  # [BN, BM]
    tl.store(y_tile, acc.to(dtype), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"want x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"x.dtype={x.dtype} != weight.dtype={weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need contiguous rows")


def _launch(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] or [2N, K]
    bias: torch.Tensor | None,
    y: torch.Tensor,  # [M, N]
    tiles: Tiles,
    norm_eps: float | None = None,  # RMSNorm (weight folded into `weight`) with this eps
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,  # [M, N], rows contiguous
) -> torch.Tensor:
    m, k = x.shape
    n = y.shape[1]
    if m == 0:
        return y
    block_m = max(16, min(triton.next_power_of_2(m), tiles.max_block_m))  # 16: tl.dot's least
    block_k = min(tiles.block_k, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, block_m))
    num_stages = tiles.num_stages
    if num_stages is None:
        sms = num_sms(x.device.index) if x.is_cuda else 1
        rows = tiles.block_n * (2 if silu_mul else 1) + block_m
        num_stages = pipeline_stages(grid[0] * grid[1], sms, rows * block_k * x.element_size())
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else weight,
        residual if residual is not None else y, y,
        m, n, k, norm_eps if norm_eps is not None else 0.0,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0),
        BLOCK_N=tiles.block_n, BLOCK_M=block_m, BLOCK_K=block_k,
        K_TILES=triton.cdiv(k, block_k), EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None, RMS_NORM=norm_eps is not None, SILU_MUL=silu_mul,
        HAS_RESIDUAL=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


def skinny_linear(
    x: torch.Tensor,  # [M, K], rows contiguous
    weight: torch.Tensor,  # [N, K], rows contiguous, x's dtype
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N]
    tiles: Tiles = Tiles(),
) -> torch.Tensor:  # [M, N] in x's dtype
    """`linear_ref` as one Triton launch; grid (N / block_n, M / block_m)."""
    _check(x, weight)
    y = x.new_empty(x.shape[0], weight.shape[0]) if out is None else out
    return _launch(x, weight, bias, y, tiles)


def normed_linear(
    x: torch.Tensor,  # [M, K], rows contiguous
    eps: float,
    weight: torch.Tensor,  # [N, K]; [2N, K] (gate | up) with silu_mul
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    tiles: Tiles = Tiles(),
) -> torch.Tensor:  # [M, N]
    """`normed_linear_ref` as one launch: RMSNorm folded into the GEMM (and SiLU * up)."""
    _check(x, weight)
    if silu_mul and weight.shape[0] % 2:
        raise ValueError(f"silu_mul wants [2N, K] gate | up; got {tuple(weight.shape)}")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = x.new_empty(x.shape[0], n)
    return _launch(x, weight, bias, y, tiles, eps, silu_mul)


def linear_residual(
    x: torch.Tensor,  # [M, K], rows contiguous
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor,  # [M, N], rows contiguous, x's dtype
    bias: torch.Tensor | None = None,
    tiles: Tiles = Tiles(),
) -> torch.Tensor:  # [M, N]
    """`linear_residual_ref` as one launch: the residual add as the GEMM's epilogue."""
    _check(x, weight)
    want = (x.shape[0], weight.shape[0])
    if residual.shape != want or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} != {want} {x.dtype} (rows "
            "contiguous)"
        )
    return _launch(x, weight, bias, x.new_empty(want), tiles, residual=residual)
