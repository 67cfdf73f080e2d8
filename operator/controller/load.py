"""Collecting a pool's load for the autoscaler: each batcher's GetLoad (the call the routers
poll), each router's held requests (its /metrics), and optionally the p99 time per output
token from Prometheus; then one PoolObservation of them. A source that does not answer in
time counts as None, never as an error: a decision is made from what did answer."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from alignedserve.common.load_report import LoadReport, get_load
from alignedserve.common.metrics import INTER_TOKEN_LATENCY_SECONDS, NUM_REQUESTS_HELD
from alignedserve.common.proto import batcher_pb2_grpc
from alignedserve.common.rpc import CHANNEL_OPTIONS
from alignedserve.operator.autoscale import PoolObservation

log = logging.getLogger(__name__)

HELD = NUM_REQUESTS_HELD.describe()[0].name
ITL = INTER_TOKEN_LATENCY_SECONDS.describe()[0].name


async def batcher_loads(
    addresses: Sequence[str], timeout_s: float = 2.0
) -> list[LoadReport | None]:
    """Each batcher's load ("host:port"), in order; None where it did not answer in time."""
    return list(await asyncio.gather(*(_batcher_load(a, timeout_s) for a in addresses)))


async def _batcher_load(address: str, timeout_s: float) -> LoadReport | None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            return await get_load(batcher_pb2_grpc.BatcherStub(channel), timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("batcher %s: GetLoad: %s", address, e.details() or e.code().name)
            return None


async def router_held(addresses: Sequence[str], timeout_s: float = 2.0) -> list[int | None]:
    """Requests each router ("host:port" of its HTTP port) holds while no batcher is ready,
    read from its /metrics; None where it did not answer in time."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_router_held(session, a) for a in addresses)))


async def _router_held(session: aiohttp.ClientSession, address: str) -> int | None:
    try:
        async with session.get(f"http://{address}/metrics") as reply:
            reply.raise_for_status()
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("router %s: /metrics: %s", address, e or type(e).__name__)
        return None
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        log.warning("router %s: /metrics unreadable: %s", address, e)
        return None
    return int(sum(s.value for f in families for s in f.samples if s.name == HELD))


def tpot_query(namespace: str, instance: str, window: str = "2m") -> str:
    """PromQL for the p99 time per output token of one AlignedServe's routers. Selected by
    the labels the Prometheus Operator puts on a ServiceMonitor's targets: `namespace`, and
    `service` (the router Service, `<instance>-router`)."""
    selector = f'namespace="{_quoted(namespace)}",service="{_quoted(instance)}-router"'
    return f"histogram_quantile(0.99, sum by (le)(rate({ITL}_bucket{{{selector}}}[{window}])))"


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


async def prometheus_p99_tpot(
    url: str, namespace: str, instance: str, timeout_s: float = 5.0
) -> float | None:
    """The p99 time per output token (seconds) over the last 2 minutes, from the Prometheus
    at `url` (its HTTP API); None without traffic, or when Prometheus does not answer."""
    query = tpot_query(namespace, instance)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}) as reply,
        ):
            body = await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.warning("prometheus %s: %s", url, e or type(e).__name__)
        return None
    if body.get("status") != "success":
        log.warning("prometheus %s: %s: %s", url, body.get("errorType"), body.get("error"))
        return None
    result = body["data"]["result"]
    if not result:
        return None  # no series: nothing scraped yet for this instance
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value  # NaN: no tokens


def pool_observation(
    now_s: float,
    current_replicas: int,
    ready_replicas: int,
    loads: Sequence[LoadReport | None],
    held: Sequence[int | None] = (),
    p99_tpot_s: float | None = None,
) -> PoolObservation:
    """One observation of a worker pool: the batchers' loads summed (those that answered),
    the routers' held requests added to the queue, KV use averaged over ready batchers."""
    reports = [r for r in loads if r is not None]
    ready = [r for r in reports if r.worker_ready]
    usage = sum(r.kv_pool_usage for r in ready) / len(ready) if ready else 0.0
    return PoolObservation(
        now_s=now_s,
        current_replicas=current_replicas,
        ready_replicas=ready_replicas,
        queue=sum(r.num_waiting for r in reports) + sum(h for h in held if h is not None),
        running=sum(r.num_running for r in reports),
        pooled=sum(r.num_pooled for r in reports),
        p99_tpot_s=p99_tpot_s,
        kv_pool_usage=min(max(usage, 0.0), 1.0),
    )
