"""The Worker gRPC service: runs the batcher's step plans on one model (`worker.proto`).

The worker follows plans and decides nothing: per step it loads KV from the batcher's CPU
pool, runs one forward pass over every prefill chunk and decode entry, samples, then writes
back and frees what the plan says. It keeps no request state beyond device residency, so a
batcher that loses its worker re-prefills each request from its last write-back, and one that
restarts re-attaches its pool.

This module imports no torch at import time: the CLI builds its parser from `WorkerConfig`,
and `--help` must not pay for torch. The torch side is imported where the model is loaded
(`server.py`, which also runs the process).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common import flags, stats_line
from alignedserve.common.errors import AlignedServeError, ConfigError, ModelLoadError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.model_config import DTYPES
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import REJECTED_STEP_KEY, grpc_status
from alignedserve.common.wire import layout_from_proto
from alignedserve.worker.profiling import StepProfile

if TYPE_CHECKING:
    from alignedserve.worker.executor import Launched, StepExecutor
    from alignedserve.worker.pool_mapping import PoolMapping
    from alignedserve.worker.residency import DeviceResidency

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
STOP_GRACE_S = 5.0  # on shutdown, in-flight RPCs get this long before they are cancelled
# Default staging room on the prefill device beyond one whole context: the batcher's default
# prefill budget per step, so a long request's last chunk and a step's other chunks fit at once.
PREFILL_STAGING_EXTRA_TOKENS = 8192
# prefill_decode_blocks: size the prefill device's decode KV like the decode device's
AUTO_BLOCKS = -1


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str = field(metadata={"help": "Hugging Face model directory"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1"})
    dtype: str | None = field(
        default=None,
        metadata={"help": "weights and KV dtype (default: the checkpoint's)", "choices": DTYPES},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "port to listen on; 0 picks a free one"})
    num_device_blocks: int = field(
        default=2048, metadata={"help": "KV blocks on the device (the decode KV capacity)"}
    )
    block_tokens: int = field(default=16, metadata={"help": "tokens per KV block"})
    prefetch_device: str | None = field(
        default=None,
        metadata={
            "help": "the pair's prefetch GPU (e.g. cuda:1): loads use both PCIe links, and "
            "prefill runs there (see offload_prefill)"
        },
    )
    offload_prefill: bool = field(
        default=True,
        metadata={
            "help": "with a prefetch device: prefill on a replica of the weights there, "
            "beside the decode step (else every chunk runs on the decode device)"
        },
    )
    prefill_kv_tokens: int = field(
        default=0,
        metadata={
            "help": "staging KV on the prefetch device, tokens; 0: one whole context plus "
            f"{PREFILL_STAGING_EXTRA_TOKENS} (a step's chunks)"
        },
    )
    # On by default (AUTO_BLOCKS): +3-14 % tokens/s offline and under overload (2xH200); at
    # 12 and 19 req/s its p99 TPOT matched the prefill-only prefill device's (7.9 vs 8.2 ms,
    # 9.1 vs 9.3 ms) thanks to the batcher's quiet period (prefill_lane_quiet_s): without it
    # the lane opened and closed with every prompt (docs/benchmarks.md, fourteenth session).
    prefill_decode_blocks: int = field(
        default=AUTO_BLOCKS,
        metadata={
            "help": "with a prefetch device that prefills: KV blocks it decodes in, on its "
            "replica of the weights, while no prompt waits (the aligned batcher sends it "
            f"residents of its own then); {AUTO_BLOCKS}: as many as num_device_blocks, fewer "
            "if its free memory holds fewer; 0: it only prefills"
        },
    )
    overlap_steps: bool = field(
        default=True,
        metadata={
            "help": "queue a step on the device before answering the previous one, when it "
            "has arrived: the device runs them back to back while the host answers"
        },
    )
    warm_up_batch: int = field(
        default=512,
        metadata={
            "help": "on a GPU, before serving: compile the prefill kernels and capture the "
            "decode graphs of batches up to this many requests (0: graphs on first use)"
        },
    )
    # A batcher that reconnects may open its new Session before the worker has seen the old
    # stream end (and finished its in-flight step): it waits this long, then is refused.
    session_handover_s: float = field(
        default=5.0, metadata={"help": "how long a new Session waits for the previous to end"}
    )

    def __post_init__(self) -> None:
        checks = (
            ("model_dir", bool(self.model_dir), "must name a directory"),
            ("device", bool(self.device), "must name a torch device"),
            ("dtype", self.dtype is None or self.dtype in DTYPES, f"not one of {list(DTYPES)}"),
            ("host", bool(self.host), "must name an address"),
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
            ("num_device_blocks", self.num_device_blocks >= 1, "must be >= 1"),
            ("block_tokens", self.block_tokens >= 1, "must be >= 1"),
            ("session_handover_s", self.session_handover_s >= 0, "must be >= 0"),
            ("prefill_kv_tokens", self.prefill_kv_tokens >= 0, "must be >= 0"),
            ("prefill_decode_blocks", self.prefill_decode_blocks >= AUTO_BLOCKS, "must be >= -1"),
            (
                "prefill_decode_blocks",
                self.prefill_decode_blocks <= 0
                or bool(self.prefetch_device and self.offload_prefill),
                "needs a prefetch_device that prefills (offload_prefill)",
            ),
            ("warm_up_batch", self.warm_up_batch >= 0, "must be >= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"WorkerConfig.{name}={getattr(self, name)!r} {rule}")


# ---------------------------------------------------------------- CLI flags from the config


FLAG_RENAMES = {"model_dir": "--model"}


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, WorkerConfig, renames=FLAG_RENAMES)


def worker_args(config: WorkerConfig) -> list[str]:
    """The command line of `alignedserve serve worker` that runs `config`."""
    return flags.to_args(config, renames=FLAG_RENAMES)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return flags.from_args(WorkerConfig, args)


# ---------------------------------------------------------------- the service


@dataclass(frozen=True)
class LoadedModel:
    """What loading the model makes (`server.load`): the whole ModelInfo, the step executor,
    and how a residency is made over an attached pool."""

    info: worker_pb2.ModelInfo
    executor: StepExecutor
    new_residency: Callable[[PoolMapping], DeviceResidency]


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Describe / Attach / Session over one model. It serves from the start, while the model
    loads: Describe then gives what Attach needs (`loading`), and Attach maps and page-locks
    the pool meanwhile, answering once both are done (`loaded`). One Session at a time. Its
    steps run in order on one thread of their own (`StepExecutor`), so the event loop keeps
    serving: each step is launched (queued on the device), then answered once its device
    work is done. A step that arrives before the previous one's device work is done is
    launched first, so the device runs the two back to back (`overlap_steps`)."""

    def __init__(
        self,
        loading_info: worker_pb2.ModelInfo,  # model_name and kv_layout, with loading set
        # (pool, copied): blocking, it page-locks a pool whose blocks are copied on a GPU
        map_pool: Callable[[CpuKVPool, bool], PoolMapping],
        session_handover_s: float = 5.0,
        overlap_steps: bool = True,
    ):
        self.layout = layout_from_proto(loading_info.kv_layout)
        self.port: int | None = None  # set by serve_worker once bound
        self.mapping: PoolMapping | None = None  # set by Attach
        self.residency: DeviceResidency | None = None  # set by Attach, once loaded
        self.num_launched_ahead = 0  # steps launched before the previous one was answered
        self._loading_info = loading_info
        self._model: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._map_pool = map_pool
        self._handover_s = session_handover_s
        self.overlap_steps = overlap_steps  # read per step: a benchmark may flip it
        self._session_lock = asyncio.Lock()
        self._attach_lock = asyncio.Lock()  # one Attach at a time; a Session waits for it
        self._stats = StepStats()  # since the last stats line
        self._window = stats_line.Window()

    @property
    def info(self) -> worker_pb2.ModelInfo:
        return self._model.result().info if self.is_loaded else self._loading_info

    @property
    def executor(self) -> StepExecutor:
        return self._model.result().executor  # raises while the model loads

    @property
    def is_loaded(self) -> bool:
        return self._model.done() and self._model.exception() is None

    def loaded(self, model: LoadedModel) -> None:
        self._model.set_result(model)

    def load_failed(self, error: BaseException) -> None:
        """An Attach waiting for the model is answered UNAVAILABLE with `error`."""
        if not self._model.done():
            self._model.set_exception(ModelLoadError(f"the model failed to load: {error!r}"))
            self._model.exception()  # retrieved: no Attach may be waiting

    async def Describe(self, request, context) -> worker_pb2.ModelInfo:
        return self.info

    async def Attach(self, request, context) -> worker_pb2.AttachResponse:
        try:
            layout = layout_from_proto(request.kv_layout)
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Attach: kv_layout: {e}")
        if layout != self.layout:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Attach: the pool's kv_layout {layout} differs from the model's {self.layout}",
            )
        # Shielded: a batcher that gives up (its deadline) does not stop a pin half-way; its
        # retry finds the pool attached (the same pool is kept) or waits for this one.
        attaching = asyncio.ensure_future(
            self._attach(request.pool_name, request.num_pool_blocks, layout, request.mirror_only)
        )
        try:
            await asyncio.shield(attaching)
        except asyncio.CancelledError:
            attaching.add_done_callback(_log_failure)  # nobody else hears how it ends
            raise
        except SessionRunningError:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "a Session is running: end it before Attach"
            )
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Attach: no shared-memory pool {request.pool_name!r}"
            )
        except ModelLoadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Attach: {e}")
        except ConfigError as e:  # size mismatch, num_pool_blocks < 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Attach: {e}")
        return worker_pb2.AttachResponse()

    async def _attach(
        self, pool_name: str, num_blocks: int, layout: KVLayout, mirror_only: bool
    ) -> None:
        async with self._attach_lock:
            if self._session_lock.locked():
                raise SessionRunningError
            if self.mapping is None or not self.mapping.holds(pool_name, num_blocks):
                pool = CpuKVPool.attach(pool_name, layout, num_blocks)
                self.close()  # a batcher restart: the previous pool is gone from its side
                try:
                    copied = not mirror_only
                    self.mapping = await asyncio.to_thread(self._map_pool, pool, copied)
                except BaseException:
                    pool.close()
                    raise
            model = await self._model  # the pin above ran while the model loaded
            if self.residency is not None:  # the same pool again: its requests start anew
                self.residency.close()
            self.residency = model.new_residency(self.mapping)
        mirror = ", mirror only: not page-locked" if mirror_only else ""
        logger.info("attached pool %r (%d blocks%s)", pool_name, num_blocks, mirror)

    async def Session(self, request_iterator, context) -> None:
        try:
            await asyncio.wait_for(self._session_lock.acquire(), self._handover_s)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another Session is running on this worker"
            )
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="step")
        loop = asyncio.get_running_loop()
        reading: asyncio.Future | None = None
        session: _Session | None = None
        residency: DeviceResidency | None = None
        try:
            async with self._attach_lock:  # an Attach under way ends first
                residency = self.residency
            if residency is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "no pool attached: call Attach first"
                )
            executor = self.executor  # loaded: Attach waited for it
            logger.info("session started")
            session = _Session(executor, residency, self._answered, context, thread, loop)
            launched: _InFlight | None = None  # queued on the device, not yet answered
            reading = asyncio.ensure_future(context.read())
            while True:
                if launched is not None:
                    # answer it once its device work ends, unless the next step comes first
                    if self.overlap_steps and not reading.done():
                        await asyncio.wait({reading, launched.ready()}, return_when=FIRST)
                    if not (self.overlap_steps and reading.done()):
                        await session.answer(launched)
                        launched = None
                        continue
                    request = await reading
                else:  # nothing queued on the device: it waits for the batcher's next plan
                    idle_from = time.perf_counter()
                    request = await reading
                    self._stats.idle_s += time.perf_counter() - idle_from
                if request is grpc.aio.EOF:
                    break
                reading = asyncio.ensure_future(context.read())
                nxt = await session.launch(request, answer_first=launched)
                if launched is not None:
                    self.num_launched_ahead += 1
                    self._stats.launched_ahead += 1
                    await session.answer(launched)
                launched = nxt
            if launched is not None:
                await session.answer(launched)
        finally:
            if reading is not None:
                reading.cancel()
            if residency is None:  # refused before it began
                self._session_lock.release()
            else:
                self._log_stats(force=True)  # the session's last, partial window
                # A thread cannot be interrupted: the device is freed once its queued steps
                # are done, on the same thread, after them.
                ended = loop.run_in_executor(thread, executor.end_session, residency)
                ended.add_done_callback(self._end_session)
                if session is not None:
                    thread.submit(session.profile.dump)  # after the session's last call there
            thread.shutdown(wait=False)

    def close(self) -> None:
        """Release the device, then unlock and unmap the pool (at re-Attach and at
        shutdown)."""
        if self.residency is not None:
            self.residency.close()
            self.residency = None
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None

    def _end_session(self, ended: asyncio.Future) -> None:
        if ended.exception() is not None:
            logger.error("ending the session failed", exc_info=ended.exception())
        self._session_lock.release()
        logger.info("session ended")

    def _answered(self, response: worker_pb2.StepResponse, step_s: float) -> None:
        """A step was answered `step_s` after its plan arrived: count it in the stats line."""
        self._stats.add(response, step_s)
        self._log_stats()

    def _log_stats(self, force: bool = False) -> None:
        """The periodic stats line: throughput, and where a step's time goes. Idle: the share
        of the window with no step queued on the device, waiting for the batcher's plan."""
        if self.residency is None:  # (answered steps imply one)
            return
        w, capture_s = self._stats, self.executor.runner.capture_s
        if not self._window.is_due(w.steps, force):
            return
        elapsed = self._window.elapsed_s
        share = self.residency.direct_share
        each = functools.partial(stats_line.ms_each, num_steps=w.steps)
        logger.info(
            "%.1f tokens/s, %d resident requests, device KV %.1f%% used; %d steps %.1f ms "
            "apart (%d launched before the previous was answered): %.1f ms from plan to "
            "answer (%.1f ms queueing it on the host), decode device %.1f ms, prefill device "
            "%.1f ms; idle %.0f%%; %.1f s capturing graphs%s",
            w.tokens / elapsed,
            self.residency.num_resident,
            100 * self.residency.allocator.usage,
            w.steps,
            self._window.ms_per(w.steps),
            w.launched_ahead,
            each(w.step_s),
            each(w.launch_s),
            each(w.compute_s),
            each(w.prefill_s + w.second_compute_s),  # its prefill batches and decode passes
            100 * w.idle_s / elapsed,
            capture_s - w.capture_s_before,
            "" if share is None else f"; loads {share:.0%} over the decode device's own link",
        )
        self._stats = StepStats(capture_s_before=capture_s)
        self._window.reopen()


