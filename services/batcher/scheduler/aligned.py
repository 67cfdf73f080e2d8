"""`aligned`: decode together only requests of about the same KV length.

Requests whose KV is on the decode GPU are *resident*; they are partitioned into contiguous
length groups, and each step decodes one group, round-robin, so every resident request
advances once per round and moving between groups costs no copy. The partition minimises
the round's cost under the decode kernel's cost model (`partition_groups`): with a padded
kernel every member costs as much as the group's longest, so requests of very different
lengths are split apart exactly when the padding they would waste exceeds one more read
of the weights; with a balanced kernel one group is best and the policy becomes continuous
batching with prefill moved off the decode GPU.

The CPU pool holds the rest (its index by length finds partners). Each step, top to bottom:
1. prefill waiting requests on the prefetch GPU, whose KV lands in the pool: there, one
   batch of chunks runs across decode steps, never holding one up; and on the decode GPU
   too when prefill is what keeps its batch small: alone on one GPU, a chunk in its step
   while nothing waits in the pool; beside a prefill device, in turns of a full batch
   while a backlog waits, within a share of its time (scheduler/turns.py); admitting at
   most `max_inflight` past prefill;
2. requests that finished streaming in become resident;
3. a pooled request waiting past `starvation_s` while the GPU is full makes room by sending
   the longest-resident requests back to the pool (they write back only new KV);
4. while nothing streams, pooled requests that fit the KV budget start streaming in: the
   starving first, then those whose lengths fall inside an existing group (they cost one
   member, not a new group), then the longest waiting;
5. decode the next group.

The KV budget above (`max_resident_kv_fraction`, `growth_tokens`) is a soft target in
tokens. The hard bound is the device's blocks, counted as the worker allocates them
(worker/residency.py): every block a resident holds stays allocated through the step (an
evicted one's until the step ends), and before the forward pass the worker allocates each
load's blocks, a block for each decoded member whose next token starts one, and every
decode-device prefill chunk's blocks for its cached + new tokens (without a prefill device
the worker prefills on the decode device, then writes the chunk back and frees it; with
one, the chunks take its staging blocks instead). Each step grants those in that order,
so one plan never asks for more blocks than the device has: loads land only when they fit
beside a block of growth per resident, a member without room skips the step (and leaves for
the pool when nothing else frees one), and prefill gets the blocks left.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

import numpy as np

from alignedserve.batcher.length_index import LengthIndex, bucket_of, bucket_of_array
from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.core import BatchPlan, Scheduler

S = RequestState
# Groups are formed over coarser buckets than the pool's index (16 per power of two: each
# <= 6.25 % of its length), which halves the partition's work at a small cost in fit.
GROUP_SUB_BITS = 3


def partition_groups(
    buckets: np.ndarray,  # [m] distinct occupied buckets, ascending
    counts: np.ndarray,  # [m] members in each
    ends: np.ndarray,  # [m] longest length of each bucket
    sums: np.ndarray,  # [m] total length of the members of each
    weight_tokens: int,
    padded: bool,
    max_members: int,
    max_span: int,
    min_members: int = 1,
) -> list[int]:
    """Split occupied buckets into contiguous groups minimising sum over groups of
    (weight_tokens + cost of its members): padded n * longest, balanced the sum of lengths.
    A group holds at most max_members members and spans at most max_span buckets (a group
    that must exceed max_members alone is allowed: one bucket cannot be split by length),
    and at least min_members (or all members, when fewer are resident). When the span bound
    leaves no partition with groups that large, the minimum is dropped rather than the span.
    Returns the index (into `buckets`) where each group starts."""
    m = len(buckets)
    cum_n = np.concatenate(([0], np.cumsum(counts)))
    cum_s = np.concatenate(([0], np.cumsum(sums)))
    # The cost of every candidate group [i, j) at once; costs are integers far below 2**53,
    # so the float sums below are exact. [m (first bucket i), m (last bucket j - 1)]
    i = np.arange(m)[:, None]
    j = np.arange(1, m + 1)[None, :]
    n = cum_n[j] - cum_n[i]
    member_cost = n * ends[j - 1] if padded else cum_s[j] - cum_s[i]
    ok = (i < j) & ((n <= max_members) | (i == j - 1)) & (buckets[j - 1] - buckets[i] < max_span)
    ok &= n >= min(min_members, int(cum_n[m]))
    cost = np.where(ok, weight_tokens + member_cost, np.inf)
    best = np.full(m + 1, np.inf)  # best[j]: cost of buckets[:j]
    best[0] = 0.0
    start = np.zeros(m + 1, dtype=np.int64)
    for last in range(1, m + 1):
        total = best[:last] + cost[:last, last - 1]
        first = int(np.argmin(total))
        best[last], start[last] = total[first], first
    if not np.isfinite(best[m]):  # only a minimum the span bound cannot meet leaves this
        return partition_groups(
            buckets, counts, ends, sums, weight_tokens, padded, max_members, max_span
        )
    starts, j = [], m
    while j > 0:
        starts.append(int(start[j]))
        j = starts[-1]
    return starts[::-1]


class AlignedPolicy:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.index = LengthIndex()
        self.pooled: dict[str, None] = {}  # pool entry order: first = longest waiting
        self.resident: dict[str, None] = {}  # on the decode GPU, in load order
        self.undecoded: set[str] = set()  # resident, no token decoded since it landed
        self.loading: list[str] = []  # streaming in (PREFETCHING)
        self.loading_done = False
        self.groups: list[list[str]] = []
        # per group, its shortest and longest member: lengths grow in lockstep, so groups stay
        # ordered by length and these two stay its ends until one of them leaves
        self.group_ends: list[tuple[str, str]] = []
        self.next_group = 0
        self.steps_since_regroup = 0
        self.churn = 0  # members joined or left since the last full regroup
        self.kv_budget = int(config.gpu_kv_tokens * config.max_resident_kv_fraction)
        self.gpu_tokens = 0  # KV tokens of resident + loading requests, kept exact
        self.num_device_blocks = config.gpu_kv_tokens // config.block_tokens
        self.held_blocks = 0  # device blocks the residents' KV fills, kept exact

    # ---- the step ----------------------------------------------------------------------
    def schedule(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan:
        free = self.num_device_blocks - self.held_blocks  # device blocks this step may take
        load: list[str] = []
        if self.loading and (self.loading_done or not self.resident):
            load = self._land(sched, free)
        evict = self._evict_for_starving(sched, now)
        prefetch = () if self.loading else self._start_loading(sched, now, set(evict))
        if prefetch and not self.resident and not load:  # nothing to overlap with: wait for it
            load = self._land(sched, free)
        free -= sum(sched.blocks_for(sched.store.get(r).num_kv_tokens) for r in load)
        self.steps_since_regroup += 1
        self.churn += len(load) + len(evict)
        # Leavers just drop out of their groups and joiners slot into one; lengths grow in
        # lockstep, so the partition stays sound until membership has changed by a quarter.
        if (
            not self.groups
            or self.churn * 4 > len(self.resident)
            or self.steps_since_regroup >= self.config.regroup_steps
        ):
            self._regroup(sched)
        elif load:
            self._insert(sched, load)
        decode, free, make_room = self._fit_decode(sched, self._next_group(), free, now)
        # On a prefill device the chunks take its staging blocks, one batch at a time (each
        # runs across decode steps; the next is queued behind it); else they take the decode
        # device's blocks, in its step.
        staging = self.config.num_prefill_device_blocks
        prefill = ()
        if sched.can_queue_prefill:
            room = self._admit_room()
            prefill = sched.plan_prefill(prefill_budget, room, device_blocks=staging or free)
        if not staging:
            free -= sched.prefill_device_blocks(prefill)
        plan = BatchPlan(
            prefill=prefill,
            decode=tuple(decode),
            load=tuple(load),
            evict=(*evict, *make_room),
            prefetch=tuple(prefetch),
            is_switch=bool(evict),
        )
        return self._with_decode_prefill(sched, plan, free)

    def _admit_room(self) -> int:
        inflight = len(self.pooled) + len(self.loading) + len(self.resident)
        return max(0, self.config.max_inflight - inflight)

    def _with_decode_prefill(
        self, sched: Scheduler, plan: BatchPlan, free_blocks: int
    ) -> BatchPlan:
        """The decode GPU prefills in its step too (`mixed_prefill`, written back to the pool)
        when prefill is what keeps it from a fuller batch:
        - alone on one GPU: a chunk of assist_tokens_per_step while nothing waits in the pool
          and it has room;
        - beside a prefill device: a turn (scheduler/turns.py), a full prefill batch, while
          more prompt tokens than that wait with no batch on the prefill device, everything
          pooled fits the decode GPU beside its residents, and the share allows: the debt of
          the last turn is paid, or the decode GPU has nothing else to do."""
        if not sched.waiting:
            return plan
        if self.config.num_prefill_device_blocks:
            budget = self.config.prefill_tokens_per_step
            idle = not (self.resident or self.loading or self.pooled)
            if not (
                sched.prefill_share.may_take(decodes=bool(plan.decode))
                and sched.has_unplanned_tokens(1 if idle else budget, after=plan.prefill)
                and self._pool_fits_device(sched)
            ):
                return plan
        else:
            if self.pooled or self._free_tokens(sched) <= 0:
                return plan
            budget = self.config.assist_tokens_per_step
        room = self._admit_room() - len(plan.prefill)
        mixed = sched.plan_prefill(budget, room, after=plan.prefill, device_blocks=free_blocks)
        return replace(plan, mixed_prefill=mixed)

    def _pool_fits_device(self, sched: Scheduler) -> bool:
        """Would every pooled request fit the decode GPU's KV budget beside the residents,
        with room to spare? Then prefill, not the GPU's room, is what keeps its batch small."""
        free = self._free_tokens(sched)
        for request_id in self.pooled:
            free -= self._need_tokens(sched.store.get(request_id))
            if free <= 0:
                return False
        return free > 0

    def _fit_decode(
        self, sched: Scheduler, group: list[str], free: int, now: float
    ) -> tuple[list[str], int, list[str]]:
        """The members of `group` the device has room to decode (a member whose next token
        starts a block needs one more), the blocks left, and members to evict so that those
        left out find room next step: without that, a device full of members that all need
        a block would stall. A member alone on the device always fits (admission)."""
        decode, short = [], []
        for request_id in group:
            kv = sched.store.get(request_id).num_kv_tokens
            grow = sched.blocks_for(kv + 1) - sched.blocks_for(kv)
            if grow <= free:
                decode.append(request_id)
                free -= grow
            else:
                short.append(request_id)
        need = len(short) - free  # blocks still missing next step
        make_room: list[str] = []
        for request_id in reversed(short):  # the longest first: the fewest leave
            if need <= 0:
                break
            make_room.append(request_id)
            need -= 1 + sched.blocks_for(sched.store.get(request_id).num_kv_tokens)
        for request_id in make_room:
            self._leave_device(sched, request_id)
            self._to_pool(sched, sched.store.get(request_id), now)
        self.churn += len(make_room)
        return decode, free, make_room

    # ---- residency ---------------------------------------------------------------------
    def _need_tokens(self, r: Request) -> int:
        return r.num_tokens + self.config.growth_tokens

    def _free_tokens(self, sched: Scheduler) -> int:
        members = len(self.resident) + len(self.loading)
        return self.kv_budget - self.gpu_tokens - members * self.config.growth_tokens

    def _start_loading(self, sched: Scheduler, now: float, evicted: set[str]) -> list[str]:
        free = self._free_tokens(sched)
        if not self.pooled or (free <= self.config.growth_tokens and self.resident):
            return []  # not even the shortest request could fit
        room = self.config.max_batch_size * 4 - len(self.resident)
        # the hard bound: blocks the picks take when they land (first token included),
        # beside a block of growth per resident; the evicted leave before that
        free_blocks = self.num_device_blocks - self.held_blocks - len(self.resident)
        picked: list[str] = []
        for request_id in self._candidates(sched, now):
            if len(picked) >= room:
                break
            if request_id in evicted:
                continue  # it leaves the device this step: not straight back
            need = self._need_tokens(sched.store.get(request_id))
            blocks = sched.blocks_for(sched.store.get(request_id).num_tokens)
            if need > free or blocks > free_blocks:
                if picked or self.resident:
                    break  # keep FCFS among candidates: no skipping to smaller ones
                need = free  # an empty GPU takes even an oversized request
            free -= need
            free_blocks -= blocks
            picked.append(request_id)
        for request_id in picked:
            self._from_pool(sched, request_id, now)
            self.gpu_tokens += sched.store.get(request_id).num_tokens
        self.loading, self.loading_done = picked, False
        return picked

    def _candidates(self, sched: Scheduler, now: float):
        """Pooled requests in load order: starving, then fitting a group, then oldest."""
        seen: set[str] = set()
        bound = now - self.config.starvation_s
        for request_id in self.pooled:
            if sched.store.get(request_id).pooled_since_s > bound:
                break
            seen.add(request_id)
            yield request_id
        for group in self.groups:
            lengths = [sched.store.get(r).num_tokens for r in group if r in self.resident]
            if lengths:
                band = self.index.band_for_lengths(min(lengths), max(lengths))
                for request_id in self.index.iter_members(band):
                    if request_id not in seen:
                        seen.add(request_id)
                        yield request_id
        for request_id in self.pooled:
            if request_id not in seen:
                yield request_id

    def _land(self, sched: Scheduler, free_blocks: int) -> list[str]:
        """The streaming-in requests become resident, if their blocks (and each one's first
        decoded token) fit the device beside a block of growth per resident; else they wait."""
        blocks = [sched.blocks_for(sched.store.get(r).num_tokens) for r in self.loading]
        if sum(blocks) > free_blocks - len(self.resident):
            return []
        landed = self.loading
        for request_id in landed:
            request = sched.store.get(request_id)
            sched.store.transition(request, S.RUNNING)
            self.resident[request_id] = None
            self.undecoded.add(request_id)
            self.held_blocks += sched.blocks_for(request.num_kv_tokens)
        self.loading, self.loading_done = [], False
        return landed

    def _leave_device(self, sched: Scheduler, request_id: str) -> None:
        """A resident leaves the device (its blocks are freed at the end of this step)."""
        del self.resident[request_id]
        self.undecoded.discard(request_id)
        request = sched.store.get(request_id)
        self.gpu_tokens -= request.num_tokens
        self.held_blocks -= sched.blocks_for(request.num_kv_tokens)

    def _evict_for_starving(self, sched: Scheduler, now: float) -> list[str]:
        if not self.pooled or self.loading:
            return []
        oldest = sched.store.get(next(iter(self.pooled)))
        if now - oldest.pooled_since_s <= self.config.starvation_s:
            return []
        short = self._need_tokens(oldest) - self._free_tokens(sched)
        evict: list[str] = []
        for request_id in self.resident:  # longest-resident first: they had their turn
            if short <= 0:
                break
            if request_id in self.undecoded:
                continue  # not yet: sent back before its turn, it could starve in turn
            evict.append(request_id)
            short -= self._need_tokens(sched.store.get(request_id))
        for request_id in evict:
            self._leave_device(sched, request_id)
            self._to_pool(sched, sched.store.get(request_id), now)
        return evict

    # ---- groups ------------------------------------------------------------------------
    def _regroup(self, sched: Scheduler) -> None:
        if not self.resident:
            self.groups, self.group_ends, self.next_group = [], [], 0
            return
        ids = list(self.resident)
        lengths = np.fromiter(
            (sched.store.get(r).num_tokens for r in ids), dtype=np.int64, count=len(ids)
        )
        buckets = bucket_of_array(np.minimum(lengths, self.index.max_length), GROUP_SUB_BITS)
        order = np.argsort(buckets, kind="stable")
        occupied, first, counts = np.unique(buckets[order], return_index=True, return_counts=True)
        by_order = lengths[order]
        starts = partition_groups(
            occupied,
            counts,
            np.maximum.reduceat(by_order, first),
            np.add.reduceat(by_order, first),
            self.config.weight_kv_tokens,
            self.config.kernel_cost == "padded",
            self.config.max_batch_size,
            self.config.max_band_buckets,
            self.config.min_batch_size,
        )
        cuts = [int(first[i]) for i in starts] + [len(ids)]  # member positions in `order`
        ranked = [ids[k] for k in order.tolist()]
        self.groups = [ranked[cuts[g] : cuts[g + 1]] for g in range(len(starts))]
        self.group_ends = [(g[0], g[-1]) for g in self.groups]  # members sorted by bucket
        self.next_group %= len(self.groups)
        self.steps_since_regroup = self.churn = 0

    def _group_range(self, sched: Scheduler, g: int) -> tuple[int, int]:
        """Current (shortest, longest) length in group g."""
        lo_id, hi_id = self.group_ends[g]
        if lo_id not in self.resident or hi_id not in self.resident:
            members = [r for r in self.groups[g] if r in self.resident]
            if not members:
                return (0, 0)
            lo_id = min(members, key=lambda r: sched.store.get(r).num_tokens)
            hi_id = max(members, key=lambda r: sched.store.get(r).num_tokens)
            self.group_ends[g] = (lo_id, hi_id)
        return sched.store.get(lo_id).num_tokens, sched.store.get(hi_id).num_tokens

    def _insert(self, sched: Scheduler, request_ids) -> None:
        """Place newly resident requests into the group whose length range holds them (the
        next full regroup re-optimises); one that would stretch a group past
        max_band_buckets triggers that regroup now instead."""
        for request_id in request_ids:
            length = sched.store.get(request_id).num_tokens
            ranges = [self._group_range(sched, g) for g in range(len(self.groups))]
            g = max(0, bisect.bisect_right([lo for lo, _ in ranges], length) - 1)
            lo, hi = ranges[g]
            lo_id, hi_id = self.group_ends[g]
            if not self.groups[g] or length < lo:
                lo, lo_id = length, request_id
            if length > hi:
                hi, hi_id = length, request_id
            cap = self.index.max_length
            span = bucket_of(min(hi, cap), GROUP_SUB_BITS) - bucket_of(min(lo, cap), GROUP_SUB_BITS)
            if span >= self.config.max_band_buckets:
                self._regroup(sched)  # places every resident request, these included
                return
            self.group_ends[g] = (lo_id, hi_id)
            self.groups[g].append(request_id)

    def _next_group(self) -> list[str]:
        """Round-robin over groups, skipping members that left since the partition."""
        for _ in range(len(self.groups)):
            group = [r for r in self.groups[self.next_group] if r in self.resident]
            self.groups[self.next_group] = group
            self.next_group = (self.next_group + 1) % len(self.groups)
            if group:
                return group
        return []

    # ---- pool membership ---------------------------------------------------------------
    def _to_pool(self, sched: Scheduler, request: Request, now: float) -> None:
        sched.store.transition(request, S.POOLED)
        request.pooled_since_s = now
        self.index.add(request.request_id, min(request.num_tokens, self.index.max_length))
        self.pooled[request.request_id] = None

    def _from_pool(self, sched: Scheduler, request_id: str, now: float) -> None:
        self.index.remove(request_id)
        del self.pooled[request_id]
        request = sched.store.get(request_id)
        request.max_pool_wait_s = max(request.max_pool_wait_s, now - request.pooled_since_s)
        sched.store.transition(request, S.PREFETCHING)

    # ---- Policy callbacks ----------------------------------------------------------------
    def on_prefetch_done(self) -> None:
        self.loading_done = bool(self.loading)

    def on_token(self, request: Request) -> None:
        if request.request_id in self.resident:
            self.gpu_tokens += 1
            self.undecoded.discard(request.request_id)
            # the decode wrote the KV of token kv - 1: a new device block if it starts one
            self.held_blocks += (request.num_kv_tokens - 1) % self.config.block_tokens == 0

    def on_prefilled(self, sched: Scheduler, request: Request, now: float) -> None:
        self._to_pool(sched, request, now)

    def on_done(self, sched: Scheduler, request: Request) -> None:
        rid = request.request_id
        if rid in self.pooled:
            self.index.remove(rid)
            del self.pooled[rid]
        if rid in self.resident or rid in self.loading:
            self.gpu_tokens -= request.num_tokens
            self.churn += 1
        if rid in self.resident:
            self.held_blocks -= sched.blocks_for(request.num_kv_tokens)
        self.resident.pop(rid, None)
        self.undecoded.discard(rid)
        if rid in self.loading:
            self.loading.remove(rid)

    def forget(self, sched: Scheduler, request: Request) -> None:
        """Drop a request the policy tracked (its worker is gone), as if it had finished."""
        self.on_done(sched, request)
        if not self.loading:
            self.loading_done = False

    def preempt_one(self, sched: Scheduler, now: float) -> Request | None:
        """CPU pool full: recompute the most recently pooled request, else the newest resident."""
        if self.pooled:
            request_id = next(reversed(self.pooled))
            self.index.remove(request_id)
            del self.pooled[request_id]
        elif self.resident:
            request_id = next(reversed(self.resident))
            self._leave_device(sched, request_id)
        else:
            return None
        victim = sched.store.get(request_id)
        sched.release_for_recompute(victim)
        return victim

    def check_invariants(self, sched: Scheduler) -> None:
        by_state: dict[RequestState, set[str]] = {s: set() for s in S}
        for r in sched.store:
            by_state[r.state].add(r.request_id)
        assert by_state[S.POOLED] == set(self.pooled) == set(self.index._where)
        assert by_state[S.RUNNING] == set(self.resident) >= self.undecoded
        assert by_state[S.PREFETCHING] == set(self.loading)
        on_gpu = [*self.resident, *self.loading]
        assert self.gpu_tokens == sum(sched.store.get(r).num_tokens for r in on_gpu)
        held = sum(sched.blocks_for(sched.store.get(r).num_kv_tokens) for r in self.resident)
        assert self.held_blocks == held <= self.num_device_blocks, (self.held_blocks, held)
        grouped = [r for g in self.groups for r in g if r in self.resident]
        assert set(grouped) == set(self.resident), "a resident request in no group"
        assert len(grouped) == len(set(grouped)), "a request in two groups"
        for group in self.groups:
            members = [sched.store.get(r) for r in group if r in self.resident]
            if len(members) > 1:
                b = [
                    bucket_of(min(m.num_tokens, self.index.max_length), GROUP_SUB_BITS)
                    for m in members
                ]
                # lengths grow in lockstep (one token per round), so a group's bucket span
                # can exceed the bound it was formed with by at most one bucket boundary
                assert max(b) - min(b) <= self.config.max_band_buckets, (min(b), max(b))
