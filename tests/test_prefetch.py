"""Prefetcher (worker/prefetch.py): every block lands where asked, over one link or two, for
block lists in runs (as the allocator hands them out) and scattered; a write queued on the
current stream before a prefetch is what the prefetch reads; over two links, the prefetch
GPU's gather buffers are reused only once their pushes have left. GPU only: the CPU path
copies with kv_cache.copy_blocks, tested with the residency."""

from __future__ import annotations

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


def check(staging: str | None, kind: str) -> None:
    from alignedserve.worker.prefetch import Prefetcher, pin, unpin

    gen = torch.Generator().manual_seed(0)
    pool = torch.randn((NUM_POOL, *BLOCK_SHAPE), generator=gen).to(torch.bfloat16)
    pin(pool)
    try:
        cache = torch.zeros((NUM_DEVICE, *BLOCK_SHAPE), dtype=torch.bfloat16, device="cuda:0")
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
    finally:
        unpin(pool)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["allocator", "scattered"])
def test_one_link(kind):
    check(None, kind)


@pytest.mark.gpu2
@pytest.mark.parametrize("kind", ["allocator", "scattered"])
def test_two_links(kind):
    check("cuda:1", kind)
