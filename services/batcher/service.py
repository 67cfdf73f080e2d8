"""The Batcher gRPC service (for routers) around the engine, and its process entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import uuid
from dataclasses import dataclass, field

import grpc

from alignedserve.batcher.engine import BatcherEngine
from alignedserve.batcher.engine_config import EngineConfig
from alignedserve.batcher.scheduler import SchedulerConfig
from alignedserve.batcher.streams import Delta, Sink
from alignedserve.common import event_loop, flags, metrics, rpc, wire
from alignedserve.common.errors import AlignedServeError, ConfigError
from alignedserve.common.policy import LOAD_ORDERS
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = "alignedserve.v1.Batcher"


@dataclass(frozen=True)
class BatcherConfig:
    worker: str = "127.0.0.1:50061"  # worker address
    host: str = "127.0.0.1"
    port: int = 50051
    pool_gib: float = 1.0  # CPU KV pool (shared memory)
    policy: str = "aligned"  # aligned | fcfs
    max_waiting: int = 1024  # admission queue bound: beyond it, RESOURCE_EXHAUSTED (429)
    starvation_s: float = 5.0
    worker_recovery_s: float = 60.0  # how long requests wait for a lost worker to return
    worker_startup_s: float = 600.0  # how long the first worker connection may take (model load)
    min_batch: int = 1  # aligned: fewest members of a decode group, when that many are resident
    max_batch_kv_fraction: float = 0.9  # aligned: decode-GPU KV that resident batches may use
    drain_s: float = 30.0  # on SIGTERM: finish in-flight requests for at most this long
    metrics_port: int = 0  # Prometheus /metrics on this HTTP port; 0: none (the router's serves)
    # aligned's decode cost model; by default what the worker reports (ModelInfo)
    kernel_cost: str | None = None  # padded | balanced
    weight_kv_tokens: int | None = None  # weight bytes / KV bytes per token
    # steps sent to the worker before the first is answered; 1: wait for each answer
    max_steps_in_flight: int = 2
    # aligned beside a prefill device: the most share of the decode GPU's time that its
    # prefill turns take while a backlog waits (0: never)
    decode_prefill_share: float = SchedulerConfig.decode_prefill_share
    # aligned beside a prefill device: its batches take whole prompts (a prompt that would
    # pass the prefill budget leads the next batch); off: cut at the budget
    prefill_whole_prompts: bool = SchedulerConfig.prefill_whole_prompts
    # aligned: which pooled requests load first after the starving: shortest-first (by the
    # max_tokens clients set, then as fit-groups) or fit-groups (lengths inside a resident
    # group, then the oldest)
    load_order: str = field(
        default=SchedulerConfig.load_order,
        metadata={"help": "aligned: which pooled requests load first", "choices": LOAD_ORDERS},
    )
    event_loop: str = field(default="auto", metadata=event_loop.FIELD_METADATA)

    def __post_init__(self) -> None:
        event_loop.check(self.event_loop)
        if self.pool_gib <= 0:
            raise ConfigError(f"pool_gib={self.pool_gib} must be > 0")
        if self.kernel_cost not in (None, "padded", "balanced"):
            raise ConfigError(f"kernel_cost={self.kernel_cost!r} not 'padded' or 'balanced'")
        if self.weight_kv_tokens is not None and self.weight_kv_tokens <= 0:
            raise ConfigError(f"weight_kv_tokens={self.weight_kv_tokens} must be > 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port} outside 0..65535")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            worker_address=self.worker,
            pool_bytes=int(self.pool_gib * 2**30),
            scheduler=SchedulerConfig(
                policy=self.policy,
                max_waiting=self.max_waiting,
                starvation_s=self.starvation_s,
                min_batch_size=self.min_batch,
                max_resident_kv_fraction=self.max_batch_kv_fraction,
                decode_prefill_share=self.decode_prefill_share,
                prefill_whole_prompts=self.prefill_whole_prompts,
                load_order=self.load_order,
            ),
            worker_recovery_s=self.worker_recovery_s,
            worker_startup_s=self.worker_startup_s,
            kernel_cost=self.kernel_cost,
            weight_kv_tokens=self.weight_kv_tokens,
            max_steps_in_flight=self.max_steps_in_flight,
        )


def add_batcher_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, BatcherConfig)


def config_from_args(args: argparse.Namespace) -> BatcherConfig:
    return flags.from_args(BatcherConfig, args)


class BatcherServicer(batcher_pb2_grpc.BatcherServicer):
    def __init__(self, engine: BatcherEngine):
        self.engine = engine

    async def Generate(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            params = wire.sampling_from_proto(request.params)
            queue = self.engine.submit(request_id, list(request.prompt_token_ids), params)
        except AlignedServeError as e:
            await context.abort(rpc.grpc_status(e), str(e))
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                if isinstance(delta, Exception):
                    await context.abort(_status_of(delta), str(delta))
                finished = delta.finish_reason is not None
                yield _response(delta)
        finally:
            if not finished:  # the client went away (or the call was cancelled)
                self.engine.abort(request_id)

    async def Stream(self, request_iterator, context):
        """A router's requests on one call: each engine step's deltas of all of them go out
        as one message (those of several steps, when the router reads slower)."""
        outbox = _Outbox()
        live: set[str] = set()  # this call's requests that have not ended

        def admit(request: batcher_pb2.GenerateRequest) -> None:
            request_id = request.request_id
            sink = outbox.sink(request_id, live)
            try:
                params = wire.sampling_from_proto(request.params)
                self.engine.submit(request_id, list(request.prompt_token_ids), params, sink)
                live.add(request_id)
            except AlignedServeError as e:
                outbox.add(_error_delta(request_id, rpc.grpc_status(e), str(e)))

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("generate"):
                    admit(msg.generate)
                elif msg.HasField("abort") and msg.abort.request_id in live:
                    self.engine.abort(msg.abort.request_id)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: outbox.wake.set())
        try:
            while True:
                await outbox.wake.wait()
                outbox.wake.clear()
                if outbox.pending:
                    deltas, outbox.pending = outbox.pending, []
                    yield batcher_pb2.StreamResponse(deltas=deltas)
                if reader.done() and not live and not outbox.pending:
                    reader.result()  # the client's half-close, or its error
                    return
        finally:
            reader.cancel()
            for request_id in list(live):  # the call ended (or the router went away)
                self.engine.abort(request_id)

    async def Abort(self, request, context):
        return batcher_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def GetLoad(self, request, context):
        load = self.engine.load()
        info = self.engine.info
        return batcher_pb2.LoadReport(
            num_waiting=load["num_waiting"],
            num_running=load["num_running"],
            num_pooled=load["num_pooled"],
            kv_pool_usage=load["kv_pool_usage"],
            worker_ready=self.engine.is_serving,
            max_model_len=info.max_model_len if info else 0,
            model_name=info.model_name if info else "",
            max_waiting=self.engine.config.scheduler.max_waiting,
            num_context_tokens=load["num_context_tokens"],
        )


async def _mirror_readiness(engine: BatcherEngine, health, interval_s: float = 0.2) -> None:
    """Health is SERVING only while a worker is attached and answering (and not draining):
    a pod whose model worker is down or wedged must leave its Service, so readiness probes
    (Kubernetes' gRPC probe) and routers see a batcher that can serve, not one that is up."""
    serving = None
    while True:
        ready = engine.is_serving
        if ready != serving:
            await rpc.set_serving(health, [SERVICE], ready)
            serving = ready
        await asyncio.sleep(interval_s)


class _Outbox:
    """The deltas a Stream call has yet to send, and the event that wakes its sender."""

    def __init__(self) -> None:
        self.pending: list[batcher_pb2.RequestDelta] = []
        self.wake = asyncio.Event()

    def add(self, delta: batcher_pb2.RequestDelta) -> None:
        self.pending.append(delta)
        self.wake.set()

    def sink(self, request_id: str, live: set[str]) -> Sink:
        """The engine's sink for one request of this call."""

        def put(delta: Delta | Exception) -> None:
            if isinstance(delta, Exception):
                live.discard(request_id)
                self.add(_error_delta(request_id, _status_of(delta), str(delta)))
                return
            msg = batcher_pb2.RequestDelta(
                request_id=request_id, token_ids=delta.token_ids, logprobs=delta.logprobs
            )
            if delta.finish_reason is not None:
                live.discard(request_id)
                msg.finish_reason = delta.finish_reason
                msg.usage.prompt_tokens = delta.prompt_tokens
                msg.usage.completion_tokens = delta.completion_tokens
            self.add(msg)

        return put


def _status_of(error: Exception) -> grpc.StatusCode:
    """A request's failure as a status: ours by the one table (e.g. the worker rejected its
    step), anything else means the worker was lost for good (UNAVAILABLE)."""
    if isinstance(error, AlignedServeError):
        return rpc.grpc_status(error)
    return grpc.StatusCode.UNAVAILABLE


def _error_delta(request_id: str, code: grpc.StatusCode, message: str) -> batcher_pb2.RequestDelta:
    return batcher_pb2.RequestDelta(
        request_id=request_id, error_code=code.value[0], error_message=message
    )


def _response(delta: Delta) -> batcher_pb2.GenerateResponse:
    msg = batcher_pb2.GenerateResponse(
        token_ids=delta.token_ids,
        logprobs=delta.logprobs,
        finish_reason=delta.finish_reason or "",
    )
    if delta.finish_reason is not None:
        msg.usage.prompt_tokens = delta.prompt_tokens
        msg.usage.completion_tokens = delta.completion_tokens
    return msg


async def _start_unless_stopped(engine: BatcherEngine, stop: asyncio.Event) -> bool:
    """engine.start() (it waits for the worker, which may load for minutes), unless `stop`
    is set first, as SIGTERM sets it: then it is abandoned and False returned."""
    starting = asyncio.ensure_future(engine.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    if starting.cancelled():
        return False
    starting.result()  # its error, if it failed
    return True


async def _abandon(readiness: asyncio.Task, server, engine: BatcherEngine) -> None:
    """Stop what serve_batcher started, when it never got to serve."""
    readiness.cancel()
    await server.stop(grace=None)
    await engine.stop()


async def serve_batcher(
    config: BatcherConfig, started: asyncio.Future | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until `stop` is set (or the task is cancelled), then drain: refuse new requests,
    let in-flight ones finish for up to drain_s, stop. `started` receives the bound port."""
    if config.metrics_port:
        metrics.start_metrics_server(config.metrics_port, config.host)
    engine = BatcherEngine(config.engine_config())
    # Serve (NOT_SERVING, so probes and routers can tell "starting") while the worker loads.
    server, health = rpc.aio_server()
    batcher_pb2_grpc.add_BatcherServicer_to_server(BatcherServicer(engine), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    readiness = asyncio.create_task(_mirror_readiness(engine, health))
    stop = stop if stop is not None else asyncio.Event()
    try:
        attached = await _start_unless_stopped(engine, stop)
    except BaseException:
        await _abandon(readiness, server, engine)
        raise
    if not attached:
        log.info("batcher stopped before a worker was attached")
        await _abandon(readiness, server, engine)
        return
    log.info("batcher serving on %s:%d (worker %s)", config.host, port, config.worker)
    if started is not None:
        started.set_result(port)
    try:
        await stop.wait()
    finally:
        engine.draining = True
        readiness.cancel()
        await asyncio.gather(readiness, return_exceptions=True)
        await rpc.set_serving(health, [SERVICE], False)
        deadline = asyncio.get_running_loop().time() + config.drain_s
        while engine.num_live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await server.stop(grace=1.0)
        await engine.stop()


def run_batcher(config: BatcherConfig) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_batcher(config, stop=stop)

    event_loop.run(main(), config.event_loop)
    return 0
