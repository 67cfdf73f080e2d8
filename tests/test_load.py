"""The operator's load collection against real servers: gRPC fake batchers on loopback, a real
router holding requests, and a real Prometheus scraping router-shaped metrics."""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from alignedserve.common.load_report import LoadReport
from alignedserve.common.metrics import (
    INTER_TOKEN_LATENCY_SECONDS,
    ITL_BUCKETS,
    start_metrics_server,
)
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.operator.load import (
    batcher_loads,
    pool_observation,
    prometheus_p99_tpot,
    router_held,
    tpot_query,
)
from alignedserve.router.client import BatcherClient
from alignedserve.serve import free_port

from fake_batcher import FakeBatcherFactory
from k8s import system_binary
from router_harness import running_router, tiny_model


@pytest.fixture
def fakes() -> Iterator[FakeBatcherFactory]:
    factory = FakeBatcherFactory()
    yield factory
    factory.close()


@pytest.fixture
def silent() -> Iterator[str]:
    """An address that accepts TCP connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def nobody() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


# ---- batchers ----------------------------------------------------------------------------------


def test_batcher_loads_in_order_with_none_for_those_not_answering(fakes, silent):
    busy, idle = fakes(token_delay_s=0.02), fakes()
    idle.worker_ready = False

    async def scenario():
        # two requests in flight on `busy`, through a router's client
        client = BatcherClient([busy.address])
        await client.start()
        streams = [
            client.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=500)) for i in range(2)
        ]
        try:
            for stream in streams:
                await anext(stream)
            started = time.monotonic()
            loads = await batcher_loads([busy.address, nobody(), idle.address, silent], 0.5)
            return loads, time.monotonic() - started
        finally:
            for stream in streams:
                await stream.aclose()
            await client.close()

    loads, took_s = asyncio.run(scenario())
    fake_load = dict(num_waiting=0, num_pooled=0, kv_pool_usage=0.0, max_model_len=2048)
    fake_load |= dict(model_name="fake", max_waiting=16)
    busy_load = loads[0]
    assert busy_load.num_context_tokens >= 2 * 3  # two prompts of 2, >= 1 token generated each
    assert loads == [
        LoadReport(
            num_running=2,
            worker_ready=True,
            num_context_tokens=busy_load.num_context_tokens,
            **fake_load,
        ),
        None,
        LoadReport(num_running=0, worker_ready=False, num_context_tokens=0, **fake_load),
        None,  # the silent one: cut at the timeout, while the others were asked meanwhile
    ]
    assert 0.5 <= took_s < 2.0
    assert asyncio.run(batcher_loads([], 0.5)) == []


def test_pool_observation_sums_what_answered():
    def report(waiting, running, pooled, usage, ready=True):
        return LoadReport(waiting, running, pooled, usage, ready, 2048, "m", 1024)

    loads = [report(3, 40, 500, 0.5), None, report(5, 10, 100, 0.3), report(2, 0, 0, 0.9, False)]
    o = pool_observation(12.0, 4, 3, loads, held=[0, None, 0], p99_tpot_s=0.1)
    assert (o.now_s, o.current_replicas, o.ready_replicas) == (12.0, 4, 3)
    assert (o.queue, o.running, o.pooled, o.p99_tpot_s) == (10, 50, 600, 0.1)
    assert math.isclose(o.kv_pool_usage, 0.4)  # over the batchers with a ready worker
    zero = pool_observation(0.0, 0, 0, [], held=[7, None, 2])
    assert (zero.queue, zero.running, zero.kv_pool_usage, zero.p99_tpot_s) == (9, 0, 0.0, None)


# ---- routers ----------------------------------------------------------------------------------


def test_router_held_reads_a_real_routers_count(tmp_path, fakes, silent):
    fake = fakes()
    fake.worker_ready = False  # nothing ready: the router holds what it gets
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    model_dir = tiny_model(tmp_path)
    with running_router(model_dir, [fake.address], hold_timeout_s=30) as router:
        url = router.url
        address = url.removeprefix("http://")

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                held = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in "ab"]
                deadline = time.monotonic() + 5
                while (counts := await router_held([address], 1.0)) != [2]:
                    assert time.monotonic() < deadline, f"held {counts}"
                    await asyncio.sleep(0.02)
                counts = await router_held([address, nobody(), silent], 0.5)
                fake.worker_ready = True
                replies = await asyncio.gather(*held)
                return counts, replies, await router_held([address], 1.0)

        counts, replies, after = asyncio.run(scenario())
    assert counts == [2, None, None]
    assert [r.status_code for r in replies] == [200, 200]
    assert after == [0]


# ---- Prometheus ---------------------------------------------------------------------------------


def test_tpot_query():
    assert tpot_query("prod", "llama") == (
        "histogram_quantile(0.99, sum by (le)(rate(alignedserve:inter_token_latency_seconds_bucket"
        '{namespace="prod",service="llama-router"}[2m])))'
    )


@contextmanager
def serving_itl() -> Iterator[tuple[int, Histogram]]:
    """A /metrics with the routers' inter-token histogram, served as the project serves every
    /metrics (classic text format, so the ':' of our names reaches Prometheus)."""
    registry = CollectorRegistry()
    name = INTER_TOKEN_LATENCY_SECONDS.describe()[0].name
    itl = Histogram(name, "ITL", ["model_name"], buckets=ITL_BUCKETS, registry=registry)
    server = start_metrics_server(0, "127.0.0.1", registry)
    try:
        yield server.server_address[1], itl.labels("tiny")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def prometheus(tmp_path) -> Iterator[tuple[str, dict[str, Histogram]]]:
    """A real Prometheus scraping the routers of two AlignedServes of namespace `prod`, `fast`
    and `slow`, every 0.2 s, with the labels the Prometheus Operator gives its targets."""
    binary = system_binary("prometheus")
    stack = ExitStack()
    targets = {name: stack.enter_context(serving_itl()) for name in ("fast", "slow")}
    jobs = "\n".join(
        f"""  - job_name: {name}-router
    static_configs:
      - targets: ["127.0.0.1:{port}"]
        labels: {{namespace: prod, service: {name}-router, pod: {name}-router-0}}"""
        for name, (port, _) in targets.items()
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 200ms\nscrape_configs:\n{jobs}\n")
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, Path(tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            try:
                if httpx.get(f"{url}/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url, {name: itl for name, (_, itl) in targets.items()}
    finally:
        proc.terminate()
        proc.wait(10)
        stack.close()


@pytest.mark.slow
def test_p99_tpot_from_a_real_prometheus(prometheus):
    url, itl = prometheus
    # no traffic yet: no answer, not zero
    assert asyncio.run(prometheus_p99_tpot(url, "prod", "fast")) is None
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            for _ in range(50):
                itl["fast"].observe(0.045)  # in the bucket (0.04, 0.05]
                itl["slow"].observe(3.0)
            time.sleep(0.05)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while True:  # both targets scraped twice (a rate needs two samples), on their own clocks
            p99 = asyncio.run(prometheus_p99_tpot(url, "prod", "fast"))
            slow = asyncio.run(prometheus_p99_tpot(url, "prod", "slow"))
            if p99 is not None and slow is not None:
                break
            assert time.monotonic() < deadline, "no p99 from Prometheus"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert 0.04 < p99 <= 0.05  # the one instance's series only: the slow one is 3 s
    assert 2.5 < slow <= 5.0
    assert asyncio.run(prometheus_p99_tpot(url, "other-namespace", "fast")) is None
    assert asyncio.run(prometheus_p99_tpot(f"http://{nobody()}", "prod", "fast", 1.0)) is None


def test_load_collection_imports_no_torch(tmp_path):
    code = "import sys, alignedserve.operator.load, alignedserve.operator.autoscale\n"
    code += "print([m for m in ('torch', 'triton', 'fastapi') if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
