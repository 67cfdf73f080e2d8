"""One run's HTTP requests dealt among several client processes.

One Python process streaming token by token saturates its event loop at ~11-14k chunks/s
(`benchmarks/serving_overhead.py --client http` on a 32-core GPU host: the client at 0.97
CPU-seconds per second, the router at 0.6-0.7), below what a GPU pair produces on short
prompts; past it a server's tokens/s and latencies measure the client. So the requests of a
run are dealt round-robin among `num_clients` processes, each with its own event loop,
connections and share of the load shape, all starting together; their records are merged.
Times stay comparable: `time.perf_counter()` is the system-wide monotonic clock on Linux.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import queue
from collections.abc import Callable, Sequence

from alignedserve.bench.records import RequestRecord, RunRecords
from alignedserve.bench.shapes import Concurrency, LoadShape, Offline
from alignedserve.bench.workload import BenchRequest
from alignedserve.common.errors import ConfigError

POLL_S = 0.5  # how often the parent checks that its clients are alive while it waits


def split_shape(shape: LoadShape, num_clients: int) -> list[LoadShape]:
    """Each client's share: the in-flight bound divided (the first ones take the remainder);
    a Poisson run's arrival times travel with its requests."""
    if isinstance(shape, Offline | Concurrency):
        total = shape.max_concurrency if isinstance(shape, Offline) else shape.num_in_flight
        if total < num_clients:
            raise ConfigError(
                f"{total} requests in flight cannot be shared by {num_clients} clients"
            )
        sizes = [total // num_clients + (i < total % num_clients) for i in range(num_clients)]
        field = "max_concurrency" if isinstance(shape, Offline) else "num_in_flight"
        return [dataclasses.replace(shape, **{field: n}) for n in sizes]
    return [shape] * num_clients


def _client(
    index: int,
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    timeout_s: float,
    events: multiprocessing.Queue,
    go: multiprocessing.Event,
) -> None:
    """A client process: its target ready, it waits for `go`, runs its share, and reports
    each record as it ends, then ("end", index, requests never sent)."""
    from alignedserve.bench.runner import run_load
    from alignedserve.bench.targets import OpenAITarget

    async def main() -> RunRecords:
        async with OpenAITarget(base_url, model, max(len(requests), 1)) as target:
            events.put(("ready", index, None))
            await asyncio.to_thread(go.wait)
            return await run_load(
                target, requests, shape, timeout_s, lambda r: events.put(("done", index, r))
            )

    try:
        events.put(("end", index, asyncio.run(main()).num_not_sent))
    except BaseException as e:  # the parent must hear of it, or it waits forever
        events.put(("error", index, f"{type(e).__name__}: {e}"))


async def run_load_in_processes(
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    timeout_s: float,
    num_clients: int,
    on_done: Callable[[RequestRecord], None] = lambda record: None,
) -> RunRecords:
    """As `runner.run_load` through the HTTP target, with the run spread over num_clients
    processes started together once every one is connected."""
    shapes = split_shape(shape, num_clients)
    spawn = multiprocessing.get_context("spawn")
    events, go = spawn.Queue(), spawn.Event()
    procs = [
        spawn.Process(
            target=_client,
            args=(i, base_url, model, requests[i::num_clients], shapes[i], timeout_s, events, go),
            daemon=True,
        )
        for i in range(num_clients)
    ]
    for proc in procs:
        proc.start()
    records: list[RequestRecord] = []
    num_ready = num_not_sent = num_ended = 0
    try:
        while num_ended < num_clients:
            try:
                kind, index, payload = await asyncio.to_thread(events.get, timeout=POLL_S)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    code = procs[dead[0]].exitcode
                    raise RuntimeError(f"bench client {dead[0]} died ({code})") from None
                continue
            if kind == "ready":
                num_ready += 1
                if num_ready == num_clients:
                    go.set()
            elif kind == "done":
                records.append(payload)
                on_done(payload)
            elif kind == "end":
                num_ended += 1
                num_not_sent += payload
            else:
                raise RuntimeError(f"bench client {index} failed: {payload}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return RunRecords(tuple(records), num_not_sent=num_not_sent)
