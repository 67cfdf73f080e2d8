"""A worker serves while it loads its model: Describe gives what Attach needs, and the pool
is attached and page-locked meanwhile, so a large pool's pinning no longer follows the load
(docs/architecture.md, "Start"). Real worker and batcher services on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import grpc
import pytest
from test_batcher_service import generate, stack

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.batcher.pool_attachment import PoolAttachment
from alignedserve.batcher.worker_link import WorkerLink
from alignedserve.common import wire
from alignedserve.common.errors import UnavailableError
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import aio_server
from alignedserve.serve import free_port
from alignedserve.worker import server as worker_server
from alignedserve.worker.generate import LocalRuntime
from alignedserve.worker.service import WorkerConfig

from factories import greedy, random_prompts


class Gate:
    """Holds the worker's model load until opened (from any thread); records what ran while
    it was held."""

    def __init__(self, monkeypatch) -> None:
        self.opened = threading.Event()
        self.mapped_while_loading: list[str] = []  # pools mapped before the load ended
        self.mapped: list[str] = []
        self.loading = True
        load, map_pool = worker_server.load, worker_server.map_pool

        def gated_load(config):
            model = load(config)
            self.opened.wait(30)
            self.loading = False
            return model

        def recorded_map_pool(pool, copied, gpu):
            self.mapped.append(pool.name)
            if self.loading:
                self.mapped_while_loading.append(pool.name)
            return map_pool(pool, copied, gpu)

        monkeypatch.setattr(worker_server, "load", gated_load)
        monkeypatch.setattr(worker_server, "map_pool", recorded_map_pool)


@contextlib.asynccontextmanager
async def loading_worker(model_dir, gate: Gate):
    """A worker whose load waits at `gate`; yields (stub, its serving task)."""
    port = free_port()
    serving = asyncio.create_task(serve_worker_on(model_dir, port))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        try:
            await stub.Describe(worker_pb2.DescribeRequest(), wait_for_ready=True, timeout=30)
            yield stub, serving
        finally:
            gate.opened.set()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


async def serve_worker_on(model_dir, port: int) -> None:
    await worker_server.serve_worker(WorkerConfig(str(model_dir), port=port, num_device_blocks=64))


def attach_request(pool: CpuKVPool) -> worker_pb2.AttachRequest:
    return worker_pb2.AttachRequest(
        pool_name=pool.name,
        num_pool_blocks=pool.num_blocks,
        kv_layout=wire.layout_to_proto(pool.layout),
    )


def test_a_loading_worker_describes_its_layout_and_attach_waits_for_the_load(
    model_dir, monkeypatch
):
    """While the model loads, Describe says so and gives the KV layout (and nothing that
    needs the model); a Session is refused; Attach maps the pool at once but answers only
    once the model is loaded; then Describe gives the whole ModelInfo."""
    gate = Gate(monkeypatch)

    async def main():
        async with loading_worker(model_dir, gate) as (stub, _):
            early = await stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
            assert early.loading and early.model_name == Path(model_dir).resolve().name
            assert early.num_device_blocks == 0 and early.vocab_size == 0
            layout = wire.layout_from_proto(early.kv_layout)
            pool = CpuKVPool.create(layout, 16)
            try:
                session = stub.Session(iter(()))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await session.read()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                attach = asyncio.ensure_future(stub.Attach(attach_request(pool), timeout=30))
                with pytest.raises(TimeoutError):  # not answered while the model loads
                    await asyncio.wait_for(asyncio.shield(attach), 0.5)
                assert gate.mapped_while_loading == [pool.name]
                gate.opened.set()
                await attach
                info = await stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
                assert not info.loading and info.num_device_blocks == 64
                assert wire.layout_from_proto(info.kv_layout) == layout
                assert info.vocab_size > 0 and info.eos_token_ids
            finally:
                pool.close()
                pool.unlink()

    asyncio.run(main())


def test_the_same_pool_attached_again_is_mapped_once(model_dir, monkeypatch):
    """A retried Attach of the pool attached finds it mapped (and pinned, on a GPU): it is
    not page-locked twice. Another pool replaces it."""
    gate = Gate(monkeypatch)
    gate.opened.set()

    async def main():
        async with loading_worker(model_dir, gate) as (stub, _):
            info = await stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
            layout = wire.layout_from_proto(info.kv_layout)
            first, second = CpuKVPool.create(layout, 16), CpuKVPool.create(layout, 8)
            try:
                for pool in (first, first, second):
                    await stub.Attach(attach_request(pool), timeout=30)
                return first.name, second.name
            finally:
                for pool in (first, second):
                    pool.close()
                    pool.unlink()

    assert gate.mapped == list(asyncio.run(main()))


def test_a_model_that_fails_to_load_answers_a_waiting_attach_unavailable(model_dir, monkeypatch):
    """An Attach waiting for the model hears why it failed, and the worker stops with that
    error (it never hangs)."""
    held = threading.Event()

    def failing_load(config):
        held.wait(30)
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(worker_server, "load", failing_load)

    async def main():
        port = free_port()
        serving = asyncio.create_task(serve_worker_on(model_dir, port))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = await stub.Describe(worker_pb2.DescribeRequest(), wait_for_ready=True)
            pool = CpuKVPool.create(wire.layout_from_proto(info.kv_layout), 16)
            try:
                attach = asyncio.ensure_future(stub.Attach(attach_request(pool), timeout=30))
                await asyncio.sleep(0.2)
                held.set()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await attach
            finally:
                pool.close()
                pool.unlink()
        with pytest.raises(RuntimeError, match="out of device memory"):
            await asyncio.wait_for(serving, 30)
        return failed.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to load" in error.details() and "out of device memory" in error.details()


def test_the_batcher_attaches_while_the_worker_loads_and_serves_its_tokens(model_dir, monkeypatch):
    """A batcher started beside its worker maps the pool there during the load (the load
    waits for that here), then serves the runtime's greedy tokens."""
    gate = Gate(monkeypatch)
    load = worker_server.load

    def load_once_mapped(config):
        for _ in range(300):  # the Attach comes while the model is loading
            if gate.mapped:
                break
            threading.Event().wait(0.1)
        gate.opened.set()
        return load(config)

    monkeypatch.setattr(worker_server, "load", load_once_mapped)
    prompt = random_prompts((12,), seed=4)[0]
    expected = LocalRuntime.from_dir(model_dir).generate([prompt], [greedy(6)])[0]

    async def main():
        async with stack(model_dir, free_port()) as (stub, _):
            return await asyncio.wait_for(generate(stub, "a", prompt, greedy(6)), 60)

    tokens, finish, _ = asyncio.run(main())
    assert len(gate.mapped_while_loading) == 1
    assert (tokens, finish) == (expected.token_ids, "length")


