"""Paged decode attention over the common KV block format: a Triton kernel and its torch twin.

Decode brings one new query per request; its K/V are already written into the cache at
position ctx_len - 1. For one layer the cache is read through the strided views
`k_blocks = blocks[:, layer, 0]` and `v_blocks = blocks[:, layer, 1]`, each
[num_blocks, block_tokens, kv_heads, head_dim]; position p of request b lives in block
`block_tables[b, p // block_tokens]` at offset `p % block_tokens`.

Shape letters: B requests, Hq query heads, Hk kv heads, G = Hq // Hk query heads per kv head
(GQA; G = 1 is MHA), D head_dim, T block_tokens, P persistent programs, C chunks.

`decode_attention_ref` is plain torch; `decode_attention` runs the Triton kernel (flash
decoding: each request's keys cut into chunks by the amount of work, the chunks of a request
cut in several merged by the program that finishes its last one) and must match it. The cut
is a `DecodePlan`, made by a small kernel once per step and shared by the step's layers
(kernels/decode_plan.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from alignedserve.worker.kernels.decode_plan import (
    CHUNK_FIELDS,
    MIN_DOT,
    DecodePlan,
    batch_pads,
    plan_decode,
)

LOG2E = math.log2(math.e)
# Running max before any key is seen: finite, so exp2(m_old - m_new) never sees -inf - -inf.
# (A tl.constexpr: the only kind of global a jitted kernel may read.)
NEG_INIT = tl.constexpr(-1.0e30)
NUM_WARPS = 4
NUM_STAGES = 3  # software pipelining depth of the key loop (loads in flight per program)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
FLOAT_DTYPES = tuple(TL_DTYPES)
TABLE_WIDTH_CLASSES = (1, 16, 17)  # warm_up's table widths: each class Triton specialises


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
    out_ptr,  # [B, Hq, D]
    chunks_ptr,  # [C, CHUNK_FIELDS] int32: the plan's chunk rows
    num_items_ptr,  # [1] int32
    arrivals_ptr,  # [B * Hk] int32: chunks of (request, kv head) done; zero before and after
    ws_m_ptr,  # [C, Hq] fp32 running max (log2 units) of each chunk of a request of several
    ws_l_ptr,  # [C, Hq] fp32 sum of exp2(score - m)
    ws_acc_ptr,  # [C, Hq, D] fp32 unnormalized sum of p * v
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # keys with ctx_len - 1 - pos >= window are invisible (HAS_WINDOW)
    kv_heads,
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
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,  # G query heads per kv head
    GROUP_PAD: tl.constexpr,  # G padded to a power of two >= 16 (tl.dot's minimum M)
    HEAD_DIM: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,  # T
    BLOCK_N: tl.constexpr,  # keys per loop step (power of two, >= 16)
    HAS_WINDOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.dot operand type: q's dtype (fp32 for bf16 in the interpreter)
):
    """A persistent program: it takes work items pid, pid + P, ... (P programs), each one
    chunk of the plan against one kv head's G query rows. A request of one chunk writes its
    output directly. The chunks of a longer one write partial softmaxes, and the program
    that finishes the last of them merges them (an arrival counter per (request, kv head)),
    so no second kernel runs."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_items = tl.load(num_items_ptr)
    q_heads = kv_heads * GROUP
    offs_g = tl.arange(0, GROUP_PAD)  # [G_PAD]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    g_mask = offs_g < GROUP
    for item in range(pid, num_items, num_programs):
        # head fastest: a request's heads run side by side
        kv_head = item % kv_heads
        chunk_index = item // kv_heads  # over all requests' chunks
        row = chunks_ptr + chunk_index * CHUNK_FIELDS
        b = tl.load(row)
        lo = tl.load(row + 1)
        hi = tl.load(row + 2)
        ctx_len = tl.load(row + 3)
        first_chunk = tl.load(row + 4)
        num_chunks = tl.load(row + 5)
        start = 0  # first visible key position
        if HAS_WINDOW:
            start = tl.maximum(ctx_len - sliding_window, 0)

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
            # A tile spans BLOCK_N // T blocks (or part of one): look up each key's block.
            # int64: block * stride overflows int32 in a pool of many GiB.
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

        out_rows = (
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        )
        if num_chunks == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no keys (ctx_len 0) -> zeros
            tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            ws = chunk_index * q_heads + heads  # [G_PAD] flat indices into [C, Hq]
            tl.store(ws_m_ptr + ws, m_i, mask=g_mask)
            tl.store(ws_l_ptr + ws, l_i, mask=g_mask)
            tl.store(ws_acc_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=g_mask[:, None])  # fmt: skip
            # Every thread's partial is stored before one thread counts the chunk as done
            # (acq_rel: released to the whole GPU; the last arrival acquires the others').
            tl.debug_barrier()
            counter = arrivals_ptr + b * kv_heads + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_chunks - 1:
                m = tl.full([GROUP_PAD], NEG_INIT, tl.float32)
                total = tl.zeros([GROUP_PAD], tl.float32)
                merged = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
                for c in range(first_chunk, first_chunk + num_chunks):
                    # .cg: from L2, where the other programs' partials are, never a stale L1
                    part = c * q_heads + heads  # [G_PAD]
                    m_c = tl.load(ws_m_ptr + part, mask=g_mask, other=NEG_INIT,
                                  cache_modifier=".cg")  # fmt: skip
                    l_c = tl.load(ws_l_ptr + part, mask=g_mask, other=0.0, cache_modifier=".cg")
                    acc_c = tl.load(ws_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                                    mask=g_mask[:, None], other=0.0,
                                    cache_modifier=".cg")  # fmt: skip
                    m_new = tl.maximum(m, m_c)
                    old, new = tl.exp2(m - m_new), tl.exp2(m_c - m_new)
                    total = total * old + l_c * new
                    merged = merged * old[:, None] + acc_c * new[:, None]
                    m = m_new
                out = merged / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
                tl.store(counter, 0)  # ready for the next layer's call on this plan


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
    *,
    plan: DecodePlan | None = None,
    num_programs: int | None = None,
    chunk_tiles: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [B, Hq, D] in q's dtype
    """Triton paged decode attention; matches `decode_attention_ref`.

    `plan`: the step's split (`plan_decode` on these lengths), shared by its layers; None
    makes one for this call, with the options given (`plan_decode`'s). A program loads the
    G query rows of its kv head once per chunk and streams that head's keys and values once
    for all G of them, which is what makes GQA decode cheap: every K/V byte is read once per
    step. The chunks of a request cut in several (flash decoding) are merged by the program
    that finishes the last of them."""
    _check_inputs(q, k_blocks, v_blocks, block_tables, context_lens, sliding_window)
    batch, q_heads, head_dim = q.shape
    block_tokens, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    if plan is None:
        plan = plan_decode(
            q, k_blocks, block_tables, context_lens, sliding_window,
            num_programs=num_programs, chunk_tiles=chunk_tiles, block_n=block_n,
        )  # fmt: skip
    elif (num_programs, chunk_tiles, block_n) != (None, None, None):
        raise ValueError("plan options (num_programs, chunk_tiles, block_n) given with a plan")
    expected = (batch, kv_heads, sliding_window, q_heads, head_dim)
    made_for = (plan.batch, plan.kv_heads, plan.sliding_window, *plan.ws_acc.shape[1:])
    if made_for != expected:
        raise ValueError(
            f"plan made for (batch, kv heads, window, q heads, head dim) {made_for}, "
            f"used for {expected}"
        )
    out = torch.empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    _decode_attention_kernel[(plan.num_programs,)](
        q,
        k_blocks,
        v_blocks,
        block_tables,
        out,
        plan.chunks,
        plan.num_items,
        plan.arrivals,
        plan.ws_m,
        plan.ws_l,
        plan.ws_acc,
        scale * LOG2E,
        sliding_window or 0,
        kv_heads,
        *q.stride(),
        *k_blocks.stride(),
        *v_blocks.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=q_heads // kv_heads,
        GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(q_heads // kv_heads)),
        HEAD_DIM=head_dim,
        BLOCK_TOKENS=block_tokens,
        BLOCK_N=plan.block_n,
        HAS_WINDOW=sliding_window is not None,
        # Triton's interpreter computes bf16 on raw bit patterns (it supports no bf16 math).
        DOT_DTYPE=tl.float32 if q.device.type == "cpu" else TL_DTYPES[q.dtype],
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


def warm_up(
    q_heads: int,
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]: one layer's view of a real cache
    v_blocks: torch.Tensor,
    max_batch: int,
    sliding_window: int | None = None,
) -> list[int]:
    """Compile every variant a batch of up to `max_batch` requests can use (one per padded
    batch size), so that no step waits for a compile; reads block 0, writes no KV. Returns
    the padded sizes."""
    pads = batch_pads(max_batch)
    device, dtype = k_blocks.device, k_blocks.dtype
    for pad in pads:
        q = torch.zeros((pad, q_heads, k_blocks.shape[-1]), dtype=dtype, device=device)
        ones = torch.ones(pad, dtype=torch.long, device=device)
        # A step's tables are as wide as its longest request, and Triton specialises their
        # row stride by class (1, a multiple of 16, other): one width of each.
        for width in TABLE_WIDTH_CLASSES:
            table = torch.zeros((pad, width), dtype=torch.long, device=device)
            decode_attention(q, k_blocks, v_blocks, table, ones, 1.0, sliding_window)
    return pads
