"""Paged decode attention over the common KV block format: a Triton kernel and its torch twin.

Decode brings one new query per request; its K/V are already written into the cache at
position ctx_len - 1. For one layer the cache is read through the strided views
`k_blocks = blocks[:, layer, 0]` and `v_blocks = blocks[:, layer, 1]`, each
[num_blocks, block_tokens, kv_heads, head_dim]; position p of request b lives in block
`block_tables[b, p // block_tokens]` at offset `p % block_tokens`.

Shape letters: B requests, Hq query heads, Hk kv heads, G = Hq // Hk query heads per kv head
(GQA; G = 1 is MHA), D head_dim, T block_tokens, P persistent programs, C chunks.

`decode_attention_ref` is plain torch; `decode_attention` runs the Triton kernels (flash
decoding: each request's keys cut into chunks by the amount of work, then a reduce of the
requests cut in several) and must match it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from alignedserve.worker.kernels.device import num_sms

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
# Programs per SM on a GPU: more than fit at once, so the hardware hands the next one to
# whichever SM frees first. With one per SM, uniform batches ran 1.2-1.45x slower (an SM
# keeps fewer loads in flight).
PROGRAMS_PER_SM = 4
# Chunks per program: the work is cut so each program gets about this many, so the longest
# chunk is a fraction of a program's share (the tail it can leave), while the partials of
# requests cut in several stay few against the keys read. Chosen on an H200 with
# benchmarks/decode_kernel_sweep.py (docs/benchmarks.md): 4 x 2 kept uniform batches within
# 6 % of one program per (request, head) and cut served-like mixed ones by 7-40 %.
ITEMS_PER_PROGRAM = 2
# Programs under the interpreter (CPU tensors): few, so tests exercise the loop and reduce.
CPU_PROGRAMS = 3
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


# The plan's vectors over the requests are padded to a power of two, at least this: every
# Triton variant is a compile (about a second), and eager decode rows of mixed steps come in
# any number, so all batches up to it share one, and warm_up compiles the rest before serving.
MIN_BATCH_PAD = 64


@triton.jit(do_not_specialize=["batch"])
def _decode_attention_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, T, Hk, D]
    v_ptr,  # [num_blocks, T, Hk, D]
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, D]: a row of one chunk is written here directly
    chunk_starts_ptr,  # [B + 1] int32: written by program 0, for the reduce
    ws_m_ptr,  # [C, Hq] fp32 running max (log2 units) of each chunk of a row of several
    ws_l_ptr,  # [C, Hq] fp32 sum of exp2(score - m)
    ws_acc_ptr,  # [C, Hq, D] fp32 unnormalized sum of p * v
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    sliding_window,  # keys with ctx_len - 1 - pos >= window are invisible (HAS_WINDOW)
    batch,
    kv_heads,
    items_per_program,  # work is cut into chunks so that each program gets about this many
    fixed_chunk_tiles,  # > 0: chunks of this many key tiles (tests); 0: from the work
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
    BATCH_PAD: tl.constexpr,  # B padded to a power of two, at least MIN_BATCH_PAD
    HAS_WINDOW: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.dot operand type: q's dtype (fp32 for bf16 in the interpreter)
):
    """A persistent program: it takes work items pid, pid + P, ... (P programs), each one
    chunk of one request's key tiles for one kv head, against that head's G query rows.

    Every program first plans the same split from the context lengths: the chunk length is
    the total key tiles over P * items_per_program, so no item is longer than a fraction of
    a program's share and a long request among short ones is spread over many programs,
    not left to one (with one program per (request, head), a request of 8k keys among ones
    of 1k made the whole kernel wait for it). A request of one chunk writes its output
    directly; the chunks of a longer one write partial softmaxes for the reduce."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)

    # ---- the plan, the same in every program: [BATCH_PAD] vectors over the requests
    offs_b = tl.arange(0, BATCH_PAD)
    b_mask = offs_b < batch
    ctx_all = tl.load(context_lens_ptr + offs_b * stride_cb, mask=b_mask, other=0).to(tl.int32)
    first_all = tl.zeros([BATCH_PAD], tl.int32)
    if HAS_WINDOW:
        first_all = tl.maximum(ctx_all - sliding_window, 0) // BLOCK_N
    tiles_all = tl.where(b_mask, tl.cdiv(ctx_all, BLOCK_N) - first_all, 0)
    chunk_tiles = fixed_chunk_tiles
    if fixed_chunk_tiles == 0:
        chunk_tiles = tl.maximum(
            tl.cdiv(tl.sum(tiles_all, 0) * kv_heads, num_programs * items_per_program), 1
        )
    # every request has at least one chunk: an empty context still writes its zeros
    chunks_all = tl.where(b_mask, tl.maximum(tl.cdiv(tiles_all, chunk_tiles), 1), 0)
    ends_all = tl.cumsum(chunks_all, 0)  # [BATCH_PAD] chunks up to and including request b
    if pid == 0:
        tl.store(chunk_starts_ptr + 1 + offs_b, ends_all, mask=b_mask)
        tl.store(chunk_starts_ptr, 0)
    num_items = tl.sum(chunks_all, 0) * kv_heads

    offs_g = tl.arange(0, GROUP_PAD)  # [G_PAD]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    g_mask = offs_g < GROUP
    for item in range(pid, num_items, num_programs):
        # head fastest: a request's heads run side by side
        kv_head = item % kv_heads
        chunk_index = item // kv_heads  # over all requests' chunks
        b = tl.sum((ends_all <= chunk_index).to(tl.int32), 0)  # the request it falls in
        at_b = offs_b == b
        num_chunks = tl.sum(tl.where(at_b, chunks_all, 0), 0)
        chunk = chunk_index - (tl.sum(tl.where(at_b, ends_all, 0), 0) - num_chunks)
        ctx_len = tl.sum(tl.where(at_b, ctx_all, 0), 0)
        first_tile = tl.sum(tl.where(at_b, first_all, 0), 0)
        num_tiles = tl.sum(tl.where(at_b, tiles_all, 0), 0)
        start = 0  # first visible key position
        if HAS_WINDOW:
            start = tl.maximum(ctx_len - sliding_window, 0)
        lo = first_tile + chunk * chunk_tiles
        hi = tl.minimum(lo + chunk_tiles, first_tile + num_tiles)  # may be <= lo: no keys

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

        alone = num_chunks == 1
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no keys (ctx_len 0) -> zeros
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & alone,
        )
        # [G_PAD] flat indices into the contiguous [C, Hq] workspace (Hq = Hk * G)
        ws = chunk_index * (kv_heads * GROUP) + heads
        partial = g_mask & (num_chunks > 1)
        tl.store(ws_m_ptr + ws, m_i, mask=partial)
        tl.store(ws_l_ptr + ws, l_i, mask=partial)
        tl.store(ws_acc_ptr + ws[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=partial[:, None])


@triton.jit
def _reduce_chunks_kernel(
    chunk_starts_ptr,  # [B + 1] int32: request b's chunks are [starts[b], starts[b + 1])
    ws_m_ptr,  # [C, Hq] fp32
    ws_l_ptr,  # [C, Hq] fp32
    ws_acc_ptr,  # [C, Hq, D] fp32
    out_ptr,  # [B, Hq, D]
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
):
    """One program = (request b, query head h): merge b's partial softmaxes, if it has
    several chunks (one of a single chunk was written by the attention kernel)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_heads = tl.num_programs(1)
    first = tl.load(chunk_starts_ptr + b)
    last = tl.load(chunk_starts_ptr + b + 1)
    if last - first > 1:
        offs_d = tl.arange(0, HEAD_DIM)  # [D]
        m = tl.full([1], NEG_INIT, tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for c in range(first, last):  # online merge; an empty chunk has l = 0, acc = 0
            m_c = tl.load(ws_m_ptr + c * q_heads + h + tl.zeros([1], tl.int32))
            l_c = tl.load(ws_l_ptr + c * q_heads + h + tl.zeros([1], tl.int32))
            acc_c = tl.load(ws_acc_ptr + (c * q_heads + h) * HEAD_DIM + offs_d)
            m_new = tl.maximum(m, m_c)
            old, new = tl.exp2(m - m_new), tl.exp2(m_c - m_new)
            total = total * old + l_c * new
            acc = acc * old + acc_c * new
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)  # [D]
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
            out.to(out_ptr.dtype.element_ty),
        )


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
    num_programs: int | None = None,
    chunk_tiles: int | None = None,
    block_n: int | None = None,
    chunk_starts: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, Hq, D] in q's dtype
    """Triton paged decode attention; matches `decode_attention_ref`.

    P persistent programs (`num_programs`; None: PROGRAMS_PER_SM per SM on a GPU,
    CPU_PROGRAMS under the interpreter) share the work, cut on the device into chunks of
    each request's key tiles for one kv head (see the kernel). A program loads the G query
    rows of its kv head once per chunk and streams that head's keys and values once for all
    G of them, which is what makes GQA decode cheap: every K/V byte is read once per step. A
    request of several chunks (flash decoding) is merged by a second kernel on grid (B, Hq).

    chunk_tiles: None sizes chunks from the work on the device; an int fixes them (tests).
    chunk_starts: an int32 [B + 1] tensor to receive the plan (request b's chunks are
    [starts[b], starts[b + 1])); None: a scratch one.
    block_n: keys per loop step (a power of two >= 16); None picks a default. Only the
    block table and context lengths are read on the device and the launch depends on
    shapes alone, so this is CUDA-graph safe.
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
    if num_programs is None:
        num_programs = PROGRAMS_PER_SM * num_sms(q.device.index) if on_gpu else CPU_PROGRAMS
    if num_programs < 1:
        raise ValueError(f"num_programs={num_programs} must be >= 1")
    if chunk_tiles is not None and chunk_tiles < 1:
        raise ValueError(f"chunk_tiles={chunk_tiles} must be >= 1")

    out = torch.empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    num_chunks = max_chunks(
        batch, kv_heads, num_programs, block_tables.shape[1] * block_tokens, block_n, chunk_tiles
    )
    ws_m = torch.empty((num_chunks, q_heads), dtype=torch.float32, device=q.device)
    ws_l = torch.empty_like(ws_m)
    ws_acc = torch.empty((num_chunks, q_heads, head_dim), dtype=torch.float32, device=q.device)
    if chunk_starts is None:
        chunk_starts = torch.empty(batch + 1, dtype=torch.int32, device=q.device)
    elif chunk_starts.shape != (batch + 1,) or chunk_starts.dtype != torch.int32:
        raise ValueError(f"chunk_starts must be int32 [{batch + 1}]; got {chunk_starts.shape}")
    _decode_attention_kernel[(num_programs,)](
        q,
        k_blocks,
        v_blocks,
        block_tables,
        context_lens,
        out,
        chunk_starts,
        ws_m,
        ws_l,
        ws_acc,
        scale * LOG2E,
        sliding_window or 0,
        batch,
        kv_heads,
        ITEMS_PER_PROGRAM,
        chunk_tiles or 0,
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
        BATCH_PAD=_batch_pad(batch),
        HAS_WINDOW=sliding_window is not None,
        # Triton's interpreter computes bf16 on raw bit patterns (it supports no bf16 math).
        DOT_DTYPE=tl.float32 if q.device.type == "cpu" else TL_DTYPES[q.dtype],
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    _reduce_chunks_kernel[(batch, q_heads)](
        chunk_starts, ws_m, ws_l, ws_acc, out, *out.stride(), HEAD_DIM=head_dim, num_warps=4
    )
    return out


def max_chunks(
    batch: int,
    kv_heads: int,
    num_programs: int,
    max_context_tokens: int,
    block_n: int,
    chunk_tiles: int | None = None,
) -> int:
    """The most chunks the kernel's plan can cut B requests into: each request's tiles t_b
    make max(1, ceil(t_b / c)) <= 1 + t_b / c chunks, and c >= sum(t_b) * Hk / (P * I), so
    all together at most B + P * I / Hk. A fixed c bounds them by the table's width."""
    if chunk_tiles is not None:
        return batch * max(1, _cdiv(_cdiv(max_context_tokens, block_n), chunk_tiles))
    return batch + _cdiv(num_programs * ITEMS_PER_PROGRAM, kv_heads)


def _batch_pad(batch: int) -> int:
    return max(MIN_BATCH_PAD, triton.next_power_of_2(batch))


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
        table = torch.zeros((pad, 1), dtype=torch.long, device=device)
        ones = torch.ones(pad, dtype=torch.long, device=device)
        decode_attention(q, k_blocks, v_blocks, table, ones, 1.0, sliding_window)
    return pads


def batch_pads(max_batch: int) -> list[int]:
    """The padded batch sizes (kernel variants) of batches of 1..max_batch requests."""
    pads = [MIN_BATCH_PAD]
    while pads[-1] < _batch_pad(max_batch):
        pads.append(2 * pads[-1])
    return pads


def plan_chunks(
    context_lens: list[int],
    kv_heads: int,
    num_programs: int,
    block_n: int,
    sliding_window: int | None = None,
    chunk_tiles: int | None = None,
) -> list[int]:
    """The kernel's plan in plain Python: how many chunks each request's keys are cut into."""
    first = [max(n - sliding_window, 0) // block_n if sliding_window else 0 for n in context_lens]
    tiles = [_cdiv(n, block_n) - f for n, f in zip(context_lens, first, strict=True)]
    if chunk_tiles is None:
        chunk_tiles = max(1, _cdiv(sum(tiles) * kv_heads, num_programs * ITEMS_PER_PROGRAM))
    return [max(1, _cdiv(t, chunk_tiles)) for t in tiles]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
