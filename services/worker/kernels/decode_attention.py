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
is a `DecodePlan`, made by a small kernel once per step (`plan_decode`) and shared by the
step's layers.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

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
# The work split, chosen on an H200 with benchmarks/decode_kernel_sweep.py (docs/benchmarks.md,
# twenty-fourth session: half as many chunks as programs, longest first, gave 2-6 % shorter
# Llama-3-8B steps than one per program in request order at B = 64 x 1024-2048 and on mixed
# lengths of B = 32-256, and the same elsewhere within about 1 %).
# Programs per SM: more than fit at once, so the hardware hands the next one to whichever SM
# frees first. With one per SM, uniform batches ran 1.2-1.45x slower (an SM keeps fewer
# loads in flight).
PROGRAMS_PER_SM = 8
# Chunks per program: the work is cut into about P x this many items (a fraction: fewer,
# longer chunks than programs). Each chunk costs its program a pipeline fill and, for a
# request cut in several, a partial written and merged; a long chunk can leave a tail.
# At 1, B = 64 x 1024 keys was cut into chunks of 4 tiles, and its attention took 13-15 %
# longer than with requests left whole.
ITEMS_PER_PROGRAM = 0.5
# Rows longest item first: the programs start in order, so short items fill in behind the
# long ones, and no long one starts last. In request order, the longer chunks of 0.5 per
# program left a tail on mixed lengths (B = 256: steps 13 % longer than at 1 per program).
LONGEST_FIRST = True
# The shortest chunk length the plan aims at, in key tiles: a chunk costs its program the
# row's loads, a pipeline fill, and for a request of several a partial written and merged,
# whatever its length (cut to one tile each, a batch of 8 mixed lengths took 11 % longer).
MIN_CHUNK_TILES = 4
# Programs under the interpreter (CPU tensors): few, but enough that the default split cuts
# a long request among short ones (the merge); tests pass num_programs=1 for the loop over
# items.
CPU_PROGRAMS = 16
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
# Chunk rows each program of the plan kernel writes.
PLAN_ROWS = 8
# A chunk row of the plan: the request, its first and end key tile, the request's context
# length, its first chunk and how many it has. Padded to 8 int32 (32 bytes) per row.
CHUNK_FIELDS = tl.constexpr(8)


