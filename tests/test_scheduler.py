"""Both policies over random workloads, driven by the simulator with check_invariants() after
every step: no block leaked or owned twice, every request finishes, a running batch's length
spread stays within its band, and no request waits in the pool past the starvation bound."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignedserve.batcher.request import RequestState
from alignedserve.batcher.scheduler import QueueFullError, SchedulerConfig, make_scheduler
from alignedserve.batcher.scheduler.aligned import declared_output_tokens
from alignedserve.batcher.scheduler.lane import Lane
from alignedserve.batcher.sim.cost_model import LLAMA3_8B, CostModel
from alignedserve.batcher.sim.simulator import simulate_engine
from alignedserve.batcher.sim.workload import SimRequest
from alignedserve.common.sampling_params import SamplingParams

from factories import drive

COST = CostModel(LLAMA3_8B)

workloads = st.lists(
    st.tuples(
        st.floats(0, 0.5),  # arrival (s)
        st.integers(1, 600),  # prompt tokens
        st.integers(1, 60),  # output tokens
    ),
    min_size=1,
    max_size=60,
)


def make_config(policy: str, block_tokens: int, pool_blocks: int, starvation_s: float):
    return SchedulerConfig(
        policy=policy,
        block_tokens=block_tokens,
        num_pool_blocks=pool_blocks,
        gpu_kv_tokens=20_000,  # small: long requests make small batches
        max_batch_size=16,
        starvation_s=starvation_s,
        prefill_tokens_per_step=1024,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads,
    policy=st.sampled_from(["aligned", "fcfs"]),
    block_tokens=st.sampled_from([4, 16]),
    pool_factor=st.floats(0.6, 3.0),
    band_buckets=st.integers(1, 12),
)
def test_random_workloads_finish_without_leaks(
    workload, policy, block_tokens, pool_factor, band_buckets
):
    requests = [
        SimRequest(f"r{i}", arrival, prompt, out)
        for i, (arrival, prompt, out) in enumerate(workload)
    ]
    biggest = max(-(-(p + o) // block_tokens) for _, p, o in workload)
    total = sum(-(-(p + o) // block_tokens) for _, p, o in workload)
    pool = max(biggest, int(total * pool_factor))  # sometimes too small: forces preemption
    config = replace(
        make_config(policy, block_tokens, pool, starvation_s=0.2), max_band_buckets=band_buckets
    )
    stats = simulate_engine(requests, config, COST, check=True)  # checks the spread bound too
    assert stats.output_tokens == sum(o for _, _, o in workload)
    assert len(stats.ttft_s) == len(workload)
    assert min(stats.ttft_s) >= 0
    if policy == "aligned":
        # bound + the steps to prefetch and switch (each well under 0.1 s in this model)
        assert stats.max_pool_wait_s <= 0.2 + 0.5, stats.max_pool_wait_s


def test_starvation_bound_is_what_bounds_the_wait():
    """Eight long-running requests fill the GPU's KV; one that arrives later fits beside
    none of them. With a loose bound it waits in the pool until they finish (~2 s); with a
    tight one it gets in within the bound (plus the copy that makes room), and the resident
    sent to the pool for it comes back as fast."""
    hogs = [SimRequest(f"h{i}", 0.0, 1500 + 10 * i, 400) for i in range(8)]
    requests = [*hogs, SimRequest("late", 0.3, 1400, 20)]
    waits = {}
    for bound in (0.05, 1000.0):
        config = replace(
            make_config("aligned", 16, 100_000, bound),
            gpu_kv_tokens=16_000,
            max_batch_size=64,
            num_prefill_device_blocks=512,
        )
        waits[bound] = simulate_engine(requests, config, COST, check=True).max_pool_wait_s
    assert waits[0.05] < waits[1000.0] / 2, waits
    assert waits[0.05] <= 0.05 + 0.5, waits


@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_abort_frees_blocks_in_every_state(policy):
    config = make_config(policy, 4, 10_000, 0.2)
    sched = make_scheduler(config)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i in range(12):
        sched.add_request(f"r{i}", range(20 + 10 * i), params, now=0.0)
    now = 0.0
    for step in range(6):  # requests spread over waiting, pooled, prefetching, running
        plan = sched.schedule(now)
        now += 0.01
        tokens = dict.fromkeys(plan.decode, 0) | {rid: 0 for rid, _ in plan.all_prefill}
        sched.update(plan, tokens, now)
        if policy == "aligned" and step == 2:
            sched.policy.on_prefetch_done()
        sched.check_invariants()
    for r in list(sched.store):
        sched.abort(r.request_id, now)
        sched.check_invariants()
    assert sched.allocator.num_used == 0
    assert all(r.finish_reason == "abort" for r in sched.store)


def test_a_joiner_never_stretches_a_group_past_the_spread_bound():
    """40 short requests are resident in one group; a long one lands while the group is
    large enough that it is slotted in without a full regroup, unless that would break the
    bound: check_invariants (every step) asserts each group's bucket span."""
    shorts = [SimRequest(f"s{i}", 0.0, 100, 60) for i in range(40)]
    requests = [*shorts, SimRequest("long", 0.05, 2000, 5)]
    for band_buckets in (2, 113):
        config = replace(
            make_config("aligned", 16, 100_000, 5.0),
            gpu_kv_tokens=200_000,
            max_batch_size=64,
            max_band_buckets=band_buckets,
        )
        stats = simulate_engine(requests, config, COST, check=True)
        assert stats.output_tokens == 40 * 60 + 5


