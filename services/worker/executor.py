"""One step of the batcher's plan on the devices, in two halves: `launch` and `finish`.

`launch` does the step's host work and queues its device work: releases, loads, the prefill
device's chunks, the decode device's forward pass and sampling, write-backs. A pair's prefill
device that decodes too (entries marked on_prefill_device: its own residents, `res.second`)
runs its forward pass in the same step, beside the decode device's. `finish` waits
for the device and builds the answer. The service calls `launch(N+1)` before `finish(N)`
when step N+1 has arrived, so the GPU runs N+1 straight after N while the host answers N.

A decode whose input is the token step N sampled (`DecodeEntry.last_sampled`) takes it from
step N's output on the device (`TokenCarry`) while N is unanswered, and from the host after.
At most one step is launched and not finished when the next is launched.

Not thread-safe: the service runs both halves on one thread, in order.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.proto import worker_pb2
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.common.wire import sampling_from_proto
from alignedserve.worker.prefiller import Prefiller, PrefillJob, PrefillRun
from alignedserve.worker.profiling import Phases
from alignedserve.worker.residency import DeviceResidency
from alignedserve.worker.runner import LaunchedStep, ModelRunner, SampledToken, SeqChunk, TokenCarry


@dataclass
class Launched:
    """A step queued on the device, not yet answered."""

    request: worker_pb2.StepRequest
    run: LaunchedStep | None  # the decode device's pass; None: nothing to compute
    done: tuple[torch.cuda.Event, ...]  # per GPU, after its pass and write-backs (CPU: none)
    wrote_back: bool  # it copies KV into the pool
    # released by a later step: the token sampled here is not kept for them
    dropped: set[str] = field(default_factory=set)
    # the host's seconds to queue it (plan parsing, residency, inputs, kernel launches): when
    # this exceeds the device's time per step, the device waits for the host
    launch_s: float = 0.0
    second_run: LaunchedStep | None = None  # the prefill device's decode pass
    residency: DeviceResidency | None = None  # its devices' residents (loads still copying)

    @property
    def runs(self) -> tuple[LaunchedStep, ...]:
        return tuple(run for run in (self.run, self.second_run) if run is not None)

    def run_on(self, lane: int) -> LaunchedStep | None:
        """The pass on lane 0 (the decode device) or 1 (the prefill device)."""
        return (self.run, self.second_run)[lane]

    def wait(self) -> None:
        """Block until the step's device work is done (thread-safe: only waits)."""
        for event in self.done:
            event.synchronize()


@dataclass(frozen=True)
class LanePass:
    """What one lane (device) queued for a step."""

    run: LaunchedStep | None  # its forward pass and sampling; None: nothing to compute
    done: torch.cuda.Event | None  # after its pass and write-backs (None: no CUDA work)
    wrote_back: bool


# Batches queued on the prefill device at once: the next runs straight after the one before,
# while the batcher learns that one is done (a step or two later) and plans another.
MAX_PREFILL_BATCHES = 2


