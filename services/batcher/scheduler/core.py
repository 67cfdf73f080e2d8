"""The batch scheduler: admission, one plan per step, and the update after it ran.

Each step reads top to bottom: `schedule(now)` asks the policy for a `BatchPlan` (plan in),
the executor (worker service, or the simulator's cost model) runs it, and `update(plan,
tokens, now)` applies the result (result out): appends tokens, grows KV blocks, finishes
requests and frees their blocks. What is policy (who prefills, who decodes, when to switch)
lives behind the `Policy` interface; everything else is here, once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Protocol

from alignedserve.batcher.request import Request, RequestState, RequestStore
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.plan import BatchPlan
from alignedserve.batcher.scheduler.recovery import requeue_lost
from alignedserve.batcher.scheduler.turns import PrefillShare
from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import InvalidRequestError, QueueFullError
from alignedserve.common.sampling_params import SamplingParams, finish_reason

# Batches queued on the prefill device at once (the worker's MAX_PREFILL_BATCHES): the next
# runs straight after the one before, while this side learns that one is done and plans
# another. With one, the device idled a step or two after every batch.
PREFILL_BATCHES_IN_FLIGHT = 2


class Policy(Protocol):
    def schedule(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan: ...
    def on_token(self, request: Request) -> None: ...
    def on_prefilled(self, sched: Scheduler, request: Request, now: float) -> None: ...
    def on_done(self, sched: Scheduler, request: Request) -> None: ...
    def forget(self, sched: Scheduler, request: Request) -> None: ...
    def preempt_one(self, sched: Scheduler, now: float) -> Request | None: ...
    def check_invariants(self, sched: Scheduler) -> None: ...
    # a step that started streaming requests in was answered (their copies start next step)
    def on_prefetch_done(self) -> None: ...
    # these residents' loads have landed (an answer no longer lists them as copying)
    def on_copied(self, request_ids: Sequence[str]) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy,
        eos_token_ids: Sequence[int] = (),
        max_model_len: int = 1 << 20,
    ):
        self.config = config
        self.policy = policy
        self.store = RequestStore()
        self.allocator = BlockAllocator(config.num_pool_blocks)
        self.waiting: deque[str] = deque()  # FCFS admission order for prefill
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        self.num_switches = 0
        self.num_preemptions = 0
        self.num_device_blocks = config.gpu_kv_tokens // config.block_tokens
        # preempted since the executor last asked: their device KV must be freed there too
        self._preempted: list[str] = []
        # Chunks on the prefill device (request -> tokens): planned by the policy as
        # `BatchPlan.prefill` when config.num_prefill_device_blocks, done at a later step
        # (`prefill_done`). Blocks of a request that ended meanwhile wait here for the chunk:
        # the device still writes into them.
        self.prefilling: dict[str, int] = {}
        self._prefill_batches: list[set[str]] = []  # their batches, oldest first
        self._orphaned_blocks: dict[str, list[int]] = {}
        # beside a prefill device, the decode GPU's own prefill (`BatchPlan.mixed_prefill`)
        # comes in turns, within a share of its time
        self.prefill_share = PrefillShare(config.decode_prefill_share)

    # ---- admission -------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: Sequence[int], params: SamplingParams, now: float
    ) -> Request:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests waiting: queue full")
        if self.config.pool_full == "reject" and not self._has_headroom(len(prompt)):
            raise QueueFullError(
                f"KV pool has {self.allocator.num_free} free blocks: no room for a "
                f"{len(prompt)}-token prompt now"
            )
        need = self._max_blocks(len(prompt), params.max_tokens)
        limits = (
            (self.config.num_pool_blocks, "the whole pool"),
            (self.num_device_blocks, "the decode device holds"),  # decoded alone, even
            # a re-prefill (after preemption) stages the whole context at once
            (self.config.num_prefill_device_blocks or need, "the prefill device stages"),
        )
        for limit, where in limits:
            if need > limit:
                raise InvalidRequestError(
                    f"request {request_id}: prompt + max_tokens needs {need} KV blocks, more "
                    f"than {where} ({limit})",
                    param="max_tokens",
                )
        request = Request(request_id, prompt, params, arrival_s=now)
        self.store.add(request)
        self.waiting.append(request_id)
        return request

    def abort(self, request_id: str, now: float) -> None:
        request = self.store.get(request_id)
        if request.state.is_done:
            return
        self._finish(request, RequestState.ABORTED, "abort", now)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self, now: float, prefill_token_budget: int | None = None) -> BatchPlan:
        """The next step's plan. The executor may cap this step's prefill tokens (the
        simulator gives the prefetch GPU what it can compute while the decode step runs)."""
        budget = self.config.prefill_tokens_per_step
        if prefill_token_budget is not None:
            budget = min(budget, prefill_token_budget)
        plan = self.policy.schedule(self, now, budget)
        self.num_switches += plan.is_switch
        if self.config.num_prefill_device_blocks and plan.prefill:
            self.prefilling.update(plan.prefill)
            self._prefill_batches.append({request_id for request_id, _ in plan.prefill})
        if self.is_turn(plan):
            self.prefill_share.took()
        return plan

    def observe_step(self, plan: BatchPlan, seconds: float) -> bool:
        """A step of `plan` was answered: the decode device spent `seconds` on it. Returns
        whether it was a turn."""
        is_turn = self.is_turn(plan)
        self.prefill_share.observe(is_turn, bool(plan.decode), seconds)
        return is_turn

    def decode_device_prefill(self, plan: BatchPlan) -> tuple[tuple[str, int], ...]:
        """The plan's prefill chunks that run in the decode device's step: with a prefill
        device only the mixed ones (the rest run there, applied by `prefill_done`)."""
        return plan.mixed_prefill if self.config.num_prefill_device_blocks else plan.all_prefill

    def is_turn(self, plan: BatchPlan) -> bool:
        """Does the decode GPU prefill in this plan beside a prefill device (a turn)?"""
        return bool(self.config.num_prefill_device_blocks and plan.mixed_prefill)

    @property
    def can_queue_prefill(self) -> bool:
        """May the next plan queue another batch on the prefill device?"""
        return len(self._prefill_batches) < PREFILL_BATCHES_IN_FLIGHT

    @property
    def num_prefill_batches(self) -> int:
        """Batches queued on the prefill device (planned, not reported done)."""
        return len(self._prefill_batches)

    @property
    def num_unplanned(self) -> int:
        """Requests waiting for prefill that no batch on the prefill device holds."""
        # the orphaned (ended meanwhile) are among the prefilling and no longer wait
        return len(self.waiting) - (len(self.prefilling) - len(self._orphaned_blocks))

    def has_unplanned_tokens(
        self, num_tokens: int, after: tuple[tuple[str, int], ...] = ()
    ) -> bool:
        """Do at least num_tokens prompt tokens wait for prefill in requests that no batch
        on the prefill device holds, nor `after`? (Reads the queue only that far.)"""
        for r in self._unplanned(after):
            num_tokens -= r.num_tokens - r.num_prefilled
            if num_tokens <= 0:
                return True
        return False

    def _unplanned(self, after: tuple[tuple[str, int], ...]) -> Iterator[Request]:
        """Waiting requests, in queue order, but those a batch on the prefill device holds
        and those planned in `after`."""
        planned = {request_id for request_id, _ in after}
        for request_id in self.waiting:
            if request_id not in planned and request_id not in self.prefilling:
                yield self.store.get(request_id)

    def update(self, plan: BatchPlan, tokens: Mapping[str, int], now: float) -> list[Request]:
        """Apply a step's result: `tokens` has one sampled token per request that finished its
        prefill this step and per decoded member. Returns the requests that finished. (The
        prefill device's chunks are applied by `prefill_done`, when they are done.)"""
        done: list[Request] = []
        for request_id, num in self.decode_device_prefill(plan):
            self._prefilled(request_id, num, tokens, now, done)
        for request_id in plan.decode:
            if request_id not in self.store:
                continue
            r = self.store.get(request_id)
            if r.state is RequestState.RUNNING and self._append(r, tokens[request_id], now):
                done.append(r)
        return done

    def resolve(self, r: Request, index: int, token: int, now: float) -> bool:
        """The answer for the PENDING token at `index` of r's output: set it. If it is a stop
        token, r ends there: what was planned after it is cut (a request still live finishes
        now; one that had already finished by length finished by this stop instead). Returns
        True if r finished now."""
        r.output_token_ids[index] = token
        reason = finish_reason(
            r.params,
            token,
            index + 1,
            len(r.prompt_token_ids) + index + 1,
            self.eos_token_ids,
            self.max_model_len,
        )
        if reason != "stop":
            return False
        finished_now = not r.state.is_done
        if finished_now:  # first: the policy takes its KV off at the length it counted
            self._finish(r, RequestState.FINISHED, "stop", now)
        elif r.finish_reason == "length":
            r.finish_reason = "stop"
        self.store.cut_output(r, index + 1)
        return finished_now

    def prefill_done(
        self, request_ids: Sequence[str], tokens: Mapping[str, int], now: float
    ) -> list[Request]:
        """The prefill device finished these requests' chunks: apply them as `update` does
        (tokens: the sampled ones). Returns the requests that finished."""
        done: list[Request] = []
        finished = set(request_ids)
        self._prefill_batches = [b for b in self._prefill_batches if not b <= finished]
        for request_id in request_ids:
            num = self.prefilling.pop(request_id, None)
            orphaned = self._orphaned_blocks.pop(request_id, None)
            if orphaned is not None:
                self.allocator.free(orphaned)
            elif num is not None:
                self._prefilled(request_id, num, tokens, now, done)
        return done

    def _prefilled(
        self, request_id: str, num: int, tokens: Mapping[str, int], now: float, done: list
    ) -> None:
        if request_id not in self.store:
            return  # aborted and dropped while the step ran
        r = self.store.get(request_id)
        if r.state is not RequestState.WAITING_PREFILL:
            return  # aborted meanwhile
        r.num_prefilled += num
        if r.num_prefilled == r.num_tokens:  # whole prompt (and any recomputed output) in
            self._dequeue(request_id)
            if r.first_token_s is None:
                r.first_token_s = now
            if self._append(r, tokens[request_id], now):
                done.append(r)
            elif r.state is RequestState.WAITING_PREFILL:
                self.policy.on_prefilled(self, r, now)

    # ---- helpers shared by the policies -------------------------------------------------
    def plan_prefill(
        self,
        token_budget: int,
        max_requests: int,
        after: tuple[tuple[str, int], ...] = (),
        device_blocks: int | None = None,
        whole_prompts: bool = False,
    ) -> tuple[tuple[str, int], ...]:
        """Prefill chunks for waiting requests, first come first served, within the token
        budget; a request is never skipped for a smaller one behind it. `after`: chunks
        already planned this step on the other GPU; those requests are left to it (a
        request's chunks run in order, on one GPU at a time). `device_blocks`: the device
        blocks the chunks may take while they run (see prefill_device_blocks).
        `whole_prompts`: a prompt is not cut where the budget ends but leads the next batch
        (one alone may pass the budget), for the prefill device: there a cut prompt's next
        chunk first copies the KV of the one before back in from the pool, over the link its
        loads use. (Letting the batch's last prompt pass the budget instead would make
        batches up to twice as long, and the prefill device's staging ring would then wrap
        onto the batch before while its KV is still being copied out.)

        A request is admitted at its first chunk: it reserves the pool blocks of its whole
        prompt and first token then, so its later chunks and its first token never wait for
        the pool. Admission stops at the first request the pool has no room for; requests
        admitted before it (chunked prefills, preempted or recovered ones behind a
        recomputed one) go on: they hold blocks the one waiting may need."""
        chunks: list[tuple[str, int]] = []
        admitting = True
        for r in self._unplanned(after):
            if token_budget <= 0 or len(chunks) >= max_requests:
                break
            if not r.blocks:  # not admitted yet
                if not admitting:
                    continue
                if not self._has_headroom(r.num_tokens) or not self.try_reserve(
                    r, r.num_tokens + 1
                ):
                    admitting = False  # admission waits until blocks are freed
                    continue
            n = r.num_tokens - r.num_prefilled
            if not whole_prompts:
                n = min(n, token_budget)
            elif n > token_budget and chunks:
                break  # it leads the next batch, whole
            if device_blocks is not None:
                device_blocks -= self.blocks_for(r.num_prefilled + n)
                if device_blocks < 0:
                    break  # the device is full: the chunk waits for blocks to be freed
            chunks.append((r.request_id, n))
            token_budget -= n
        return tuple(chunks)

    def prefill_device_blocks(self, chunks: Sequence[tuple[str, int]]) -> int:
        """Device blocks these chunks' requests fill while they run: all of their KV, the
        cached tokens (loaded first when not resident) and the new ones."""
        return sum(
            self.blocks_for(self.store.get(request_id).num_prefilled + n)
            for request_id, n in chunks
        )

    def max_blocks_of(self, r: Request) -> int:
        """The most KV blocks the request can come to hold."""
        return self._max_blocks(len(r.prompt_token_ids), r.params.max_tokens)

    def _max_blocks(self, prompt_tokens: int, max_tokens: int) -> int:
        # a request stops at max_model_len tokens
        return self.blocks_for(min(prompt_tokens + max_tokens, self.max_model_len))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_tokens)

    def _has_headroom(self, num_tokens: int) -> bool:
        """Would the pool keep `admit_watermark` of its blocks free after this request? An
        empty pool always admits, so a request that fits the pool always makes progress."""
        if self.allocator.num_used == 0:
            return True
        free_after = self.allocator.num_free - self.blocks_for(num_tokens)
        return free_after >= self.config.admit_watermark * self.config.num_pool_blocks

    def try_reserve(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's blocks to cover num_tokens if the pool has room (no preemption)."""
        need = self.blocks_for(num_tokens) - len(request.blocks)
        if need > 0:
            if not self.allocator.can_allocate(need):
                return False
            request.blocks.extend(self.allocator.allocate(need))
        return True

    def reserve_blocks(self, request: Request, num_tokens: int, now: float) -> None:
        """Grow a running request's blocks, preempting others (policy's choice, possibly this
        very request) while the pool is full."""
        while not self.try_reserve(request, num_tokens):
            victim = self.policy.preempt_one(self, now)
            if victim is None:
                raise RuntimeError("KV pool exhausted and nothing can be preempted")
            if victim is request:
                return

    def release_for_recompute(self, request: Request) -> None:
        """Preemption by recomputation (vLLM's default): drop the KV, prefill again later."""
        self.allocator.free(request.blocks)
        request.blocks = []
        request.num_prefilled = 0
        self.store.transition(request, RequestState.WAITING_PREFILL)
        self.waiting.appendleft(request.request_id)
        self.num_preemptions += 1
        self._preempted.append(request.request_id)

    def take_preempted(self) -> list[str]:
        """Requests preempted (for recompute) since the last call: the executor frees their
        KV on the device before the step that prefills them again."""
        taken, self._preempted = self._preempted, []
        return taken

    def recover_from_worker_loss(
        self,
        synced: Mapping[str, int],
        evicting: Sequence[str] = (),
        unanswered: Collection[str] = (),
    ) -> list[str]:
        """The worker died: what it held goes back to waiting for a prefill from the KV that
        reached the pool (`recovery.requeue_lost`, which says how). Returns the ids of the
        requests reopened."""
        # the prefill device's chunk in flight is lost with it (its requests are planned again);
        # the blocks of those that ended meanwhile are free once the old session is gone,
        # before any new plan is sent
        self.prefilling.clear()
        self._prefill_batches.clear()
        self.prefill_share.steps_lost()
        for blocks in self._orphaned_blocks.values():
            self.allocator.free(blocks)
        self._orphaned_blocks.clear()
        return requeue_lost(self, synced, evicting, unanswered)

    def check_invariants(self) -> None:
        self.store.check_invariants(self.config.block_tokens, self.config.num_pool_blocks)
        owned = sum(len(r.blocks) for r in self.store)
        owned += sum(len(blocks) for blocks in self._orphaned_blocks.values())
        assert owned == self.allocator.num_used, f"{owned} owned vs {self.allocator.num_used}"
        assert self._orphaned_blocks.keys() <= self.prefilling.keys()
        assert set().union(*self._prefill_batches) == self.prefilling.keys()
        assert len(self._prefill_batches) <= PREFILL_BATCHES_IN_FLIGHT
        assert self.num_unplanned == sum(rid not in self.prefilling for rid in self.waiting)
        for request_id in self.prefilling.keys() - self._orphaned_blocks.keys():
            r = self.store.get(request_id)
            assert r.state is RequestState.WAITING_PREFILL, r
        waiting = list(self.store.in_state(RequestState.WAITING_PREFILL))
        assert sorted(r.request_id for r in waiting) == sorted(self.waiting), "waiting out of sync"
        for r in waiting:  # admitted ones hold room for their whole prefill and first token
            assert not r.blocks or len(r.blocks) >= self.blocks_for(r.num_tokens + 1), r
        self.policy.check_invariants(self)

    # ---- internals ---------------------------------------------------------------------
    def _append(self, r: Request, token: int, now: float) -> bool:
        """Append a sampled token; True if the request finished."""
        self.store.append_token(r, token)
        r.last_token_s = now
        self.policy.on_token(r)
        reason = finish_reason(
            r.params,
            token,
            len(r.output_token_ids),
            r.num_tokens,
            self.eos_token_ids,
            self.max_model_len,
        )
        if reason is not None:
            self._finish(r, RequestState.FINISHED, reason, now)
            return True
        self.reserve_blocks(r, r.num_kv_tokens + 1, now)  # room for the next token's KV
        return False

    def _dequeue(self, request_id: str) -> None:
        # Prefills complete in queue order, so this is almost always the head: O(1).
        if self.waiting and self.waiting[0] == request_id:
            self.waiting.popleft()
        elif request_id in self.waiting:
            self.waiting.remove(request_id)

    def _finish(self, r: Request, state: RequestState, reason: str, now: float) -> None:
        self._dequeue(r.request_id)
        self.policy.on_done(self, r)
        if r.request_id in self.prefilling:  # the prefill device still writes into them
            self._orphaned_blocks[r.request_id] = r.blocks
        else:
            self.allocator.free(r.blocks)
        r.blocks = []
        r.finish_reason = reason
        r.finished_s = now
        self.store.transition(r, state)
