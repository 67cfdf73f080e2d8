"""Triton paged decode attention against its torch twin, and the twin against the model path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tiny shapes). With one,
the same tiny cases run compiled on it, and the `gpu` tests add realistic shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from alignedserve.common.kv_layout import KVLayout
from alignedserve.worker.attention import AttentionMetadata, paged_attention_ref
from alignedserve.worker.kv_cache import KVCache

from triton_cpu import DEVICE, HAS_CUDA, kernel_module, scalar_loop_bounds

# the plan first: a re-imported attention module then takes the re-imported plan's functions
dpm = kernel_module("alignedserve.worker.kernels.decode_plan", "_decode_plan_kernel")
dam = kernel_module("alignedserve.worker.kernels.decode_attention", "_decode_attention_kernel")

NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_scalar_index():
    with scalar_loop_bounds():
        yield


def make_case(
    contexts: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int = 64,
    block_tokens: int = 16,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    device: str = DEVICE,
    seed: int = 0,
):
    """A pool of blocks [num_blocks, layers=2, 2, T, Hk, D] read through layer 1's strided views.

    Each request's blocks are a shuffled, non-contiguous subset of a larger pool. Every slot
    the query must not see holds NaN: the other layer, spare blocks, the tail of each last
    block, slots before the sliding window, and the block that block-table padding points
    at. A kernel that reads one of them, or mixes up a stride, returns NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(contexts)
    num_req_blocks = [-(-c // block_tokens) for c in contexts]
    max_blocks = max(1, *num_req_blocks)
    num_blocks = sum(num_req_blocks) + 3  # spares, one of them the padding target
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((batch, max_blocks), int(order[-1]), dtype=torch.long)
    start = 0
    for b, n in enumerate(num_req_blocks):
        table[b, :n] = order[start : start + n]
        start += n

    shape = (num_blocks, 2, 2, block_tokens, kv_heads, head_dim)
    torch.manual_seed(seed)
    pool = torch.empty(shape, dtype=dtype, device=device).normal_()
    pool[:, 0] = NAN  # the other layer
    visible = torch.zeros((num_blocks, block_tokens), dtype=torch.bool)  # [num_blocks, T]
    positions = torch.arange(max_blocks * block_tokens)
    for b, (ctx, n) in enumerate(zip(contexts, num_req_blocks, strict=True)):
        seen = positions < ctx
        if sliding_window is not None:
            seen &= positions >= ctx - sliding_window
        visible[table[b, :n]] = seen[: n * block_tokens].reshape(n, block_tokens)
    pool.masked_fill_(~visible.to(device)[:, None, None, :, None, None], NAN)

    q = torch.randn((batch, q_heads, head_dim), generator=gen).to(device, dtype)
    k_blocks, v_blocks = pool[:, 1, 0], pool[:, 1, 1]  # [num_blocks, T, Hk, D], strided
    lens = torch.tensor(contexts, dtype=torch.long, device=device)
    return q, k_blocks, v_blocks, table.to(device), lens


# How the kernel cuts the work: its own plan over 3 programs; every key tile a chunk of its
# own (most requests merged from several partials); one program doing every item in turn.
SPLITS = {
    "auto": {},
    "tile-chunks": dict(chunk_tiles=1),
    "one-program": dict(num_programs=1, chunk_tiles=2),
}


def check(contexts, q_heads, kv_heads, atol, rtol=0.0, *, split, block_n=None, **case):
    window = case.get("sliding_window")
    q, k, v, table, lens = make_case(contexts, q_heads, kv_heads, **case)
    scale = q.shape[-1] ** -0.5
    want = dam.decode_attention_ref(q, k, v, table, lens, scale, window)
    got = dam.decode_attention(
        q, k, v, table, lens, scale, window, block_n=block_n, **SPLITS[split]
    )
    assert got.dtype == q.dtype and got.shape == q.shape
    assert not want.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


HEADS = [(4, 4), (8, 2)]  # MHA, GQA (G = 4)
CONTEXTS = [(1,), (50,), (15, 16, 17), (1, 50, 16)]  # B in {1, 3}; block edges at T = 16


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("contexts", CONTEXTS, ids=str)
def test_kernel_matches_ref_fp32(contexts, heads, split):
    check(list(contexts), *heads, atol=1e-4, split=split)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", SPLITS)
def test_kernel_matches_ref_half(dtype, split):
    check([1, 17, 50], 8, 2, atol=2e-2, rtol=1e-2, dtype=dtype, split=split)


@pytest.mark.parametrize(
    ("block_tokens", "block_n"),
    [(16, 32), (16, 64), (32, 16), (32, 32)],
    ids=["2-blocks-per-tile", "4-blocks-per-tile", "half-block-per-tile", "1-block-per-tile"],
)
@pytest.mark.parametrize("split", SPLITS)
def test_tile_and_block_sizes(block_tokens, block_n, split):
    check([1, 31, 32, 33, 50], 8, 2, atol=1e-4, split=split, block_n=block_n,
          block_tokens=block_tokens)  # fmt: skip


@pytest.mark.parametrize("window", [1, 7, 16, 20])
@pytest.mark.parametrize("split", SPLITS)
def test_sliding_window(window, split):
    # NaN before the window: blocks wholly before it are skipped, the rest are masked.
    check([1, 15, 17, 50], 8, 2, atol=1e-4, split=split, sliding_window=window)


def test_default_plan_and_strided_inputs():
    """The default plan, a non-contiguous q, and an int32 block table with extra padding."""
    q, k, v, table, lens = make_case([3, 40], 8, 2)
    q_strided = torch.stack([q, q], dim=-1)[..., 0]  # [B, Hq, D], stride(2) == 2
    assert not q_strided.is_contiguous()
    wide = torch.cat([table, table[:, :1].expand(-1, 5)], dim=1).to(torch.int32)
    want = dam.decode_attention_ref(q, k, v, table, lens, 0.125)
    got = dam.decode_attention(q_strided, k, v, wide, lens.to(torch.int32), 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("split", SPLITS)
def test_empty_context_gives_zeros(split):
    """Batch padding (ctx_len 0) must come out as zeros, not NaN, in both twins."""
    q, k, v, table, lens = make_case([0, 20], 8, 2)
    want = dam.decode_attention_ref(q, k, v, table, lens, 0.125)
    got = dam.decode_attention(q, k, v, table, lens, 0.125, **SPLITS[split])
    assert (want[0] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [None, 20])
def test_a_long_request_is_cut_into_chunks_and_matches(window):
    """One long request among short ones (what made one program the whole kernel's tail):
    the plan made on the device, read back, is the Python twin's, cuts the long one into
    several chunks of consecutive tiles and leaves the short ones whole; the output matches
    the reference. With a window, only its tiles count."""
    contexts = [300, 9, 17, 1, 33, 12]
    q, k, v, table, lens = make_case(contexts, 8, 2, sliding_window=window)
    # 16-key tiles on every device (a GPU's default is longer)
    plan = dpm.plan_decode(q, k, table, lens, window, num_programs=16, block_n=dpm.MIN_DOT)
    got = dam.decode_attention(q, k, v, table, lens, 0.125, window, plan=plan)
    chunks = dpm.plan_chunks(contexts, 2, 16, dpm.MIN_DOT, window)
    rows = plan.read()
    assert rows == dpm.plan_rows(contexts, 2, 16, dpm.MIN_DOT, window)
    assert sorted(b for b, _, _ in rows) == [b for b, n in enumerate(chunks) for _ in range(n)]
    for b, ctx in enumerate(contexts):  # the chunks of a request tile its visible keys
        tiles = [(lo, hi) for r, lo, hi in rows if r == b]
        first = max(ctx - window, 0) // dpm.MIN_DOT if window else 0
        assert tiles[0][0] == first and tiles[-1][1] == -(-ctx // dpm.MIN_DOT)
        assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(tiles))
    if window is None:  # (with one, the long request has as few visible keys as the rest)
        assert chunks[0] > 1 and chunks[1:] == [1] * 5, chunks
    want = dam.decode_attention_ref(q, k, v, table, lens, 0.125, window)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("longest_first", [True, False])
def test_rows_go_longest_item_first(monkeypatch, longest_first):
    """Programs start in row order: with LONGEST_FIRST the chunks of the long requests come
    first and the whole short ones follow, longest first, ties in request order; without
    it, rows keep the requests' order. Either way the output matches the reference."""
    monkeypatch.setattr(dpm, "LONGEST_FIRST", longest_first)
    contexts = [20, 5, 300, 40, 37, 16, 200]  # tiles of 16 keys: 2, 1, 19, 3, 3, 1, 13
    q, k, v, table, lens = make_case(contexts, 8, 2)
    plan = dpm.plan_decode(q, k, table, lens, num_programs=32, block_n=dpm.MIN_DOT)
    rows = plan.read()
    assert rows == dpm.plan_rows(contexts, 2, 32, dpm.MIN_DOT)
    # chunks of >= 6 tiles, shared out evenly: 300 keys (19 tiles) in 3, 200 (13) in 2
    assert len(rows) == 10 and [hi - lo for b, lo, hi in rows if b == 2] == [7, 6, 6]
    requests = list(dict.fromkeys(b for b, _, _ in rows))
    assert requests == ([2, 6, 3, 4, 0, 1, 5] if longest_first else list(range(7)))
    got = dam.decode_attention(q, k, v, table, lens, 0.125, plan=plan)
    want = dam.decode_attention_ref(q, k, v, table, lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("split", SPLITS)
def test_one_plan_serves_every_layer(split):
    """A step plans once and its layers share the plan: each call merges the requests cut
    in several from its own partials and leaves the arrival counters at zero for the next
    (a counter left behind would make the next layer merge too early, or never)."""
    contexts = [200, 3, 45, 16]
    q, k, v, table, lens = make_case(contexts, 8, 2)
    plan = dpm.plan_decode(q, k, table, lens, block_n=dpm.MIN_DOT, **SPLITS[split])
    cut = dpm.plan_chunks(contexts, 2, plan.num_programs, plan.block_n,
                          chunk_tiles=SPLITS[split].get("chunk_tiles"))  # fmt: skip
    assert sum(cut) > len(contexts)  # some request is merged from several chunks
    for layer in range(3):
        q_l = torch.randn(q.shape, generator=torch.Generator().manual_seed(layer)).to(q)
        k_l, v_l = k * (layer + 1), v - layer  # other keys and values, the same NaN slots
        got = dam.decode_attention(q_l, k_l, v_l, table, lens, 0.125, plan=plan)
        want = dam.decode_attention_ref(q_l, k_l, v_l, table, lens, 0.125)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert not plan.arrivals.any()


@pytest.mark.parametrize("mixed", [False, True], ids=["decode-pass", "mixed-pass"])
def test_a_pass_plans_once_for_its_decode_rows(mixed):
    """`AttentionMetadata.decode_plan`: made at the first layer's call, the same plan for
    every later one (per window); in a mixed pass it covers only the decode rows, whose
    tables and lengths the kernel then reads."""
    contexts = [40, 200, 7]
    q_all, k, v, table, lens = make_case(contexts, 8, 2)
    tables = [[int(b) for b in row[: -(-c // 16)]] for row, c in zip(table, contexts, strict=True)]
    q_lens = [1, 1, 1] if not mixed else [1, 1, 5]  # request 2 brings a prompt chunk
    meta = AttentionMetadata.build(
        q_lens=q_lens,
        num_cached=[c - n for c, n in zip(contexts, q_lens, strict=True)],
        block_tables=tables,
        block_tokens=16,
        device=DEVICE,
    )
    rows = [0, 1] if mixed else [0, 1, 2]
    q = q_all[rows]
    plan = meta.decode_plan(q, k, None)
    assert meta.decode_plan(q, k, None) is plan and plan.batch == len(rows)
    assert meta.decode_plan(q, k, 8) is not plan  # another window, another plan
    tables_t = meta.decode_tables if mixed else meta.block_tables
    lens_t = meta.decode_ctx_lens if mixed else meta.ctx_lens
    got = dam.decode_attention(q, k, v, tables_t, lens_t, 0.125, plan=plan)
    want = dam.decode_attention_ref(q, k, v, table[rows], lens[rows], 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_plan_made_for_other_shapes_is_refused():
    q, k, v, table, lens = make_case([5, 9], 8, 2)
    plan = dpm.plan_decode(q, k, table, lens)
    with pytest.raises(ValueError, match="plan made for"):
        dam.decode_attention(q[:1], k, v, table[:1], lens[:1], 0.125, plan=plan)
    with pytest.raises(ValueError, match="plan made for"):
        dam.decode_attention(q, k, v, table, lens, 0.125, sliding_window=4, plan=plan)
    with pytest.raises(ValueError, match="given with a plan"):
        dam.decode_attention(q, k, v, table, lens, 0.125, plan=plan, chunk_tiles=1)
    with pytest.raises(TypeError, match="chunks"):  # a misspelt option fails at the call
        dam.decode_attention(q, k, v, table, lens, 0.125, chunks=1)


def test_warm_up_compiles_each_padded_batch_size_once():
    """Eager decode rows come in any number: each padded size is a variant of the kernel
    (a compile on a GPU), all made by warm_up; its calls leave the cache as it was."""
    _, k, v, _, _ = make_case([5], 8, 2)
    before = k.clone(), v.clone()
    assert dam.warm_up(8, k, v, max_batch=3) == [dpm.MIN_BATCH_PAD]
    assert torch.equal(k.nan_to_num(), before[0].nan_to_num())
    assert torch.equal(v.nan_to_num(), before[1].nan_to_num())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(head_dim=48), "head_dim=48"),
        (dict(block_tokens=24), "block_tokens=24"),
        (dict(q_heads=6), "q heads 6"),
        (dict(block_n=8), "block_n=8"),
        (dict(sliding_window=0), "sliding_window=0"),
    ],
)
def test_rejects_bad_shapes(change, message):
    q = torch.zeros((2, change.get("q_heads", 8), change.get("head_dim", 64)), device=DEVICE)
    kv = torch.zeros((4, change.get("block_tokens", 16), 4, q.shape[-1]), device=DEVICE)
    table = torch.zeros((2, 1), dtype=torch.long, device=DEVICE)
    lens = torch.ones(2, dtype=torch.long, device=DEVICE)
    kwargs = {k: change[k] for k in ("block_n", "sliding_window") if k in change}
    with pytest.raises(ValueError, match=message):
        dam.decode_attention(q, kv, kv, table, lens, 0.125, **kwargs)


@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa"])
def test_ref_matches_model_path(heads, sliding_window):
    """The twin equals `paged_attention_ref` (the path the models run, checked against
    transformers) on a decode step: q_len = 1, whose new K/V that path writes itself."""
    q_heads, kv_heads = heads
    contexts = [1, 16, 17, 50]
    layout = KVLayout(num_layers=2, num_kv_heads=kv_heads, head_dim=64, block_tokens=16,
                      dtype="float32")  # fmt: skip
    cache = KVCache(layout, num_blocks=16, device=DEVICE)
    torch.manual_seed(1)
    cache.blocks.normal_()  # stale data everywhere, including where the new K/V go
    order = torch.randperm(16).tolist()
    tables, start = [], 0
    for ctx in contexts:
        n = layout.blocks_for(ctx)
        tables.append(order[start : start + n])
        start += n
    meta = AttentionMetadata.build(
        q_lens=[1] * len(contexts),
        num_cached=[c - 1 for c in contexts],
        block_tables=tables,
        block_tokens=16,
        device=DEVICE,
    )
    q = torch.randn((len(contexts), q_heads, 64), device=DEVICE)
    k_new = torch.randn((len(contexts), kv_heads, 64), device=DEVICE)
    v_new = torch.randn((len(contexts), kv_heads, 64), device=DEVICE)
    model = paged_attention_ref(q, k_new, v_new, cache, 1, meta, 0.125, sliding_window)
    k_blocks, v_blocks = cache.layer(1)
    twin = dam.decode_attention_ref(
        q, k_blocks, v_blocks, meta.block_tables, meta.ctx_lens, 0.125, sliding_window
    )
    torch.testing.assert_close(twin, model, atol=1e-5, rtol=1e-5)
    kernel = dam.decode_attention(
        q, k_blocks, v_blocks, meta.block_tables, meta.ctx_lens, 0.125, sliding_window
    )
    torch.testing.assert_close(kernel, model, atol=1e-4, rtol=0)


# ---- GPU: realistic shapes (pytest -m gpu) ----

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def gpu_contexts(batch: int, max_context: int = 4096, seed: int = 0) -> list[int]:
    """Mixed lengths 1..max_context, with both extremes and a block edge always present."""
    if batch == 1:
        return [max_context]
    gen = torch.Generator().manual_seed(seed)
    contexts = torch.randint(1, max_context + 1, (batch,), generator=gen).tolist()
    contexts[:4] = [1, max_context, 16, 17][:batch]
    return contexts


def ref_in_chunks(q, k, v, table, lens, scale, window, chunk: int = 16):
    """The twin over slices of the batch: its fp32 gather of a whole batch would not fit."""
    return torch.cat(
        [
            dam.decode_attention_ref(
                q[i : i + chunk], k, v, table[i : i + chunk], lens[i : i + chunk], scale, window
            )
            for i in range(0, q.shape[0], chunk)
        ]
    )


def check_gpu(contexts, q_heads, kv_heads, split, **case):
    window = case.get("sliding_window")
    q, k, v, table, lens = make_case(contexts, q_heads, kv_heads, device="cuda", **case)
    scale = q.shape[-1] ** -0.5
    want = ref_in_chunks(q, k, v, table, lens, scale, window)
    got = dam.decode_attention(q, k, v, table, lens, scale, window, **SPLITS[split])
    torch.cuda.synchronize()
    assert not want.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_llama3_8b_layer(batch, split):
    check_gpu(gpu_contexts(batch), 32, 8, split, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_opt_13b_layer_mha(batch, split):
    check_gpu(gpu_contexts(batch), 40, 40, split, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(dtype=torch.float16, head_dim=128),
        dict(dtype=torch.bfloat16, head_dim=64),
        dict(dtype=torch.bfloat16, head_dim=128, block_tokens=32),
        dict(dtype=torch.bfloat16, head_dim=128, sliding_window=1000),
        dict(dtype=torch.float32, head_dim=128),
    ],
    ids=["fp16", "d64", "t32", "window", "fp32"],
)
@pytest.mark.parametrize("split", SPLITS)
def test_gpu_variants(case, split):
    check_gpu(gpu_contexts(48, seed=1), 32, 8, split, **case)


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replay():
    """The plan is made on the device from the lengths, so one captured graph serves every
    step, whatever its lengths."""
    contexts = gpu_contexts(8, max_context=2048)
    q, k, v, table, lens = make_case(
        contexts, 32, 8, head_dim=128, dtype=torch.bfloat16, device="cuda"
    )
    static_lens = lens.clone()
    dam.decode_attention(q, k, v, table, static_lens, 0.088)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dam.decode_attention(q, k, v, table, static_lens, 0.088)
    for shrink in (0, 5, 700):
        static_lens.copy_((lens - shrink).clamp(min=1))
        graph.replay()
        want = ref_in_chunks(q, k, v, table, static_lens, 0.088, None)
        torch.testing.assert_close(out, want, atol=2e-2, rtol=1e-2)