@pytest.mark.parametrize("policy", ["aligned", "fcfs"])
def test_full_pool_waits_or_rejects_as_configured(policy):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for mode in ("wait", "reject"):
        config = replace(make_config(policy, 4, 20, 0.2), pool_full=mode)
        sched = make_scheduler(config)
        sched.add_request("big", range(60), params, now=0.0)  # 15 of 20 blocks
        plan = sched.schedule(0.0)
        sched.update(plan, {rid: 0 for rid, _ in plan.all_prefill}, 0.01)
        if mode == "reject":
            with pytest.raises(QueueFullError, match="no room"):
                sched.add_request("next", range(40), params, now=0.01)
            assert "next" not in sched.store
        else:
            sched.add_request("next", range(40), params, now=0.01)  # queued, not prefilled
            plan = sched.schedule(0.01)
            assert "next" not in {rid for rid, _ in plan.all_prefill}
            assert list(sched.waiting) == ["next"]
        sched.check_invariants()


def test_the_prefill_devices_batches_run_across_steps_and_keep_an_aborted_requests_blocks():
    """With a prefill device, a planned chunk stays in flight until `prefill_done`: a second
    batch may queue behind it but no third, no request is planned twice, and an aborted
    request's pool blocks stay allocated (the device still writes into them) until its
    batch is done. (No decode-GPU turns here, the default: the prefill device alone.)"""
    config = replace(
        make_config("aligned", 16, 1000, 5.0),
        num_prefill_device_blocks=64,
        prefill_tokens_per_step=100,
    )
    sched = make_scheduler(config)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    sched.add_request("a", range(1, 101), params, now=0.0)
    plan = sched.schedule(0.0)
    assert plan.prefill == (("a", 100),) and sched.prefilling == {"a": 100}
    sched.add_request("b", range(1, 51), params, now=0.0)
    sched.add_request("c", range(1, 51), params, now=0.0)
    sched.add_request("d", range(1, 51), params, now=0.0)
    # b and c queue behind a; d waits (not admitted yet), a is not planned twice
    plan = sched.schedule(0.01)
    assert plan.prefill == (("b", 50), ("c", 50)) and plan.mixed_prefill == ()
    assert not sched.can_queue_prefill
    sched.update(plan, {}, now=0.01)
    a_blocks = set(sched.store.get("a").blocks)
    sched.abort("a", now=0.02)
    sched.store.pop("a")  # as the engine forgets it
    used = sched.allocator.num_used
    assert len(a_blocks) == 7 and used == 7 + 2 * 4  # a's 101 tokens, 51 of b and c: held
    sched.check_invariants()
    plan = sched.schedule(0.025)
    assert plan.prefill == ()  # two batches queued already
    sched.update(plan, {}, now=0.025)
    sched.prefill_done(["a"], {}, now=0.03)
    assert sched.prefilling == {"b": 50, "c": 50} and sched.allocator.num_used == 8
    sched.check_invariants()
    plan = sched.schedule(0.04)  # room for a batch again: d goes there
    assert plan.prefill == (("d", 50),)
    assert sched.allocator.num_used == 8 + 4  # d's 51 tokens beside b's and c's
    sched.update(plan, {}, now=0.04)
    sched.prefill_done(["b", "c"], {"b": 7, "c": 8}, now=0.05)
    sched.prefill_done(["d"], {"d": 9}, now=0.05)
    assert [sched.store.get(r).output_token_ids for r in "bcd"] == [[7], [8], [9]]
    assert sched.prefilling == {}
    sched.check_invariants()


