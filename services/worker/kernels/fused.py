"""Fused elementwise kernels of a decoder layer, each a Triton kernel beside its torch twin.

In eager torch a Llama layer's small ops are many kernels: RMSNorm ~7 (fp32 upcast, square,
mean, rsqrt, two muls, casts), RoPE ~18, SiLU * up 2, the KV append 2. Each costs a launch
(~2-3 us even inside a CUDA graph) and a round trip through HBM. Here each group is one
kernel that reads its inputs once and writes its outputs once:

- `fused_add_rms_norm`: residual add + RMSNorm (layers.RMSNorm on x + residual).
- `rope_kv_write`: rotate-half RoPE on q and k (layers.RotaryEmbedding) + the K/V cache
  append (KVCache.write), reading cos/sin from a table built once (`build_cos_sin_cache`).
- `silu_and_mul`: silu(gate) * up on a fused gate_up projection's output.

Numerics are the model code's, bit for bit where the ops allow: a kernel computes in fp32 and
rounds to the input dtype exactly where eager torch stores an intermediate tensor in that
dtype (`_round`), because on bf16 those roundings, not the fp32 maths, dominate the error.
RoPE + KV append is exact on every dtype (with fp fusion off, see its launch); RMSNorm's
mean (summation order) and SiLU's exp may differ by an fp32 ulp, so an output may be an ulp
of its dtype away where that ulp moved a rounding.

Shape letters: N tokens, H hidden size, I intermediate size, Hq / Hk query / kv heads,
D head_dim, T block_tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
FLOAT_DTYPES = tuple(TL_DTYPES)
MAX_NORM_BLOCK = 8192  # one program holds a whole row in registers: H up to this
SILU_BLOCK = 1024  # columns of out per program


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE -> fp32: the rounding eager torch applies when it stores a DTYPE tensor
    (a no-op for fp32). Kept explicit so every step matches the model's numerics."""
    return x.to(DTYPE).to(tl.float32)


def _check_float(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} not one of {FLOAT_DTYPES}")


# ---- residual add + RMSNorm ----


