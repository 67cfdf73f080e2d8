"""Varlen causal prefill attention in Triton (FlashAttention's online softmax), beside its torch
twin: the prefill pass's attention on a GPU (attention._attend_varlen).

It replaced torch's FlashAttention 2, which took 19-47 ms of an 8,192-token pass on an H200
(10-37 %: more for chunks after cached tokens), where vLLM runs FlashAttention 3, which the GPU
image lacks. Triton's `tl.dot` compiles to Hopper's wgmma; on the same bf16 inputs this kernel
ran at 1.22-1.59x FA2's speed in every pass benchmarks/prefill_profile.py times (fortieth
session, docs/benchmarks.md), with DEFAULT_TILING the fastest of SWEEP in each.

Layout as the varlen call's: q [N, Hq, D] packed request by request (cu_q_lens), keys and values
[K, Hk, D] likewise (cu_ctx_lens); query i of a request with q_len queries and ctx keys sees
keys 0 .. i + ctx - q_len (the mask aligned to the bottom right: a chunk's queries come after
its cached keys). GQA: query head h reads kv head h // (Hq / Hk). float32 inputs are
multiplied exactly (no TF32): the GPU tests compare float32 passes with transformers.

One program per (query block, request, query head), the heaviest query blocks (the last,
which see the most keys) first. Key tiles wholly before a block's first query are read
without a mask; only the tiles along the diagonal are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# the twin: the served path's torch varlen call (CPU, float32)
from alignedserve.worker.attention import varlen_attention_ref as prefill_attention_ref  # noqa: F401


@dataclass(frozen=True)
class Tiling:
    block_m: int = 128  # queries per program
    block_n: int = 64  # keys per tile
    num_warps: int = 8
    num_stages: int = 3


# the fastest of SWEEP in every pass prefill_profile.py timed, OPT-13B and Llama-3-8B alike
DEFAULT_TILING = Tiling(block_m=64, block_n=64, num_warps=4, num_stages=3)
# float32 tiles are twice the bytes: these keep q and two stages of K and V within shared
# memory at head_dim 128 (float32 serves the GPU tests against transformers, not speed)
FP32_TILING = Tiling(block_m=32, block_n=32, num_warps=4, num_stages=2)
SWEEP = [  # what prefill_profile.py times on a GPU
    Tiling(128, 64, 8, 3), Tiling(128, 128, 8, 3), Tiling(128, 64, 4, 3),
    Tiling(64, 64, 4, 3), Tiling(128, 64, 8, 2), Tiling(128, 32, 4, 4),
]  # fmt: skip
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _tile(
    acc, m_i, l_i, q,  # the block's state: [M, D] fp32, [M], [M]; q [M, D]
    k_ptrs, v_ptrs, stride_kn, stride_vn,  # the tile's first key's [D] and value's [D] rows
    offs_m, offs_n, offset, k_len, scale_log2,
    MASKED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile into the online softmax of a block of queries."""
    if MASKED:
        seen = offs_n[None, :] < k_len
        k = tl.load(k_ptrs + offs_n[None, :] * stride_kn, mask=seen, other=0.0)  # [D, N]
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vn, mask=offs_n[:, None] < k_len, other=0.0)
    else:
        k = tl.load(k_ptrs + offs_n[None, :] * stride_kn)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vn)  # [N, D]
    s = tl.dot(q, k.to(DOT_DTYPE), input_precision=PRECISION) * scale_log2  # [M, N], in log2 units
    if MASKED:
        visible = (offs_n[None, :] <= offs_m[:, None] + offset) & seen
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


