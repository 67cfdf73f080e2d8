"""GPU-Prefetch-For-GPU: move a batch's KV blocks from the pinned CPU pool onto the decode
GPU over two PCIe links at once.

Each GPU has its own PCIe link to host memory (55.5 GB/s each, 109.6 GB/s together,
../shared/notes/gpu-facts.md). So the decode GPU pulls a share of the blocks over its own
link, while the prefetch GPU pulls the rest into a staging area and pushes them over NVLink
(396 GB/s, so never the bottleneck). Both run on their own streams, beside the decode
kernels. Blocks keep the one block format everywhere, so every copy is whole contiguous
blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CUDA_HOST_REGISTER_PORTABLE_MAPPED = 3  # every GPU may read it, through its own link


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


class GatherPrefetcher:
    """The same job in a few kernel launches, whatever the number of blocks: each GPU gathers
    its share of the blocks straight from host memory (one indexing kernel reading over its
    own link), and the prefetch GPU pushes its whole share over NVLink as one copy."""

    def __init__(
        self,
        pool: torch.Tensor,  # pinned with pin(): [num_pool_blocks, *block_shape]
        cache: torch.Tensor,  # [num_device_blocks, *block_shape] on the decode GPU
        staging_device: torch.device | str | None = None,
        direct_share: float = 0.5,
    ):
        self.cache = cache
        self.direct_share = direct_share if staging_device is not None else 1.0
        self.direct = device_view(pool, cache.device)
        self.direct_stream = torch.cuda.Stream(cache.device)
        self.staging_device = staging_device
        if staging_device is not None:
            self.remote = device_view(pool, staging_device)
            self.staging_stream = torch.cuda.Stream(staging_device)
            self.push_stream = torch.cuda.Stream(cache.device)

    def start(
        self, pool_blocks: Sequence[int], device_blocks: Sequence[int], chunks: int = 8
    ) -> list:
        """Queue the gathers; returns events (see Prefetcher.wait_on / done). The host never
        waits: block indices travel as pinned, non-blocking copies on the same streams."""
        n = len(pool_blocks)
        split = round(n * self.direct_share)
        dev = self.cache.device
        src = torch.tensor(pool_blocks, dtype=torch.long).pin_memory()
        dst = torch.tensor(device_blocks, dtype=torch.long).pin_memory()
        events = []
        with torch.cuda.stream(self.direct_stream):
            src_d = src[:split].to(dev, non_blocking=True)
            dst_d = dst[:split].to(dev, non_blocking=True)
            self.cache.index_copy_(0, dst_d, self.direct.index_select(0, src_d))
            events.append(self.direct_stream.record_event())
        if split < n:
            # The prefetch GPU's share in chunks, so the NVLink push of one chunk overlaps
            # the gather (over PCIe) of the next.
            with torch.cuda.stream(self.staging_stream), torch.cuda.stream(self.push_stream):
                for part in torch.arange(split, n).chunk(chunks):
                    lo, hi = int(part[0]), int(part[-1]) + 1
                    src_r = src[lo:hi].to(self.staging_device, non_blocking=True)
                    staged = self.remote.index_select(0, src_r)  # the prefetch GPU's link
                    staged.record_stream(self.push_stream)  # read there: keep it till then
                    gathered = self.staging_stream.record_event()
                    self.push_stream.wait_event(gathered)
                    landed = staged.to(dev, non_blocking=True)  # NVLink
                    dst_p = dst[lo:hi].to(dev, non_blocking=True)
                    self.cache.index_copy_(0, dst_p, landed)
                events.append(self.staging_stream.record_event())
                events.append(self.push_stream.record_event())
        return events


class Prefetcher:
    def __init__(
        self,
        pool: torch.Tensor,  # [num_pool_blocks, *block_shape], pinned CPU memory
        cache: torch.Tensor,  # [num_device_blocks, *block_shape] on the decode GPU
        staging_device: torch.device | str | None = None,  # the prefetch GPU; None: one link
        staging_blocks: int = 64,
        direct_share: float = 0.5,  # fraction of blocks the decode GPU pulls itself
    ):
        self.pool, self.cache = pool, cache
        self.direct_share = direct_share if staging_device is not None else 1.0
        self.direct_stream = torch.cuda.Stream(cache.device)
        self.staging = None
        if staging_device is not None:
            self.staging_stream = torch.cuda.Stream(staging_device)
            # torch orders a peer copy against the current stream of both GPUs: on the decode
            # GPU that must be a side stream too, or the push would queue behind decode work
            self.push_stream = torch.cuda.Stream(cache.device)
            # a ring of staging blocks: the H2D copy of block i+R waits for block i's NVLink push
            self.staging = torch.empty(
                (staging_blocks, *cache.shape[1:]), dtype=cache.dtype, device=staging_device
            )

    def start(self, pool_blocks: Sequence[int], device_blocks: Sequence[int]) -> list:
        """Queue the copies pool_blocks[i] -> device_blocks[i]; returns events to wait on
        (`done` / `wait_on`). Nothing blocks the calling thread."""
        n = len(pool_blocks)
        split = round(n * self.direct_share)
        events = []
        with torch.cuda.stream(self.direct_stream):
            for src, dst in zip(pool_blocks[:split], device_blocks[:split], strict=True):
                self.cache[dst].copy_(self.pool[src], non_blocking=True)
            events.append(self.direct_stream.record_event())
        if split < n:
            ring = self.staging.shape[0]
            with torch.cuda.stream(self.staging_stream), torch.cuda.stream(self.push_stream):
                for i, (src, dst) in enumerate(
                    zip(pool_blocks[split:], device_blocks[split:], strict=True)
                ):
                    slot = self.staging[i % ring]
                    slot.copy_(self.pool[src], non_blocking=True)  # prefetch GPU's link
                    self.cache[dst].copy_(slot, non_blocking=True)  # NVLink, same stream: ordered
                events.append(self.staging_stream.record_event())
                events.append(self.push_stream.record_event())
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