def fused_add_rms_norm_ref(
    x: torch.Tensor,  # [N, H]
    residual: torch.Tensor | None,  # [N, H] or None
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [N, H], new residual [N, H]
    """layers.RMSNorm applied to r = x + residual (added in the input dtype); returns (normed, r).
    The output dtype is torch's promotion of weight and x, as in `weight * x32.to(dtype)`."""
    r = x if residual is None else x + residual  # [N, H] in x's dtype
    r32 = r.float()
    normed = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(r.dtype), r


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [N, H]
    residual_ptr,  # [N, H]: read when HAS_RESIDUAL
    weight_ptr,  # [H]
    out_ptr,  # [N, H] normed, in promote(weight, x) dtype
    new_residual_ptr,  # [N, H] x + residual: written when HAS_RESIDUAL
    hidden,
    eps,
    stride_xn,
    stride_xh,
    stride_rn,
    stride_rh,
    stride_on,
    stride_oh,
    stride_nrn,
    stride_nrh,
    BLOCK_H: tl.constexpr,  # H padded to a power of two
    HAS_RESIDUAL: tl.constexpr,
):
    """One program = one row: the add, the fp32 mean of squares, the scale, all in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = cols < hidden
    x_dtype = x_ptr.dtype.element_ty
    r = tl.load(x_ptr + row * stride_xn + cols * stride_xh, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_rn + cols * stride_rh, mask=mask, other=0.0)
        r = _round(r + res.to(tl.float32), x_dtype)  # the add happens in x's dtype
        tl.store(new_residual_ptr + row * stride_nrn + cols * stride_nrh, r.to(x_dtype), mask=mask)
    mean_sq = tl.sum(r * r, 0) / hidden  # padding columns loaded as 0 add nothing
    normed = _round(r * tl.rsqrt(mean_sq + eps), x_dtype)  # [BLOCK_H]
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * normed  # exact in fp32 for half inputs: one rounding, at the store
    tl.store(out_ptr + row * stride_on + cols * stride_oh, out.to(out_ptr.dtype.element_ty), mask)


def fused_add_rms_norm(
    x: torch.Tensor,  # [N, H]
    residual: torch.Tensor | None,  # [N, H] or None (then new_residual is x itself)
    weight: torch.Tensor,  # [H] (read as contiguous)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [N, H], new residual [N, H]
    """Triton residual add + RMSNorm; matches `fused_add_rms_norm_ref`. Grid (N,)."""
    if x.dim() != 2 or weight.shape != x.shape[1:]:
        raise ValueError(f"want x [N, H] and weight [H]; got {tuple(x.shape)}, {weight.shape}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.shape} {residual.dtype} != x {x.shape} {x.dtype}")
    _check_float(x=x, weight=weight)
    num_tokens, hidden = x.shape
    if hidden > MAX_NORM_BLOCK:
        raise ValueError(f"hidden={hidden} > {MAX_NORM_BLOCK} (one row per program)")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    if num_tokens == 0:
        return out, new_residual
    block_h = triton.next_power_of_2(hidden)
    has_residual = residual is not None
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        residual if has_residual else x,
        weight.contiguous(),
        out,
        new_residual,
        hidden,
        eps,
        *x.stride(),
        *(residual if has_residual else x).stride(),
        *out.stride(),
        *new_residual.stride(),
        BLOCK_H=block_h,
        HAS_RESIDUAL=has_residual,
        num_warps=min(16, max(1, block_h // 512)),  # ~16 elements per thread
    )
    return out, new_residual


# ---- RoPE + KV cache append ----


def build_cos_sin_cache(
    inv_freq: torch.Tensor,  # [D/2] fp32, e.g. layers.rope_inv_freq(rope, head_dim)
    max_positions: int,
) -> torch.Tensor:  # [max_positions, D] fp32: cos of the D/2 frequencies, then their sin
    """The table `rope_kv_write` reads: row p is cat(cos(p * inv_freq), sin(p * inv_freq)), the
    same fp32 products RotaryEmbedding forms per step. Build it on the device that runs the
    model: cos/sin are then those of that device's torch, as RotaryEmbedding's are."""
    positions = torch.arange(max_positions, device=inv_freq.device).float()  # [P]
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rope_ref(
    x: torch.Tensor,  # [N, heads, D]
    cos: torch.Tensor,  # [N, 1, D/2] in x's dtype
    sin: torch.Tensor,  # [N, 1, D/2]
) -> torch.Tensor:  # [N, heads, D]
    half = x.shape[-1] // 2
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # [N, 1, D]
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin


def rope_kv_write_ref(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    positions: torch.Tensor,  # [N] int, each < max_positions
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32 from build_cos_sin_cache
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D] (a strided per-layer view is fine)
    v_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]
    slot_block: torch.Tensor,  # [N] int: block of each new token
    slot_offset: torch.Tensor,  # [N] int: its offset in that block
) -> tuple[torch.Tensor, torch.Tensor]:  # q_rot [N, Hq, D], k_rot [N, Hk, D]
    """RotaryEmbedding (cos/sin cast to q's dtype, then q * cos + rotate_half(q) * sin), then
    KVCache.write of k_rot and v into the slots (cast to the cache dtype)."""
    half = q.shape[-1] // 2
    cos_sin = cos_sin_cache[positions.long()][:, None, :]  # [N, 1, D]
    cos, sin = cos_sin[..., :half].to(q.dtype), cos_sin[..., half:].to(q.dtype)  # [N, 1, D/2]
    q_rot, k_rot = _rope_ref(q, cos, sin), _rope_ref(k, cos, sin)
    k_blocks[slot_block, slot_offset] = k_rot.to(k_blocks.dtype)
    v_blocks[slot_block, slot_offset] = v.to(v_blocks.dtype)
    return q_rot, k_rot


@triton.jit
def _rope_heads(
    src_ptr,  # first element of one token's [heads, D] (head stride stride_h, dim stride_d)
    stride_h,
    stride_d,
    cos,  # [HALF_PAD] fp32, already rounded to DTYPE
    sin,  # [HALF_PAD]
    num_heads,
    half,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Rotate one token's heads: ([HEADS_PAD, HALF_PAD] first halves, second halves, mask)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [HEADS_PAD, 1]
    dims = tl.arange(0, HALF_PAD)[None, :]  # [1, HALF_PAD]
    mask = (heads < num_heads) & (dims < half)
    ptrs = src_ptr + heads * stride_h + dims * stride_d
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]
    x2 = tl.load(ptrs + half * stride_d, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), each product and the
    # sum rounded to DTYPE as eager torch does (-(x2 * sin) rounds like (-x2) * sin).
    out1 = _round(_round(x1 * cos[None, :], DTYPE) - _round(x2 * sin[None, :], DTYPE), DTYPE)
    out2 = _round(_round(x2 * cos[None, :], DTYPE) + _round(x1 * sin[None, :], DTYPE), DTYPE)
    return out1, out2, mask


@triton.jit
def _rope_kv_write_kernel(
    q_ptr,  # [N, Hq, D]
    k_ptr,  # [N, Hk, D]
    v_ptr,  # [N, Hk, D]
    positions_ptr,  # [N]
    cache_ptr,  # [max_positions, D] fp32 (cos | sin)
    k_blocks_ptr,  # [num_blocks, T, Hk, D]
    v_blocks_ptr,  # [num_blocks, T, Hk, D]
    slot_block_ptr,  # [N]
    slot_offset_ptr,  # [N]
    q_out_ptr,  # [N, Hq, D]
    k_out_ptr,  # [N, Hk, D]
    q_heads,
    kv_heads,
    half,  # D / 2
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_cache,
    stride_kbb,
    stride_kbt,
    stride_kbh,
    stride_kbd,
    stride_vbb,
    stride_vbt,
    stride_vbh,
    stride_vbd,
    stride_qon,
    stride_qoh,
    stride_qod,
    stride_kon,
    stride_koh,
    stride_kod,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,  # D / 2 padded to a power of two
    DTYPE: tl.constexpr,  # q/k/v dtype: where eager torch rounds
):
    """One program = one token: all its q and k heads share one cos/sin row, and its K/V go to
    one cache slot."""
    n = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)  # [HALF_PAD]
    pos = tl.load(positions_ptr + n).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dims < half, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + half + dims, mask=dims < half, other=0.0)
    cos, sin = _round(cos, DTYPE), _round(sin, DTYPE)  # RotaryEmbedding casts them to q's dtype

    q_src = q_ptr + n * stride_qn
    q1, q2, q_mask = _rope_heads(q_src, stride_qh, stride_qd, cos, sin, q_heads, half, HQ_PAD,
                                 HALF_PAD, DTYPE)  # fmt: skip
    q_heads_i = tl.arange(0, HQ_PAD)[:, None]
    q_out = q_out_ptr + n * stride_qon + q_heads_i * stride_qoh + dims[None, :] * stride_qod
    tl.store(q_out, q1.to(DTYPE), mask=q_mask)
    tl.store(q_out + half * stride_qod, q2.to(DTYPE), mask=q_mask)

    k_src = k_ptr + n * stride_kn
    k1, k2, k_mask = _rope_heads(k_src, stride_kh, stride_kd, cos, sin, kv_heads, half, HK_PAD,
                                 HALF_PAD, DTYPE)  # fmt: skip
    kv_heads_i = tl.arange(0, HK_PAD)[:, None]
    k_out = k_out_ptr + n * stride_kon + kv_heads_i * stride_koh + dims[None, :] * stride_kod
    tl.store(k_out, k1.to(DTYPE), mask=k_mask)
    tl.store(k_out + half * stride_kod, k2.to(DTYPE), mask=k_mask)

    # The cache append. int64: block * stride overflows int32 in a pool of many GiB.
    block = tl.load(slot_block_ptr + n).to(tl.int64)
    offset = tl.load(slot_offset_ptr + n).to(tl.int64)
    k_slot = k_blocks_ptr + block * stride_kbb + offset * stride_kbt
    k_slot += kv_heads_i * stride_kbh + dims[None, :] * stride_kbd  # [HK_PAD, HALF_PAD]
    cache_dtype = k_blocks_ptr.dtype.element_ty
    tl.store(k_slot, k1.to(DTYPE).to(cache_dtype), mask=k_mask)
    tl.store(k_slot + half * stride_kbd, k2.to(DTYPE).to(cache_dtype), mask=k_mask)
    # v is copied as is, in two halves like k: D need not be a power of two.
    v_src = v_ptr + n * stride_vn + kv_heads_i * stride_vh + dims[None, :] * stride_vd
    v_slot = v_blocks_ptr + block * stride_vbb + offset * stride_vbt
    v_slot += kv_heads_i * stride_vbh + dims[None, :] * stride_vbd
    v_dtype = v_blocks_ptr.dtype.element_ty
    tl.store(v_slot, tl.load(v_src, mask=k_mask).to(v_dtype), mask=k_mask)
    tl.store(
        v_slot + half * stride_vbd,
        tl.load(v_src + half * stride_vd, mask=k_mask).to(v_dtype),
        mask=k_mask,
    )


def rope_kv_write(
    q: torch.Tensor,  # [N, Hq, D] (strided is fine: e.g. a split of a fused qkv output)
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    positions: torch.Tensor,  # [N] int, each < max_positions (not checked: no host sync)
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32 from build_cos_sin_cache
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D] (strided per-layer view: KVCache.layer)
    v_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]
    slot_block: torch.Tensor,  # [N] int
    slot_offset: torch.Tensor,  # [N] int
) -> tuple[torch.Tensor, torch.Tensor]:  # q_rot [N, Hq, D], k_rot [N, Hk, D], contiguous
    """Triton RoPE + KV cache append; matches `rope_kv_write_ref`. Grid (N,).

    Writes k_rot and v into k_blocks / v_blocks at (slot_block[i], slot_offset[i]) and returns
    the rotated q (for attention) and k (for a prefill path that attends over the new keys
    directly). Reads only device tensors: CUDA-graph safe.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            f"want q [N, Hq, D], k and v [N, Hk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (rotate-half RoPE)")
    if k_blocks.dim() != 4 or v_blocks.shape != k_blocks.shape or k_blocks.shape[2:] != k.shape[1:]:
        raise ValueError(f"k/v blocks {tuple(k_blocks.shape)} vs k {tuple(k.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)}: want [P, {head_dim}]")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(1) != 1:
        raise ValueError("cos_sin_cache must be a row-major fp32 table (build_cos_sin_cache)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_float(q=q, k_blocks=k_blocks, v_blocks=v_blocks)
    for name, t in (("positions", positions), ("slot_block", slot_block),
                    ("slot_offset", slot_offset)):  # fmt: skip
        if t.shape != (num_tokens,) or t.is_floating_point():
            raise ValueError(f"{name} must be an int tensor [N={num_tokens}]; got {t.shape}")

    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even if q is not
    k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_rot, k_rot
    half = head_dim // 2
    _rope_kv_write_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        k_blocks,
        v_blocks,
        slot_block,
        slot_offset,
        q_rot,
        k_rot,
        q_heads,
        kv_heads,
        half,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        cos_sin_cache.stride(0),
        *k_blocks.stride(),
        *v_blocks.stride(),
        *q_rot.stride(),
        *k_rot.stride(),
        HQ_PAD=triton.next_power_of_2(q_heads),
        HK_PAD=triton.next_power_of_2(kv_heads),
        HALF_PAD=triton.next_power_of_2(half),
        DTYPE=TL_DTYPES[q.dtype],
        num_warps=4,
        # Otherwise LLVM narrows round(x1 * cos) - round(x2 * sin) to bf16 maths and fuses it
        # into one fma.rn.bf16, dropping the products' rounding: ~23% of bf16 outputs then
        # differed from eager torch by an ulp (H200, Llama-3-8B q). Memory-bound: costs nothing.
        enable_fp_fusion=False,
    )
    return q_rot, k_rot


