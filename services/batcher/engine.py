"""The batcher's engine: schedule -> execute on the worker -> update -> fan tokens out.

One asyncio task runs the loop; gRPC handlers submit and abort requests in the same event
loop, between steps.

The engine runs one step ahead of the worker (`max_steps_in_flight`, 2 by default): it sends
step N+1 before step N is answered, so the worker finds its next plan waiting, and the
batcher's own work (answering N, fanning its tokens out, planning N+2) overlaps the GPU's
step N+1. The scheduler applies each step as it is sent, with a PENDING placeholder for
every token it samples (request.py), and the answer resolves them; a decode whose
input is still PENDING asks the worker for the token it sampled last (`last_sampled`). A
stop token found in an answer ends its request there, and whatever was planned after it is
dropped. Only a prefill that would have to send a PENDING token (a request preempted or
recovered meanwhile) waits for the answers first. The worker runs steps in order and
finishes each step's pool writes before the next starts, so pool blocks freed while a
step is in flight may go to a request of a later step.

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from alignedserve.batcher import engine_metrics
from alignedserve.batcher.engine_config import EngineConfig, scheduler_config_for
from alignedserve.batcher.engine_stats import EngineStats
from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.batcher.pool_attachment import PoolAttachment
from alignedserve.batcher.request import PENDING, Request, RequestState
from alignedserve.batcher.scheduler import BatchPlan, make_scheduler
from alignedserve.batcher.scheduler.core import PREFILL_BATCHES_IN_FLIGHT
from alignedserve.batcher.step_message import step_message
from alignedserve.batcher.streams import Sink, Streams
from alignedserve.batcher.worker_link import StepRejected, WorkerLink, WorkerLost
from alignedserve.common import metrics, wire
from alignedserve.common.errors import (
    AlignedServeError,
    ConfigError,
    InvalidRequestError,
    UnavailableError,
)
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.policy import reserves_pool
from alignedserve.common.proto import common_pb2, worker_pb2
from alignedserve.common.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class StepRejectedError(AlignedServeError):
    """The worker could not run a step that held this request (see worker_link)."""


@dataclass
class SentStep:
    """A step sent to the worker and not answered yet."""

    number: int
    plan: BatchPlan
    # request -> index in its output_token_ids of the PENDING token this step samples
    placeholders: dict[str, int]
    # request -> tokens of its KV in the pool once the step is done (its write-backs)
    writing: dict[str, int] = field(default_factory=dict)


class BatcherEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.link = WorkerLink(config.worker_address)
        # the KV layout of the worker's model (its pool's blocks), once it described it; the
        # pool itself belongs to the attachment
        self.layout: KVLayout | None = None
        self._attachment: PoolAttachment | None = None
        self.scheduler = None
        self.info: worker_pb2.ModelInfo | None = None
        self._worker_ready = False
        self.draining = False
        self._streams = Streams()  # live requests' sinks
        self._synced: dict[str, int] = {}  # tokens of KV that reached the pool, per request
        self._copying: set[str] = set()  # loaded by answered steps, copies not known done
        self._in_flight: deque[SentStep] = deque()  # sent, oldest first
        # each live request's sampling parameters as a message, built once (not every step)
        self._params_msg: dict[str, common_pb2.SamplingParams] = {}
        self._release: list[str] = []  # finished on our side; free on the worker next step
        self._released: set[str] = set()  # finished as sent; released, sink still open
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._step = 0
        self._step_since: float | None = None  # since when the worker runs the oldest step
        self._stats = EngineStats(PREFILL_BATCHES_IN_FLIGHT)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Reserve the pool's memory while connecting to the worker (retrying until
        worker_startup_s); once it describes its model, cut the pool into its blocks, attach
        (fcfs reserves nothing: its pool mirrors the device's blocks, pool_attachment.py)."""
        mirror = not reserves_pool(self.config.scheduler.policy)  # fcfs: KV on the device
        self._attachment = PoolAttachment(self.link, self.config.pool_bytes, mirror)
        try:
            await self._connect(first=True)
        except BaseException:
            await self._attachment.close()
            raise
        self._task = asyncio.create_task(self._loop(), name="batcher-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.scheduler is not None:
            self._stats.log_if_due(self.load, force=True)  # the last, partial window
        await self.link.close()
        if self._attachment is not None:
            await self._attachment.close()

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
        return len(self._streams)

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
        if request_id in self._streams:
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
        self._streams.open(request_id, sink)
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> bool:
        if request_id not in self._streams or self.scheduler is None:
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
            num_context_tokens=self.scheduler.store.num_live_tokens if self.scheduler else 0,
            num_waiting=counts.get(RequestState.WAITING_PREFILL, 0),
            num_running=counts.get(RequestState.RUNNING, 0)
            + counts.get(RequestState.PREFETCHING, 0),
            num_pooled=counts.get(RequestState.POOLED, 0),
            kv_pool_usage=self.scheduler.allocator.usage if self.scheduler else 0.0,
        )

    # ---- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._observe_prefill_queue()
            with self._stats.timer("plan_s"):
                plan = self._next_plan()
                msg = self._send(plan) if plan is not None else None
            if msg is not None:
                try:
                    with self._stats.timer("send_s"):
                        await self.link.send(msg)
                except WorkerLost as e:
                    log.warning("worker lost (%s): recovering %d requests", e, self.num_live)
                    await self._recover()
                continue  # fill the pipeline before waiting for an answer
            if self._in_flight:
                await self._answer()
            elif not self._has_work():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_probe_s)
                if not self._wake.is_set():  # idle: is the worker still there?
                    await self._probe()
            else:  # e.g. the pool is full of finished-but-unsent work: wait for a change
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.05)

    def _next_plan(self) -> BatchPlan | None:
        """The next step to send now, or None: the pipeline is full, a prefill it would
        plan needs a token not answered yet, or there is nothing to do."""
        if len(self._in_flight) >= self.config.max_steps_in_flight or not self._has_work():
            return None
        store = self.scheduler.store
        if self._in_flight and any(
            store.get(rid).state is RequestState.WAITING_PREFILL
            for rid in self._unanswered()
            if rid in store
        ):
            return None  # its prefill would send PENDING tokens: wait for the answers
        plan = self.scheduler.schedule(time.monotonic())
        if plan.is_empty and not self._release:
            # a step just to hear from the prefill device, when none is in flight anyway
            return plan if self.scheduler.prefilling and not self._in_flight else None
        return plan

    def _send(self, plan: BatchPlan) -> worker_pb2.StepRequest:
        """Make the plan's step and apply it to the scheduler at once, with PENDING for every
        token it samples (see the module's docstring). Returns the message to send."""
        self._report(plan)
        msg, writing = self._to_proto(plan)
        store = self.scheduler.store
        on_decode_device = (
            plan.mixed_prefill
            if self.scheduler.config.num_prefill_device_blocks
            else plan.all_prefill
        )
        ids = [*plan.decode, *(rid for rid, _ in on_decode_device)]
        before = {rid: len(store.get(rid).output_token_ids) for rid in ids}
        finished = self.scheduler.update(plan, dict.fromkeys(ids, PENDING), time.monotonic())
        # One it finished by length keeps its sink until its tokens are answered, but its KV
        # is free for the next plan now: the worker must free it at the next step too.
        self._release += (r.request_id for r in finished)
        self._released.update(r.request_id for r in finished)
        placeholders = {
            rid: n for rid, n in before.items() if len(store.get(rid).output_token_ids) > n
        }
        self._release += self.scheduler.take_preempted()  # recomputed later: free the device
        if not self._in_flight:
            self._step_since = time.monotonic()
        self._in_flight.append(SentStep(msg.step, plan, placeholders, writing))
        return msg

    async def _answer(self) -> None:
        """Read the oldest step's answer and apply it; on a lost worker or a rejected
        step, recover."""
        try:
            with self._stats.timer("wait_s"):
                response = await self.link.receive([s.number for s in self._in_flight])
        except StepRejected as e:
            self._fail_plan(e)
            await self._recover()
            return
        except WorkerLost as e:
            log.warning("worker lost (%s): recovering %d requests", e, self.num_live)
            await self._recover()
            return
        sent = self._in_flight.popleft()
        with self._stats.timer("apply_s"):
            was_turn = self._after_step(sent, response)
        self._step_since = time.monotonic() if self._in_flight else None
        turn_s = response.compute_s if was_turn else None
        self._stats.answered(len(response.tokens), turn_s)  # (the loop observes the queue next)
        self._stats.log_if_due(self.load)

    def _observe_prefill_queue(self) -> None:
        has_device = self.scheduler.config.num_prefill_device_blocks > 0
        self._stats.observe(
            self.scheduler.num_unplanned,
            self.scheduler.num_prefill_batches if has_device else None,
        )

    def _forget_worker(self) -> None:
        """The worker's device is gone, with the steps in flight: requests it held go back to
        prefill from what reached the pool, those a lost step was evicting included (their
        write-back may not have happened); the tokens of the lost steps were never made."""
        self.worker_ready = False
        evicting = [rid for sent in self._in_flight for rid in sent.plan.evict]
        unanswered = self._unanswered()
        self._in_flight.clear()
        self._step_since = None
        for rid in self.scheduler.recover_from_worker_loss(self._synced, evicting, unanswered):
            self._synced.pop(rid, None)  # reopened: its KV blocks are gone
        self._release = []  # the new session starts with nothing resident
        self._released.clear()
        self._copying.clear()
        self.scheduler.take_preempted()

    def _unanswered(self) -> set[str]:
        """Requests with a PENDING token (one a step in flight samples)."""
        return {rid for sent in self._in_flight for rid in sent.placeholders}

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

    def _fail_plan(self, rejected: StepRejected) -> None:
        """The worker rejected a step: the requests it held fail (the same plan would fail
        again), once, with the worker's reason; the session is gone, so the rest recover."""
        plan = next(s.plan for s in self._in_flight if s.number == rejected.step)
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
        # the store holds live requests (and ended ones waiting for a step's answer): _finish
        # removes each one; a prefill batch in flight must still be answered (an aborted
        # request's blocks wait for it)
        return (
            bool(self._release or self.scheduler.prefilling or self._in_flight)
            or len(self.scheduler.store) > 0
        )

    def _to_proto(self, plan: BatchPlan) -> tuple[worker_pb2.StepRequest, dict[str, int]]:
        """The plan as the worker's message (see step_message), releases included."""
        store = self.scheduler.store
        for rid, _ in plan.all_prefill:
            r = store.get(rid)
            if r.num_prefilled == 0 and not r.output_token_ids:  # its first prefill chunk
                queued = time.monotonic() - r.arrival_s
                metrics.REQUEST_QUEUE_TIME_SECONDS.labels(self.info.model_name).observe(queued)
        self._step += 1
        msg, writing = step_message(self._step, plan, self.scheduler, self._params_of)
        msg.release.extend(self._release)
        self._release = []
        return msg, writing

    def _report(self, plan: BatchPlan) -> None:
        engine_metrics.report_plan(
            self.info.model_name, self.scheduler, self.load(), self.layout, plan
        )

    def _after_step(self, sent: SentStep, response: worker_pb2.StepResponse) -> bool:
        """Apply a step's answer: resolve its PENDING tokens, land the prefill device's batch
        if done, give each request its new tokens, finish the requests that ended. Returns
        whether the step was a prefill turn of the decode GPU."""
        store, plan = self.scheduler.store, sent.plan
        # the step's write-backs reached the pool (of requests not aborted meanwhile)
        self._synced.update((r, n) for r, n in sent.writing.items() if r in store)
        was_turn = self.scheduler.observe_step(plan, response.compute_s)  # decode device's time
        if response.load_s:  # a load batch landed since the last answer
            metrics.PREFETCH_SECONDS.labels(self.info.model_name).observe(response.load_s)
        # this step's loads, and earlier ones still copying, that the answer says have landed
        self._copying.update(plan.load)
        copying = set(response.copying)
        copied = [rid for rid in self._copying if rid not in copying]
        self._copying.difference_update(copied)
        if copied:
            self.scheduler.policy.on_copied(copied)
        if plan.prefetch:
            # what started streaming in may land at the next step: the worker starts its
            # copies there, and they run beside the steps (`on_copied` once they are in)
            self.scheduler.policy.on_prefetch_done()
        tokens = {t.request_id: t.token_id for t in response.tokens}
        logprobs = {t.request_id: t.logprob for t in response.tokens}
        now = time.monotonic()
        touched: list[Request] = []
        for rid, index in sent.placeholders.items():
            if rid not in store:
                continue  # aborted meanwhile
            r = store.get(rid)
            if index < len(r.output_token_ids):  # else cut: a stop token came before it
                self.scheduler.resolve(r, index, tokens[rid], now)
                touched.append(r)
        if response.prefilled:  # the prefill device's batch (sent at this step or before)
            landed = [store.get(rid) for rid in response.prefilled if rid in store]
            self.scheduler.prefill_done(response.prefilled, tokens, now)
            # their KV up to num_prefilled is in the pool now
            self._synced.update((r.request_id, r.num_prefilled) for r in landed)
            touched += landed
        self._release += self.scheduler.take_preempted()  # recomputed later: free the device
        for r in touched:
            self._streams.emit(r, logprobs.get(r.request_id, 0.0))
        for r in touched:
            if r.state.is_done and r.num_answered == len(r.output_token_ids):
                self._finish(r)
        return was_turn

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
        self._streams.close(r, error)
        if r.request_id in self._released:
            self._released.remove(r.request_id)
        else:
            self._release.append(r.request_id)
        self._synced.pop(r.request_id, None)
        self._params_msg.pop(r.request_id, None)
        if r.request_id in self.scheduler.store:
            self.scheduler.store.pop(r.request_id)
        self._wake.set()

    # ---- the worker ----------------------------------------------------------------------
    async def _connect(self, first: bool = False) -> None:
        wait_s = self.config.worker_startup_s if first else self.config.worker_recovery_s
        info = await self._attachment.attach(wait_s)
        if self.scheduler is None:
            self._setup(info, self._attachment.pool)
        self.worker_ready = True
        log.info("worker %s attached (%s)", self.config.worker_address, info.model_name)
        engine_metrics.report_worker_start(info)

    def _setup(self, info: worker_pb2.ModelInfo, pool: CpuKVPool) -> None:
        self.info, self.layout = info, pool.layout
        config = scheduler_config_for(self.config, info, pool.num_blocks)
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

    async def _recover(self) -> None:
        self._forget_worker()
        while True:  # keep trying; requests that outwait one recovery window fail
            try:
                await self._connect()
                return
            except (UnavailableError, ConfigError) as e:
                log.error("%s: failing %d requests", e, self.num_live)
                # ConfigError: the restarted worker refused the pool at once. The clients'
                # requests were not invalid, and it may be replaced: wait a window, try again.
                refused = isinstance(e, ConfigError)
                self._fail(
                    list(self._streams), UnavailableError(f"worker lost: {e}") if refused else e
                )
                if refused:
                    await asyncio.sleep(self.config.worker_recovery_s)
