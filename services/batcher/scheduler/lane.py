"""One decoding device of the `aligned` policy: its resident requests, their length groups,
and the device blocks they hold.

A *lane* is a device that decodes: the decode GPU always, and the pair's prefill GPU while no
prompt waits (scheduler/aligned.py decides when). Requests whose KV is on the device are
*resident*; they are partitioned into contiguous length groups, and each step decodes one
group, round-robin, so every resident advances once per round and moving between groups costs
no copy. The partition minimises the round's cost under the decode kernel's cost model
(`partition_groups`): with a padded kernel every member costs as much as the group's longest,
so requests of very different lengths are split apart exactly when the padding they would
waste exceeds one more read of the weights; with a balanced kernel one group is best.

The lane counts its tokens and blocks exactly, as the worker allocates them
(worker/residency.py); pure Python over ints and lists.
"""

from __future__ import annotations

import bisect
import functools
import itertools

import numpy as np

from alignedserve.batcher.length_index import bucket_of, bucket_of_array
from alignedserve.batcher.request import Request, RequestState
from alignedserve.batcher.scheduler.config import SchedulerConfig
from alignedserve.batcher.scheduler.core import Scheduler

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
    cum_n = np.concatenate(([0], np.cumsum(counts)))  # [m + 1]
    # The cost of every candidate group of buckets i..l at once, a row per last bucket l (the
    # DP reads one row a step, i <= l only); costs are integers far below 2**53, so the float
    # sums below are exact. [m (last bucket l), m (first bucket i)]
    n = cum_n[1:, None] - cum_n[None, :-1]
    if padded:
        member_cost = n * ends[:, None]
    else:
        cum_s = np.concatenate(([0], np.cumsum(sums)))  # [m + 1]
        member_cost = cum_s[1:, None] - cum_s[None, :-1]
    # (a group of one bucket has n == counts[l], and every larger one has more)
    ok = (n <= np.maximum(counts, max_members)[:, None]) & (buckets[:, None] - buckets < max_span)
    ok &= n >= min(min_members, int(cum_n[m]))
    cost = np.where(ok, weight_tokens + member_cost, np.inf)
    best = np.empty(m + 1)  # best[j]: cost of buckets[:j]
    best[0] = 0.0
    start = [0]  # start[j]: where the last group of that best split starts
    # (a few numpy calls per bucket: they, not the rows' lengths, are what this costs)
    for last in range(1, m + 1):
        total = best[:last] + cost[last - 1, :last]  # [last]
        first = total.argmin()
        best[last] = total[first]
        start.append(first)
    if not np.isfinite(best[m]):  # only a minimum the span bound cannot meet leaves this
        return partition_groups(
            buckets, counts, ends, sums, weight_tokens, padded, max_members, max_span
        )
    starts, j = [], m
    while j > 0:
        starts.append(int(start[j]))
        j = starts[-1]
    return starts[::-1]


@functools.cache
def _group_buckets(max_length: int) -> np.ndarray:
    """The group bucket of every length up to max_length, so that a regroup looks its
    residents' up in one call rather than bucket_of_array's dozen; in the smallest type that
    holds them (bytes below 2**32 tokens): small to look up in. [max_length + 1]"""
    buckets = bucket_of_array(np.arange(max_length + 1), GROUP_SUB_BITS)
    return buckets.astype(np.min_scalar_type(buckets[-1]))