# num_m_blocks varies with the pass's longest chunk, and Triton compiles a variant for each of
# an integer's classes (1, a multiple of 16, other): the warm-up's passes cover two, so the
# third compiled while serving (suspected in a fresh machine's slow first steps, fortieth
# session). It is only subtracted from: nothing is lost by not specialising it.
@triton.jit(do_not_specialize=["num_m_blocks"])
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_q_ptr, cu_k_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    scale_log2,  # softmax scale * log2(e)
    num_m_blocks,
    GROUP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.dot's operands: q's dtype (fp32 for bf16 in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for fp32 operands, no TF32
):  # fmt: skip
    m_block = num_m_blocks - 1 - tl.program_id(0)  # the heaviest blocks first
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_k_ptr + b)
    k_len = tl.load(cu_k_ptr + b + 1) - k_start
    offset = k_len - q_len  # query i sees keys 0 .. i + offset
    kh = h // GROUP
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_rows = q_ptr + (q_start + offs_m.to(tl.int64))[:, None] * stride_qn + h * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=offs_m[:, None] < q_len, other=0.0)  # [M, D]
    q = q.to(DOT_DTYPE)
    k_ptrs = k_ptr + k_start.to(tl.int64) * stride_kn + kh * stride_kh + offs_d[:, None]
    v_ptrs = v_ptr + k_start.to(tl.int64) * stride_vn + kh * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys before the block's first query's position are seen by every query of the block.
    full_end = (m_block * BLOCK_M + offset + 1) // BLOCK_N * BLOCK_N
    full_end = tl.minimum(full_end, k_len // BLOCK_N * BLOCK_N)
    end = tl.minimum((m_block + 1) * BLOCK_M, q_len) + offset  # the last query's keys, exclusive
    for start_n in range(0, full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _tile(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
            offs_m, offs_n, offset, k_len, scale_log2,
            MASKED=False, DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION,
        )  # fmt: skip
    for start_n in range(full_end, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _tile(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
            offs_m, offs_n, offset, k_len, scale_log2,
            MASKED=True, DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION,
        )  # fmt: skip
    out = acc / l_i[:, None]
    o_rows = o_ptr + (q_start + offs_m.to(tl.int64))[:, None] * stride_on + h * stride_oh
    tl.store(o_rows + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < q_len)


def prefill_attention(
    q: torch.Tensor,  # [N, Hq, D] (rows may be strided: a split of a fused qkv output)
    k: torch.Tensor,  # [K, Hk, D]
    v: torch.Tensor,  # [K, Hk, D]
    cu_q_lens: torch.Tensor,  # [B + 1] int32 or int64, on q's device
    cu_ctx_lens: torch.Tensor,  # [B + 1]: each request's keys at least its queries
    max_q_len: int,  # the longest request's queries (host int: the grid)
    scale: float,
    tiling: Tiling | None = None,  # DEFAULT_TILING, or FP32_TILING for float32
    out: torch.Tensor | None = None,  # [N, Hq, D] in q's dtype, the last dimension dense
) -> torch.Tensor:  # [N, Hq, D]: `out`, or a new contiguous tensor
    """Matches `prefill_attention_ref`; reads only device tensors besides max_q_len."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"want q [N, Hq, D], k and v [K, Hk, D]; got {q.shape}, {k.shape}")
    head_dim, q_heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim}: a power of two of at least 16")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a dense last dimension")
    if cu_q_lens.shape != cu_ctx_lens.shape or cu_q_lens.dim() != 1:
        raise ValueError(f"cu_q_lens {cu_q_lens.shape} and cu_ctx_lens {cu_ctx_lens.shape}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: want q's {tuple(q.shape)} {q.dtype}")
    batch = cu_q_lens.shape[0] - 1
    if q.shape[0] == 0 or batch == 0:
        return out
    if tiling is None:
        tiling = FP32_TILING if q.dtype == torch.float32 else DEFAULT_TILING
    num_m_blocks = triton.cdiv(max_q_len, tiling.block_m)
    dot_dtype = tl.float32 if q.device.type == "cpu" else TL_DTYPES[q.dtype]
    _prefill_attention_kernel[(num_m_blocks, batch, q_heads)](
        q, k, v, out, cu_q_lens, cu_ctx_lens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        scale * math.log2(math.e), num_m_blocks,
        GROUP=q_heads // kv_heads, D=head_dim, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )  # fmt: skip
    return out
