"""`fcfs`: vLLM-style continuous batching, the baseline to beat.

Every running request keeps its KV on the decode GPU (the pool's blocks stand for GPU
blocks here). Each step decodes all running requests and fills the rest of the token
budget with chunked prefill of waiting requests, first come first served. When blocks run
short, the newest running request is preempted and recomputed later (vLLM's default).
"""

from __future__ import annotations

from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler.core import Scheduler
from alignedserve.batcher.scheduler.plan import BatchPlan


class FcfsPolicy:
    def __init__(self) -> None:
        self.running: dict[str, None] = {}  # insertion order = admission order

    def schedule(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan:
        decode = tuple(self.running)
        room = sched.config.max_batch_size - len(decode)
        prefill = sched.plan_prefill(prefill_budget - len(decode), room)
        return BatchPlan(mixed_prefill=prefill, decode=decode)

    def on_token(self, request: Request) -> None:
        pass

    def on_prefilled(self, sched: Scheduler, request: Request, now: float) -> None:
        sched.store.transition(request, RequestState.RUNNING)
        self.running[request.request_id] = None

    def on_done(self, sched: Scheduler, request: Request) -> None:
        self.running.pop(request.request_id, None)

    def forget(self, sched: Scheduler, request: Request) -> None:
        self.on_done(sched, request)

    def preempt_one(self, sched: Scheduler, now: float) -> Request | None:
        if not self.running:
            return None
        request_id = next(reversed(self.running))
        del self.running[request_id]
        victim = sched.store.get(request_id)
        sched.release_for_recompute(victim)
        return victim

    def on_prefetch_done(self) -> None:
        pass  # every request's KV stays on the GPU: nothing streams in

    def on_copied(self, request_ids) -> None:
        pass

    def check_invariants(self, sched: Scheduler) -> None:
        running = {r.request_id for r in sched.store.in_state(RequestState.RUNNING)}
        assert running == set(self.running), "running set out of sync"
        assert len(running) <= sched.config.max_batch_size
