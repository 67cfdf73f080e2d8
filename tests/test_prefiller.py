"""The prefill device's path (worker/prefiller.py) against the decode device's own: the same
chunks give the same sampled tokens and put the same KV into the pool's blocks, whether a
prompt runs whole or in chunks over cached KV, alone or batched, in one staging pass or
several."""

from __future__ import annotations

import itertools

import pytest
import torch

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.model_config import ModelConfig
from alignedserve.worker.kv_cache import KVCache, block_runs, copy_blocks
from alignedserve.worker.loader import load_model
from alignedserve.worker.pool_mapping import PoolMapping
from alignedserve.worker.prefiller import Prefiller, PrefillJob
from alignedserve.worker.residency import DeviceResidency
from alignedserve.worker.runner import ModelRunner

import factories
from factories import random_prompts

BLOCK_TOKENS = 4


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture
def layout(model_dir):
    return KVLayout.for_model(ModelConfig.from_dir(model_dir), BLOCK_TOKENS)


def chunked(prompts, cuts, pool):
    """Per prompt: its pool blocks and its chunks (token ids, cached tokens, sample?)."""
    plans = []
    for prompt, cut in zip(prompts, cuts, strict=True):
        blocks = tuple(pool.allocate(-(-len(prompt) // BLOCK_TOKENS)))
        edges = [0, *([cut] if cut else []), len(prompt)]
        chunks = [(tuple(prompt[a:b]), a, b == len(prompt)) for a, b in itertools.pairwise(edges)]
        plans.append((blocks, chunks))
    return plans


def pool_view(pool, layout):
    return torch.from_numpy(pool.blocks()).view(torch.float32).view(-1, *layout.block_shape)


def by_token(pool, layout, blocks):
    """A copy of a request's KV in the pool, token by token: [tokens, layers, 2, kv_heads,
    head_dim]."""
    per_block = pool_view(pool, layout)[list(blocks)]  # [n, layers, 2, T, kv_heads, head_dim]
    layers, two, _, heads, dim = per_block.shape[1:]
    return per_block.permute(0, 3, 1, 2, 4, 5).reshape(-1, layers, two, heads, dim).clone()


def run_on_decode_device(model, layout, pool, plans, sampling):
    """The worker's path without a prefill device: residency + runner, write back, release."""
    # the worker's own mapping of the batcher's pool, as Attach makes it
    mapping = PoolMapping(CpuKVPool.attach(pool.name, layout, 64), "mapped")
    residency = DeviceResidency(KVCache(layout, 256), mapping)
    runner = ModelRunner(model, residency.kv_cache)
    tokens = {}
    for i in range(max(len(chunks) for _, chunks in plans)):  # chunk i of every prompt at once
        step = [
            (f"r{k}", blocks, chunks[i])
            for k, (blocks, chunks) in enumerate(plans)
            if i < len(chunks)
        ]
        seq = [
            residency.prefill_chunk(rid, ids, cached, blocks, sampling if sample else None)
            for rid, blocks, (ids, cached, sample) in step
        ]
        for t in runner.step(seq):
            tokens[t.request_id] = t.token_id
        for rid, blocks, (ids, _, _) in step:
            residency.advance(rid, len(ids))
            residency.write_back(rid, blocks)
            residency.release(rid)
    residency.close()
    mapping.close()
    return tokens


def run_on_prefill_device(
    model, layout, pool, plans, sampling, staging_blocks, device="cpu", one_by_one=False
):
    """Chunk i of every prompt in one run (each prompt in a run of its own if one_by_one),
    as the executor sends them: a chunk's run starts once the chunk before it is copied out."""
    prefiller = Prefiller(ModelRunner(model, KVCache(layout, staging_blocks, device=device)))
    view = pool_view(pool, layout)
    if device != "cpu":
        view = view.pin_memory()  # a pinned copy of the pool: read back into it at the end
    tokens = {}
    for i in range(max(len(chunks) for _, chunks in plans)):
        jobs = [
            PrefillJob(f"r{k}", ids, cached, blocks, sampling if sample else None)
            for k, (blocks, chunks) in enumerate(plans)
            if i < len(chunks)
            for ids, cached, sample in [chunks[i]]
        ]
        runs = [
            prefiller.run(group, view) for group in ([[j] for j in jobs] if one_by_one else [jobs])
        ]
        for run in runs:
            run.wait_copied()
            assert run.seconds > 0 and run.is_copied()
            tokens.update((t.request_id, t.token_id) for t in run.sampled)
    if device != "cpu":
        pool_view(pool, layout).copy_(view)
    return tokens


def check_against_decode_device(ref_model, model, layout, prompts, cuts, staging_blocks, **how):
    """The prefill device's path (`model`; `how`: run_on_prefill_device's device, one_by_one
    and the KV's tolerance) gives the decode device's (`ref_model`) tokens and pool KV."""
    tolerance = how.pop("tolerance", {})
    sampling = factories.greedy(1)
    with (
        CpuKVPool.create(layout, 64) as ref_pool,
        CpuKVPool.create(layout, 64) as pool,
    ):
        ref_plans = chunked(prompts, cuts, ref_pool)
        plans = chunked(prompts, cuts, pool)
        expected = run_on_decode_device(ref_model, layout, ref_pool, ref_plans, sampling)
        tokens = run_on_prefill_device(model, layout, pool, plans, sampling, staging_blocks, **how)
        assert tokens == expected and len(tokens) == len(prompts)
        for prompt, (ref_blocks, _), (blocks, _) in zip(prompts, ref_plans, plans, strict=True):
            n = len(prompt)
            ours, ref = (
                by_token(pool, layout, blocks)[:n],
                by_token(ref_pool, layout, ref_blocks)[:n],
            )
            torch.testing.assert_close(ours, ref, **tolerance)
            assert ours.abs().sum() > 0  # the KV is there, not zeros on both sides


@pytest.mark.parametrize(
    ("cuts", "staging_blocks"),
    [
        ((0, 0, 0), 256),  # whole prompts, one pass
        ((8, 5, 13), 256),  # chunks over cached KV, block-aligned or not
        ((8, 5, 13), 9),  # a staging cache too small for all three: several passes
    ],
)
def test_prefill_device_gives_the_decode_devices_tokens_and_pool_kv(
    model, layout, cuts, staging_blocks
):
    prompts = random_prompts((17, 9, 30), seed=3)
    check_against_decode_device(model, model, layout, prompts, cuts, staging_blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("staging_blocks", [256, 9])
def test_on_a_gpu_copies_out_overlap_the_next_pass_and_land_whole(
    model_dir, layout, staging_blocks
):
    """Each prompt in a run of its own, each run's copies out still queued while the next
    run's pass computes: in the ring's next blocks (256), or over the blocks they read (9,
    where the pass must wait for them). The pool ends as the decode device's path leaves it."""
    check_against_decode_device(
        load_model(model_dir),
        load_model(model_dir, device="cuda"),
        layout,
        random_prompts((17, 9, 30, 23), seed=5),
        (8, 0, 13, 0),
        staging_blocks,
        device="cuda",
        one_by_one=True,
        tolerance={"atol": 1e-4, "rtol": 1e-4},
    )


def test_a_chunk_larger_than_the_staging_cache_is_refused(model, layout):
    prefiller = Prefiller(ModelRunner(model, KVCache(layout, 2)))
    with CpuKVPool.create(layout, 8) as pool:
        job = PrefillJob("big", tuple(range(1, 10)), 0, tuple(pool.allocate(3)), None)
        with pytest.raises(InvalidRequestError, match="more than the prefill device's 2"):
            prefiller.run([job], pool_view(pool, layout))
        short = PrefillJob("short", tuple(range(1, 10)), 0, tuple(pool.allocate(2)), None)
        prefiller3 = Prefiller(ModelRunner(model, KVCache(layout, 3)))
        with pytest.raises(InvalidRequestError, match="2 pool blocks given"):
            prefiller3.run([short], pool_view(pool, layout))


def test_copy_blocks_coalesces_runs_and_copies_each_pair():
    src = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    dst = torch.zeros(12, 3)
    pairs = [(0, 4), (1, 5), (2, 6), (7, 0), (9, 1), (10, 2), (3, 9)]
    copy_blocks(dst, src, pairs)
    expected = torch.zeros(12, 3)
    for d, s in pairs:
        expected[d] = src[s]
    assert torch.equal(dst, expected)
    # one transfer per run of consecutive ids on both sides
    assert block_runs(pairs) == [(0, 4, 3), (7, 0, 1), (9, 1, 2), (3, 9, 1)]
    assert block_runs([]) == [] and block_runs([(5, 5), (4, 4)]) == [(5, 5, 1), (4, 4, 1)]


def test_runs_log_their_prompt_tokens_and_the_devices_share(model, layout, monkeypatch, caplog):
    from alignedserve.common import stats_line
    from alignedserve.worker import prefiller as prefiller_module

    monkeypatch.setenv(stats_line.ENV, "3600")  # no line before the interval has passed
    prefiller = Prefiller(ModelRunner(model, KVCache(layout, 64)))
    with CpuKVPool.create(layout, 16) as pool, caplog.at_level("INFO", prefiller_module.__name__):
        jobs = [
            PrefillJob(f"r{i}", tuple(p), 0, tuple(pool.allocate(-(-len(p) // BLOCK_TOKENS))), None)
            for i, p in enumerate(random_prompts((11, 6), seed=1))
        ]
        prefiller.run(jobs[:1], pool_view(pool, layout))
        assert not [r for r in caplog.records if r.getMessage().startswith("prefill:")]
        prefiller._stats.window.interval_s = 1e-9  # due at the next run
        run = prefiller.run(jobs[1:], pool_view(pool, layout))
    assert run.pass_span_s > 0  # on the CPU: the host's seconds for the passes
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill:")]
    assert line.startswith("prefill: 17 prompt tokens in 2 runs, ")
    assert "the passes spanned" in line and "the host queued them" in line
    assert line.endswith("; 0 new device allocations, 0 allocation retries")  # CPU: none
