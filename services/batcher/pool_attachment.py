"""The batcher's CPU KV pool, from its reservation to its attachment to the worker.

The pool's memory is reserved at start, while the worker loads its model: allocating a large
pool takes tens of seconds (160 GiB: ~19 s on the 2xH200 host). The worker answers while it
loads: its first `Describe` brings the KV layout that cuts the segment into whole blocks,
then `Attach` maps and page-locks it there, also while the model loads (27-37 s more at
160 GiB), and answers once both are done; a second `Describe` then brings the whole
ModelInfo. After a worker restart the same pool is attached again.

fcfs keeps every running request's KV on the device, and its pool's blocks only number the
device's: that pool is a sparse segment of exactly the device's blocks, made once the worker
has loaded (its ModelInfo brings their number) and attached `mirror_only`, so the worker does
not page-lock it and no memory is reserved for it. (Before, fcfs's budget was the lesser of
`--pool-gib` and the device's KV, and a 48 GiB pool left half an H200's KV unused.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc

from alignedserve.batcher.kv_pool import CpuKVPool, PoolSegment
from alignedserve.batcher.worker_link import WorkerLink
from alignedserve.common import wire
from alignedserve.common.errors import ConfigError, UnavailableError
from alignedserve.common.proto import worker_pb2


class PoolAttachment:
    def __init__(self, link: WorkerLink, pool_bytes: int, mirror_device: bool = False) -> None:
        """Starts reserving the pool's memory on a thread (call it in the event loop); with
        `mirror_device` (fcfs), none: the pool mirrors the device's blocks (module docstring)."""
        self.link = link
        self.mirror_device = mirror_device
        self.pool: CpuKVPool | None = None
        self._closed = False
        self._segment: asyncio.Future[PoolSegment] | None = None
        if not mirror_device:
            reserve = functools.partial(PoolSegment.reserve, pool_bytes)
            self._segment = asyncio.ensure_future(asyncio.to_thread(reserve))

    async def attach(self, wait_s: float) -> worker_pb2.ModelInfo:
        """Describe and Attach, retrying for `wait_s` (then UnavailableError), and return the
        loaded worker's ModelInfo; the first time, the reserved segment becomes the pool of
        the worker's layout (a mirror is made once the worker has loaded). A pool that could
        not be reserved (/dev/shm too small) raises its ConfigError at once, worker or not,
        and so does an Attach the worker refuses as invalid (a layout it does not have)."""
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            try:
                segment = self._segment
                if segment is not None and segment.done() and segment.exception() is not None:
                    await segment
                info = await self.link.connect()
                if self.mirror_device and info.loading:  # its blocks come with the model
                    why, error = "loading its model", None
                else:
                    if self.pool is None:  # once: a retry (an Attach that timed out) reuses it
                        self.pool = await self._carve(info)
                    # a loading worker answers once loaded: allow what is left of the wait
                    await self.link.attach(
                        self.pool,
                        deadline - time.monotonic() if info.loading else 0.0,
                        mirror_only=self.mirror_device,
                    )
                    if info.loading:  # Attach answered once it was loaded
                        info = await self.link.describe()
                    if not info.loading:
                        return info
                    why, error = "loading again (restarted)", None  # after its Attach: anew
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # no retry mends it
                    raise ConfigError(f"worker at {self.link.address}: {e.details()}") from e
                why, error = e.code().name, e
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"no worker at {self.link.address} within {wait_s:g} s: {why}"
                ) from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _carve(self, info: worker_pb2.ModelInfo) -> CpuKVPool:
        """The pool of the worker's layout: the reserved segment cut to whole blocks, or for
        a mirror, a sparse segment of the loaded worker's device blocks."""
        layout = wire.layout_from_proto(info.kv_layout)
        if self._segment is not None:
            return (await self._segment).carve(layout)
        nbytes = info.num_device_blocks * layout.block_bytes
        return PoolSegment.reserve(nbytes, reserve=False).carve(layout)

    async def close(self) -> None:
        """Remove the pool, or the segment reserved for it (once its reservation ends: a
        thread cannot be stopped); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()
            return
        if self._segment is None:  # a mirror never made: nothing to remove
            return
        with contextlib.suppress(Exception):  # its reservation failed: nothing was made
            (await self._segment).discard()
