"""The router's batchers found through DNS (a headless Service's name stands for one batcher per
ready pod), and requests held while no batcher is ready (scale from zero). A fake getaddrinfo
stands in for the cluster's DNS; the batchers are real gRPC fakes on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from alignedserve.common.errors import AlignedServeError, QueueFullError, UnavailableError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router.client import BatcherClient
from alignedserve.router.config import RouterConfig, add_router_arguments, config_from_args
from alignedserve.router.discovery import Discovery, join_host_port, split_host_port

from factories import metric_samples
from fake_batcher import FakeBatcherFactory, eventually
from router_harness import running_router, tiny_model

NAME = "tiny-worker.ns.svc.cluster.local"


class FakeDNS:
    """getaddrinfo over a table name -> addresses. Loopback fakes differ by port where pods
    differ by IP, so the table holds whole "ip:port" addresses and answers with their ports."""

    def __init__(self, records: dict[str, list[str]] | None = None):
        self.records = dict(records or {})
        self.failure: int | None = None  # a gaierror code every lookup fails with
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.lookups.append((host, port))
        if self.failure is not None:
            raise socket.gaierror(self.failure, "fake DNS failure")
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        infos = []
        for address in self.records[host]:
            ip, p = split_host_port(address)
            kind = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, p, 0, 0) if kind == socket.AF_INET6 else (ip, p)
            infos.append((kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos


@pytest.fixture
def fakes() -> Iterator[FakeBatcherFactory]:
    factory = FakeBatcherFactory()
    yield factory
    factory.close()


async def collect(client: BatcherClient, request_id: str, max_tokens: int = 2) -> list:
    params = SamplingParams(max_tokens=max_tokens)
    return [c async for c in client.generate(request_id, [5, 6], params)]


# ---- resolution --------------------------------------------------------------------------------


def test_host_port_parsing():
    assert split_host_port("10.0.0.7:50051") == ("10.0.0.7", 50051)
    assert split_host_port(f"{NAME}:50051") == (NAME, 50051)
    assert split_host_port("[fd00::7]:50051") == ("fd00::7", 50051)
    for target in ("unix:/run/batcher.sock", "dns:///name:50051", "fd00::7", "name", "a:b"):
        assert split_host_port(target) is None, target
    assert join_host_port("fd00::7", 1) == "[fd00::7]:1" and join_host_port("a", 1) == "a:1"


def test_discovery_resolves_names_and_keeps_the_rest():
    dns = FakeDNS({NAME: ["10.0.0.2:50051", "10.0.0.1:50051"], "one": ["10.0.1.1:7"]})
    entries = [f"{NAME}:50051", "10.9.9.9:50051", "one:7", "unix:/sock", "10.0.0.1:50051"]
    discovery = Discovery(entries, dns)
    # sorted within a name, in the entries' order, each address once
    assert asyncio.run(discovery.resolve()) == [
        "10.0.0.1:50051",
        "10.0.0.2:50051",
        "10.9.9.9:50051",
        "10.0.1.1:7",
        "unix:/sock",
    ]
    assert dns.lookups == [(NAME, 50051), ("one", 7)]  # addresses are not looked up

    # a pod left: the name resolves to one address; a name gone resolves to none
    dns.records[NAME] = ["10.0.0.2:50051"]
    del dns.records["one"]
    assert asyncio.run(discovery.resolve()) == [
        "10.0.0.2:50051",
        "10.9.9.9:50051",
        "unix:/sock",
        "10.0.0.1:50051",
    ]
    # DNS not answering for a while: the last addresses stay
    dns.failure = socket.EAI_AGAIN
    assert asyncio.run(discovery.resolve())[:1] == ["10.0.0.2:50051"]


def test_dual_stack_pods_count_once():
    dns = FakeDNS({NAME: ["[fd00::1]:50051", "10.0.0.1:50051", "[fd00::2]:50051", "10.0.0.2:1"]})
    # the first family getaddrinfo answers with, only
    assert asyncio.run(Discovery([f"{NAME}:50051"], dns).resolve()) == [
        "[fd00::1]:50051",
        "[fd00::2]:50051",
    ]


def test_router_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(
        ["--model-dir", "/m", "--batcher-addresses", f"{NAME}:50051", "--resolve-interval-s",
         "2", "--max-held", "8", "--hold-timeout-s", "30"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.resolve_interval_s, config.max_held, config.hold_timeout_s) == (2.0, 8, 30.0)
    defaults = config_from_args(
        parser.parse_args(["--model-dir", "/m", "--batcher-addresses", "x:1"])
    )
    assert (defaults.resolve_interval_s, defaults.max_held, defaults.hold_timeout_s) == (
        5.0,
        1024,
        60.0,
    )
    for bad, message in (("max_held", "max_held=-1"), ("hold_timeout_s", "hold_timeout_s=-1")):
        with pytest.raises(ValueError, match=message):
            RouterConfig(model_dir="/m", batcher_addresses=("x:1",), **{bad: -1})


# ---- the client over real batchers ---------------------------------------------------------------


def test_one_batcher_per_address_following_the_pods(fakes):
    a, b, c = fakes(token_delay_s=0.01), fakes(), fakes()
    dns = FakeDNS({NAME: [a.address, b.address]})

    async def scenario() -> None:
        client = BatcherClient(
            [f"{NAME}:50051"], poll_interval_s=0.02, resolve_interval_s=0.05, getaddrinfo=dns
        )
        await client.start()
        try:
            assert {x.address for x in client.batchers} == {a.address, b.address}
            assert client.is_ready()
            # a long stream on a (b refuses it), then a's pod goes away mid-stream
            b.reject_with = grpc.StatusCode.RESOURCE_EXHAUSTED
            long = client.generate("long", [1, 2], SamplingParams(max_tokens=40))
            first = await anext(long)
            b.reject_with = None
            leaving = next(x for x in client.batchers if x.address == a.address)
            assert a.requests[-1][0] == "long"
            dns.records[NAME] = [b.address, c.address]
            await eventually(lambda: {x.address for x in client.batchers} == {b.address, c.address})
            assert leaving.is_removed and leaving.num_streams == 1
            # new requests go to the batchers there are now, both of them
            for i in range(6):
                assert (await collect(client, f"new{i}"))[-1].finish_reason == "length"
            new_ids = {r[0] for r in b.requests + c.requests}
            assert {f"new{i}" for i in range(6)} <= new_ids
            assert any(r[0].startswith("new") for r in b.requests)
            assert any(r[0].startswith("new") for r in c.requests)
            assert not any(r[0].startswith("new") for r in a.requests)
            # the stream on the batcher that left finishes whole; then its channel closes
            rest = [chunk async for chunk in long]
            assert rest[-1].finish_reason == "length"
            assert sum(len(x.token_ids) for x in [first, *rest]) == 40
            assert "long" not in a.cancelled
            await eventually(
                lambda: leaving.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
            )
            polls = a.num_load_calls
            await asyncio.sleep(0.1)
            assert a.num_load_calls == polls  # no longer polled
            # a pod comes back at the same address: a new batcher, served again
            dns.records[NAME] = [a.address, b.address, c.address]
            await eventually(lambda: len(client.batchers) == 3)
            back = next(x for x in client.batchers if x.address == a.address)
            assert back is not leaving
            await eventually(lambda: back.load is not None and back.load.worker_ready)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_request_is_held_until_a_batcher_exists_and_is_ready(fakes):
    """Scaled to zero: the name resolves to nothing; a request waits for the first pod, which
    answers GetLoad before its worker is ready."""
    fake = fakes()
    fake.worker_ready = False
    dns = FakeDNS()

    async def scenario() -> None:
        client = BatcherClient(
            [f"{NAME}:50051"], poll_interval_s=0.02, resolve_interval_s=0.05, getaddrinfo=dns
        )
        await client.start()
        try:
            assert client.batchers == [] and not client.is_ready()
            held = asyncio.create_task(collect(client, "first", max_tokens=3))
            await eventually(lambda: client.num_held == 1)
            dns.records[NAME] = [fake.address]
            await eventually(lambda: len(client.batchers) == 1 and fake.num_load_calls >= 2)
            assert not held.done() and client.num_held == 1 and fake.requests == []
            fake.worker_ready = True
            chunks = await asyncio.wait_for(held, 5)
            assert chunks[-1].finish_reason == "length" and fake.requests[0][0] == "first"
            assert client.num_held == 0
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_batcher_that_refuses_before_any_token_sends_the_request_to_the_next(fakes):
    """A rollout: the only batcher the router knows is draining (or its pod is gone) though
    its last report said ready. The request is held, not failed, until the new pod's batcher
    is found and ready, and is answered there."""
    leaving, arriving = fakes(), fakes()
    leaving.reject_with = grpc.StatusCode.UNAVAILABLE
    dns = FakeDNS({NAME: [leaving.address]})

    async def scenario() -> None:
        client = BatcherClient(
            [f"{NAME}:50051"], poll_interval_s=0.02, resolve_interval_s=0.05, getaddrinfo=dns
        )
        await client.start()
        try:
            await eventually(client.is_ready)
            held = asyncio.create_task(collect(client, "moved", max_tokens=3))
            await eventually(lambda: client.num_held == 1)  # refused, and held
            dns.records[NAME] = [arriving.address]
            chunks = await asyncio.wait_for(held, 5)
            assert chunks[-1].finish_reason == "length"
            assert [r[0] for r in arriving.requests] == ["moved"]
        finally:
            await client.close()

    asyncio.run(scenario())


def test_holding_is_bounded_in_number_and_time(fakes):
    fake = fakes()
    fake.worker_ready = False

    async def scenario() -> None:
        client = BatcherClient([fake.address], poll_interval_s=0.02, max_held=2, hold_timeout_s=0.5)
        changes: list[int] = []
        client.on_num_held = changes.append  # what a multiprocess gauge is written from
        await client.start()
        try:
            started = time.monotonic()
            held = [asyncio.create_task(collect(client, f"held{i}")) for i in range(2)]
            await eventually(lambda: client.num_held == 2)
            with pytest.raises(QueueFullError, match="max_held=2") as full:
                await collect(client, "third")
            assert full.value.http_status == 429
            for task in held:
                with pytest.raises(UnavailableError, match=r"within 0\.5 s") as late:
                    await task
                assert late.value.http_status == 503
            assert 0.5 <= time.monotonic() - started < 3
            assert client.num_held == 0 and fake.requests == []
            # a held request whose caller goes away leaves the count at once
            gone = asyncio.create_task(collect(client, "gone"))
            await eventually(lambda: client.num_held == 1)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            assert client.num_held == 0
            assert changes == [1, 2, 1, 0, 1, 0]
        finally:
            await client.close()
        no_hold = BatcherClient([fake.address], max_held=0)
        await no_hold.start()
        try:
            with pytest.raises(UnavailableError, match="no batcher has a ready worker"):
                await collect(no_hold, "now")
        finally:
            await no_hold.close()

    asyncio.run(scenario())


def test_a_request_held_twice_is_held_hold_timeout_s_in_all(fakes):
    """Held while no batcher is ready; one reports ready but refuses it (draining), then is not
    ready again: the second wait ends at the request's first deadline, not a new one."""
    fake = fakes()
    fake.worker_ready = False
    hold_timeout_s = 0.5

    async def scenario() -> None:
        client = BatcherClient([fake.address], poll_interval_s=0.02, hold_timeout_s=hold_timeout_s)
        await client.start()
        try:
            started = time.monotonic()
            held = asyncio.create_task(collect(client, "twice"))
            await eventually(lambda: client.num_held == 1)
            await asyncio.sleep(0.3 - (time.monotonic() - started))
            fake.reject_with = grpc.StatusCode.UNAVAILABLE
            fake.worker_ready = True
            await eventually(lambda: fake.requests != [])  # woken, sent, refused
            fake.worker_ready = False
            with pytest.raises(AlignedServeError) as e:
                await held
            assert e.value.http_status == 503
            assert time.monotonic() - started < hold_timeout_s + 0.15  # not 0.3 s + a new 0.5 s
            assert client.num_held == 0
        finally:
            await client.close()

    asyncio.run(scenario())