@triton.jit
def _request_tiles(
    ctx_ptrs,  # [BATCH_PAD] pointers to context lengths
    mask,  # [BATCH_PAD] which are requests
    sliding_window,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """(context length, first visible key tile, visible tiles) of each request."""
    ctx = tl.load(ctx_ptrs, mask=mask, other=0).to(tl.int32)
    first = tl.zeros_like(ctx)
    if HAS_WINDOW:
        first = tl.maximum(ctx - sliding_window, 0) // BLOCK_N
    return ctx, first, tl.where(mask, tl.cdiv(ctx, BLOCK_N) - first, 0)


@triton.jit
def _num_chunks(tiles, chunk):
    """Each request's chunks: its tiles over `chunk`, rounded (the tiles are then shared
    out evenly). A request of up to 1.5 chunks stays whole, not cut into one chunk and a
    scrap; a cut one's chunks are 0.5-1.25 times `chunk` long."""
    return tl.maximum((tiles + chunk // 2) // chunk, 1)


@triton.jit(do_not_specialize=["batch"])
def _decode_plan_kernel(
    context_lens_ptr,  # [B]
    chunks_ptr,  # [C, CHUNK_FIELDS] int32 out: one row per chunk (see CHUNK_FIELDS)
    num_items_ptr,  # [1] int32 out: chunks * kv_heads
    arrivals_ptr,  # [B * Hk] int32 out: zeroed
    stride_cb,
    batch,
    kv_heads,
    target_items,  # the work is cut into about this many items (chunks x kv heads) ...
    min_chunk_tiles,  # ... but the chunk length no shorter than this
    fixed_chunk_tiles,  # > 0: the chunk length, in key tiles (tests); 0: from the work
    sliding_window,
    BLOCK_N: tl.constexpr,
    BATCH_PAD: tl.constexpr,
    ROWS: tl.constexpr,  # chunk rows per program
    HAS_WINDOW: tl.constexpr,
    LONGEST_FIRST: tl.constexpr,  # rows ordered by their requests' longest item
):
    """The step's split of the keys, made once and read by every layer's attention kernel
    (the lengths are the same in all layers). The chunk length is the total key tiles
    over `target_items`, and each request is cut into about that long chunks, evenly
    (`_num_chunks`), so no item is longer than a fraction of a program's share, and a long
    request among short ones is spread over many programs, not left to one (with one
    program per (request, head), a request of 8k keys among ones of 1k made the whole
    kernel wait for it). Rows go longest chunk first (LONGEST_FIRST): programs start in
    order, so the short items fill in behind the long ones instead of a long one starting
    last. Every program computes the split over all requests ([BATCH_PAD] vectors) and
    writes ROWS of the chunk rows."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BATCH_PAD)
    b_mask = offs_b < batch
    ctx_all, first_all, tiles_all = _request_tiles(
        context_lens_ptr + offs_b * stride_cb, b_mask, sliding_window, BLOCK_N, HAS_WINDOW
    )
    chunk_tiles = fixed_chunk_tiles
    if fixed_chunk_tiles == 0:
        chunk_tiles = tl.maximum(
            tl.cdiv(tl.sum(tiles_all, 0) * kv_heads, target_items), min_chunk_tiles
        )
    order = offs_b  # [BATCH_PAD] the request at each position of the rows
    if LONGEST_FIRST:
        # one sort key: the request's chunk length, then the earlier request; padding (0)
        # sorts last
        longest = tl.cdiv(tiles_all, _num_chunks(tiles_all, chunk_tiles))
        key = tl.where(b_mask, (longest + 1) * BATCH_PAD + (BATCH_PAD - 1 - offs_b), 0)
        order = BATCH_PAD - 1 - tl.sort(key, descending=True) % BATCH_PAD
        ctx_all, first_all, tiles_all = _request_tiles(
            context_lens_ptr + order * stride_cb, b_mask, sliding_window, BLOCK_N, HAS_WINDOW
        )
    # every request has at least one chunk: an empty context still writes its zeros
    chunks_all = tl.where(b_mask, _num_chunks(tiles_all, chunk_tiles), 0)
    ends_all = tl.cumsum(chunks_all, 0)  # [BATCH_PAD] chunks up to and including position p
    total = tl.sum(chunks_all, 0)
    if pid == 0:
        tl.store(num_items_ptr, total * kv_heads)

    # this program's share of the arrival counters (the attention kernel counts on zeros)
    share = tl.cdiv(batch * kv_heads, tl.num_programs(0))
    offs_z = tl.arange(0, BATCH_PAD)
    for z in range(pid * share, tl.minimum((pid + 1) * share, batch * kv_heads), BATCH_PAD):
        end = tl.minimum((pid + 1) * share, batch * kv_heads)
        tl.store(arrivals_ptr + z + offs_z, 0, mask=z + offs_z < end)

    rows = pid * ROWS + tl.arange(0, ROWS)  # [R] chunk indices over all requests
    row_mask = rows < total
    p = tl.sum((ends_all[None, :] <= rows[:, None]).to(tl.int32), 1)  # [R] their positions
    at_p = offs_b[None, :] == p[:, None]  # [R, BATCH_PAD]
    b = tl.sum(tl.where(at_p, order[None, :], 0), 1)  # [R] their requests
    num_chunks = tl.sum(tl.where(at_p, chunks_all[None, :], 0), 1)  # [R]
    first_chunk = tl.sum(tl.where(at_p, ends_all[None, :], 0), 1) - num_chunks
    first_tile = tl.sum(tl.where(at_p, first_all[None, :], 0), 1)
    num_tiles = tl.sum(tl.where(at_p, tiles_all[None, :], 0), 1)
    # chunk i of k over t tiles: t // k tiles, one more for the first t % k
    i = rows - first_chunk
    cuts = tl.maximum(num_chunks, 1)  # (0 in rows past the last: never stored)
    share, extra = num_tiles // cuts, num_tiles % cuts
    lo = first_tile + i * share + tl.minimum(i, extra)
    hi = lo + share + (i < extra).to(tl.int32)  # lo == hi: no keys (an empty context)
    ctx_len = tl.sum(tl.where(at_p, ctx_all[None, :], 0), 1)
    row = chunks_ptr + rows * CHUNK_FIELDS
    tl.store(row, b, mask=row_mask)
    tl.store(row + 1, lo, mask=row_mask)
    tl.store(row + 2, hi, mask=row_mask)
    tl.store(row + 3, ctx_len, mask=row_mask)
    tl.store(row + 4, first_chunk, mask=row_mask)
    tl.store(row + 5, num_chunks, mask=row_mask)


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


@dataclass(frozen=True)
class DecodePlan:
    """One decode step's split of the keys into work items, made on the device once
    (`plan_decode`) and read by every layer's attention call: it depends only on the
    requests' context lengths, which all layers share. It also holds the workspace of the
    requests cut in several chunks, and their arrival counters, which each call leaves at
    zero for the next. So a plan serves one layer's call at a time, on one stream."""

    chunks: torch.Tensor  # [C, CHUNK_FIELDS] int32 chunk rows
    num_items: torch.Tensor  # [1] int32: chunks * kv_heads
    arrivals: torch.Tensor  # [B * Hk] int32
    ws_m: torch.Tensor  # [C, Hq] fp32
    ws_l: torch.Tensor  # [C, Hq] fp32
    ws_acc: torch.Tensor  # [C, Hq, D] fp32
    batch: int
    kv_heads: int
    num_programs: int  # the attention kernel's P
    block_n: int
    sliding_window: int | None

    def read(self) -> list[tuple[int, int, int]]:
        """(request, first tile, end tile) of every chunk, in order (tests, probes)."""
        total = int(self.num_items.item()) // self.kv_heads
        return [tuple(row) for row in self.chunks[:total, :3].tolist()]


def plan_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_blocks: torch.Tensor,  # [num_blocks, T, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    sliding_window: int | None = None,
    *,
    num_programs: int | None = None,
    chunk_tiles: int | None = None,
    block_n: int | None = None,
) -> DecodePlan:
    """The split of a step's keys among P persistent programs (`num_programs`; None:
    PROGRAMS_PER_SM per SM on a GPU, CPU_PROGRAMS under the interpreter): each request's key
    tiles cut into chunks, each chunk one work item per kv head (see `_decode_plan_kernel`).
    chunk_tiles: None sizes chunks from the work on the device; an int fixes their length
    (tests; see `_num_chunks`).
    block_n: keys per loop step (a power of two >= 16); None picks a default. Only the
    context lengths are read on the device and the launch depends on shapes alone, so this
    is CUDA-graph safe."""
    batch, q_heads, head_dim = q.shape
    block_tokens, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
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
    num_chunks = max_chunks(
        batch, kv_heads, num_programs, block_tables.shape[1] * block_tokens, block_n, chunk_tiles
    )
    device = q.device
    plan = DecodePlan(
        chunks=torch.empty((num_chunks, CHUNK_FIELDS.value), dtype=torch.int32, device=device),
        num_items=torch.empty(1, dtype=torch.int32, device=device),
        arrivals=torch.empty(max(batch, 1) * kv_heads, dtype=torch.int32, device=device),
        ws_m=torch.empty((num_chunks, q_heads), dtype=torch.float32, device=device),
        ws_l=torch.empty((num_chunks, q_heads), dtype=torch.float32, device=device),
        ws_acc=torch.empty((num_chunks, q_heads, head_dim), dtype=torch.float32, device=device),
        batch=batch,
        kv_heads=kv_heads,
        num_programs=num_programs,
        block_n=block_n,
        sliding_window=sliding_window,
    )
    if not batch:
        plan.num_items.zero_()
    else:
        _decode_plan_kernel[(_cdiv(num_chunks, PLAN_ROWS),)](
            context_lens,
            plan.chunks,
            plan.num_items,
            plan.arrivals,
            context_lens.stride(0),
            batch,
            kv_heads,
            _target_items(num_programs),
            MIN_CHUNK_TILES,
            chunk_tiles or 0,
            sliding_window or 0,
            BLOCK_N=block_n,
            BATCH_PAD=_batch_pad(batch),
            ROWS=PLAN_ROWS,
            HAS_WINDOW=sliding_window is not None,
            LONGEST_FIRST=LONGEST_FIRST,
            num_warps=4,
        )
    return plan


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


def max_chunks(
    batch: int,
    kv_heads: int,
    num_programs: int,
    max_context_tokens: int,
    block_n: int,
    chunk_tiles: int | None = None,
) -> int:
    """The most chunks the kernel's plan can cut B requests into: each request's tiles t_b
    make max(1, ceil(t_b / c)) <= 1 + t_b / c chunks, and c >= sum(t_b) * Hk / N (N the
    target items), so all together at most B + N / Hk. A fixed c bounds them by the
    table's width."""
    if chunk_tiles is not None:
        return batch * max(1, _cdiv(_cdiv(max_context_tokens, block_n), chunk_tiles))
    return batch + _cdiv(_target_items(num_programs), kv_heads)


def _target_items(num_programs: int) -> int:
    """How many work items (chunks x kv heads) the plan cuts a step's keys into, about."""
    return max(1, round(num_programs * ITEMS_PER_PROGRAM))


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


def plan_chunks(context_lens: list[int], *args, **options) -> list[int]:
    """How many chunks each request's keys are cut into (`plan_rows`' arguments)."""
    cut = collections.Counter(b for b, _, _ in plan_rows(context_lens, *args, **options))
    return [cut[b] for b in range(len(context_lens))]


def plan_rows(
    context_lens: list[int],
    kv_heads: int,
    num_programs: int,
    block_n: int,
    sliding_window: int | None = None,
    chunk_tiles: int | None = None,
) -> list[tuple[int, int, int]]:
    """The kernel's plan in plain Python: (request, first tile, end tile) of every chunk,
    in the plan's order (`DecodePlan.read`)."""
    first, tiles, chunk_tiles = _split(
        context_lens, kv_heads, num_programs, block_n, sliding_window, chunk_tiles
    )
    num_chunks = [_twin_num_chunks(t, chunk_tiles) for t in tiles]
    order = list(range(len(context_lens)))
    if LONGEST_FIRST:  # longest chunk first, then the earlier request (a stable sort)
        order.sort(key=lambda b: -_cdiv(tiles[b], num_chunks[b]))
    rows = []
    for b in order:
        share, extra = divmod(tiles[b], num_chunks[b])
        for i in range(num_chunks[b]):
            lo = first[b] + i * share + min(i, extra)
            rows.append((b, lo, lo + share + (i < extra)))
    return rows


def _twin_num_chunks(tiles: int, chunk: int) -> int:
    return max(1, (tiles + chunk // 2) // chunk)  # as `_num_chunks`


def _split(context_lens, kv_heads, num_programs, block_n, sliding_window, chunk_tiles):
    """Each request's first visible tile and visible tiles, and the chunk length in tiles."""
    first = [max(n - sliding_window, 0) // block_n if sliding_window else 0 for n in context_lens]
    tiles = [_cdiv(n, block_n) - f for n, f in zip(context_lens, first, strict=True)]
    if chunk_tiles is None:
        work = _cdiv(sum(tiles) * kv_heads, _target_items(num_programs))
        chunk_tiles = max(MIN_CHUNK_TILES, work)
    return first, tiles, chunk_tiles


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
