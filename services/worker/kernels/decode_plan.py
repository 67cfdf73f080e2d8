"""The decode attention kernel's work split: which keys of which request each program takes.

A decode step's attention reads every request's visible keys once per layer, and the cost
of a request is its length. Cutting the keys by request alone leaves a long request among
short ones to one program, and the whole kernel waits for it. So once per step, a small
kernel (`_decode_plan_kernel`, through `plan_decode`) cuts the step's key tiles into chunks
of about equal work, writes one row per chunk, longest first, and returns a frozen
`DecodePlan` that every layer's attention call reads (kernels/decode_attention.py): the
context lengths, and so the split, are the same in all layers. The plan also holds the
workspace where the chunks of a request cut in several leave their partial softmaxes, and
the counters that tell which program merges them.

`plan_rows` is the plan in plain Python (the kernel's twin); `plan_chunks` counts its rows
per request. `max_chunks` bounds the rows from shapes alone, so a CUDA graph can fix the
workspace at capture.

Shape letters: B requests, Hk kv heads, P persistent programs of the attention kernel,
C chunks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from alignedserve.worker.kernels.device import num_sms

# tl.dot needs M, N, K >= 16 on NVIDIA GPUs: the G query rows of a kv head are padded up to it,
# and key tiles are at least this long.
MIN_DOT = 16
# Keys per loop step on a GPU: 8 blocks of 16 per tile keep more loads in flight. On an H200
# (Llama-3-8B layer, bf16, B = 64 x 2048 keys) 16 / 32 / 64 / 128 took 208 / 150 / 178 / 141 us;
# 128 was also best at B = 256 x 1024 (3.9 TB/s) and for MHA.
GPU_BLOCK_N = 128
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
