"""GPU-Prefetch-For-GPU: move a batch's KV blocks from the pinned CPU pool onto the decode
GPU over two PCIe links at once.

Each GPU has its own PCIe link to host memory (55.5 GB/s each, 109.6 GB/s together,
../shared/notes/gpu-facts.md). The decode GPU pulls a share of the blocks over its own link
with DMA copies, while the prefetch GPU gathers the rest and pushes them over NVLink
(396 GB/s, never the bottleneck). Everything runs on side streams, beside the decode
kernels. Blocks keep the one block format everywhere, so every copy moves whole contiguous
blocks.

Measured (docs/benchmarks.md): a gather kernel on the decode GPU itself starves decode of
SMs, so the decode GPU's share always uses copy engines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignedserve.worker.kv_cache import copy_blocks
from alignedserve.worker.transfer import tensor_on

CUDA_HOST_REGISTER_PORTABLE_MAPPED = 3  # every GPU may read it, through its own link
# Bytes of blocks the prefetch GPU gathers before pushing them on (each of its two buffers):
# a chunk's gather takes ~5 ms over one link, its push ~1 ms over NVLink.
GATHER_CHUNK_BYTES = 256 << 20


def pin(host: torch.Tensor) -> None:
    """Page-lock a CPU tensor's memory in place (e.g. the shared-memory pool) and map it into
    every GPU's address space: copies from it are DMA, and kernels may read it directly."""
    nbytes = host.numel() * host.element_size()
    err = torch.cuda.cudart().cudaHostRegister(
        host.data_ptr(), nbytes, CUDA_HOST_REGISTER_PORTABLE_MAPPED
    )
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({err}): raise the memlock limit?")


class _HostView:
    """__cuda_array_interface__ over pinned, mapped host memory (unified addressing: the
    device address is the host address), so torch sees it as a CUDA tensor, without a copy."""

    def __init__(self, host: torch.Tensor):
        typestr = {torch.bfloat16: "<u2", torch.float16: "<f2", torch.float32: "<f4"}
        self.__cuda_array_interface__ = {
            "data": (host.data_ptr(), False),
            "shape": tuple(host.shape),
            "typestr": typestr[host.dtype],
            "version": 3,
        }


def device_view(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CUDA tensor on `device` reading `host` (pinned with `pin`) over that GPU's link."""
    with torch.cuda.device(device):
        view = torch.as_tensor(_HostView(host), device=device)
    return view.view(host.dtype) if host.dtype == torch.bfloat16 else view


def unpin(host: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


class Prefetcher:
    """Moves blocks pool -> decode GPU. The decode GPU pulls its share with DMA copies (copy
    engines: its SMs stay with the decode kernels); the prefetch GPU gathers the rest with a
    kernel reading host memory over its own link (its SMs are idle anyway) and pushes them
    over NVLink. With no prefetch GPU every block is a DMA copy over one link. Every copy
    moves a run of consecutive blocks (kv_cache.copy_blocks): one host call each."""

    def __init__(
        self,
        pool: torch.Tensor,  # pinned with pin(): [num_pool_blocks, *block_shape]
        cache: torch.Tensor,  # [num_device_blocks, *block_shape] on the decode GPU
        staging_device: torch.device | str | None = None,  # the prefetch GPU
        # Its DMA copies run a little faster than the gather and push: on the H200 pair
        # 25.2 against 21.9 Llama blocks/ms, so both sides end together at 0.535
        # (benchmarks/prefetch_host.py --direct-share; docs/benchmarks.md).
        direct_share: float = 0.535,
        chunk_bytes: int = GATHER_CHUNK_BYTES,
    ):
        self.pool, self.cache = pool, cache
        self.direct_share = direct_share if staging_device is not None else 1.0
        self.direct_stream = torch.cuda.Stream(cache.device)
        self.staging_device = staging_device
        if staging_device is not None:
            self.remote = device_view(pool, staging_device)
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
        n = len(pool_blocks)
        split = round(n * self.direct_share)
        events = []
        # the pool blocks may have just been written (write-back) by work queued on this stream
        current = torch.cuda.current_stream(self.cache.device)
        self.direct_stream.wait_stream(current)
        if self.staging_device is not None:
            self.staging_stream.wait_stream(current)
            self.push_stream.wait_stream(current)
        if split < n:  # first, so the prefetch GPU starts while the host issues the rest
            count = n - split
            with torch.cuda.stream(self.staging_stream):  # (the ring: no pinning per call)
                src_r = tensor_on(pool_blocks[split:], torch.long, self.staging_device)
            # Chunks through the two buffers; each chunk's runs of consecutive device blocks
            # are pushed straight into place (no scatter kernel takes the decode GPU's SMs).
            # torch runs a peer copy on the source GPU's current stream, so the push gets a
            # stream of its own there (ordered by events, as is a buffer's reuse).
            for part in range(0, count, self.chunk_blocks):
                end = min(part + self.chunk_blocks, count)
                turn, self.turn = self.turn, 1 - self.turn
                staged = self.buffers[turn][: end - part]
                with torch.cuda.stream(self.staging_stream):
                    if self.pushed[turn] is not None:  # its last chunk has left
                        self.staging_stream.wait_event(self.pushed[turn])
                    torch.index_select(self.remote, 0, src_r[part:end], out=staged)
                    gathered = self.staging_stream.record_event()
                self.send_stream.wait_event(gathered)
                into = device_blocks[split + part : split + end]
                with torch.cuda.stream(self.send_stream), torch.cuda.stream(self.push_stream):
                    copy_blocks(self.cache, staged, list(zip(into, range(end - part), strict=True)))
                self.pushed[turn] = self.send_stream.record_event()
            for stream in (self.staging_stream, self.send_stream, self.push_stream):
                events.append(stream.record_event())
        with torch.cuda.stream(self.direct_stream):  # a copy per run of consecutive blocks
            pairs = list(zip(device_blocks[:split], pool_blocks[:split], strict=True))
            copy_blocks(self.cache, self.pool, pairs)
            events.append(self.direct_stream.record_event())
        return events

    @staticmethod
    def wait_on(events: list, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait for the copies, without a host sync."""
        stream = stream or torch.cuda.current_stream()
        for event in events:
            stream.wait_event(event)

    @staticmethod
    def done(events: list) -> bool:
        return all(event.query() for event in events)
