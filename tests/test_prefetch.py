"""Prefetcher (worker/prefetch.py): every block lands where asked, over one link or two, for
block lists in runs (as the allocator hands them out) and scattered; a write queued on the
current stream before a prefetch is what the prefetch reads; over two links, the prefetch
GPU's gather buffers are reused only once their pushes have left, and the split between the
links follows each load's measured sides (SplitBalance: its rule on the CPU, its timing on two
GPUs). The copies are GPU only: the CPU path copies with kv_cache.copy_blocks, tested with the
residency."""

from __future__ import annotations

import contextlib

import pytest
import torch

from alignedserve.common.block_allocator import BlockAllocator

BLOCK_SHAPE = (2, 2, 4, 2, 8)  # [layers, K/V, block_tokens, kv_heads, head_dim]
NUM_POOL, NUM_DEVICE = 96, 64


def lists(kind: str, n: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(pool blocks, device blocks) of one load of n blocks."""
    if kind == "allocator":  # a churned pool, a fresh device allocator: runs on both sides
        pool = BlockAllocator(NUM_POOL)
        held = [pool.allocate(int(torch.randint(1, 6, (), generator=gen))) for _ in range(12)]
        for blocks in held[::3]:
            pool.free(blocks)
        return pool.allocate(n), BlockAllocator(NUM_DEVICE).allocate(n)
    src = torch.randperm(NUM_POOL, generator=gen)[:n].tolist()
    dst = torch.randperm(NUM_DEVICE, generator=gen)[:n].tolist()
    return src, dst


@contextlib.contextmanager
def pinned_pool(seed: int):
    """A pinned pool of random blocks and an empty decode-GPU cache."""
    from alignedserve.worker.prefetch import pin, unpin

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn((NUM_POOL, *BLOCK_SHAPE), generator=gen).to(torch.bfloat16)
    pin(pool)
    try:
        cache = torch.zeros((NUM_DEVICE, *BLOCK_SHAPE), dtype=torch.bfloat16, device="cuda:0")
        yield pool, cache, gen
    finally:
        unpin(pool)


def check(staging: str | None, kind: str) -> None:
    from alignedserve.worker.prefetch import Prefetcher

    with pinned_pool(0) as (pool, cache, gen):
        # chunks of 3 blocks: a load of 40 reuses each gather buffer several times
        block_bytes = pool[0].numel() * pool.element_size()
        prefetcher = Prefetcher(pool, cache, staging_device=staging, chunk_bytes=3 * block_bytes)
        for n in (1, 7, 40):
            src, dst = lists(kind, n, gen)
            # a write-back queued on the current stream behind device work: the copies see it
            written = pool[src[0]].to("cuda:0") + 1
            torch.cuda._sleep(1_000_000)
            pool[src[0]].copy_(written, non_blocking=True)
            if staging is not None:
                # pushes held back: a gather buffer written again before its push has left
                # would land the wrong blocks
                with torch.cuda.stream(prefetcher.send_stream):
                    torch.cuda._sleep(2_000_000)
            events = prefetcher.start(src, dst)
            Prefetcher.wait_on(events)
            torch.cuda.synchronize()
            assert torch.equal(cache[dst].cpu(), pool[src]), (kind, n)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["allocator", "scattered"])
def test_one_link(kind):
    check(None, kind)


@pytest.mark.gpu2
@pytest.mark.parametrize("kind", ["allocator", "scattered"])
def test_two_links(kind):
    check("cuda:1", kind)


@pytest.mark.gpu2
def test_two_links_balance_follows_a_slow_side():
    """Each load's two sides are timed on the right streams: a staged side held back (its
    pushes wait for work on the decode GPU's push stream) moves the share to the direct side,
    up to its bound, and every block still lands."""
    from alignedserve.worker.prefetch import Prefetcher

    with pinned_pool(1) as (pool, cache, gen):
        prefetcher = Prefetcher(pool, cache, staging_device="cuda:1")
        shares = [prefetcher.direct_share]
        for _ in range(6):
            src, dst = lists("allocator", 40, gen)
            with torch.cuda.stream(prefetcher.push_stream):
                torch.cuda._sleep(20_000_000)  # ~10 ms: far longer than 40 small blocks
            Prefetcher.wait_on(prefetcher.start(src, dst))
            torch.cuda.synchronize()
            assert torch.equal(cache[dst].cpu(), pool[src])
            shares.append(prefetcher.direct_share)
        assert shares[0] == 0.47 and shares[-1] == prefetcher.split.bounds[1], shares


@pytest.mark.gpu2
def test_two_links_balance_reads_only_loads_that_are_done():
    """Loads queued back to back, never waited for: each start feeds the balance the loads
    done by then, oldest first, and keeps the rest; none piles up, every block lands."""
    from alignedserve.worker.prefetch import Prefetcher

    with pinned_pool(2) as (pool, cache, gen):
        prefetcher = Prefetcher(pool, cache, staging_device="cuda:1")
        loads = [lists("allocator", 40, gen) for _ in range(6)]
        for src, dst in loads:
            with torch.cuda.stream(prefetcher.push_stream):
                torch.cuda._sleep(2_000_000)  # the loads stay in flight while the host queues
            prefetcher.start(src, dst)
        assert 1 <= len(prefetcher._timed) <= 6  # the latest, at least, is still running
        torch.cuda.synchronize()
        src, dst = loads[-1]
        Prefetcher.wait_on(prefetcher.start(src, dst))  # reads all six, keeps its own
        assert len(prefetcher._timed) == 1 and prefetcher.direct_share > 0.47
        torch.cuda.synchronize()
        assert torch.equal(cache[dst].cpu(), pool[src])


def test_balance_settles_where_both_sides_end_together():
    """Sides with different rates and fixed start-up costs: from any first share, the share
    goes to where both end together (within 1 %), and stays there."""
    from alignedserve.worker.prefetch import SplitBalance

    n = 4000  # blocks per load
    for direct_rate, staged_rate, direct_start_s, staged_start_s, first in [
        (25.2, 21.9, 0.0, 0.0, 0.47),  # the twenty-eighth session's rates (blocks per ms)
        (25.2, 21.9, 1.0, 5.0, 0.47),  # the staged side's first gather, before any push
        (25.0, 8.0, 0.5, 0.5, 0.2),  # the prefetch GPU's link busy with the prefill's copies
        (10.0, 30.0, 0.0, 0.0, 0.8),
    ]:
        balance = SplitBalance(first)

        def times(share, dr=direct_rate, sr=staged_rate, ds=direct_start_s, ss=staged_start_s):
            split = round(n * share)
            return split, ds + split / dr, n - split, ss + (n - split) / sr

        for _ in range(30):
            split, direct_ms, staged, staged_ms = times(balance.share)
            balance.observe(split, direct_ms / 1e3, staged, staged_ms / 1e3)
        split, direct_ms, staged, staged_ms = times(balance.share)
        assert abs(direct_ms - staged_ms) <= 0.01 * max(direct_ms, staged_ms), (
            direct_rate,
            staged_rate,
            balance.share,
            direct_ms,
            staged_ms,
        )


def test_balance_follows_rates_that_change():
    """The prefetch GPU's link gets busy (the prefill's copies): within a few loads the share
    moves to the new balance, not to an average over everything seen."""
    from alignedserve.worker.prefetch import SplitBalance

    balance, n = SplitBalance(0.47), 4000
    for staged_rate, loads in ((21.9, 30), (8.0, 8)):  # blocks per ms
        for _ in range(loads):
            split = round(n * balance.share)
            direct_ms, staged_ms = 0.5 + split / 25.2, 0.5 + (n - split) / staged_rate
            balance.observe(split, direct_ms / 1e3, n - split, staged_ms / 1e3)
    assert balance.share == pytest.approx(25.2 / (25.2 + 8.0), abs=0.01), balance.share


def test_balance_bounds_and_idle_sides():
    from alignedserve.worker.prefetch import SplitBalance

    balance = SplitBalance(0.5)
    balance.observe(100, 1.0, 100, 1000.0)  # the staged side crawls: the bound, not 0.999
    assert balance.share == 0.9
    for idle in [(0, 0.0, 200, 0.01), (200, 0.01, 0, 0.0), (100, 0.0, 100, 0.01)]:
        fresh = SplitBalance(0.5)  # a side with nothing timed teaches nothing
        fresh.observe(*idle)
        assert fresh.share == 0.5, idle
    balance.observe(100, 1000.0, 100, 0.001)
    assert 0.1 <= balance.share < 0.9
    assert SplitBalance(1.0).share == 1.0  # a held share may be anything (all one side)
    with pytest.raises(ValueError, match=r"direct_share 1\.5"):
        SplitBalance(1.5)


def test_touch_pages_reads_a_byte_of_every_page_and_keeps_the_thread_count():
    """`pin` first reads every page of the pool in parallel (so cudaHostRegister only locks
    them): the first byte of each whole page is read, whatever the tensor's dtype, and the
    process keeps its torch thread count."""
    from alignedserve.worker.prefetch import PAGE_BYTES, touch_pages

    host = (torch.arange(10 * PAGE_BYTES + 100) * 7 % 251).to(torch.uint8)  # [bytes]
    firsts = sum(int(host[i * PAGE_BYTES]) for i in range(10))  # the last partial page: none
    before = torch.get_num_threads()
    assert touch_pages(host, 3) == firsts > 0
    assert touch_pages(host[: 10 * PAGE_BYTES].view(torch.bfloat16).view(5, -1), 2) == firsts
    assert torch.get_num_threads() == before