class StepExecutor:
    def __init__(
        self,
        info: worker_pb2.ModelInfo,
        runner: ModelRunner,
        prefiller: Prefiller | None,
        second_runner: ModelRunner | None = None,  # the prefill device's decode passes
    ):
        self.info = info
        self.runner = runner
        self.prefiller = prefiller
        self.second_runner = second_runner
        self._second_stream = (
            torch.cuda.Stream(second_runner.device)
            if second_runner is not None and second_runner.device.type == "cuda"
            else None
        )
        # One thread drives the prefill device: its batch of chunks runs across decode steps.
        self._prefill_thread = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefill")
            if prefiller is not None
            else None
        )
        # the batches queued on it, oldest first, each with its request ids
        self._prefilling: list[tuple[concurrent.futures.Future, frozenset[str]]] = []
        self._dropped_prefill: set[str] = set()  # released while their batch runs
        # each live request's latest sampled token, this session, once its step is finished
        self._last_sampled: dict[str, int] = {}
        self._unfinished: Launched | None = None  # launched, not yet finished
        self._slow_logged_s = -1.0  # when a slow step's phases were last logged

    # ---------------------------------------------------------------- the two halves

    def launch(self, request: worker_pb2.StepRequest, res: DeviceResidency) -> Launched:
        phases = Phases()
        with self.runner.on_device():
            launched = self._launch(request, res, phases)
        launched.launch_s = time.perf_counter() - phases.start
        self._slow_logged_s = phases.log_if_slow(
            launched.launch_s,
            self._slow_logged_s,
            lambda: (
                f"step {request.step} ({len(request.load)} loads, {len(request.prefill)} "
                f"prefill chunks, {len(request.decode)} decodes)"
            ),
        )
        return launched

    def finish(self, launched: Launched) -> worker_pb2.StepResponse:
        """Wait for the step's device work; its answer (a prefill batch that failed raises its
        error here, failing this step)."""
        with self.runner.on_device():
            sampled = [t for run in launched.runs for t in run.result()]
            launched.wait()  # the write-backs too: the batcher counts them safe in the pool
            if launched.request.wait_prefill and self._prefilling:
                self._wait_prefilling()
            prefilled, sampled_there, prefill_s = self._take_prefilled()
            if self._unfinished is launched:
                self._unfinished = None
            self._last_sampled.update(
                (t.request_id, t.token_id) for t in sampled if t.request_id not in launched.dropped
            )
            self._last_sampled.update((t.request_id, t.token_id) for t in sampled_there)
            res = launched.residency
            residencies = [r for r in (res, res and res.second) if r is not None]
            return worker_pb2.StepResponse(
                step=launched.request.step,
                tokens=[
                    worker_pb2.SampledToken(
                        request_id=t.request_id, token_id=t.token_id, logprob=t.logprob
                    )
                    for t in (*sampled, *sampled_there)
                ],
                compute_s=launched.run.compute_s if launched.run else 0.0,
                second_compute_s=launched.second_run.compute_s if launched.second_run else 0.0,
                load_s=max((r.landed_seconds() for r in residencies), default=0.0),
                copying=[rid for r in residencies for rid in r.copying()],
                prefilled=prefilled,
                prefill_s=prefill_s,
                launch_s=launched.launch_s,
            )

    def end_session(self, res: DeviceResidency | None) -> None:
        """Once the session's last step is launched: wait for every device, free the device."""
        with self.runner.on_device():
            self._unfinished = None
            if self.runner.device.type == "cuda":
                # also what a launch that failed halfway had queued
                torch.cuda.synchronize(self.runner.device)
                if self.second_runner is not None:
                    torch.cuda.synchronize(self.second_runner.device)
            # they write into the pool's blocks: no next session (or pool) before they are done
            self._wait_prefilling()
            self._prefilling = []
            self._dropped_prefill.clear()
            if res is not None:
                res.release_all()
            self._last_sampled.clear()

    # ---------------------------------------------------------------- launch

    def _launch(
        self, request: worker_pb2.StepRequest, res: DeviceResidency, phases: Phases
    ) -> Launched:
        self._check_unique(request)
        before = self._unfinished
        lanes = self._lanes(request, res)
        # First free what the batcher already counts as free (requests that finished before
        # this step): its plan may give their device blocks to this step's new requests.
        self._release(request, lanes, before)
        if before is not None and before.wrote_back and len(before.done) > 1:
            # a request written back on one GPU may load on the other now: each GPU's work
            # from here on (its loads first) waits for the other's write-backs
            for runner, _ in lanes:
                with self._on_lane(runner):
                    for event in before.done:
                        torch.cuda.current_stream().wait_event(event)
        phases.mark("releases")
        for lane, pair in enumerate(lanes):
            self._load(request, lane, *pair)
        phases.mark("loads")
        # the prefill device's chunks start first and run while this thread does the rest;
        # they read the pool, so they wait for write-backs the step before still has queued
        self._start_offloaded(request, res, before if before and before.wrote_back else None)
        phases.mark("prefill device's batch")
        passes = []
        for lane, pair in enumerate(lanes):
            passes.append(self._pass(request, lane, *pair, before))
            phases.mark(f"lane {lane}'s pass")
        launched = Launched(
            request,
            passes[0].run,
            tuple(p.done for p in passes if p.done is not None),
            wrote_back=any(p.wrote_back for p in passes),
            second_run=passes[1].run if len(passes) > 1 else None,
            residency=res,
        )
        self._unfinished = launched
        return launched

    def _release(
        self,
        request: worker_pb2.StepRequest,
        lanes: list[tuple[ModelRunner, DeviceResidency]],
        before: Launched | None,
    ) -> None:
        """Free the released requests' device blocks; drop their sampled tokens of the step
        before and their prefill results still to come."""
        prefilling = self._prefilling_ids()
        # on each lane's stream: a block freed while its load still copies in is taken by
        # work queued there (a member growing), which must come after the copies
        for runner, lane_res in lanes:
            with self._on_lane(runner):
                for request_id in request.release:
                    lane_res.release(request_id)
        for request_id in request.release:
            self._last_sampled.pop(request_id, None)
            if before is not None:
                before.dropped.add(request_id)
            if request_id in prefilling:
                self._dropped_prefill.add(request_id)

    def _load(
        self,
        request: worker_pb2.StepRequest,
        lane: int,
        runner: ModelRunner,
        res: DeviceResidency,
    ) -> None:
        """Start copying the lane's new residents in from the pool."""
        with self._on_lane(runner):
            res.load_batch(
                [
                    (e.request_id, e.pool_blocks, e.num_kv_tokens)
                    for e in request.load
                    if e.on_prefill_device == bool(lane)
                ]
            )

    def _pass(
        self,
        request: worker_pb2.StepRequest,
        lane: int,
        runner: ModelRunner,
        res: DeviceResidency,
        before: Launched | None,
    ) -> LanePass:
        """Queue the lane's forward pass and sampling, then its write-backs behind them."""
        with self._on_lane(runner):
            chunks, carried, write_back = self._chunks(request, res, before, lane)
            run = None
            if chunks:
                ran = before.run_on(lane) if before is not None else None
                carry = TokenCarry(ran.tokens, tuple(carried)) if carried else None
                run = runner.launch(chunks, carry)
                for chunk in chunks:
                    res.advance(chunk.request_id, len(chunk.token_ids))
            for request_id, pool_blocks in write_back:
                res.write_back(request_id, pool_blocks)  # queued behind the pass
                res.release(request_id)
            done = None
            # (the prefill device's stream has work only when it decodes or writes back)
            if runner.device.type == "cuda" and (lane == 0 or run or write_back):
                done = torch.cuda.current_stream().record_event()
            return LanePass(run, done, bool(write_back))

    def _on_lane(self, runner: ModelRunner) -> contextlib.ExitStack:
        """The decode device: its current stream. The prefill device: a stream of its own:
        there the prefill thread's batches run on the current stream, and a decode pass or
        write-back queued behind one would wait for all of it."""
        stack = contextlib.ExitStack()
        stack.enter_context(runner.on_device())
        if runner is self.second_runner and self._second_stream is not None:
            stack.enter_context(torch.cuda.stream(self._second_stream))
        return stack

    def _lanes(
        self, request: worker_pb2.StepRequest, res: DeviceResidency
    ) -> list[tuple[ModelRunner, DeviceResidency]]:
        """The devices that decode: the decode device, and the prefill device when it has
        decode blocks of its own (a plan that sends it entries without them is refused)."""
        lanes = [(self.runner, res)]
        if res.second is not None and self.second_runner is not None:
            lanes.append((self.second_runner, res.second))
        elif any(e.on_prefill_device for e in (*request.load, *request.decode, *request.evict)):
            raise InvalidRequestError(
                "an entry is on_prefill_device, but this worker's prefill device has no decode "
                "blocks (ModelInfo.num_prefill_decode_blocks)",
                param="on_prefill_device",
            )
        return lanes

    def _chunks(
        self,
        request: worker_pb2.StepRequest,
        res: DeviceResidency,
        before: Launched | None,
        lane: int,
    ) -> tuple[list[SeqChunk], list[tuple[int, int]], list[tuple[str, Sequence[int]]]]:
        """One device's chunks (lane 0, the decode device: its prefill chunks, then its
        decodes; lane 1, the prefill device: its decodes); the decodes whose input is still
        on the device, as (chunk index, row of `before`'s tokens there); and the write-backs
        after the pass (prefill chunks not kept resident, then the evicted)."""
        chunks: list[SeqChunk] = []
        carried: list[tuple[int, int]] = []
        write_back: list[tuple[str, Sequence[int]]] = []
        for c in request.prefill if lane == 0 else ():
            if c.on_prefill_device:
                continue
            self._check_tokens(c.request_id, c.token_ids, c.num_cached_tokens)
            sampling = self._sampling(c.request_id, c.params) if c.sample else None
            chunks.append(
                res.prefill_chunk(
                    c.request_id, c.token_ids, c.num_cached_tokens, c.pool_blocks, sampling
                )
            )
            if not c.keep_resident:
                write_back.append((c.request_id, c.pool_blocks))
        ran = before.run_on(lane) if before is not None else None
        on_device = ran.row if ran is not None else {}
        for d in request.decode:
            if d.on_prefill_device != bool(lane):
                continue
            token = d.token_id
            if d.last_sampled:
                row = on_device.get(d.request_id)
                if row is not None and d.request_id not in before.dropped:
                    carried.append((len(chunks), row))
                    token = 0  # a placeholder: the pass takes the carried token
                else:
                    token = self._last_sampled_token(d.request_id)
            self._check_tokens(d.request_id, [token], d.num_kv_tokens)
            sampling = self._sampling(d.request_id, d.params)
            chunks.append(res.decode_chunk(d.request_id, token, d.num_kv_tokens, sampling))
        write_back += [
            (e.request_id, e.pool_blocks)
            for e in request.evict
            if e.on_prefill_device == bool(lane)
        ]
        return chunks, carried, write_back

    def _start_offloaded(
        self, request: worker_pb2.StepRequest, res: DeviceResidency, after: Launched | None
    ) -> None:
        """Submit the step's on_prefill_device chunks to the prefill device's thread."""
        jobs = []
        for c in request.prefill:
            if not c.on_prefill_device:
                continue
            if self.prefiller is None:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device, but this worker has no "
                    f"prefill device",
                    param="on_prefill_device",
                )
            if len(self._prefilling) >= MAX_PREFILL_BATCHES:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: {MAX_PREFILL_BATCHES} batches are queued on "
                    f"the prefill device already; send the next once one is done",
                    param="on_prefill_device",
                )
            if c.keep_resident:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device chunks land in the pool; "
                    f"keep_resident must be false",
                    param="keep_resident",
                )
            if res.is_resident(c.request_id):
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device, but its KV is resident on "
                    f"the decode device",
                    param="on_prefill_device",
                )
            self._check_tokens(c.request_id, c.token_ids, c.num_cached_tokens)
            sampling = self._sampling(c.request_id, c.params) if c.sample else None
            jobs.append(
                PrefillJob(
                    c.request_id,
                    tuple(c.token_ids),
                    c.num_cached_tokens,
                    tuple(c.pool_blocks),
                    sampling,
                )
            )
        if jobs:
            pool = res.pool_view()

            def run() -> PrefillRun:
                if after is not None:
                    after.wait()
                return self.prefiller.run(jobs, pool)

            ids = frozenset(job.request_id for job in jobs)
            self._prefilling.append((self._prefill_thread.submit(run), ids))

    def _take_prefilled(self) -> tuple[list[str], list[SampledToken], float]:
        """The prefill device's batches done, oldest first (one still running holds back
        those behind it): their request ids, sampled tokens (but for requests released
        meanwhile) and seconds. A batch that failed raises its error."""
        ids: list[str] = []
        sampled: list[SampledToken] = []
        seconds = 0.0
        while self._prefilling and self._prefilling[0][0].done():
            future, batch_ids = self._prefilling[0]
            run = future.result()
            if not run.is_copied():  # its KV is not whole in the pool yet
                break
            self._prefilling.pop(0)
            ids += sorted(batch_ids)
            sampled += [t for t in run.sampled if t.request_id not in self._dropped_prefill]
            self._dropped_prefill -= batch_ids
            seconds += run.seconds
        return ids, sampled, seconds

    def _wait_prefilling(self) -> None:
        """Until every batch queued on the prefill device is done, its KV in the pool (one
        that failed is done: `_take_prefilled` raises its error)."""
        for future, _ in self._prefilling:
            if future.exception() is None:
                future.result().wait_copied()

    def _prefilling_ids(self) -> frozenset[str]:
        return frozenset().union(*(ids for _, ids in self._prefilling))

    # ---------------------------------------------------------------- checks

    def _last_sampled_token(self, request_id: str) -> int:
        token = self._last_sampled.get(request_id)
        if token is None:
            raise InvalidRequestError(
                f"decode {request_id!r}: last_sampled, but this session sampled no token for it",
                param="last_sampled",
            )
        return token

    def _check_unique(self, request: worker_pb2.StepRequest) -> None:
        ids = [c.request_id for c in request.prefill] + [d.request_id for d in request.decode]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidRequestError(f"requests {dup} appear twice in one forward pass")
        busy = self._prefilling_ids() & {
            *ids,
            *(e.request_id for e in (*request.load, *request.evict)),
        }
        if busy:
            raise InvalidRequestError(
                f"requests {sorted(busy)[:3]} are being prefilled on the prefill device"
            )

    def _check_tokens(self, request_id: str, token_ids: Sequence[int], num_cached: int) -> None:
        # On a GPU an out-of-range index is a device-side assert that poisons the whole
        # context, so the plan is checked here, not left to the embedding lookup.
        if not token_ids:
            raise InvalidRequestError(f"{request_id!r}: no tokens to compute", param="token_ids")
        bad = [t for t in token_ids if t >= self.info.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{request_id!r}: token ids {bad[:3]} not below vocab_size={self.info.vocab_size}",
                param="token_ids",
            )
        if num_cached + len(token_ids) > self.info.max_model_len:
            raise InvalidRequestError(
                f"{request_id!r}: {num_cached} + {len(token_ids)} tokens exceed "
                f"max_model_len={self.info.max_model_len}",
                param="token_ids",
            )

    def _sampling(self, request_id: str, params) -> SamplingParams:
        try:
            return sampling_from_proto(params)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{request_id!r}: {e}", param=e.param) from e
