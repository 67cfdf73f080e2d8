"""The batcher's engine: schedule -> execute on the worker -> update -> fan tokens out.

One asyncio task runs the loop; gRPC handlers submit and abort requests in the same event
loop, between steps. One step is in flight at a time, so the pool blocks a step writes are
never handed to another request before the worker has finished with them.

If the worker's session breaks, every request it held returns to the prefill queue from
the KV that reached the pool (see Scheduler.recover_from_worker_loss), and the engine keeps
reconnecting until `worker_recovery_s`; clients see a delay, not an error. A step the worker
rejects (worker_link.StepRejected: the plan itself is wrong, so sending it again would fail
again) fails the requests it held, with an error to their clients; the rest recover so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from alignedserve.batcher import engine_metrics
from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler import BatchPlan, SchedulerConfig, make_scheduler
from alignedserve.batcher.worker_link import StepRejected, WorkerLink, WorkerLost
from alignedserve.common import metrics, wire
from alignedserve.common.errors import AlignedServeError, InvalidRequestError, UnavailableError
from alignedserve.common.proto import common_pb2, worker_pb2
from alignedserve.common.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request, as sent to its Generate stream."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int
    completion_tokens: int


# Where a request's deltas go, called in the engine's loop: each Delta, then its last one
# (finish_reason set) or the exception that failed it. Must not block.
Sink = Callable[["Delta | Exception"], None]


class StepRejectedError(AlignedServeError):
    """The worker could not run a step that held this request (see worker_link)."""


@dataclass(frozen=True)
class EngineConfig:
    worker_address: str
    pool_bytes: int
    # block_tokens, pool and device sizes, and the decode cost model are filled in from the
    # worker (scheduler_config_for); the two cost fields below override the worker's
    scheduler: SchedulerConfig
    worker_recovery_s: float = 60.0
    worker_startup_s: float = 600.0  # the first connection: the worker may still load its model
    idle_probe_s: float = 1.0  # with nothing to do, send the worker an empty step this often
    stall_s: float = 60.0  # a step running longer than this marks the worker not ready (wedged)
    kernel_cost: str | None = None  # padded | balanced; None: what the worker's kernel is
    weight_kv_tokens: int | None = None  # None: the worker's weight bytes / KV bytes per token


def scheduler_config_for(
    config: EngineConfig, info: worker_pb2.ModelInfo, num_pool_blocks: int
) -> SchedulerConfig:
    """The scheduler's settings for this worker: `config.scheduler` with the block size, the
    pool and device sizes and the decode cost model taken from the worker's ModelInfo (a cost
    field the worker does not report keeps the configured value; EngineConfig's overrides
    win over both)."""
    base = config.scheduler
    layout = wire.layout_from_proto(info.kv_layout)
    # fcfs keeps every running request's KV on the device: its blocks budget is the
    # device's, whatever the pool's size (the pool only mirrors them)
    if base.policy == "fcfs":
        num_pool_blocks = min(num_pool_blocks, info.num_device_blocks)
    kernel_cost = config.kernel_cost or info.decode_kernel_cost or base.kernel_cost
    if config.weight_kv_tokens is not None:
        weight_kv_tokens = config.weight_kv_tokens
    elif info.weight_bytes:
        weight_kv_tokens = max(1, info.weight_bytes // layout.token_bytes)
    else:
        weight_kv_tokens = base.weight_kv_tokens
    return replace(
        base,
        block_tokens=layout.block_tokens,
        num_pool_blocks=num_pool_blocks,
        gpu_kv_tokens=info.num_device_blocks * layout.block_tokens,
        kernel_cost=kernel_cost,
        weight_kv_tokens=weight_kv_tokens,
        # fcfs is the baseline as vLLM runs it: every chunk in the decode device's step
        num_prefill_device_blocks=info.num_prefill_blocks if base.policy == "aligned" else 0,
    )


class BatcherEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.link = WorkerLink(config.worker_address)
        self.pool: CpuKVPool | None = None
        self.scheduler = None
        self.info: worker_pb2.ModelInfo | None = None
        self._worker_ready = False
        self.draining = False
        self._sinks: dict[str, Sink] = {}  # live requests
        self._synced: dict[str, int] = {}  # tokens of KV that reached the pool, per request
        self._writing: dict[str, int] = {}  # what _synced becomes once the step in flight ends
        # each live request's sampling parameters as a message, built once (not every step)
        self._params_msg: dict[str, common_pb2.SamplingParams] = {}
        self._release: list[str] = []  # finished on our side; free on the worker next step
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._step = 0
        self._step_since: float | None = None  # monotonic start of the step in flight

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the worker (retrying until worker_recovery_s), make the pool, attach."""
        await self._connect(first=True)
        self._task = asyncio.create_task(self._loop(), name="batcher-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.link.close()
        if self.pool is not None:
            self.pool.close()
            self.pool.unlink()

    @property
    def worker_ready(self) -> bool:
        return self._worker_ready

    @worker_ready.setter
    def worker_ready(self, is_ready: bool) -> None:
        # the one place readiness changes, so the gauge cannot disagree with GetLoad
        self._worker_ready = is_ready
        if self.info is not None:
            metrics.WORKER_READY.labels(self.info.model_name).set(int(is_ready))

    @property
    def is_serving(self) -> bool:
        """Can serve now: a worker attached, answering steps in time, and not draining."""
        stalled = (
            self._step_since is not None
            and time.monotonic() - self._step_since > self.config.stall_s
        )
        alive = self._task is not None and not self._task.done()
        return alive and self.worker_ready and not self.draining and not stalled

    @property
    def num_live(self) -> int:
        return len(self._sinks)

    # ---- requests ------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        sink: Sink | None = None,
    ) -> asyncio.Queue | None:
        """Admit a request (or raise AlignedServeError). Its deltas go to `sink`; without one,
        to the asyncio.Queue returned."""
        if self.draining:
            raise UnavailableError("batcher is draining: send new requests elsewhere")
        if self.scheduler is None:
            raise UnavailableError("batcher is starting: no worker attached yet")
        if request_id in self._sinks:
            raise InvalidRequestError(f"request_id {request_id!r} is in use", "request_id")
        max_len = self.info.max_model_len
        if not 1 <= len(prompt) < max_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; this model takes 1..{max_len - 1}", "prompt"
            )
        if max(prompt) >= self.info.vocab_size or min(prompt) < 0:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.info.vocab_size})", "prompt"
            )
        self.scheduler.add_request(request_id, tuple(prompt), params, time.monotonic())
        queue: asyncio.Queue | None = None
        if sink is None:
            queue = asyncio.Queue()
            sink = queue.put_nowait
        self._sinks[request_id] = sink
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> bool:
        if request_id not in self._sinks or self.scheduler is None:
            return False
        if request_id not in self.scheduler.store:
            return False
        request = self.scheduler.store.get(request_id)
        if request.state.is_done:
            return False
        self.scheduler.abort(request_id, time.monotonic())
        self._finish(request)
        return True

    def load(self) -> dict[str, float]:
        counts = self.scheduler.store.count_by_state() if self.scheduler else {}
        return dict(
            num_waiting=counts.get(RequestState.WAITING_PREFILL, 0),
            num_running=counts.get(RequestState.RUNNING, 0)
            + counts.get(RequestState.PREFETCHING, 0),
            num_pooled=counts.get(RequestState.POOLED, 0),
            kv_pool_usage=self.scheduler.allocator.usage if self.scheduler else 0.0,
        )

    # ---- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._has_work():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_probe_s)
                if not self._wake.is_set():  # idle: is the worker still there?
                    await self._probe()
                continue
            plan = self.scheduler.schedule(time.monotonic())
            if plan.is_empty and not self._release and not self.scheduler.prefilling:
                # e.g. the pool is full of finished-but-unsent work: wait for a change
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                continue
            before = self._snapshot(plan)
            self._report(plan)
            request = self._to_proto(plan)
            self._step_since = time.monotonic()
            try:
                response = await self.link.step(request)
            except StepRejected as e:
                self._fail_plan(plan, e)
                await self._recover(plan)
                continue
            except WorkerLost as e:
                log.warning("worker lost (%s): recovering %d requests", e, self.num_live)
                await self._recover(plan)
                continue
            finally:
                self._step_since = None
            self._after_step(plan, response, before)

    def _forget_worker(self, lost: BatchPlan | None = None) -> None:
        """The worker's device is gone, with the step in flight (`lost`, if any): requests
        it held go back to prefill from what reached the pool, those the lost step was
        evicting included (their write-back may not have happened)."""
        self.worker_ready = False
        self._writing = {}
        self.scheduler.recover_from_worker_loss(self._synced, lost.evict if lost else ())
        self._release = []  # the new session starts with nothing resident
        self.scheduler.take_preempted()

    async def _probe(self) -> None:
        """An empty step through the session: a dead or wedged idle worker is noticed (and
        readiness drops) before the next request finds it."""
        self._step += 1
        try:
            await asyncio.wait_for(
                self.link.step(worker_pb2.StepRequest(step=self._step)), self.config.stall_s
            )
        except (WorkerLost, TimeoutError) as e:
            log.warning("worker lost while idle (%s)", e or "no answer")
            await self._recover()

    def _fail_plan(self, plan: BatchPlan, rejected: StepRejected) -> None:
        """The worker rejected this plan: the requests it held fail (the same plan would fail
        again), once, with the worker's reason; the session is gone, so the rest recover."""
        ids = dict.fromkeys(
            (*plan.load, *(rid for rid, _ in plan.all_prefill), *plan.decode, *plan.evict)
        )
        failed = [rid for rid in ids if rid in self.scheduler.store]
        error = StepRejectedError(
            f"the worker could not run a step with this request "
            f"({rejected.code.name}: {rejected.details})"
        )
        log.error(
            "worker rejected step %d (%s): failing its %d requests, recovering the other %d",
            rejected.step,
            rejected,
            len(failed),
            self.num_live - len(failed),
        )
        self._fail(failed, error)

    def _has_work(self) -> bool:
        # the store holds live requests only: _finish removes each one as it ends; a prefill
        # batch in flight must still be answered (an aborted request's blocks wait for it)
        return bool(self._release or self.scheduler.prefilling) or len(self.scheduler.store) > 0

    def _snapshot(self, plan: BatchPlan) -> dict[str, int]:
        """Output length of every request the step may give a token to."""
        ids = {*plan.decode, *(rid for rid, _ in plan.all_prefill)}
        return {rid: len(self.scheduler.store.get(rid).output_token_ids) for rid in ids}

    def _to_proto(self, plan: BatchPlan) -> worker_pb2.StepRequest:
        store = self.scheduler.store
        keep_resident = self.scheduler.config.policy == "fcfs"
        self._writing = {}
        self._step += 1
        msg = worker_pb2.StepRequest(step=self._step, release=self._release)
        self._release = []
        for rid in plan.load:
            r = store.get(rid)
            msg.load.add(request_id=rid, pool_blocks=r.blocks, num_kv_tokens=r.num_kv_tokens)
        offload = self.scheduler.config.num_prefill_device_blocks > 0
        chunks = [(rid, n, offload) for rid, n in plan.prefill]
        chunks += [(rid, n, False) for rid, n in plan.mixed_prefill]
        for rid, n, on_prefill_device in chunks:
            r = store.get(rid)
            if r.num_prefilled == 0 and not r.output_token_ids:  # its first prefill chunk
                queued = time.monotonic() - r.arrival_s
                metrics.REQUEST_QUEUE_TIME_SECONDS.labels(self.info.model_name).observe(queued)
            tokens = [*r.prompt_token_ids, *r.output_token_ids]
            end = r.num_prefilled + n
            msg.prefill.add(
                request_id=rid,
                token_ids=tokens[r.num_prefilled : end],
                num_cached_tokens=r.num_prefilled,
                pool_blocks=r.blocks,
                params=self._params_of(r),
                sample=end == r.num_tokens,
                keep_resident=keep_resident,
                on_prefill_device=on_prefill_device,
            )
            if not keep_resident and not on_prefill_device:  # (that one: when it is done)
                self._writing[rid] = end
        for rid in plan.decode:
            r = store.get(rid)
            msg.decode.add(
                request_id=rid,
                token_id=r.output_token_ids[-1],
                num_kv_tokens=r.num_kv_tokens,
                params=self._params_of(r),
            )
        for rid in plan.evict:
            r = store.get(rid)
            msg.evict.add(request_id=rid, pool_blocks=r.blocks)
            self._writing[rid] = r.num_kv_tokens
        # nothing for the decode device: answer when the prefill device's batch is done
        msg.wait_prefill = not (msg.load or msg.decode or msg.evict or plan.mixed_prefill)
        return msg

    def _report(self, plan: BatchPlan) -> None:
        engine_metrics.report_plan(
            self.info.model_name, self.scheduler, self.load(), self.pool.layout, plan
        )

    def _after_step(self, plan: BatchPlan, response, before: dict[str, int]) -> None:
        # the step's write-backs reached the pool (of requests not aborted meanwhile)
        self._synced.update((r, n) for r, n in self._writing.items() if r in self.scheduler.store)
        self._writing = {}
        if plan.load:  # this worker loads at the step that lands them, before its forward
            metrics.PREFETCH_SECONDS.labels(self.info.model_name).observe(response.load_s)
        if plan.prefetch and hasattr(self.scheduler.policy, "on_prefetch_done"):
            # this worker loads synchronously, at the step that lands them
            self.scheduler.policy.on_prefetch_done()
        tokens = {t.request_id: t.token_id for t in response.tokens}
        logprobs = {t.request_id: t.logprob for t in response.tokens}
        now = time.monotonic()
        finished = self.scheduler.update(plan, tokens, now)
        if response.prefilled:  # the prefill device's batch (sent at this step or before)
            store = self.scheduler.store
            landed = [rid for rid in response.prefilled if rid in store]
            before.update((rid, len(store.get(rid).output_token_ids)) for rid in landed)
            finished += self.scheduler.prefill_done(response.prefilled, tokens, now)
            # their KV up to num_prefilled is in the pool now
            self._synced.update((rid, store.get(rid).num_prefilled) for rid in landed)
        self._release += self.scheduler.take_preempted()  # recomputed later: free the device
        store, sinks = self.scheduler.store, self._sinks
        for rid, n in before.items():
            if rid not in store:
                continue  # aborted while the step ran
            r = store.get(rid)
            new = r.output_token_ids[n:]
            sink = sinks.get(rid)
            if new and sink is not None:
                want = r.params.logprobs
                sink(
                    Delta(
                        token_ids=tuple(new),
                        logprobs=(logprobs.get(rid, 0.0),) * len(new) if want else (),
                        finish_reason=None,
                        prompt_tokens=len(r.prompt_token_ids),
                        completion_tokens=len(r.output_token_ids),
                    )
                )
        for r in finished:
            self._finish(r)

    def _fail(self, request_ids: Sequence[str], error: Exception) -> None:
        """End these live requests with `error` (their clients get it), freeing their KV."""
        for rid in request_ids:
            request = self.scheduler.store.get(rid)
            self.scheduler.abort(rid, time.monotonic())
            self._finish(request, error=error)

    def _params_of(self, r: Request) -> common_pb2.SamplingParams:
        msg = self._params_msg.get(r.request_id)
        if msg is None:
            msg = self._params_msg[r.request_id] = wire.sampling_to_proto(r.params)
        return msg

    def _finish(self, r: Request, error: Exception | None = None) -> None:
        """Send the final message (or the error that ends the stream), forget the request,
        free it on the worker next step."""
        sink = self._sinks.pop(r.request_id, None)
        if sink is not None:
            sink(
                error
                or Delta((), (), r.finish_reason, len(r.prompt_token_ids), len(r.output_token_ids))
            )
        self._release.append(r.request_id)
        self._synced.pop(r.request_id, None)
        self._params_msg.pop(r.request_id, None)
        if r.request_id in self.scheduler.store:
            self.scheduler.store.pop(r.request_id)
        self._wake.set()

    # ---- the worker ----------------------------------------------------------------------
    async def _connect(self, first: bool = False) -> None:
        wait_s = self.config.worker_startup_s if first else self.config.worker_recovery_s
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            try:
                info = await self.link.connect()
                if first:
                    self._setup(info)
                await self.link.attach(self.pool)
                self.worker_ready = True
                log.info("worker %s attached (%s)", self.config.worker_address, info.model_name)
                return
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"no worker at {self.config.worker_address} within "
                        f"{wait_s:g} s: {e.code().name}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _setup(self, info: worker_pb2.ModelInfo) -> None:
        self.info = info
        layout = wire.layout_from_proto(info.kv_layout)
        self.pool = CpuKVPool.create_bytes(layout, self.config.pool_bytes)
        config = scheduler_config_for(self.config, info, self.pool.num_blocks)
        log.info(
            "scheduler: %s policy, %d device blocks, decode cost %s with weights = %d KV tokens",
            config.policy,
            info.num_device_blocks,
            config.kernel_cost,
            config.weight_kv_tokens,
        )
        self.scheduler = make_scheduler(
            config, eos_token_ids=tuple(info.eos_token_ids), max_model_len=info.max_model_len
        )
        if config.num_prefill_device_blocks:
            log.info(
                "prefill on the worker's %s (%d staging blocks), beside the decode steps",
                info.prefill_device,
                config.num_prefill_device_blocks,
            )
        engine_metrics.create_series(info.model_name)

    async def _recover(self, lost: BatchPlan | None = None) -> None:
        self._forget_worker(lost)
        while True:  # keep trying; requests that outwait one recovery window fail
            try:
                await self._connect()
                return
            except UnavailableError as e:
                log.error("%s: failing %d requests", e, self.num_live)
                self._fail(list(self._sinks), e)
