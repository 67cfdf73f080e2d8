"""The batcher's CPU KV pool, from its reservation to its attachment to the worker.

The pool's memory is reserved at start, while the worker loads its model: allocating a large
pool takes tens of seconds (160 GiB: ~19 s on the 2xH200 host). The worker answers while it
loads: its first `Describe` brings the KV layout that cuts the segment into whole blocks,
then `Attach` maps and page-locks it there, also while the model loads (27-37 s more at
160 GiB), and answers once both are done; a second `Describe` then brings the whole
ModelInfo. After a worker restart the same pool is attached again.
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
from alignedserve.common.errors import UnavailableError
from alignedserve.common.proto import worker_pb2


class PoolAttachment:
    def __init__(self, link: WorkerLink, pool_bytes: int) -> None:
        """Starts reserving the pool's memory on a thread (call it in the event loop)."""
        self.link = link
        self.pool: CpuKVPool | None = None
        self._closed = False
        reserve = functools.partial(PoolSegment.reserve, pool_bytes)
        self._segment = asyncio.ensure_future(asyncio.to_thread(reserve))

    async def attach(self, wait_s: float) -> worker_pb2.ModelInfo:
        """Describe and Attach, retrying for `wait_s` (then UnavailableError), and return the
        loaded worker's ModelInfo; the first time, the reserved segment becomes the pool of
        the worker's layout. A pool that could not be reserved (/dev/shm too small) raises
        its ConfigError at once, worker or not."""
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            try:
                if self._segment.done() and self._segment.exception() is not None:
                    await self._segment
                info = await self.link.connect()
                if self.pool is None:  # once: a retry (an Attach that timed out) reuses it
                    layout = wire.layout_from_proto(info.kv_layout)
                    self.pool = (await self._segment).carve(layout)
                # a loading worker answers once loaded: allow what is left of the wait
                await self.link.attach(
                    self.pool, deadline - time.monotonic() if info.loading else 0.0
                )
                if info.loading:  # Attach answered once it was loaded
                    info = await self.link.describe()
                if not info.loading:
                    return info
                why, error = "loading again (restarted)", None  # after its Attach: anew
            except grpc.aio.AioRpcError as e:
                why, error = e.code().name, e
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"no worker at {self.link.address} within {wait_s:g} s: {why}"
                ) from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

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
        with contextlib.suppress(Exception):  # its reservation failed: nothing was made
            (await self._segment).discard()