class Lane:
    def __init__(self, config: SchedulerConfig, num_device_blocks: int, max_length: int, name: str):
        self.config = config
        self.name = name  # for messages: "decode device", "prefill device"
        self.max_length = max_length  # lengths are bucketed up to this (the pool's index)
        # on the device, in load order, with each one's length (num_tokens), kept exact: a
        # regroup reads every resident's, and reading them from the requests touches a few
        # scattered objects each (most of a regroup's time among 100k pooled)
        self.resident: dict[str, int] = {}
        self.undecoded: set[str] = set()  # resident, no token decoded since it landed
        # resident, its KV maybe still copying in (the worker copies at the step that lands
        # it, beside the steps; `on_copied` once an answer says it landed): left out of the
        # steps while others decode, so that no step waits for a load
        self.copying: set[str] = set()
        self.loading: list[str] = []  # streaming in (PREFETCHING)
        self.loading_done = False
        self.groups: list[list[str]] = []  # the residents, each in one group
        self.group_of: dict[str, int] = {}  # resident -> its group
        # per group, its shortest and longest member: lengths grow in lockstep, so groups stay
        # ordered by length and these two stay its ends until one of them leaves
        self.group_ends: list[tuple[str, str]] = []
        self.next_group = 0
        self.steps_since_regroup = 0
        self.churn = 0  # members joined or left since the last full regroup
        self.num_device_blocks = num_device_blocks
        kv_tokens = num_device_blocks * config.block_tokens
        self.kv_budget = int(kv_tokens * config.max_resident_kv_fraction)
        self.gpu_tokens = 0  # KV tokens of resident + loading requests, kept exact
        self.member_tokens = config.weight_kv_tokens // config.ridge_flops_per_byte
        self.held_blocks = 0  # device blocks the residents' KV fills, kept exact

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.resident or request_id in self.loading

    # ---- room --------------------------------------------------------------------------
    def need_tokens(self, r: Request) -> int:
        return r.num_tokens + self.config.growth_tokens

    def step_tokens(self) -> int:
        """What a step over all its members reads beyond the weights, in KV tokens: their KV,
        and their projections' FLOPs at the GPU's ridge (`member_tokens` each)."""
        return self.gpu_tokens + (len(self.resident) + len(self.loading)) * self.member_tokens

    def free_tokens(self) -> int:
        members = len(self.resident) + len(self.loading)
        return self.kv_budget - self.gpu_tokens - members * self.config.growth_tokens

    # ---- membership --------------------------------------------------------------------
    def start_loading(self, sched: Scheduler, request_id: str) -> None:
        self.loading.append(request_id)
        self.loading_done = False
        self.gpu_tokens += sched.store.get(request_id).num_tokens

    def land(self, sched: Scheduler, free_blocks: int) -> list[str]:
        """The streaming-in requests become resident, if their blocks (and each one's first
        decoded token) fit the device beside a block of growth per resident; else they wait."""
        blocks = [sched.blocks_for(sched.store.get(r).num_tokens) for r in self.loading]
        if sum(blocks) > free_blocks - len(self.resident):
            return []
        landed = self.loading
        for request_id in landed:
            request = sched.store.get(request_id)
            sched.store.transition(request, S.RUNNING)
            self.resident[request_id] = request.num_tokens
            self.undecoded.add(request_id)
            self.copying.add(request_id)
            self.held_blocks += sched.blocks_for(request.num_kv_tokens)
        self.loading, self.loading_done = [], False
        return landed

    def unload(self, sched: Scheduler) -> list[str]:
        """Stop streaming in: the requests loading go back (nothing of them is on the device
        yet: the worker copies a request's KV at the step that lands it)."""
        gone, self.loading, self.loading_done = self.loading, [], False
        for request_id in gone:
            self.gpu_tokens -= sched.store.get(request_id).num_tokens
        return gone

    def leave(self, sched: Scheduler, request_id: str) -> None:
        """A resident leaves the device (its blocks are freed at the end of this step)."""
        del self.resident[request_id]
        self._drop(request_id)
        self.undecoded.discard(request_id)
        self.copying.discard(request_id)
        request = sched.store.get(request_id)
        self.gpu_tokens -= request.num_tokens
        self.held_blocks -= sched.blocks_for(request.num_kv_tokens)
        self.churn += 1

    def on_token(self, request: Request) -> None:
        request_id = request.request_id
        self.gpu_tokens += 1
        self.resident[request_id] = length = request.num_tokens  # (its new token included)
        self.undecoded.discard(request_id)
        # the decode wrote the KV of token kv - 1, where kv = length - 1 (a token was just
        # sampled): a new device block if it starts one
        self.held_blocks += (length - 2) % self.config.block_tokens == 0

    def on_done(self, sched: Scheduler, request: Request) -> None:
        """A resident or loading request ended (at the length it counted)."""
        rid = request.request_id
        self.gpu_tokens -= request.num_tokens
        self.churn += 1
        if rid in self.resident:
            self.held_blocks -= sched.blocks_for(request.num_kv_tokens)
            del self.resident[rid]
            self._drop(rid)
        self.undecoded.discard(rid)
        self.copying.discard(rid)
        if rid in self.loading:
            self.loading.remove(rid)
            if not self.loading:
                self.loading_done = False

    # ---- the step's group --------------------------------------------------------------
    def next_decode(
        self, sched: Scheduler, landed: list[str], free: int, may_wait: bool = True
    ) -> tuple[list[str], int, list[str]]:
        """The group this step decodes: the members the device has room for (a member whose
        next token starts a block needs one more), the blocks left, and the members that
        leave for the pool so that those left out find room next step (without that, a
        device full of members that all need a block would stall). A member alone on the
        device always fits (admission). Leavers drop out of their groups and joiners slot
        into one; lengths grow in lockstep, so the partition stays sound until
        membership has changed by a quarter. Members whose KV is still copying in sit the
        step out; if the whole group is, it waits for their copies only if `may_wait` (the
        step's answer waits for every device's pass: no other device has one ready)."""
        self.steps_since_regroup += 1
        self.churn += len(landed)
        landed = [r for r in landed if r in self.resident]  # (some may have left already)
        if (
            not self.groups
            or self.churn * 4 > len(self.resident)
            or self.steps_since_regroup >= self.config.regroup_steps
        ):
            self.regroup()
        elif landed:
            self._insert(landed)
        group = self._next_group(may_wait)
        copying = self.copying
        ready = [r for r in group if r not in copying] if copying else group
        decode, short = [], []
        length, block_tokens = self.resident, self.config.block_tokens
        for request_id in ready or group:  # (all copying: only if it may wait)
            # its next token starts a block when its written KV (all but its last token)
            # fills whole blocks
            grow = (length[request_id] - 1) % block_tokens == 0
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
            need -= 1 + sched.blocks_for(length[request_id] - 1)
        for request_id in make_room:
            self.leave(sched, request_id)
        return decode, free, make_room

    def regroup(self) -> None:
        if not self.resident:
            self.groups, self.group_of, self.group_ends, self.next_group = [], {}, [], 0
            return
        # Few array calls, over n residents or m buckets: among 100k pooled requests this runs
        # with cold caches, where each call costs several times what it does warm.
        n = len(self.resident)
        ids = np.fromiter(self.resident, object, n)  # [n]
        lengths = np.fromiter(self.resident.values(), np.int64, n)  # [n]
        buckets = _group_buckets(self.max_length)[np.minimum(lengths, self.max_length)]  # [n]
        order = np.argsort(lengths, kind="stable")  # [n] by length (so by bucket), then load order
        per_bucket = np.bincount(buckets)  # [highest bucket + 1] members in each
        occupied = np.flatnonzero(per_bucket)  # [m]
        counts = per_bucket[occupied]  # [m]
        first = np.cumsum(counts) - counts  # [m] where each bucket's members start in `order`
        by_order = lengths[order]  # [n]
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
        ranked = ids[order].tolist()
        cuts = [*first[starts].tolist(), n]  # member positions in `ranked`
        self.groups = [ranked[a:b] for a, b in itertools.pairwise(cuts)]
        self.group_of = {r: g for g, group in enumerate(self.groups) for r in group}
        self.group_ends = [(g[0], g[-1]) for g in self.groups]  # members sorted by length
        self.next_group %= len(self.groups)
        self.steps_since_regroup = self.churn = 0

    def group_range(self, g: int) -> tuple[int, int]:
        """Current (shortest, longest) length in group g; (0, 0) when it has none left."""
        if not self.groups[g]:
            return (0, 0)
        lo_id, hi_id = self.group_ends[g]
        return self.resident[lo_id], self.resident[hi_id]

    def _drop(self, request_id: str) -> None:
        """A resident leaves its group (and, if it was one of its ends, they are found again).
        One that landed this step and leaves before the step's group is chosen has none."""
        g = self.group_of.pop(request_id, None)
        if g is None:
            return
        members = self.groups[g]
        members.remove(request_id)
        if members and request_id in self.group_ends[g]:
            length = self.resident.__getitem__
            self.group_ends[g] = (min(members, key=length), max(members, key=length))

    def _insert(self, request_ids) -> None:
        """Place newly resident requests into the group whose length range holds them (the
        next full regroup re-optimises); one that would stretch a group past
        max_band_buckets triggers that regroup now instead."""
        for request_id in request_ids:
            length = self.resident[request_id]
            ranges = [self.group_range(g) for g in range(len(self.groups))]
            g = max(0, bisect.bisect_right([lo for lo, _ in ranges], length) - 1)
            lo, hi = ranges[g]
            lo_id, hi_id = self.group_ends[g]
            if not self.groups[g] or length < lo:
                lo, lo_id = length, request_id
            if length > hi:
                hi, hi_id = length, request_id
            cap = self.max_length
            span = bucket_of(min(hi, cap), GROUP_SUB_BITS) - bucket_of(min(lo, cap), GROUP_SUB_BITS)
            if span >= self.config.max_band_buckets:
                self.regroup()  # places every resident request, these included
                return
            self.group_ends[g] = (lo_id, hi_id)
            self.groups[g].append(request_id)
            self.group_of[request_id] = g

    def _next_group(self, may_wait: bool) -> list[str]:
        """Round-robin over groups, skipping those every member has left, and those whose
        members are all still copying in while a group has one ready. With none ready: the
        first of them if the step may wait for its copies, else none (and that group keeps
        its turn)."""
        first_copying = None
        for _ in range(len(self.groups)):
            g = self.next_group
            self.next_group = (g + 1) % len(self.groups)
            group = self.groups[g]
            if group and not self.copying.issuperset(group):  # (one is ready)
                return list(group)
            if group and first_copying is None:
                first_copying = g
        if first_copying is None:
            return []
        if not may_wait:
            self.next_group = first_copying
            return []
        self.next_group = (first_copying + 1) % len(self.groups)
        return list(self.groups[first_copying])

    # ---- checks ------------------------------------------------------------------------
    def check_invariants(self, sched: Scheduler) -> None:
        assert set(self.resident) >= self.undecoded
        assert set(self.resident) >= self.copying
        for request_id, length in self.resident.items():
            assert length == sched.store.get(request_id).num_tokens, (request_id, length)
        on_gpu = [*self.resident, *self.loading]
        assert self.gpu_tokens == sum(sched.store.get(r).num_tokens for r in on_gpu), self.name
        held = sum(sched.blocks_for(sched.store.get(r).num_kv_tokens) for r in self.resident)
        assert self.held_blocks == held <= self.num_device_blocks, (self.name, self.held_blocks)
        grouped = [r for g in self.groups for r in g]
        assert set(grouped) == set(self.resident), (
            "a resident request in no group, or a leaver in one"
        )
        assert len(grouped) == len(set(grouped)), "a request in two groups"
        assert self.group_of == {r: g for g, group in enumerate(self.groups) for r in group}
        for g, group in enumerate(self.groups):
            assert not group or set(self.group_ends[g]) <= set(group), "a group's end left it"
            members = [sched.store.get(r) for r in group]
            if len(members) > 1:
                b = [bucket_of(min(m.num_tokens, self.max_length), GROUP_SUB_BITS) for m in members]
                # lengths grow in lockstep (one token per round), so a group's bucket span
                # can exceed the bound it was formed with by at most one bucket boundary
                assert max(b) - min(b) <= self.config.max_band_buckets, (min(b), max(b))
