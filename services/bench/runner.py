"""Runs one load shape: sends each request when its shape says, through a target, and stops
at the run's timeout, when requests still out are cancelled and recorded as failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from alignedserve.bench.records import RequestRecord, RunRecords, Target
from alignedserve.bench.shapes import LoadShape, Offline, Poisson
from alignedserve.bench.workload import BenchRequest

Gate = Callable[[BenchRequest], AbstractAsyncContextManager[None]]


def _gate(shape: LoadShape, start: float) -> Gate:
    """What a request waits for before it is sent: its arrival time, or a free slot."""
    if isinstance(shape, Poisson):

        @asynccontextmanager
        async def at_arrival(request: BenchRequest) -> AsyncIterator[None]:
            await asyncio.sleep(start + request.arrival_s - asyncio.get_running_loop().time())
            yield

        return at_arrival
    # Slots are granted in request order (asyncio's semaphore wakes its waiters first in,
    # first out), so a closed loop sends the workload in order.
    slots = asyncio.Semaphore(
        shape.max_concurrency if isinstance(shape, Offline) else shape.num_in_flight
    )

    @asynccontextmanager
    async def in_slot(request: BenchRequest) -> AsyncIterator[None]:
        async with slots:
            yield

    return in_slot


def _cancelled(request: BenchRequest, send_s: float, timeout_s: float) -> RequestRecord:
    # What it streamed before the cancellation is dropped with it: failed requests count in
    # no latency or throughput.
    return RequestRecord(
        request_id=request.request_id,
        send_s=send_s,
        end_s=time.perf_counter(),
        chunks=(),
        prompt_tokens=len(request.prompt_token_ids),
        completion_tokens=0,
        error=f"cancelled: the run's timeout ({timeout_s:g} s) came first",
    )


async def run_load(
    target: Target,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    timeout_s: float,
    on_done: Callable[[RequestRecord], None] = lambda record: None,
) -> RunRecords:
    """Every request of the run, sent as the shape says; returns once each has finished,
    failed or been cancelled at timeout_s after the start."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    gate = _gate(shape, start)

    async def one(request: BenchRequest) -> RequestRecord | None:
        send_s = None
        try:
            async with asyncio.timeout_at(start + timeout_s), gate(request):
                send_s = time.perf_counter()
                record = await target.run(request)
        except TimeoutError:
            if send_s is None:
                return None  # never sent
            record = _cancelled(request, send_s, timeout_s)
        on_done(record)
        return record

    results = await asyncio.gather(*(one(r) for r in requests))
    records = tuple(r for r in results if r is not None)
    return RunRecords(records, num_not_sent=len(results) - len(records))