# ---- SiLU(gate) * up ----


def silu_and_mul_ref(
    gate_up: torch.Tensor,  # [N, 2I]: gate | up, as a fused gate_up projection writes them
) -> torch.Tensor:  # [N, I]
    """silu(gate) * up in the input dtype. silu is computed in fp32 and rounded once to the
    input dtype, then multiplied by up (rounded again): exactly `F.silu(gate) * up`, since
    torch's silu on bf16/fp16 computes in fp32 internally and rounds once."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return F.silu(gate.float()).to(gate_up.dtype) * up


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [N, 2I]
    out_ptr,  # [N, I]
    inter,  # I
    stride_gn,
    stride_gi,
    stride_on,
    stride_oi,
    BLOCK: tl.constexpr,
):
    """One program = BLOCK columns of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    src = gate_up_ptr + row * stride_gn + cols * stride_gi
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + inter * stride_gi, mask=mask, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype)  # torch's formula, rounded like F.silu
    tl.store(out_ptr + row * stride_on + cols * stride_oi, (silu * up).to(dtype), mask=mask)


def silu_and_mul(
    gate_up: torch.Tensor,  # [N, 2I]
) -> torch.Tensor:  # [N, I] in gate_up's dtype
    """Triton silu(gate) * up; matches `silu_and_mul_ref`. Grid (N, cdiv(I, SILU_BLOCK))."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"want gate_up [N, 2I]; got {tuple(gate_up.shape)}")
    _check_float(gate_up=gate_up)
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, *gate_up.stride(), *out.stride(), BLOCK=block, num_warps=4
    )
    return out