def test_a_request_that_leaves_and_comes_back_is_in_one_group():
    """A resident sent to the pool and loaded again before its old group came round (when
    leavers dropped out of groups only then) was listed in two groups: decoded twice a
    round, or twice in one step; leavers now leave their group at once. A seeded workload
    where one comes back that fast (found by driving the scheduler as the engine does: a
    load lands at the step after the one that started it); check=True asserts each
    resident is in one group after every step."""
    rng = random.Random(11)
    workload = [(rng.uniform(0, 0.5), rng.randint(1, 600), rng.randint(1, 60)) for _ in range(40)]
    requests = [SimRequest(f"r{i}", a, p, o) for i, (a, p, o) in enumerate(workload)]
    pool = int(1.5 * sum(-(-(p + o) // 4) for _, p, o in workload))
    config = replace(make_config("aligned", 4, pool, starvation_s=0.2), max_band_buckets=2)
    stats = simulate_engine(requests, config, COST, check=True)
    assert stats.output_tokens == sum(o for _, _, o in workload)


def lane_sched(config: SchedulerConfig, lengths: dict[str, int]) -> SimpleNamespace:
    """What a Lane reads of its scheduler: requests of these lengths (tokens; KV one short),
    and the blocks a length takes."""
    requests = {
        rid: SimpleNamespace(request_id=rid, num_tokens=n, num_kv_tokens=n - 1)
        for rid, n in lengths.items()
    }
    store = SimpleNamespace(get=requests.__getitem__, transition=lambda request, state: None)
    return SimpleNamespace(store=store, blocks_for=lambda n: -(-n // config.block_tokens))


def land_on(lane: Lane, sched: SimpleNamespace, ids) -> list[str]:
    """Stream these requests onto the lane and land them, with the device's free blocks."""
    for request_id in ids:
        lane.start_loading(sched, request_id)
    return lane.land(sched, free_blocks=lane.num_device_blocks - lane.held_blocks)


def test_a_lane_drops_leavers_at_once_even_those_that_landed_this_step():
    """Leavers leave their group when they leave the device, so no step lists them. A
    request that landed this step and left before the step's group was chosen (the
    prefill device's lane closing as prompts arrive) is in no group yet: it must neither
    fail nor be placed in one, whether the step regroups or slots the newcomers in."""
    config = two_small_lanes(0.5)
    lane = Lane(config, num_device_blocks=1024, max_length=1 << 16, name="prefill device")
    lengths = [100 + i for i in range(14)] + [105, 106, 107]
    sched = lane_sched(config, {f"r{i}": n for i, n in enumerate(lengths)})

    def land(ids: list[str], leaving: str) -> list[str]:
        landed = land_on(lane, sched, ids)
        assert landed == ids
        lane.leave(sched, leaving)  # before next_decode places it
        decode, _, _ = lane.next_decode(sched, landed, free=512)
        lane.check_invariants(sched)
        assert leaving not in decode and leaving not in lane.group_of
        return decode

    land([f"r{i}" for i in range(14)], leaving="r13")  # the first step regroups
    assert lane.steps_since_regroup == 0 and len(lane.resident) == 13
    land(["r14", "r15"], leaving="r15")  # these slot into the groups
    assert lane.steps_since_regroup == 1 and "r14" in lane.group_of
    lane.leave(sched, "r0")  # a grouped resident: out of its group now
    assert "r0" not in [r for group in lane.groups for r in group]
    lane.check_invariants(sched)


def test_a_lane_leaves_requests_out_of_its_steps_while_their_copies_run():
    """A landed request's KV is copied in beside the steps: the lane decodes the others
    until the worker answers that its copies are done, and it alone waits for them."""
    config = two_small_lanes(0.5)
    lane = Lane(config, num_device_blocks=1024, max_length=1 << 16, name="decode device")
    sched = lane_sched(config, {f"r{i}": 100 + i for i in range(6)})

    first = land_on(lane, sched, ["r0", "r1", "r2", "r3"])
    decode, _, _ = lane.next_decode(sched, first, free=512, may_wait=False)
    assert decode == []  # another device has members ready: its answer must not wait
    decode, _, _ = lane.next_decode(sched, [], free=512)
    assert sorted(decode) == first  # nothing else to decode: they wait for their copies
    lane.copying.difference_update(first)  # (AlignedPolicy.on_copied)
    second = land_on(lane, sched, ["r4", "r5"])
    decode, _, _ = lane.next_decode(sched, second, free=512)
    assert sorted(decode) == first  # r4 and r5 copy beside this step
    lane.copying.discard("r4")
    decode, _, _ = lane.next_decode(sched, [], free=512)
    assert sorted(decode) == [*first, "r4"]
    lane.leave(sched, "r5")  # it leaves still copying
    assert not lane.copying
    lane.check_invariants(sched)


def two_small_lanes(quiet_s: float) -> SchedulerConfig:
    """Each device decodes about two requests of ~100 tokens; five prompts a prefill step."""
    return SchedulerConfig(
        policy="aligned",
        block_tokens=16,
        num_pool_blocks=4096,
        gpu_kv_tokens=1024,
        num_prefill_device_blocks=64,
        num_prefill_decode_blocks=64,
        prefill_lane_quiet_s=quiet_s,
        prefill_tokens_per_step=512,
    )


def lane_openings(quiet_s: float) -> list[tuple[float, bool]]:
    """A prompt every 0.2 s until 1.8 s, each 100 tokens with 400 to generate; the decode
    device holds two of them, the prefill device's lane as many. Driven as the engine drives
    the scheduler (10 ms decode steps, prefill batches of 50 ms); returns, per step, its
    time and whether the prefill device decoded in it."""
    sched = make_scheduler(two_small_lanes(quiet_s))
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    times: list[float] = []

    def arrivals(step: int, now: float) -> None:
        times.append(now)
        while len(sched.store) < 10 and 0.2 * len(sched.store) <= now + 1e-9:
            sched.add_request(f"r{len(sched.store)}", range(100), params, now)

    plans, _, _ = drive(sched, 500, turn_s=0.05, decode_s=0.01, arrivals=arrivals)
    return [
        (t, any(r in plan.on_prefill_device for r in plan.decode))
        for t, plan in zip(times, plans, strict=True)
    ]


def test_the_prefill_lane_opens_only_once_no_prompt_has_waited_for_a_while():
    """Under a trickle of prompts the prefill device's lane would open between two and
    close at the next, sending its residents back through the pool each time. With a quiet
    period it stays closed while they come, and opens that long after the last is in."""
    eager = lane_openings(0.0)
    assert any(there for t, there in eager if t < 1.8)  # it flaps with the trickle
    quiet = lane_openings(0.5)
    assert not any(there for t, there in quiet if t < 1.8)
    first = min(t for t, there in quiet if there)
    assert 1.85 + 0.5 <= first <= 1.85 + 0.5 + 0.1, first  # last prefilled at 1.85 s


def step_prefilling_at_once(sched, now: float):
    """One planned step answered at `now`: its prefill batch done at once, every decoded
    request given token 7. Returns the plan (the caller says when loads are done)."""
    plan = sched.schedule(now)
    if plan.prefill:
        ids = [rid for rid, _ in plan.prefill]
        sched.prefill_done(ids, dict.fromkeys(ids, 7), now)
    sched.update(plan, dict.fromkeys(plan.decode, 7), now)
    return plan


def test_a_closing_lane_sends_what_was_streaming_in_back_as_long_waiting_as_before():
    """The prefill device's lane closes (a prompt arrives) while a request is still streaming
    into it. That request goes back to the pool keeping its wait so far, in its place among
    the oldest; the lane's residents follow, as newly pooled. The pool stays oldest first."""
    sched = make_scheduler(two_small_lanes(0.0))  # prompts pooled over several steps
    policy, lane = sched.policy, sched.policy.prefill_lane
    for i in range(12):  # every other one finishes soon, one at a time, making room
        tokens = 3 + i if i % 2 == 0 else 400
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        sched.add_request(f"r{i}", range(100), params, now=0.0)
    now = 0.0
    for _ in range(40):
        plan = step_prefilling_at_once(sched, now)  # the pool fills over the first steps
        now += 0.01
        if lane.loading and lane.resident:
            break  # a load into the lane is in flight (its on_prefetch_done not yet come)
        if plan.prefetch:
            sched.policy.on_prefetch_done()
    assert lane.loading and lane.resident, "no load in flight to a lane with residents"
    streaming, residents = list(lane.loading), list(lane.resident)
    waited_since = {rid: sched.store.get(rid).pooled_since_s for rid in streaming}
    sched.add_request("late", range(100), SamplingParams(max_tokens=5), now=now)
    sched.schedule(now)
    for rid in streaming:
        request = sched.store.get(rid)
        assert request.state is RequestState.POOLED
        assert request.pooled_since_s == waited_since[rid] < now
    for rid in residents:
        assert sched.store.get(rid).pooled_since_s == now
    since = [sched.store.get(rid).pooled_since_s for rid in policy.pooled]
    assert since == sorted(since), list(zip(policy.pooled, since, strict=True))
    assert set(streaming) | set(residents) <= set(policy.pooled)
    policy.check_invariants(sched)


def test_a_members_cost_follows_the_gpus_ridge():
    """One more member costs its projections' FLOPs: weight bytes / ridge KV tokens of
    reading. A GPU with half the ridge (matmul cheap against HBM reads) makes it twice as
    much; the scheduler's step estimate carries it for each member."""
    base = SchedulerConfig(policy="aligned", weight_kv_tokens=122_000, kernel_cost="balanced")
    for ridge, want in ((190, 642), (95, 1284)):
        sched = make_scheduler(replace(base, ridge_flops_per_byte=ridge))
        lane = sched.policy.decode_lane
        assert lane.member_tokens == want
        lane.resident.update(dict.fromkeys(["a", "b", "c"]))
        assert lane.step_tokens() == 3 * want  # no KV held: the members' share alone


def two_balanced_lanes(num_pool_blocks: int, gpu_kv_tokens: int) -> SchedulerConfig:
    """Both devices decode (the prefill device's lane opens once no prompt waits) on a
    balanced kernel, with Llama-3-8B's weight in KV tokens (122k: ~640 per member)."""
    return SchedulerConfig(
        policy="aligned",
        block_tokens=16,
        num_pool_blocks=num_pool_blocks,
        gpu_kv_tokens=gpu_kv_tokens,
        num_prefill_device_blocks=1024,
        num_prefill_decode_blocks=4096,
        prefill_lane_quiet_s=0.0,
        prefill_tokens_per_step=8192,
        kernel_cost="balanced",
    )


def test_the_lanes_balance_by_members_as_well_as_kv():
    """64 short requests, all landed on the decode device before the prefill device's lane
    opens. Their KV is small beside a read of the weights (64 x ~60 tokens against 122k),
    but each member's share of the projections costs ~640 KV tokens (lane.member_tokens):
    the decode device sends the prefill device about half of them, so the two steps that
    run side by side take about the same time."""
    sched = make_scheduler(two_balanced_lanes(num_pool_blocks=8192, gpu_kv_tokens=64 * 1024))
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    for i in range(64):
        sched.add_request(f"r{i}", range(32), params, now=0.0)
    drive(sched, 60, turn_s=0.05, decode_s=0.01)
    main, second = sched.policy.decode_lane, sched.policy.prefill_lane
    assert len(main.resident) + len(second.resident) == 64
    assert abs(len(main.resident) - len(second.resident)) <= 8, (
        len(main.resident),
        len(second.resident),
    )


def test_the_prefill_lane_sends_residents_back_when_its_own_outlast_the_decode_lanes():
    """The decode device sends its longest residents to the prefill device, until the two
    steps cost about the same (64 short members weigh as much as 14 long ones: each
    member's projections cost ~640 KV tokens). When the long ones are also the last to
    finish, the decode device ran nearly dry while the prefill device's step set the pace
    (3 against 13 here before; served OPT-13B in the thirty-first session). Balance now runs
    both ways: the lane whose step costs more sends residents to the other. A move must
    shrink the gap by the threshold, so a lone request is never sent to and fro."""
    sched = make_scheduler(two_balanced_lanes(num_pool_blocks=16384, gpu_kv_tokens=128 * 1024))
    for i in range(16):  # long prompts with many tokens to go, one of them more than the rest
        params = SamplingParams(max_tokens=700 if i == 0 else 400)
        sched.add_request(f"long{i}", range(3000), params, now=0.0)
    for i in range(64):  # short ones, soon done
        sched.add_request(f"short{i}", range(40), SamplingParams(max_tokens=20), now=0.0)
    main, second = sched.policy.decode_lane, sched.policy.prefill_lane
    at_300: list[list[str]] = []

    def look(step: int, now: float) -> None:
        if step == 300:
            at_300.extend([list(main.resident), list(second.resident)])

    plans, _, _ = drive(sched, 1000, turn_s=0.05, decode_s=0.01, arrivals=look)
    assert all(r.state == RequestState.FINISHED for r in sched.store)
    on_main, on_second = at_300
    assert sorted(on_main + on_second) == sorted(f"long{i}" for i in range(16))
    assert abs(len(on_main) - len(on_second)) <= 3, at_300
    decoded_on: dict[str, list[bool]] = {}  # per request, on the prefill device at each step
    on_second: set[str] = set()  # the prefill device's residents, step by step
    for plan in plans:
        on_second.update(r for r in plan.load if r in plan.on_prefill_device)
        for rid in plan.evict:  # its write-backs go out from it: each eviction says so
            assert (rid in on_second) == (rid in plan.on_prefill_device), rid
            on_second.discard(rid)
        for rid in plan.decode:
            there = rid in plan.on_prefill_device
            decoded_on.setdefault(rid, []).append(there)
            if there:
                on_second.add(rid)
    went_back = [r for r, where in decoded_on.items() if True in where and not where[-1]]
    assert went_back and all(r.startswith("long") for r in went_back)
    moves = [r for plan in plans for r in plan.evict]  # there and back at most
    assert max(map(moves.count, set(moves))) <= 2, moves


def test_a_lone_resident_is_not_sent_to_and_fro():
    """One request whose step costs more than the threshold alone: moving it to the other
    lane leaves the gap as wide the other way, so it stays where it landed."""
    config = replace(two_small_lanes(0.0), kernel_cost="balanced", weight_kv_tokens=200)
    sched = make_scheduler(config)
    sched.add_request("r", range(300), SamplingParams(max_tokens=100), now=0.0)
    plans, _, _ = drive(sched, 300, turn_s=0.05, decode_s=0.01)
    assert sched.store.get("r").state == RequestState.FINISHED
    assert [plan.evict for plan in plans if plan.evict] == []


MAX_TOKENS = [20 + 10 * ((7 * i) % 12) for i in range(12)]  # no order by arrival


def pool_loads(load_order: str, params_of) -> tuple[list[tuple[str, ...]], list[dict]]:
    """The decode device holds two requests; twelve wait in the pool, in two length bands.
    Returns each step's loads, and before each step the pooled requests' declared lengths."""
    config = replace(two_small_lanes(0.0), num_prefill_decode_blocks=0, load_order=load_order)
    sched = make_scheduler(config)
    for i in range(12):
        sched.add_request(f"r{i}", range(100 if i % 2 else 40), params_of(i), now=0.0)
    seen: list[dict[str, float]] = []

    def record(step: int, now: float) -> None:
        pooled = map(sched.store.get, sched.policy.pooled)
        seen.append({r.request_id: declared_output_tokens(r) for r in pooled})

    plans, _, _ = drive(sched, 600, turn_s=0.05, decode_s=0.01, arrivals=record)
    assert all(r.state == RequestState.FINISHED for r in sched.store)
    loads = [plan.prefetch for plan in plans]
    assert {r for load in loads for r in load} == {f"r{i}" for i in range(12)}
    return loads, seen


def test_shortest_first_loads_by_the_max_tokens_clients_set():
    """Output lengths unrelated to arrival: "shortest-first" (the default) loads the pooled
    by max_tokens, shortest first (a wait in the pool weighs most on a short request's time
    per output token); "fit-groups" takes those that fit a resident group, then the oldest."""
    assert SchedulerConfig().load_order == "shortest-first"

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True)

    loads, seen = pool_loads("shortest-first", params)
    for load, pooled in zip(loads, seen, strict=True):
        assert list(load) == sorted(pooled, key=pooled.get)[: len(load)], (load, pooled)
    fit_groups, _ = pool_loads("fit-groups", params)
    assert fit_groups != loads


@pytest.mark.parametrize("clients", ["all set the same max_tokens", "none set max_tokens"])
def test_without_distinct_caps_shortest_first_loads_as_fit_groups(clients):
    """Equal caps tie, and a max_tokens the router filled in (here falling with arrival) is
    a cap, not the client's word on the output's length: it ranks last, tied. Either way the
    pool loads exactly as fit-groups loads it, step by step."""

    def params(i: int) -> SamplingParams:
        if clients == "none set max_tokens":
            return SamplingParams(max_tokens=150 - 10 * i, is_default_max_tokens=True)
        return SamplingParams(max_tokens=64)

    loads, _ = pool_loads("shortest-first", params)
    assert loads == pool_loads("fit-groups", params)[0]


def test_requests_that_set_max_tokens_load_before_those_that_did_not():
    """Half the pooled set no max_tokens (filled in by the router, smaller than the rest's):
    in every step's loads, those that set one come first, shortest first."""
    filled_in = {f"r{i}" for i in range(0, 12, 2)}

    def params(i: int) -> SamplingParams:
        if f"r{i}" in filled_in:
            return SamplingParams(max_tokens=40 - 2 * i, is_default_max_tokens=True)
        return SamplingParams(max_tokens=MAX_TOKENS[i] + 30)

    loads, seen = pool_loads("shortest-first", params)
    for load, pooled in zip(loads, seen, strict=True):
        declared = {r: n for r, n in pooled.items() if r not in filled_in}
        first = sorted(declared, key=declared.get)[: len(load)]
        assert list(load[: len(first)]) == first, (load, pooled)


@pytest.mark.parametrize("load_order", ["fit-groups", "shortest-first"])
def test_a_pooled_request_that_fits_a_resident_group_loads_before_an_older_one(load_order):
    """Two residents of ~100 tokens fill the decode device. Then a 300-token prompt and one
    of the residents' length wait in the pool, the longer pooled first. fit-groups puts the
    one that fits the residents' group (one more member, not a new group) ahead of the older;
    so does shortest-first where the clients' max_tokens tie, and by max_tokens where not.
    A starving request loads first, whatever it declared."""
    config = replace(
        two_small_lanes(0.0), num_prefill_decode_blocks=0, starvation_s=1e9, load_order=load_order
    )

    def pooled_pair(older_params: SamplingParams):
        """The scheduler with "older" (older_params) and "fits" (max_tokens 8) pooled."""
        sched = make_scheduler(config)
        policy, lane = sched.policy, sched.policy.decode_lane
        now = 0.0

        def run_until(done) -> None:
            nonlocal now
            for _ in range(50):
                plan = step_prefilling_at_once(sched, now)
                if plan.prefetch:
                    policy.on_prefetch_done()
                now += 0.01
                if done():
                    return
            raise AssertionError("never reached")

        for rid in ("a", "b"):
            sched.add_request(rid, range(100), SamplingParams(max_tokens=400), now=now)
        run_until(lambda: len(lane.resident) == 2)
        sched.add_request("older", range(300), older_params, now=now)
        run_until(lambda: "older" in policy.pooled)
        # prefilled in one step, as the residents decode one token: the same length as theirs
        sched.add_request(
            "fits", range(sched.store.get("a").num_tokens), SamplingParams(max_tokens=8), now=now
        )
        run_until(lambda: "fits" in policy.pooled)
        assert list(policy.pooled) == ["older", "fits"] and len(lane.resident) == 2
        assert sched.store.get("fits").num_tokens == sched.store.get("a").num_tokens
        return sched, policy, lane, now

    sched, policy, lane, now = pooled_pair(SamplingParams(max_tokens=8))
    older = sched.store.get("older")
    older.output_token_ids.extend([7] * 5)  # fewer tokens left, the same max_tokens: a tie
    assert list(policy._candidates(sched, lane, now)) == ["fits", "older"]
    sched, policy, lane, now = pooled_pair(SamplingParams(max_tokens=4))  # older: the shorter
    expected = ["older", "fits"] if load_order == "shortest-first" else ["fits", "older"]
    assert list(policy._candidates(sched, lane, now)) == expected
    # starving, it loads first, whatever it declared (none here: it would rank last)
    sched, policy, lane, now = pooled_pair(SamplingParams(max_tokens=8, is_default_max_tokens=True))
    assert list(policy._candidates(sched, lane, now)) == ["fits", "older"]
    sched.store.get("older").pooled_since_s = now - 2 * config.starvation_s
    assert list(policy._candidates(sched, lane, now)) == ["older", "fits"]


def test_a_lane_decodes_a_ready_group_before_one_still_copying():
    """Round-robin skips a group whose members are all still copying in while another
    group has one ready; with none ready the first copying group comes back (decoded only
    if the step may wait for it)."""
    # padded attention and little weight to share: short and long decode apart
    config = replace(two_small_lanes(0.5), kernel_cost="padded", weight_kv_tokens=1000)
    lane = Lane(config, num_device_blocks=4096, max_length=1 << 16, name="decode device")
    lengths = {"s0": 100, "s1": 110, "l0": 6000, "l1": 6100}  # two length groups
    sched = lane_sched(config, lengths)
    landed = land_on(lane, sched, lengths)
    lane.regroup()
    assert sorted(map(sorted, lane.groups)) == [["l0", "l1"], ["s0", "s1"]]
    lane.copying = set(lane.groups[lane.next_group])  # the group whose turn it is
    ready = sorted(set(landed) - lane.copying)
    for _ in range(3):  # every step, whatever the turn
        decode, _, _ = lane.next_decode(sched, [], free=1024, may_wait=False)
        assert sorted(decode) == ready
    lane.copying = set(lengths)  # none ready: the group whose turn it is, if it may wait
    turn = lane.next_group
    assert lane.next_decode(sched, [], free=1024, may_wait=False)[0] == []
    assert lane.next_group == turn  # it keeps its turn for when its copies are in
    assert sorted(lane.next_decode(sched, [], free=1024)[0]) == sorted(lane.groups[turn])
    lane.check_invariants(sched)


def test_loads_still_copying_wait_only_when_no_device_has_a_member_ready():
    """Loads copy for several steps (as ~1 GB requests over one link do). A step decodes a
    member still copying only if every member it decodes is (no device had one ready: the
    step's answer waits for both devices' passes), and every request still finishes."""
    sched = make_scheduler(two_small_lanes(0.0))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for i in range(12):
        sched.add_request(f"r{i}", range(100), params, 0.0)
    copy_steps = 4
    plans, _, _ = drive(sched, 2000, turn_s=0.05, decode_s=0.01, copy_steps=copy_steps)
    assert all(r.state == RequestState.FINISHED for r in sched.store), "requests unfinished"
    mixed_steps = 0
    for i, plan in enumerate(plans):
        # still copying at step i: loaded in one of the copy_steps steps up to it
        copying = {r for p in plans[max(0, i - copy_steps + 1) : i + 1] for r in p.load}
        decoding_copying = set(plan.decode) & copying
        if decoding_copying:
            assert decoding_copying == set(plan.decode), "a ready member waited for copies"
        elif copying:
            mixed_steps += 1  # loads copying beside a step of ready members
    assert mixed_steps > 0  # the case the rule is for happened


@pytest.mark.parametrize("whole", [True, False])
def test_the_prefill_devices_batches_take_whole_prompts_unless_told_otherwise(whole):
    """On the prefill device a prompt is not cut where the token budget (100) ends: its
    next chunk would first copy the KV of the one before back in from the pool. It leads
    the next batch instead, whole, past the budget if it must."""
    config = replace(
        make_config("aligned", 16, 1000, 5.0),
        num_prefill_device_blocks=20,
        prefill_tokens_per_step=100,
        prefill_whole_prompts=whole,
    )
    sched = make_scheduler(config)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for request_id, n in (("a", 60), ("b", 150), ("c", 30)):
        sched.add_request(request_id, range(1, n + 1), params, now=0.0)
    first = sched.schedule(0.0).prefill
    second = sched.schedule(0.01).prefill  # queued behind the first
    if whole:  # c is not planned ahead of b
        assert (first, second) == ((("a", 60),), (("b", 150),))
    else:  # b cut at the budget; its next chunk waits for the first to be done
        assert (first, second) == ((("a", 60), ("b", 40)), (("c", 30),))
    sched.check_invariants()


def test_a_cut_prompts_next_chunk_pays_its_copy_in_on_the_prefill_device():
    """In the simulator, a prompt cut into chunks on the prefill device takes longer to its
    first token than the same prompt whole: its later chunks copy its KV so far in first."""
    ttft = {}
    for whole in (True, False):
        config = replace(
            make_config("aligned", 16, 10_000, 5.0),
            num_prefill_device_blocks=1024,
            prefill_tokens_per_step=1000,
            prefill_whole_prompts=whole,
        )
        stats = simulate_engine([SimRequest("r", 0.0, 4000, 2)], config, COST, check=True)
        ttft[whole] = stats.ttft_s[0]
    copy_in_s = COST.h2d_s((1000 + 2000 + 3000) * COST.model.kv_bytes_per_token)
    assert ttft[False] - ttft[True] >= copy_in_s, (ttft, copy_in_s)


def test_a_request_starves_only_past_the_bound():
    """Waiting exactly `starvation_s` is not starving, for the load order and the eviction
    alike (they share the predicate)."""
    sched = make_scheduler(make_config("aligned", 16, 64, starvation_s=5.0))
    waited = SimpleNamespace(pooled_since_s=10.0)
    assert not sched.policy._is_starving(waited, 15.0)
    assert sched.policy._is_starving(waited, 15.001)


def test_a_groups_range_is_its_shortest_and_longest_member():
    """The load order fits pooled requests to each group's (shortest, longest) length: a
    regroup orders members by length, joiners stretch the range, and an end that leaves
    gives way to the next shortest or longest, wherever it sits in the group."""
    config = two_small_lanes(0.5)
    lane = Lane(config, num_device_blocks=1024, max_length=1 << 16, name="decode device")
    base = {"a": 101, "b": 97, "c": 103, "d": 99, "e": 100, "f": 98, "g": 102, "h": 100}
    sched = lane_sched(config, {**base, "short": 96, "long": 104})

    def range_of(request_id: str) -> tuple[int, int]:
        return lane.group_range(lane.group_of[request_id])

    lane.next_decode(sched, land_on(lane, sched, base), free=512)  # loaded out of length order
    assert len(lane.groups) == 1 and range_of("a") == (97, 103)
    lane.next_decode(
        sched, land_on(lane, sched, ["short", "long"]), free=512
    )  # joiners, slotted in
    assert lane.steps_since_regroup == 1 and range_of("a") == (96, 104)
    lane.leave(sched, "long")  # the joiners sit after the others in the group
    assert range_of("a") == (96, 103)
    lane.leave(sched, "short")
    assert range_of("a") == (97, 103)
    lane.leave(sched, "b")
    lane.leave(sched, "c")
    assert range_of("a") == (98, 102)
    lane.check_invariants(sched)
