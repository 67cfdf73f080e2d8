"""Paged decode attention over the common KV block format: a Triton kernel and its torch twin.

Decode brings one new query per request; its K/V are already written into the cache at
position ctx_len - 1. For one layer the cache is read through the strided views
`k_blocks = blocks[:, layer, 0]` and `v_blocks = blocks[:, layer, 1]`, each
[num_blocks, block_tokens, kv_heads, head_dim]; position p of request b lives in block
`block_tables[b, p // block_tokens]` at offset `p % block_tokens`.

Shape letters: B requests, Hq query heads, Hk kv heads, G = Hq // Hk query heads per kv head
(GQA; G = 1 is MHA), D head_dim, T block_tokens, S splits of one request's keys.

`decode_attention_ref` is plain torch; `decode_attention` runs the Triton kernels (flash
decoding: an optional split of each request's keys, then a reduce) and must match it.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
# Running max before any key is seen: finite, so exp2(m_old - m_new) never sees -inf - -inf.
# (A tl.constexpr: the only kind of global a jitted kernel may read.)
NEG_INIT = tl.constexpr(-1.0e30)
# tl.dot needs M, N, K >= 16 on NVIDIA GPUs: the G query rows of a kv head are padded up to it,
# and key tiles are at least this long.
MIN_DOT = 16
# Keys per loop step on a GPU: 8 blocks of 16 per tile keep more loads in flight. On an H200
# (Llama-3-8B layer, bf16, B = 64 x 2048 keys) 16 / 32 / 64 / 128 took 208 / 150 / 178 / 141 us;
# 128 was also best at B = 256 x 1024 (3.9 TB/s) and for MHA.
GPU_BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 3  # software pipelining depth of the key loop (loads in flight per program)
# Auto split: aim for 2 programs per SM, but give each split at least this many keys, so the
# per-split fixed cost (query load, workspace write, reduce) stays small against its reads.
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 32
# Under the interpreter (CPU tensors) auto picks this, so tests exercise split and reduce.
CPU_SPLITS = 2
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
FLOAT_DTYPES = tuple(TL_DTYPES)


def _visible_keys(
    context_lens: torch.Tensor,  # [B]
    num_keys: int,
    sliding_window: int | None,
) -> torch.Tensor:  # [B, S] bool: may the decode query of request b see key position s?
    s = torch.arange(num_keys, device=context_lens.device)[None, :]  # [1, S]
    last = context_lens.long()[:, None] - 1  # [B, 1] position of the query itself
    visible = s <= last
    if sliding_window is not None:
        visible &= s > last - sliding_window
    return visible


def decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D] (a strided per-layer view is fine)
    v_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int; entries past a request's blocks unused
    context_lens: torch.Tensor,  # [B] int: keys 0..ctx_len-1 are valid
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [B, Hq, D] in q's dtype
    """Plain torch, fp32 softmax. A request with ctx_len 0 (batch padding) gets zeros."""
    batch, q_heads, head_dim = q.shape
    block_tokens, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    group = q_heads // kv_heads
    num_keys = block_tables.shape[1] * block_tokens
    table = block_tables.long()
    # Gather each request's blocks into a padded [B, S, Hk, D] copy of its context.
    keys = k_blocks[table].reshape(batch, num_keys, kv_heads, head_dim).float()
    values = v_blocks[table].reshape(batch, num_keys, kv_heads, head_dim).float()
    visible = _visible_keys(context_lens, num_keys, sliding_window)  # [B, S]
    # Zero invisible values: stale slots may hold anything (NaN too), and 0 * NaN = NaN.
    values = torch.where(visible[:, :, None, None], values, 0.0)
    qg = q.float().reshape(batch, kv_heads, group, head_dim)  # [B, Hk, G, D]: head h -> h // G
    scores = torch.einsum("bhgd,bshd->bhgs", qg, keys) * scale  # [B, Hk, G, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    out = torch.einsum("bhgs,bshd->bhgd", probs, values)  # [B, Hk, G, D]
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, T, Hk, D]
    v_ptr,  # [num_blocks, T, Hk, D]
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, D]: written when not SPLIT
    ws_m_ptr,  # [B, Hq, S] fp32 running max (log2 units), contiguous: written when SPLIT
    ws_l_ptr,  # [B, Hq, S] fp32 sum of exp2(score - m)
    ws_acc_ptr,  # [B, Hq, S, D] fp32 unnormalized sum of p * v
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # keys with ctx_len - 1 - pos >= window are invisible (HAS_WINDOW)
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tn,
    stride_cb,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,  # G query heads per kv head
    GROUP_PAD: tl.constexpr,  # G padded to a power of two >= 16 (tl.dot's minimum M)
    HEAD_DIM: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,  # T
    BLOCK_N: tl.constexpr,  # keys per loop step (power of two, >= 16)
    HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.dot operand type: q's dtype (fp32 for bf16 in the interpreter)
):
    """One program = (request b, kv head, split): its G query rows against its share of keys."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx_len = tl.load(context_lens_ptr + b * stride_cb).to(tl.int32)
    start = 0  # first visible key position
    if HAS_WINDOW:
        start = tl.maximum(ctx_len - sliding_window, 0)
    # Tiles wholly before the window are never visited. Every visited tile holds at least one
    # visible key (start in the first, ctx_len - 1 in the last), so m is finite after one tile.
    first_tile = start // BLOCK_N
    num_tiles = tl.cdiv(ctx_len, BLOCK_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    lo = first_tile + split * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, first_tile + num_tiles)  # may be <= lo: no keys

    offs_g = tl.arange(0, GROUP_PAD)  # [G_PAD]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # [G_PAD] query heads of this kv head

    # Padding rows (g >= G) load zeros: finite scores, so they never turn NaN; never stored.
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None],
        other=0.0,
    ).to(DOT_DTYPE)  # [G_PAD, D]
    m_i = tl.full([GROUP_PAD], NEG_INIT, tl.float32)  # running max of scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # running sum of p * v

    table_row = block_tables_ptr + b * stride_tb
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    for tile in range(lo, hi):
        pos = tile * BLOCK_N + offs_n  # [N] key positions of this tile
        valid = (pos < ctx_len) & (pos >= start)
        # A tile spans BLOCK_N // T blocks (or part of one): look up each key's block. int64:
        # block * stride overflows int32 in a pool of many GiB.
        block = tl.load(table_row + (pos // BLOCK_TOKENS) * stride_tn, mask=valid, other=0)
        block = block.to(tl.int64)
        slot = pos % BLOCK_TOKENS
        k = tl.load(
            k_head
            + block[:, None] * stride_kb
            + slot[:, None] * stride_kt
            + offs_d[None, :] * stride_kd,
            mask=valid[:, None],
            other=0.0,
        )  # [N, D]
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee")  # [G_PAD, N]
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # [G_PAD]
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(scores - m_new[:, None])  # [G_PAD, N]; invisible keys -> 0
        l_i = l_i * alpha + tl.sum(p, 1)
        # Masked to 0: stale slots may hold NaN, and p = 0 does not cancel NaN.
        v = tl.load(
            v_head
            + block[:, None] * stride_vb
            + slot[:, None] * stride_vt
            + offs_d[None, :] * stride_vd,
            mask=valid[:, None],
            other=0.0,
        )  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee"
        )  # [G_PAD, D]
        m_i = m_new

    if SPLIT:
        # [G_PAD] flat indices into the contiguous [B, Hq, S] workspace (Hq = Hk * G)
        ws = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(ws_m_ptr + ws, m_i, mask=g_mask)
        tl.store(ws_l_ptr + ws, l_i, mask=g_mask)
        tl.store(ws_acc_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no keys (ctx_len 0) -> zeros
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None],
        )