FIRST = asyncio.FIRST_COMPLETED


class SessionRunningError(Exception):
    """Attach was asked for while a Session runs."""


def _log_failure(attaching: asyncio.Future) -> None:
    """An Attach whose caller gave up still ends: log how, if it failed."""
    if not attaching.cancelled() and attaching.exception() is not None:
        logger.warning("an Attach failed: %r", attaching.exception())


@dataclass
class _InFlight:
    """A launched step, as the session loop sees it."""

    launched: Launched
    began: float  # when its plan arrived (perf_counter)
    _ready: asyncio.Future | None = None

    def ready(self) -> asyncio.Future:
        """Done once the step's device work is (waited for on a thread of its own)."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(asyncio.to_thread(self.launched.wait))
        return self._ready


class _Session:
    """One Session's steps, launched and answered on its step thread, in order. A step that
    cannot be run ends the session, marked as that step's rejection."""

    def __init__(
        self,
        executor: StepExecutor,
        residency: DeviceResidency,  # fixed for the session: Attach is refused during one
        answered: Callable[[worker_pb2.StepResponse, float], None],
        context,
        thread,
        loop,
    ) -> None:
        self.executor, self.residency, self.answered = executor, residency, answered
        self.context, self.thread, self.loop = context, thread, loop
        self.profile = StepProfile()
        self._launch = self.profile.wrap(executor.launch)
        self._finish = self.profile.wrap(executor.finish)

    async def launch(
        self, request: worker_pb2.StepRequest, answer_first: _InFlight | None
    ) -> _InFlight:
        began = time.perf_counter()
        job = self.loop.run_in_executor(self.thread, self._launch, request, self.residency)
        try:
            # shielded: a cancelled stream must not forget a step still running
            return _InFlight(await asyncio.shield(job), began)
        except Exception as e:
            if answer_first is not None:  # launched before this one, its answer stands
                await self.answer(answer_first)
            await self._abort(request.step, e)

    async def answer(self, step: _InFlight) -> None:
        job = self.loop.run_in_executor(self.thread, self._finish, step.launched)
        try:
            response = await asyncio.shield(job)
        except Exception as e:
            await self._abort(step.launched.request.step, e)
        await self.context.write(response)
        self.answered(response, time.perf_counter() - step.began)

    async def _abort(self, step: int, error: Exception) -> None:
        rejected = ((REJECTED_STEP_KEY, str(step)),)
        if isinstance(error, AlignedServeError):
            await self.context.abort(grpc_status(error), f"step {step}: {error}", rejected)
        # a bug or a device error: end the session, not the process
        logger.error("step %d failed", step, exc_info=error)
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"step {step}: {type(error).__name__}: {error}", rejected
        )


@dataclass
class StepStats:
    """Sums over the steps since the last stats line."""

    steps: int = 0
    launched_ahead: int = 0  # of them, launched before the previous one was answered
    tokens: int = 0
    step_s: float = 0.0  # from receiving the plan to answering it
    launch_s: float = 0.0  # of which the host spent queueing its device work
    idle_s: float = 0.0  # nothing queued on the device: waiting for the next plan
    compute_s: float = 0.0  # the decode device's passes
    second_compute_s: float = 0.0  # the prefill device's decode passes
    prefill_s: float = 0.0
    capture_s_before: float = 0.0  # the runner's capture time at the window's start

    def add(self, response: worker_pb2.StepResponse, step_s: float) -> None:
        self.steps += 1
        self.tokens += len(response.tokens)
        self.step_s += step_s
        self.launch_s += response.launch_s
        self.compute_s += response.compute_s
        self.second_compute_s += response.second_compute_s
        self.prefill_s += response.prefill_s
