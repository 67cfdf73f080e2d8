"""`aligned`: decode together only requests of about the same KV length.

Each decoding device is a *lane* (scheduler/lane.py): its resident requests, partitioned into
length groups decoded round-robin, one group per step. The decode GPU is always a lane. The
pair's prefill GPU becomes one too (`num_prefill_decode_blocks`) while no prompt waits: then
both GPUs decode, each its own residents, in the same step. When prompts wait again it goes
back to prefill at once: its residents return to the pool (they write back only new KV),
where the decode GPU may take them. So on a prompt-heavy load the second GPU prefills, and in
the decode-heavy tail (or a lull) it doubles the KV read bandwidth instead of idling.

The CPU pool holds the rest (its index by length finds partners). Each step, top to bottom:
1. prefill waiting requests on the prefetch GPU, whose KV lands in the pool: there, one
   batch of chunks runs across decode steps, never holding one up; and on the decode GPU
   too when prefill is what keeps its batch small: alone on one GPU, a chunk in its step
   while nothing waits in the pool; beside a prefill device, in turns of a full batch
   while a backlog waits, within a share of its time (scheduler/turns.py); admitting at
   most `max_inflight` past prefill;
2. requests that finished streaming in become resident on their lane;
3. a pooled request waiting past `starvation_s` while the decode GPU is full makes room by
   sending its longest-resident requests back to the pool (they write back only new KV);
   while the prefill GPU decodes, the lane whose step costs more sends the other its longest
   requests until the two steps cost about the same;
4. pooled requests that fit a lane's KV budget start streaming in, the lane with the
   least KV first: the starving first; then those whose lengths fall inside one of the
   lane's groups (they cost one member, not a new group), then the longest waiting; with
   `load_order="shortest-first"` (the default) that order sorted by the max_tokens their
   clients set, stably (a wait in the pool weighs most on a short request's time per
   output token, and its room on the device frees soonest; equal caps keep the order);
5. each lane decodes its next group.

The KV budget above (`max_resident_kv_fraction`, `growth_tokens`) is a soft target in
tokens. The hard bound is each device's blocks, counted as the worker allocates them
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

import math
from dataclasses import replace

from alignedserve.batcher.length_index import MAX_LENGTH
from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.core import Scheduler
from alignedserve.batcher.scheduler.lane import GROUP_SUB_BITS, Lane, partition_groups
from alignedserve.batcher.scheduler.plan import BatchPlan
from alignedserve.batcher.scheduler.pool import Pool

S = RequestState
__all__ = ["GROUP_SUB_BITS", "AlignedPolicy", "declared_output_tokens", "partition_groups"]


def declared_output_tokens(request: Request) -> float:
    """How long its client said the output may run (max_tokens); a max_tokens the router
    filled in (`is_default_max_tokens`) is a cap, not the client's word: it ranks last."""
    return math.inf if request.params.is_default_max_tokens else request.params.max_tokens