@triton.jit
def _reduce_splits_kernel(
    ws_m_ptr,  # [B, Hq, S] fp32
    ws_l_ptr,  # [B, Hq, S] fp32
    ws_acc_ptr,  # [B, Hq, S, D] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # S padded to a power of two
):
    """One program = (request b, query head h): merge the S partial softmaxes into one row."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)  # [S_PAD]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    s_mask = offs_s < num_splits
    ws = (b * tl.num_programs(1) + h) * num_splits + offs_s  # [S_PAD]
    m = tl.load(ws_m_ptr + ws, mask=s_mask, other=NEG_INIT)
    l = tl.load(ws_l_ptr + ws, mask=s_mask, other=0.0)  # noqa: E741 (the paper's name)
    acc = tl.load(
        ws_acc_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )  # [S_PAD, D]
    # Empty splits carry m = NEG_INIT, l = 0, acc = 0: their weight is 0 or multiplies zeros.
    weight = tl.exp2(m - tl.max(m, 0))  # [S_PAD]
    total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)  # [D]
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
    )


def auto_num_splits(batch: int, kv_heads: int, max_context_tokens: int, num_sms: int) -> int:
    """How many programs share one (request, kv head): enough to fill the GPU, no more.

    With B * Hk programs of one split the GPU runs about B * Hk / num_SMs waves. Below ~2
    programs per SM it idles, so each request's keys are split up to that (rounded down: a
    few programs past 2 per SM leave a tail; on an H200, B = 4 x 16384 keys took 81 us with
    8 splits, 94 us with 9), but every split keeps at least MIN_SPLIT_TOKENS keys of the
    longest context. Aligned batches (B = 64, Hk = 8 on 132 SMs) already fill the GPU and
    take the single-pass path with no workspace.
    """
    wanted = 2 * num_sms // max(1, batch * kv_heads)
    by_length = max(1, max_context_tokens // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@functools.cache
def _num_sms(device_index: int | None) -> int:
    # Cached: at small batches the kernel takes ~20 us and the host's launch path shows.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_inputs(q, k_blocks, v_blocks, block_tables, context_lens, sliding_window) -> None:
    if q.dim() != 3 or k_blocks.dim() != 4 or v_blocks.shape != k_blocks.shape:
        raise ValueError(
            f"want q [B, Hq, D] and k/v blocks [num_blocks, T, Hk, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k_blocks.shape)}, v {tuple(v_blocks.shape)}"
        )
    batch, q_heads, head_dim = q.shape
    _, block_tokens, kv_heads, kv_dim = k_blocks.shape
    if kv_dim != head_dim or q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} x {head_dim} vs kv heads {kv_heads} x {kv_dim}")
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= {MIN_DOT}")
    if block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens={block_tokens} must be a power of two")
    for name, t in (("q", q), ("k_blocks", k_blocks), ("v_blocks", v_blocks)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} not one of {FLOAT_DTYPES}")
    for name, t, dims in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
        if t.dim() != dims or t.shape[0] != batch or t.is_floating_point():
            raise ValueError(f"{name} must be an int tensor [B={batch}, ...]; got {t.shape}")
    devices = {t.device for t in (q, k_blocks, v_blocks, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {devices}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window={sliding_window} must be > 0")


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D] (strided is fine)
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D] (strided per-layer view is fine)
    v_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32 or int64
    context_lens: torch.Tensor,  # [B] int: keys 0..ctx_len-1 are valid (0 -> output zeros)
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    *,
    block_n: int | None = None,
) -> torch.Tensor:  # [B, Hq, D] in q's dtype
    """Triton paged decode attention; matches `decode_attention_ref`.

    Launch grid (B, Hk, S): one program per request, kv head and split. A program loads the
    G query rows of its kv head once and streams that head's keys and values once for all G
    of them, which is what makes GQA decode cheap: every K/V byte is read once per step.
    With S = 1 the program writes the output directly. With S > 1 (flash decoding: too few
    (request, head) pairs to fill the GPU) each program handles a contiguous 1/S of the
    request's key tiles and writes its partial softmax (m, l, acc) to an fp32 workspace,
    and a second kernel on grid (B, Hq) merges the S partials of each row.

    num_splits: None picks with `auto_num_splits` on a GPU (no host sync: the longest
    context is bounded by the block table's width) and CPU_SPLITS under the interpreter.
    block_n: keys per loop step (a power of two >= 16); None picks a default. Only the
    block table and context lengths are read on the device, so this is CUDA-graph safe.
    """
    _check_inputs(q, k_blocks, v_blocks, block_tables, context_lens, sliding_window)
    batch, q_heads, head_dim = q.shape
    block_tokens, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    group = q_heads // kv_heads
    on_gpu = q.device.type == "cuda"
    if block_n is None:
        block_n = max(block_tokens, GPU_BLOCK_N if on_gpu else MIN_DOT)
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two >= {MIN_DOT}")
    if num_splits is None:
        if on_gpu:
            num_sms = _num_sms(q.device.index)
            max_context = block_tables.shape[1] * block_tokens
            num_splits = auto_num_splits(batch, kv_heads, max_context, num_sms)
        else:
            num_splits = CPU_SPLITS
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")

    out = torch.empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    split = num_splits > 1
    if split:
        ws_m = torch.empty((batch, q_heads, num_splits), dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty(
            (batch, q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
    else:  # direct write: the workspace arguments are never touched
        ws_m = ws_l = ws_acc = out

    grid = (batch, kv_heads, num_splits)
    _decode_attention_kernel[grid](
        q,
        k_blocks,
        v_blocks,
        block_tables,
        context_lens,
        out,
        ws_m,
        ws_l,
        ws_acc,
        scale * LOG2E,
        sliding_window or 0,
        num_splits,
        *q.stride(),
        *k_blocks.stride(),
        *v_blocks.stride(),
        *block_tables.stride(),
        context_lens.stride(0),
        *out.stride(),
        GROUP=group,
        GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_TOKENS=block_tokens,
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        SPLIT=split,
        # Triton's interpreter computes bf16 on raw bit patterns (it supports no bf16 math).
        DOT_DTYPE=tl.float32 if q.device.type == "cpu" else TL_DTYPES[q.dtype],
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if split:
        _reduce_splits_kernel[(batch, q_heads)](
            ws_m,
            ws_l,
            ws_acc,
            out,
            num_splits,
            *out.stride(),
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