# ---- through HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def held_gauge(url: str) -> float:
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    # (the registry is the process's: routers of earlier tests left their own model names)
    return samples[("alignedserve:num_requests_held", (("model_name", "tiny"),))]


def test_http_requests_wait_for_a_ready_batcher_then_429_and_503(model_dir, fakes):
    fake = fakes()
    fake.worker_ready = False
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
    with (
        running_router(model_dir, [fake.address], max_held=1, hold_timeout_s=30) as router,
        httpx.Client(base_url=router.url, timeout=20) as http,
    ):
        url = router.url
        assert held_gauge(url) == 0

        async def held_then_served() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=20) as h:
                return await h.post("/v1/completions", json={**body, "stream": True})

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            first = asyncio.create_task(held_then_served())
            deadline = time.monotonic() + 5
            while await asyncio.to_thread(held_gauge, url) != 1:
                assert time.monotonic() < deadline, "the request was not held"
                await asyncio.sleep(0.02)
            over = await asyncio.to_thread(http.post, "/v1/completions", json=body)
            fake.worker_ready = True
            return over, await first

        over, served = asyncio.run(scenario())
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        error = over.json()["error"]
        assert error["type"] == "rate_limit_error" and "max_held=1" in error["message"]
        assert served.status_code == 200 and served.text.endswith("data: [DONE]\n\n")
        assert '"finish_reason":"length"' in served.text
        assert held_gauge(url) == 0

    fake.worker_ready = False
    with running_router(model_dir, [fake.address], hold_timeout_s=0.3) as router:
        started = time.monotonic()
        late = httpx.post(f"{router.url}/v1/completions", json=body, timeout=10)
        assert late.status_code == 503 and time.monotonic() - started >= 0.3
        error = late.json()["error"]
        assert error["type"] == "service_unavailable_error"
        assert "no batcher became ready within 0.3 s" in error["message"]


def test_a_draining_router_answers_its_held_requests_503_at_once(model_dir, fakes):
    fake = fakes()
    fake.worker_ready = False
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
    with running_router(model_dir, [fake.address], hold_timeout_s=30) as router:
        url = router.url
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=20)
            deadline = time.monotonic() + 5
            while held_gauge(url) != 1:
                assert time.monotonic() < deadline, "the request was not held"
                time.sleep(0.02)
            started = time.monotonic()
            router.server.begin_drain()
            reply = held.result()
        assert time.monotonic() - started < 2  # not the hold timeout, nor the drain's
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert "shutting down" in reply.json()["error"]["message"]
    assert fake.requests == []
