"""The decode attention kernel's work split in plain Python (`plan_rows`, the plan kernel's
twin, checked against the kernel itself in test_decode_attention.py): every request's
visible tiles cut once, evenly, longest first, within the workspace sized from shapes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from triton_cpu import kernel_module

dpm = kernel_module("alignedserve.worker.kernels.decode_plan", "_decode_plan_kernel")


@settings(max_examples=200, deadline=None)
@given(
    contexts=st.lists(st.integers(0, 20_000), min_size=1, max_size=64),
    kv_heads=st.sampled_from([1, 8, 40]),
    num_programs=st.integers(1, 300),
    window=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_plan_never_needs_more_chunks_than_the_workspace_holds(
    contexts, kv_heads, num_programs, window
):
    """The workspace is sized by max_chunks from shapes alone (a CUDA graph fixes it at
    capture): whatever the lengths, the plan fits it."""
    chunks = dpm.plan_chunks(contexts, kv_heads, num_programs, 128, window)
    bound = dpm.max_chunks(len(contexts), kv_heads, num_programs, 20_000, 128)
    assert all(c >= 1 for c in chunks) and sum(chunks) <= bound


@settings(max_examples=200, deadline=None)
@given(
    contexts=st.lists(st.integers(0, 20_000), min_size=1, max_size=64),
    kv_heads=st.sampled_from([1, 8, 40]),
    num_programs=st.integers(1, 300),
)
def test_chunks_are_even_and_go_longest_first(contexts, kv_heads, num_programs):
    """Each request's visible tiles are cut once, in order, into its tiles over the chunk
    length, rounded, chunks (a request up to 1.5 chunks long stays whole) of equal length
    within a tile; the rows go longest chunk first."""
    rows = dpm.plan_rows(contexts, kv_heads, num_programs, 128)
    _, _, chunk = dpm._split(contexts, kv_heads, num_programs, 128, None, None)
    for b, ctx in enumerate(contexts):
        mine = [(lo, hi) for r, lo, hi in rows if r == b]
        tiles = -(-ctx // 128)
        assert mine[0][0] == 0 and mine[-1][1] == tiles
        assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(mine))
        assert len(mine) == max(1, round(tiles / chunk + 1e-9))  # halves round up
        lengths = [hi - lo for lo, hi in mine]
        assert max(lengths) - min(lengths) <= 1
    requests = dict.fromkeys(r for r, _, _ in rows)
    longest = [max(hi - lo for r, lo, hi in rows if r == b) for b in requests]
    assert longest == sorted(longest, reverse=True)


def test_each_batch_size_has_one_padded_variant():
    """Eager decode rows come in any number: each padded size is one kernel variant (a
    compile on a GPU), and `batch_pads` lists every one a batch up to its bound can use."""
    assert dpm.batch_pads(1) == dpm.batch_pads(dpm.MIN_BATCH_PAD) == [dpm.MIN_BATCH_PAD]
    assert dpm.batch_pads(200) == [64, 128, 256] and dpm.batch_pads(512) == [64, 128, 256, 512]
    assert {dpm._batch_pad(b) for b in range(1, 513)} == set(dpm.batch_pads(512))
