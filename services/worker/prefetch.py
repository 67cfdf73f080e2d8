"""GPU-Prefetch-For-GPU: move a batch's KV blocks from the pinned CPU pool onto the decode
GPU over two PCIe links at once.

Each GPU has its own PCIe link to host memory (55.5 GB/s each, 109.6 GB/s together,
../shared/notes/gpu-facts.md). The decode GPU pulls a share of the blocks over its own link
with DMA copies, while the prefetch GPU gathers the rest and pushes them over NVLink
(396 GB/s, never the bottleneck). Everything runs on side streams, beside the decode
kernels. Blocks keep the one block format everywhere, so every copy moves whole contiguous
blocks.

Every copy runs on copy engines, never as a kernel: a gather kernel reading host memory
holds SMs for its whole transfer. On the decode GPU that starved decode (docs/benchmarks.md);
on the prefetch GPU it slowed the prefill passes running there.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from alignedserve.worker.kv_cache import copy_blocks

logger = logging.getLogger(__name__)
CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every GPU: each copies over its own link
# Bytes of blocks the prefetch GPU gathers before pushing them on (each of its two buffers):
# a chunk's gather takes ~5 ms over one link, its push ~1 ms over NVLink.
GATHER_CHUNK_BYTES = 256 << 20
PAGE_BYTES = 4096  # the host's memory pages, as `touch_pages` reads them


def touch_pages(host: torch.Tensor, num_threads: int) -> int:
    """Read a byte of every page of a contiguous CPU tensor on `num_threads` threads of its
    own, so the process's page tables hold them all. Returns the bytes' sum (0 for a fresh
    pool). numpy's sums release the GIL, so the threads fault pages in at once; unlike torch's
    thread count, nothing process-wide is changed (the worker may be loading its model
    meanwhile, and sets that count itself)."""
    flat = host.view(-1).view(torch.uint8).numpy()  # [bytes], over the same memory
    firsts = flat[: flat.size // PAGE_BYTES * PAGE_BYTES : PAGE_BYTES]  # [pages]
    parts = np.array_split(firsts, max(1, min(num_threads, firsts.size)))
    with ThreadPoolExecutor(len(parts), thread_name_prefix="touch") as threads:
        return sum(threads.map(lambda part: int(part.sum(dtype=np.int64)), parts))


def pin(host: torch.Tensor, num_threads: int | None = None) -> tuple[float, float]:
    """Page-lock a CPU tensor's memory in place (e.g. the shared-memory pool) for every GPU:
    copies from it and into it are DMA. Its pages are first read in parallel (`touch_pages`
    with `num_threads`, by default a thread per core it may run on): cudaHostRegister then
    only locks them. On an H200 (16 cores) that pinned a 48 GiB pool in 4.2 s against 15.3 s
    (`benchmarks/pool_pin.py`, thirty-fifth session). The worker pins while it loads its
    model, graph captures included: they capture thread-locally (`worker/cuda_graph.py`), so
    this thread's CUDA calls cannot fail them. Returns the seconds spent reading and
    locking."""
    if num_threads is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        num_threads = len(cores) if cores else os.cpu_count() or 1
    start = time.perf_counter()
    touch_pages(host, num_threads)
    read = time.perf_counter()
    register(host)
    read_s, lock_s = read - start, time.perf_counter() - read
    logger.info(
        "pinned %.1f GiB in %.1f s: pages read in %.1f s (%d threads), locked in %.1f s",
        host.numel() * host.element_size() / 2**30,
        read_s + lock_s,
        read_s,
        num_threads,
        lock_s,
    )
    return read_s, lock_s


def register(host: torch.Tensor) -> None:
    """Page-lock a CPU tensor's memory in place for every GPU with one cudaHostRegister (its
    pages faulted in one at a time where no one has read them: `pin` reads them first)."""
    nbytes = host.numel() * host.element_size()
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, CUDA_HOST_REGISTER_PORTABLE)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({err}): raise the memlock limit?")


def unpin(host: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


class SplitBalance:
    """The decode GPU's share of a load's blocks, where both sides take as long. Each side's
    rate (blocks per second, each timed from when its first copy can start to its last copy)
    moves with every load measured, and the share goes to direct_rate / (direct_rate +
    staged_rate), within `bounds`. The rates differ by block size and by what else uses each
    link: on the prefetch GPU the prefill's own copies in share its link, so no one constant
    fits (the H200 pair's idle optimum ran from 0.45, Llama-3-8B's 2 MiB blocks, to 0.5,
    OPT-13B's 12.5 MiB; docs/benchmarks.md)."""

    def __init__(self, share: float, keep: float = 0.5, bounds: tuple[float, float] = (0.1, 0.9)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"direct_share {share} outside 0..1")
        self.share, self.keep, self.bounds = share, keep, bounds
        # decayed sums of each side's blocks and seconds: big loads weigh more than small ones
        self.direct = [0.0, 0.0]
        self.staged = [0.0, 0.0]

    def observe(self, direct_blocks: int, direct_s: float, staged_blocks: int, staged_s: float):
        """One load's two sides: their blocks, and each one's seconds."""
        if direct_blocks <= 0 or staged_blocks <= 0 or direct_s <= 0 or staged_s <= 0:
            return  # one side idle: nothing learned about the balance
        for sums, blocks, seconds in (
            (self.direct, direct_blocks, direct_s),
            (self.staged, staged_blocks, staged_s),
        ):
            sums[0] = sums[0] * self.keep + blocks
            sums[1] = sums[1] * self.keep + seconds
        direct_rate = self.direct[0] / self.direct[1]
        staged_rate = self.staged[0] / self.staged[1]
        lo, hi = self.bounds
        self.share = min(hi, max(lo, direct_rate / (direct_rate + staged_rate)))


class Prefetcher:
    """Moves blocks pool -> decode GPU. The decode GPU pulls its share with DMA copies; the
    prefetch GPU gathers the rest into a buffer with DMA copies over its own link and pushes
    them over NVLink. Copy engines only: the decode GPU's SMs stay with the decode kernels,
    the prefetch GPU's with its prefill. With no prefetch GPU every block is a DMA copy over
    one link. Every copy moves a run of consecutive blocks (kv_cache.copy_blocks): one host
    call each."""

    def __init__(
        self,
        pool: torch.Tensor,  # pinned with pin(): [num_pool_blocks, *block_shape]
        cache: torch.Tensor,  # [num_device_blocks, *block_shape] on the decode GPU
        staging_device: torch.device | str | None = None,  # the prefetch GPU
        # the decode GPU's share of a load's blocks: where it starts (the H200 pair's idle
        # optimum, benchmarks/prefetch_host.py --direct-share), and whether the loads'
        # measured rates move it (SplitBalance) or it stays
        direct_share: float = 0.47,
        chunk_bytes: int = GATHER_CHUNK_BYTES,
        balance: bool = True,
    ):
        self.pool, self.cache = pool, cache
        self.split = SplitBalance(direct_share)  # the share, and how it moves
        self.is_balancing = balance and staging_device is not None
        self.staging_device = staging_device
        # each load's (direct blocks, staged blocks, and both sides' start and end events)
        # until its copies are done and its times are read
        self._timed: deque[tuple[int, int, list[torch.cuda.Event]]] = deque()
        self.direct_stream = torch.cuda.Stream(cache.device)
        if staging_device is not None:
            self.staging_stream = torch.cuda.Stream(staging_device)
            self.send_stream = torch.cuda.Stream(staging_device)
            # torch orders a peer copy against the current stream of both GPUs: on the decode
            # GPU that must be a side stream too, or the push would queue behind decode work
            self.push_stream = torch.cuda.Stream(cache.device)
            # Two gather buffers, used in turn, chunk after chunk: the gather of one overlaps
            # the NVLink push of the other. Allocated once: a fresh gather output per chunk
            # could make the caching allocator free cached memory, and cudaFree waits for
            # all work queued on the prefetch GPU (its prefill batches), holding up the host.
            block_bytes = pool[0].numel() * pool.element_size()
            self.chunk_blocks = max(1, chunk_bytes // block_bytes)
            self.buffers = [
                torch.empty(
                    (self.chunk_blocks, *pool.shape[1:]), dtype=pool.dtype, device=staging_device
                )
                for _ in range(2)
            ]
            self.pushed: list[torch.cuda.Event | None] = [None, None]  # each buffer's last push
            self.turn = 0

    def start(self, pool_blocks: Sequence[int], device_blocks: Sequence[int]) -> list:
        """Queue the copies pool_blocks[i] -> device_blocks[i]; returns events to wait on
        (`wait_on` / `done`). The host never waits for the GPUs."""
        if self.is_balancing:
            self._read_times()
        n = len(pool_blocks)
        split = round(n * self.direct_share)
        events = []
        # the pool blocks may have just been written (write-back) by work queued on this stream
        current = torch.cuda.current_stream(self.cache.device)
        self.direct_stream.wait_stream(current)
        if self.staging_device is not None:
            self.staging_stream.wait_stream(current)
            self.push_stream.wait_stream(current)
        # Each side timed from when its first copy can start (the work queued before the load
        # done, and the host at its copies: the direct ones are queued after the staged, and
        # that wait is the host's, not the link's) to its last copy:
        # [direct side's start, its end, staged side's start, its end]
        timing = None
        if self.is_balancing and 0 < split < n:
            timing = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            timing[2].record(self.staging_stream)
        if split < n:  # first, so the prefetch GPU starts while the host issues the rest
            count = n - split
            # Chunks through the two buffers, each gathered a run of pool blocks at a time;
            # its runs of consecutive device blocks are pushed straight into place.
            # torch runs a peer copy on the source GPU's current stream, so the push gets a
            # stream of its own there (ordered by events, as is a buffer's reuse).
            for part in range(0, count, self.chunk_blocks):
                end = min(part + self.chunk_blocks, count)
                turn, self.turn = self.turn, 1 - self.turn
                staged = self.buffers[turn][: end - part]
                with torch.cuda.stream(self.staging_stream):
                    if self.pushed[turn] is not None:  # its last chunk has left
                        self.staging_stream.wait_event(self.pushed[turn])
                    gather = enumerate(pool_blocks[split + part : split + end])
                    copy_blocks(staged, self.pool, list(gather))
                    gathered = self.staging_stream.record_event()
                self.send_stream.wait_event(gathered)
                into = device_blocks[split + part : split + end]
                with torch.cuda.stream(self.send_stream), torch.cuda.stream(self.push_stream):
                    copy_blocks(self.cache, staged, list(zip(into, range(end - part), strict=True)))
                self.pushed[turn] = self.send_stream.record_event()
            for stream in (self.staging_stream, self.send_stream, self.push_stream):
                events.append(stream.record_event())
            if timing:
                timing[3].record(self.send_stream)  # the last push has landed
        with torch.cuda.stream(self.direct_stream):  # a copy per run of consecutive blocks
            pairs = list(zip(device_blocks[:split], pool_blocks[:split], strict=True))
            if timing:
                timing[0].record(self.direct_stream)
            copy_blocks(self.cache, self.pool, pairs)
            events.append(self.direct_stream.record_event())
            if timing:
                timing[1].record(self.direct_stream)
                self._timed.append((split, n - split, timing))  # (all four recorded)
        return events

    @property
    def direct_share(self) -> float:
        """The decode GPU's share of the next load's blocks (all of them over one link)."""
        return self.split.share if self.staging_device is not None else 1.0

    def _read_times(self) -> None:
        """Feed the balance the loads whose copies are done (never waits for the others)."""
        while self._timed:
            direct_blocks, staged_blocks, (d0, d1, s0, s1) = self._timed[0]
            if not (d1.query() and s1.query()):
                return
            self._timed.popleft()
            self.split.observe(
                direct_blocks, d0.elapsed_time(d1) / 1e3, staged_blocks, s0.elapsed_time(s1) / 1e3
            )

    @staticmethod
    def wait_on(events: list, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait for the copies, without a host sync."""
        stream = stream or torch.cuda.current_stream()
        for event in events:
            stream.wait_event(event)

    @staticmethod
    def done(events: list) -> bool:
        return all(event.query() for event in events)