class AlignedPolicy:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        by_declared = config.load_order == "shortest-first"
        self.pooled = Pool(declared_output_tokens if by_declared else None)
        device_blocks = config.gpu_kv_tokens // config.block_tokens
        self.decode_lane = Lane(config, device_blocks, MAX_LENGTH, "decode device")
        # the prefill device's residents, while it decodes (only with a prefill device)
        self.prefill_lane = (
            Lane(config, config.num_prefill_decode_blocks, MAX_LENGTH, "prefill device")
            if config.num_prefill_decode_blocks and config.num_prefill_device_blocks
            else None
        )
        self.lanes = [lane for lane in (self.decode_lane, self.prefill_lane) if lane is not None]
        self.lane_of: dict[str, Lane] = {}  # resident and loading requests' lanes
        self._quiet_since_s: float | None = None  # since when no prompt has waited

    @property
    def held_blocks(self) -> int:
        """Device blocks the residents fill, on every decoding device."""
        return sum(lane.held_blocks for lane in self.lanes)

    @property
    def num_device_blocks(self) -> int:
        return sum(lane.num_device_blocks for lane in self.lanes)

    # ---- the step ----------------------------------------------------------------------
    def schedule(self, sched: Scheduler, now: float, prefill_budget: int) -> BatchPlan:
        # device blocks this step may take, per lane
        free = {lane: lane.num_device_blocks - lane.held_blocks for lane in self.lanes}
        landed: dict[Lane, list[str]] = {lane: [] for lane in self.lanes}
        for lane in self.lanes:
            if lane.loading and (lane.loading_done or not lane.resident):
                landed[lane] = lane.land(sched, free[lane])
        starving = self._evict_for_starving(sched, now)
        second_decodes = self._prefill_lane_decodes(sched, now)
        on_prefill_device: set[str] = set()
        evict = list(starving)
        if self.prefill_lane is not None and second_decodes:
            source, moved = self._balance(sched, now)
            evict += moved
            if source is self.prefill_lane:
                on_prefill_device.update(moved)
        elif self.prefill_lane is not None:
            left = self._close_prefill_lane(sched, now)
            evict += left
            on_prefill_device.update(left)
        prefetch: list[str] = []
        for lane in sorted(self.lanes, key=Lane.step_tokens):
            if lane.loading or (lane is self.prefill_lane and not second_decodes):
                continue
            picked = self._start_loading(sched, lane, now, set(evict))
            prefetch += picked
            if picked and not lane.resident and not landed[lane]:
                # nothing to overlap with: wait for it
                landed[lane] = lane.land(sched, free[lane])
        decode: list[str] = []
        for lane in self.lanes:
            loads = landed[lane]
            free[lane] -= sum(sched.blocks_for(sched.store.get(r).num_kv_tokens) for r in loads)
            # a pass waiting for copies holds up the step's answer: only if no device has
            # a member ready
            may_wait = not any(
                r not in o.copying for o in self.lanes if o is not lane for r in o.resident
            )
            members, free[lane], make_room = lane.next_decode(sched, loads, free[lane], may_wait)
            for request_id in make_room:  # (they left the lane)
                del self.lane_of[request_id]
                self._to_pool(sched, sched.store.get(request_id), now)
            evict += make_room
            decode += members
            if lane is self.prefill_lane:
                on_prefill_device.update(loads, members, make_room)
        # On a prefill device the chunks take its staging blocks, one batch at a time (each
        # runs across decode steps; the next is queued behind it); else they take the decode
        # device's blocks, in its step.
        staging = self.config.num_prefill_device_blocks
        prefill = ()
        if sched.can_queue_prefill:
            room = self._admit_room()
            free_decode = free[self.decode_lane]
            prefill = sched.plan_prefill(
                prefill_budget,
                room,
                device_blocks=staging or free_decode,
                whole_prompts=self.config.prefill_whole_prompts and bool(staging),
            )
        if not staging:
            free[self.decode_lane] -= sched.prefill_device_blocks(prefill)
        plan = BatchPlan(
            prefill=prefill,
            decode=tuple(decode),
            load=tuple(r for lane in self.lanes for r in landed[lane]),
            evict=tuple(evict),
            prefetch=tuple(prefetch),
            is_switch=bool(starving),
            on_prefill_device=frozenset(on_prefill_device),
        )
        return self._with_decode_prefill(sched, plan, free[self.decode_lane])

    def _admit_room(self) -> int:
        inflight = len(self.pooled) + len(self.lane_of)
        return max(0, self.config.max_inflight - inflight)

    # ---- the prefill device's role -------------------------------------------------------
    def _prefill_lane_decodes(self, sched: Scheduler, now: float) -> bool:
        """Does the prefill device decode this step? Only while no prompt waits (a prefill
        batch on it would hold up its decode step, and with it the decode device's answer),
        and once none has waited for `prefill_lane_quiet_s`: under a steady trickle of
        prompts the lane would open between two and close at the next, and each close sends
        its residents back through the pool (2x the p99 TPOT at moderate load, simulated)."""
        if self.prefill_lane is None:
            return False
        if sched.waiting or sched.prefilling:
            self._quiet_since_s = None
            return False
        if self._quiet_since_s is None:
            self._quiet_since_s = now
        return now - self._quiet_since_s >= self.config.prefill_lane_quiet_s

    def _close_prefill_lane(self, sched: Scheduler, now: float) -> list[str]:
        """Prompts wait: the prefill device goes back to prefill. Its residents leave for the
        pool (they write back only their new KV) and what was streaming in stays there."""
        lane = self.prefill_lane
        streaming = lane.unload(sched)
        for request_id in streaming:
            del self.lane_of[request_id]
        self._back_to_pool(sched, streaming, now)
        leaving = list(lane.resident)
        self._send_to_pool(sched, leaving, now)
        return leaving

    def _balance(self, sched: Scheduler, now: float) -> tuple[Lane | None, list[str]]:
        """While the prefill device decodes and the pool has nothing to load: if one lane's
        step costs much more than the other's (by more than a quarter of a read of the
        weights, in KV tokens: `Lane.step_tokens`, members' KV and projections), it sends its
        residents to the pool, the longest first, until about half the gap has gone. It
        skips those the other lane has no room for and those that would leave the gap about
        as wide the other way, and moves nothing unless the gap shrinks by the threshold.
        The other lane, now the one with less, takes them next.
        The two steps run side by side, so the gap is what the dearer lane's step costs
        beyond the other's. Both ways: the decode device fills the prefill device once the
        prompts are done, and takes residents back as the prefill device's outlast its own
        (the longest went there). Members count, not only KV: 160 short residents against 80
        took 1.4x the step time of 120 and 120 (2xH200, fixed-128-2048, fourteenth
        session). Returns the lane they leave and the requests."""
        if any(lane.loading for lane in self.lanes) or self.pooled:
            return None, []
        dear, cheap = sorted(self.lanes, key=Lane.step_tokens, reverse=True)
        gap, threshold = dear.step_tokens() - cheap.step_tokens(), self.config.weight_kv_tokens / 4
        if gap <= threshold:
            return None, []
        movable = [r for r in dear.resident if r not in dear.undecoded]
        movable.sort(key=lambda r: sched.store.get(r).num_tokens, reverse=True)
        moved, room, leaving = 0, cheap.free_tokens(), []
        for request_id in movable:
            if moved * 2 >= gap:
                break
            request = sched.store.get(request_id)
            need, cost = cheap.need_tokens(request), request.num_tokens + dear.member_tokens
            if need > room or 2 * (gap - moved - cost) < threshold:
                continue  # no room there, or the gap would not shrink by the threshold
            leaving.append(request_id)
            moved += cost
            room -= need
        if gap - abs(gap - 2 * moved) < threshold:
            return None, []  # (only requests that fit made it, and too few)
        self._send_to_pool(sched, leaving, now)
        return dear, leaving

    # ---- the decode GPU's own prefill ----------------------------------------------------
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
            idle = not (self.lane_of or self.pooled)
            if not (
                sched.prefill_share.may_take(decodes=bool(plan.decode))
                and sched.has_unplanned_tokens(1 if idle else budget, after=plan.prefill)
                and self._pool_fits_device(sched)
            ):
                return plan
        else:
            if self.pooled or self.decode_lane.free_tokens() <= 0:
                return plan
            budget = self.config.assist_tokens_per_step
        room = self._admit_room() - len(plan.prefill)
        mixed = sched.plan_prefill(budget, room, after=plan.prefill, device_blocks=free_blocks)
        return replace(plan, mixed_prefill=mixed)

    def _pool_fits_device(self, sched: Scheduler) -> bool:
        """Would every pooled request fit the decode GPU's KV budget beside the residents,
        with room to spare? Then prefill, not the GPU's room, is what keeps its batch small."""
        free = self.decode_lane.free_tokens()
        for request_id in self.pooled:
            free -= self.decode_lane.need_tokens(sched.store.get(request_id))
            if free <= 0:
                return False
        return free > 0

    # ---- residency ---------------------------------------------------------------------
    def _start_loading(
        self, sched: Scheduler, lane: Lane, now: float, evicted: set[str]
    ) -> list[str]:
        free = lane.free_tokens()
        if not self.pooled or (free <= self.config.growth_tokens and lane.resident):
            return []  # not even the shortest request could fit
        room = self.config.max_batch_size * 4 - len(lane.resident)
        # the hard bound: blocks the picks take when they land (first token included),
        # beside a block of growth per resident; the evicted leave before that
        free_blocks = lane.num_device_blocks - lane.held_blocks - len(lane.resident)
        picked: list[str] = []
        for request_id in self._candidates(sched, lane, now):
            if len(picked) >= room:
                break
            if request_id in evicted:
                continue  # it leaves a device this step: not straight back
            request = sched.store.get(request_id)
            if sched.max_blocks_of(request) > lane.num_device_blocks:
                continue  # it could outgrow this device (admission only bounds the first)
            need = lane.need_tokens(request)
            blocks = sched.blocks_for(request.num_tokens)
            if need > free or blocks > free_blocks:
                if picked or lane.resident:
                    break  # keep the load order: no skipping to smaller ones
                need = free  # an empty device takes even an oversized request
            free -= need
            free_blocks -= blocks
            picked.append(request_id)
        for request_id in picked:
            self._from_pool(sched, request_id, now)
            lane.start_loading(sched, request_id)
            self.lane_of[request_id] = lane
        return picked

    def _candidates(self, sched: Scheduler, lane: Lane, now: float):
        """Pooled requests in load order: starving ones, oldest first; then the pool's load
        order (scheduler/pool.py): by `declared_output_tokens` with "shortest-first" (one
        class with "fit-groups"), in each class those whose lengths fall inside one of the
        lane's groups, then the oldest."""
        seen: set[str] = set()
        for request_id in self.pooled:
            if not self._is_starving(sched.store.get(request_id), now):
                break
            seen.add(request_id)
            yield request_id
        groups = (lane.group_range(g) for g, group in enumerate(lane.groups) if group)
        yield from self.pooled.load_order(groups, seen)

    def _leave(self, sched: Scheduler, request_id: str) -> None:
        self.lane_of.pop(request_id).leave(sched, request_id)

    def _send_to_pool(self, sched: Scheduler, request_ids: list[str], now: float) -> None:
        """Residents leave their lanes for the pool (they write back only their new KV)."""
        for request_id in request_ids:
            self._leave(sched, request_id)
            self._to_pool(sched, sched.store.get(request_id), now)

    def _is_starving(self, request: Request, now: float) -> bool:
        """Pooled for longer than `starvation_s`."""
        return now - request.pooled_since_s > self.config.starvation_s

    def _evict_for_starving(self, sched: Scheduler, now: float) -> list[str]:
        lane = self.decode_lane
        if not self.pooled or lane.loading:
            return []
        oldest = sched.store.get(next(iter(self.pooled)))
        if not self._is_starving(oldest, now):
            return []
        short = lane.need_tokens(oldest) - lane.free_tokens()
        evict: list[str] = []
        for request_id in lane.resident:  # longest-resident first: they had their turn
            if short <= 0:
                break
            if request_id in lane.undecoded:
                continue  # not yet: sent back before its turn, it could starve in turn
            evict.append(request_id)
            short -= lane.need_tokens(sched.store.get(request_id))
        self._send_to_pool(sched, evict, now)
        return evict

    # ---- pool membership ---------------------------------------------------------------
    def _to_pool(self, sched: Scheduler, request: Request, now: float) -> None:
        sched.store.transition(request, S.POOLED)
        request.pooled_since_s = now
        self.pooled.add(request)

    def _back_to_pool(self, sched: Scheduler, request_ids: list[str], now: float) -> None:
        """Requests that were streaming in return to the pool, each as long waiting as
        before: in its place among the oldest (one re-sort for all of them)."""
        if not request_ids:
            return
        for request_id in request_ids:
            request = sched.store.get(request_id)
            since = request.pooled_since_s
            self._to_pool(sched, request, now)
            request.pooled_since_s = since
        since_of = {rid: sched.store.get(rid).pooled_since_s for rid in self.pooled}
        self.pooled.sort(since_of.__getitem__)

    def _from_pool(self, sched: Scheduler, request_id: str, now: float) -> None:
        self.pooled.remove(request_id)
        request = sched.store.get(request_id)
        request.max_pool_wait_s = max(request.max_pool_wait_s, now - request.pooled_since_s)
        sched.store.transition(request, S.PREFETCHING)

    # ---- Policy callbacks ----------------------------------------------------------------
    def on_prefetch_done(self) -> None:
        for lane in self.lanes:
            lane.loading_done = bool(lane.loading)

    def on_copied(self, request_ids) -> None:
        """These residents' loads have landed (an answer no longer lists them as copying)."""
        for lane in self.lanes:
            lane.copying.difference_update(request_ids)

    def on_token(self, request: Request) -> None:
        lane = self.lane_of.get(request.request_id)
        if lane is not None and request.request_id in lane.resident:
            lane.on_token(request)

    def on_prefilled(self, sched: Scheduler, request: Request, now: float) -> None:
        self._to_pool(sched, request, now)

    def on_done(self, sched: Scheduler, request: Request) -> None:
        rid = request.request_id
        if rid in self.pooled:
            self.pooled.remove(rid)
        lane = self.lane_of.pop(rid, None)
        if lane is not None:
            lane.on_done(sched, request)

    def forget(self, sched: Scheduler, request: Request) -> None:
        """Drop a request the policy tracked (its worker is gone), as if it had finished."""
        self.on_done(sched, request)

    def preempt_one(self, sched: Scheduler, now: float) -> Request | None:
        """CPU pool full: recompute the most recently pooled request, else the newest resident."""
        if self.pooled:
            request_id = self.pooled.newest()
            self.pooled.remove(request_id)
        else:
            resident = [r for r in self.lane_of if r in self.lane_of[r].resident]
            if not resident:
                return None
            request_id = resident[-1]
            self._leave(sched, request_id)
        victim = sched.store.get(request_id)
        sched.release_for_recompute(victim)
        return victim

    def check_invariants(self, sched: Scheduler) -> None:
        by_state: dict[RequestState, set[str]] = {s: set() for s in S}
        for r in sched.store:
            by_state[r.state].add(r.request_id)
        assert by_state[S.POOLED] == set(self.pooled)
        self.pooled.check_invariants()
        resident = [r for lane in self.lanes for r in lane.resident]
        loading = [r for lane in self.lanes for r in lane.loading]
        assert by_state[S.RUNNING] == set(resident) and len(resident) == len(set(resident))
        assert by_state[S.PREFETCHING] == set(loading) and len(loading) == len(set(loading))
        assert set(self.lane_of) == {*resident, *loading}
        for request_id, lane in self.lane_of.items():
            assert request_id in lane, (request_id, lane.name)
        for lane in self.lanes:
            lane.check_invariants(sched)
