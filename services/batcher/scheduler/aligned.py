"""`aligned`: decode together only requests of about the same KV length.

Pooled requests (KV in the CPU pool) sit in a LengthIndex. One batch runs on the decode GPU;
its members' lengths grow in lockstep, so it stays aligned. Each step:
1. prefill waiting requests (on the prefetch GPU) into the pool; while the pool holds less
   than two full batches, the decode GPU prefills a bounded chunk too, in its step;
2. refill the running batch with pooled requests of matching length (joiners);
3. if a pooled request has waited past the starvation bound, or some length band of the
   pool would make a batch that decodes `switch_margin` more tokens per unit of step cost
   (see `score`), choose it as the next batch and start prefetching it; the current batch
   keeps decoding until the executor reports the prefetch complete, then they switch and
   the old members go back to the pool, to rejoin a batch when lengths match again.
A batch's KV (with growth headroom) never exceeds `max_batch_kv_fraction` of the decode GPU,
so the running and the prefetched batch fit side by side.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from alignedserve.batcher.length_index import Band, LengthIndex, bucket_of, bucket_start
from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.core import BatchPlan, Scheduler

S = RequestState


class AlignedPolicy:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.index = LengthIndex()
        self.pooled: dict[str, None] = {}  # pool entry order: first = longest waiting
        self.running: dict[str, None] = {}
        self.next_batch: list[str] = []  # prefetching
        self.next_ready = False  # the executor reported the prefetch complete
        self.ends = np.maximum(self.index.bucket_ends(), 1)  # longest length of each bucket
        self.need = np.array([self.cap(int(e)) for e in self.ends])  # batch cap per band end

    def cap(self, max_length: int) -> int:
        """Members a batch of this longest length may hold within the KV budget."""
        per_member = max_length + self.config.growth_tokens
        return max(1, min(self.config.max_batch_size, self.config.batch_kv_tokens // per_member))

    # ---- the step ----------------------------------------------------------------------
    def schedule(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan:
        return self._with_assist(sched, self._plan(sched, now, prefill_budget))

    def _admit_room(self, sched: Scheduler) -> int:
        """How many more requests may start prefill without exceeding max_inflight."""
        inflight = len(self.pooled) + len(self.next_batch) + len(self.running)
        return max(0, self.config.max_inflight - inflight)

    def _plan(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan:
        prefill = sched.plan_prefill(prefill_budget, max_requests=self._admit_room(sched))
        if self.next_batch and (self.next_ready or not self.running):
            return self._switch(sched, prefill, now)
        if self.next_batch:  # keep decoding (and refilling) while the next batch streams in
            joiners = self._joiners(sched, self._lengths(sched), now)
            return BatchPlan(prefill=prefill, decode=tuple(self.running), load=tuple(joiners))
        starving = self._starving(sched, now)
        joiners = self._joiners(sched, self._lengths(sched), now)
        lengths = self._lengths(sched)
        batch = self._pick(sched, starving, lengths, now)
        if batch and not self.running:  # nothing to overlap with: load it right away
            self.next_batch = batch
            return self._switch(sched, prefill, now)
        self.next_batch = batch
        return BatchPlan(
            prefill=prefill, decode=tuple(self.running), load=tuple(joiners), prefetch=tuple(batch)
        )

    def _with_assist(self, sched: Scheduler, plan: BatchPlan) -> BatchPlan:
        """While the pool holds less than two full batches, the prefetch GPU alone cannot
        keep the decode GPU fed: the decode GPU prefills too, a bounded chunk per step mixed
        into its decode step, so no GPU idles and the pool fills."""
        if not sched.waiting:
            return plan
        target = 2 * self.config.max_batch_size
        if len(self.pooled) + len(self.next_batch) >= target:
            return plan
        room = self._admit_room(sched) - len(plan.prefill)
        mixed = sched.plan_prefill(self.config.assist_tokens_per_step, room, after=plan.prefill)
        return replace(plan, mixed_prefill=mixed)

    def _switch(self, sched: Scheduler, prefill, now: float) -> BatchPlan:
        evict = tuple(self.running)
        for request_id in evict:
            self._to_pool(sched, sched.store.get(request_id), now)
        self.running = dict.fromkeys(self.next_batch)
        for request_id in self.next_batch:
            sched.store.transition(sched.store.get(request_id), S.RUNNING)
        self.next_batch, self.next_ready = [], False
        return BatchPlan(
            prefill=prefill,
            decode=tuple(self.running),
            load=tuple(self.running),
            evict=evict,
            is_switch=bool(evict),
        )

    def _starving(self, sched: Scheduler, now: float) -> Request | None:
        if not self.pooled:
            return None
        oldest = sched.store.get(next(iter(self.pooled)))
        return oldest if now - oldest.pooled_since_s > self.config.starvation_s else None

    def _lengths(self, sched: Scheduler) -> list[int]:
        return [sched.store.get(r).num_tokens for r in self.running]

    def score(self, size: int, max_length: int) -> float:
        """Tokens per unit of step cost for a batch (padded model: every member costs as much
        as the longest; the weights cost `weight_kv_tokens` once per step)."""
        return size / (self.config.weight_kv_tokens + size * max_length)

    def _best_band(self) -> Band | None:
        """The band (<= max_band_buckets wide) whose batch scores best; at equal size the
        narrower band wins, as its longest length is smaller."""
        best, best_score = None, 0.0
        for width in range(1, self.config.max_band_buckets + 1):
            size = np.minimum(self.index.window_counts(width), self.need[width - 1 :])
            ends = self.ends[width - 1 :]
            score = size / (self.config.weight_kv_tokens + size * ends)
            lo = int(np.argmax(score))
            if score[lo] > best_score * (1 + 1e-9):
                best, best_score = (lo, lo + width - 1), float(score[lo])
        return self.index.band(*best) if best else None

    def _pick(
        self, sched: Scheduler, starving: Request | None, lengths: list[int], now: float
    ) -> list[str]:
        """Choose the next batch from the pool (moving its members to PREFETCHING), or []
        when the running batch should go on: nothing starves and no band beats it by
        `switch_margin` with at least `min_batch_size` members."""
        if not self.pooled:
            return []
        if starving is not None:
            band = self.index.band_around(starving.num_tokens, self.config.max_band_buckets)
        else:
            band = self._best_band()
            size = min(band.count, int(self.need[band.hi]))
            running = self.score(len(lengths), max(lengths)) if lengths else 0.0
            if self.score(size, band.max_length) <= running * (1 + self.config.switch_margin):
                return []
            if lengths and size < self.config.min_batch_size:
                return []
        batch = self.index.members(band, limit=int(self.need[band.hi]))
        for request_id in batch:
            self._from_pool(sched, request_id, S.PREFETCHING, now)
        return batch

    def _joiners(self, sched: Scheduler, lengths: list[int], now: float) -> list[str]:
        if not lengths or not self.pooled:
            return []
        room = self.cap(max(lengths)) - len(lengths)
        if room <= 0:
            return []
        band = self.index.band_for_lengths(min(lengths), max(lengths))
        joiners = [
            r
            for r in self.index.members(band, limit=room * 4)
            if min(lengths) <= self.index.length_of(r) <= max(lengths)
        ][:room]
        for request_id in joiners:
            self._from_pool(sched, request_id, S.RUNNING, now)
            self.running[request_id] = None
        return joiners

    # ---- pool membership ---------------------------------------------------------------
    def _to_pool(self, sched: Scheduler, request: Request, now: float) -> None:
        sched.store.transition(request, S.POOLED)
        request.pooled_since_s = now
        self.index.add(request.request_id, min(request.num_tokens, self.index.max_length))
        self.pooled[request.request_id] = None

    def _from_pool(
        self, sched: Scheduler, request_id: str, state: RequestState, now: float
    ) -> None:
        self.index.remove(request_id)
        del self.pooled[request_id]
        request = sched.store.get(request_id)
        request.max_pool_wait_s = max(request.max_pool_wait_s, now - request.pooled_since_s)
        sched.store.transition(request, state)

    # ---- Policy callbacks ----------------------------------------------------------------
    def on_prefetch_done(self) -> None:
        self.next_ready = bool(self.next_batch)

    def on_prefilled(self, sched: Scheduler, request: Request, now: float) -> None:
        self._to_pool(sched, request, now)

    def on_done(self, sched: Scheduler, request: Request) -> None:
        rid = request.request_id
        if rid in self.pooled:
            self.index.remove(rid)
            del self.pooled[rid]
        self.running.pop(rid, None)
        if rid in self.next_batch:
            self.next_batch.remove(rid)

    def preempt_one(self, sched: Scheduler, now: float) -> Request | None:
        """CPU pool full: recompute the most recently pooled request, else the newest member."""
        if self.pooled:
            request_id = next(reversed(self.pooled))
            self.index.remove(request_id)
            del self.pooled[request_id]
        elif self.running:
            request_id = next(reversed(self.running))
            del self.running[request_id]
        else:
            return None
        victim = sched.store.get(request_id)
        sched.release_for_recompute(victim)
        return victim

    def check_invariants(self, sched: Scheduler) -> None:
        by_state = {s: set() for s in S}
        for r in sched.store:
            by_state[r.state].add(r.request_id)
        assert by_state[S.POOLED] == set(self.pooled) == set(self.index._where)
        assert by_state[S.RUNNING] == set(self.running)
        assert by_state[S.PREFETCHING] == set(self.next_batch)
        if self.running:
            lengths = [sched.store.get(r).num_tokens for r in self.running]
            lo = bucket_of(min(lengths))
            spread_bound = bucket_start(lo + self.config.max_band_buckets) - bucket_start(lo)
            assert max(lengths) - min(lengths) <= spread_bound, (min(lengths), max(lengths))
            assert len(lengths) <= self.cap(max(lengths) - 1) + 1 or len(lengths) <= self.cap(
                min(lengths)
            )