class RestartingWorker(worker_pb2_grpc.WorkerServicer):
    """A fake worker that restarts once right after answering an Attach: its next Describe
    says it is loading again. Counts the Attach calls."""

    def __init__(self, info: worker_pb2.ModelInfo) -> None:
        self.info = info
        self.attached: list[str] = []
        self.describes = 0

    async def Describe(self, request, context):
        self.describes += 1
        loading = len(self.attached) < 2  # loading until attached anew after the restart
        return (
            worker_pb2.ModelInfo(
                model_name=self.info.model_name, kv_layout=self.info.kv_layout, loading=True
            )
            if loading
            else self.info
        )

    async def Attach(self, request, context):
        self.attached.append(request.pool_name)
        return worker_pb2.AttachResponse()


def test_a_worker_that_restarts_after_attach_is_attached_again_with_the_same_pool(model_dir):
    """If the worker restarts between its Attach and the batcher's second Describe, that
    Describe says `loading`: the batcher attaches the same pool again and returns the loaded
    worker's ModelInfo, never the loading one."""
    from alignedserve.common.kv_layout import KVLayout

    layout = KVLayout(2, 2, 4, 4, "float32")
    info = worker_pb2.ModelInfo(
        model_name="m", kv_layout=wire.layout_to_proto(layout), num_device_blocks=7
    )

    async def main():
        server, _ = aio_server()
        fake = RestartingWorker(info)
        worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        attachment = PoolAttachment(WorkerLink(f"127.0.0.1:{port}"), 1 << 20)
        try:
            got = await attachment.attach(10)
            return got, fake, attachment.pool.name
        finally:
            await attachment.close()
            await attachment.link.close()
            await server.stop(0)

    got, fake, pool_name = asyncio.run(main())
    assert not got.loading and got.num_device_blocks == 7
    assert fake.attached == [pool_name, pool_name]


def test_a_worker_that_never_loads_fails_the_attach_at_the_deadline(model_dir):
    """A worker that stays loading past the batcher's wait is reported unavailable."""

    class NeverLoaded(RestartingWorker):
        async def Describe(self, request, context):
            return worker_pb2.ModelInfo(kv_layout=self.info.kv_layout, loading=True)

    from alignedserve.common.kv_layout import KVLayout

    info = worker_pb2.ModelInfo(kv_layout=wire.layout_to_proto(KVLayout(2, 2, 4, 4, "float32")))

    async def main():
        server, _ = aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(NeverLoaded(info), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        attachment = PoolAttachment(WorkerLink(f"127.0.0.1:{port}"), 1 << 20)
        try:
            with pytest.raises(UnavailableError, match="loading"):
                await attachment.attach(0.5)
        finally:
            await attachment.close()
            await attachment.link.close()
            await server.stop(0)

    asyncio.run(main())


def test_an_attach_the_worker_refuses_as_invalid_fails_at_once_not_at_the_deadline(model_dir):
    """INVALID_ARGUMENT (a pool the worker cannot use) is no state a retry can wait out: the
    batcher's start fails with the worker's reason at once. (An fcfs mirror that a GPU
    worker refused was retried until the batcher's wait ran out, and serve never started.)"""
    import time

    from alignedserve.common.errors import ConfigError
    from alignedserve.common.kv_layout import KVLayout

    class Refusing(RestartingWorker):
        async def Attach(self, request, context):
            self.attached.append(request.pool_name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Attach: not page-locked")

    layout = wire.layout_to_proto(KVLayout(2, 2, 4, 4, "float32"))
    fake = Refusing(worker_pb2.ModelInfo(model_name="m", kv_layout=layout, num_device_blocks=7))

    async def main():
        server, _ = aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        attachment = PoolAttachment(WorkerLink(f"127.0.0.1:{port}"), 1 << 20)
        start = time.monotonic()
        try:
            with pytest.raises(ConfigError, match="not page-locked"):
                await attachment.attach(30)
            return time.monotonic() - start
        finally:
            await attachment.close()
            await attachment.link.close()
            await server.stop(0)

    assert asyncio.run(main()) < 10
    assert len(fake.attached) == 1
