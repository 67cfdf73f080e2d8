"""The autoscaler's decisions: worked examples of each rule, then properties over arbitrary
policies and load sequences (hypothesis)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignedserve.common.errors import ConfigError
from alignedserve.operator.autoscale import (
    AutoscaleState,
    Decision,
    PoolObservation,
    PoolPolicy,
    decide,
    recommend,
)

POLICY = PoolPolicy(
    min_replicas=1,
    max_replicas=10,
    target_queue_per_replica=16,
    target_p99_tpot_s=0.2,
    scale_down_stabilization_s=300,
    scale_to_zero=False,
)


def obs(now_s: float = 0.0, current: int = 1, ready: int | None = None, **load) -> PoolObservation:
    fields = dict(queue=0, running=0, pooled=0, p99_tpot_s=None, kv_pool_usage=0.0) | load
    return PoolObservation(now_s, current, current if ready is None else ready, **fields)


class Pool:
    """Applies each decision, as the operator does, with every replica ready at once unless
    told otherwise."""

    def __init__(self, policy: PoolPolicy, replicas: int, now_s: float = 0.0):
        self.policy = policy
        self.replicas = replicas
        self.state = AutoscaleState.initial(now_s, replicas)

    def step(self, now_s: float, ready: int | None = None, **load) -> Decision:
        decision, self.state = decide(
            self.policy, self.state, obs(now_s, self.replicas, ready, **load)
        )
        self.replicas = decision.desired_replicas
        return decision


# ---- the rules, one example each -------------------------------------------------------------


def test_scale_up_at_once_but_at_most_doubling_per_step():
    pool = Pool(POLICY, 1)
    steps = [pool.step(15.0 * i, queue=100) for i in range(1, 5)]
    # ceil(100 / 16) = 7, reached by doubling: 2, 4, 7, then it stays
    assert [d.desired_replicas for d in steps] == [2, 4, 7, 7]
    assert [d.direction for d in steps] == ["up", "up", "up", "none"]
    assert "limited to 2" in steps[0].reason and "queue 100" in steps[0].reason


def test_a_large_factor_jumps_and_the_max_caps():
    policy = dataclasses.replace(POLICY, max_scale_up_factor=100.0, max_replicas=5)
    decision, _ = decide(policy, AutoscaleState.initial(0, 1), obs(1, 1, queue=1000))
    assert decision == Decision(5, decision.reason, "up") and "max 5" in decision.reason


def test_scale_down_waits_for_the_stabilization_window():
    pool = Pool(POLICY, 1)
    for t in (0, 15, 30, 45):
        pool.step(t, queue=100)
    assert pool.replicas == 7
    # load falls to one replica's worth at t=60: nothing goes for 300 s after the last
    # recommendation of 7 (t=45)
    assert [pool.step(t, queue=10).desired_replicas for t in range(60, 345, 15)] == [7] * 19
    down = pool.step(345, queue=10)
    assert down.desired_replicas == 1 and down.direction == "down"


def test_scale_down_goes_to_the_highest_recommendation_of_the_window():
    pool = Pool(POLICY, 8, now_s=-1000)  # an old state: its seed has left the window
    pool.step(0, queue=60)  # 4
    pool.step(100, queue=30)  # 2
    assert pool.replicas == 8 - 4  # 8 -> max(4, 2)
    assert pool.step(301, queue=30).desired_replicas == 2  # the 4 of t=0 has left the window


def test_a_fresh_state_does_not_scale_down_before_a_whole_window():
    pool = Pool(POLICY, 6, now_s=1000)
    assert pool.step(1299, queue=0).desired_replicas == 6
    assert pool.step(1300, queue=0).desired_replicas == 1


def test_no_scale_down_while_a_replica_is_starting():
    pool = Pool(dataclasses.replace(POLICY, scale_down_stabilization_s=0), 4)
    held = pool.step(10, ready=3, queue=0)
    assert held.desired_replicas == 4 and held.direction == "none"
    assert "not ready" in held.reason
    assert pool.step(20, ready=4, queue=0).desired_replicas == 1


def test_p99_above_target_asks_for_one_more_than_ready():
    pool = Pool(POLICY, 2)
    up = pool.step(10, queue=0, p99_tpot_s=0.5)
    assert up.desired_replicas == 3 and "p99 TPOT" in up.reason
    # the third replica is still starting: the latency does not ask for a fourth
    assert pool.step(20, ready=2, p99_tpot_s=0.5).desired_replicas == 3
    assert pool.step(30, ready=3, p99_tpot_s=0.5).desired_replicas == 4
    # below target, or no target: the queue alone decides
    assert recommend(POLICY, obs(current=4, p99_tpot_s=0.1))[0] == 1
    no_target = dataclasses.replace(POLICY, target_p99_tpot_s=None)
    assert recommend(no_target, obs(current=4, p99_tpot_s=9.0))[0] == 1


def test_kv_in_use_holds_the_pool():
    # 4 ready replicas with pools 60 % full: 3 replicas would hold that KV at 80 %
    assert recommend(POLICY, obs(current=4, running=40, pooled=900, kv_pool_usage=0.6)) == (
        3,
        "KV pools 60% used on 4 ready",
    )
    assert recommend(POLICY, obs(current=3, kv_pool_usage=1 / 3))[0] == 1  # no rounding up


def test_scale_to_zero_only_when_idle_for_a_window_and_back_on_the_first_request():
    policy = dataclasses.replace(POLICY, min_replicas=0, scale_to_zero=True)
    pool = Pool(policy, 2, now_s=0)
    assert pool.step(400, queue=0, running=1).desired_replicas == 1  # busy: not zero
    assert pool.step(500, queue=0).desired_replicas == 1  # idle, but 1 was asked at t=400
    zero = pool.step(700, queue=0)
    assert zero.desired_replicas == 0 and zero.direction == "down"
    assert pool.step(701, ready=0, queue=0).desired_replicas == 0
    first = pool.step(702, ready=0, queue=1)  # one request held by a router
    assert first.desired_replicas == 1 and first.direction == "up"
    # many held: still one at a time from zero (x2 of 0 is 0, at least +1)
    pool.replicas = 0
    assert pool.step(703, ready=0, queue=500).desired_replicas == 1


def test_min_replicas_applies_while_busy_even_with_scale_to_zero():
    policy = dataclasses.replace(POLICY, min_replicas=3, scale_to_zero=True)
    pool = Pool(policy, 0, now_s=-1000)
    assert pool.step(0, ready=0, queue=1).desired_replicas == 3  # the bounds win over x2
    assert pool.step(1000, queue=0).desired_replicas == 0


def test_bounds_win_when_the_policy_changes():
    state = AutoscaleState.initial(0, 9)
    lower_max = dataclasses.replace(POLICY, max_replicas=4)
    lowered = decide(lower_max, state, obs(1, 9, queue=500))[0]
    assert (lowered.desired_replicas, lowered.direction) == (4, "down")
    assert lowered.reason.endswith("; 4 within the bounds")
    higher_min = dataclasses.replace(POLICY, min_replicas=5)
    assert decide(higher_min, state, obs(1, 2))[0].desired_replicas == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(min_replicas=0), "needs scale_to_zero"),
        (dict(min_replicas=-1), "min_replicas=-1"),
        (dict(min_replicas=3, max_replicas=2), "max_replicas=2"),
        (dict(min_replicas=0, max_replicas=0, scale_to_zero=True), "max_replicas=0"),
        (dict(target_queue_per_replica=0), "target_queue_per_replica=0"),
        (dict(target_p99_tpot_s=0.0), "target_p99_tpot_s=0.0"),
        (dict(scale_down_stabilization_s=-1), "scale_down_stabilization_s=-1"),
        (dict(max_scale_up_factor=0.5), "max_scale_up_factor=0.5"),
    ],
)
def test_policy_validation(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(POLICY, **change)


def test_observation_validation():
    with pytest.raises(ValueError, match=r"kv_pool_usage=1\.5"):
        obs(kv_pool_usage=1.5)
    with pytest.raises(ValueError, match="queue=-1"):
        obs(queue=-1)


# ---- properties ------------------------------------------------------------------------------


@st.composite
def policies(draw) -> PoolPolicy:
    scale_to_zero = draw(st.booleans())
    min_replicas = draw(st.integers(0 if scale_to_zero else 1, 6))
    return PoolPolicy(
        min_replicas=min_replicas,
        max_replicas=draw(st.integers(max(min_replicas, 1), 24)),
        target_queue_per_replica=draw(st.sampled_from([1, 4, 16, 100.5])),
        target_p99_tpot_s=draw(st.sampled_from([None, 0.05, 0.2])),
        scale_down_stabilization_s=draw(st.sampled_from([0, 30, 300])),
        scale_to_zero=scale_to_zero,
        max_scale_up_factor=draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])),
    )


# One sample of load: seconds since the last one, and the load.
samples = st.fixed_dictionaries(
    {
        "dt": st.sampled_from([0.0, 1.0, 15.0, 15.0, 60.0, 299.0, 301.0]),
        "queue": st.sampled_from([0, 0, 1, 5, 16, 17, 100, 1000]),
        "running": st.sampled_from([0, 0, 3, 40]),
        "pooled": st.sampled_from([0, 0, 500]),
        "p99_tpot_s": st.sampled_from([None, 0.01, 0.1, 1.0]),
        "kv_pool_usage": st.sampled_from([0.0, 0.3, 0.99]),
        "num_not_ready": st.sampled_from([0, 0, 0, 1, 3]),
    }
)


def run(policy: PoolPolicy, start: int, loads: list[dict], now: float = 0.0):
    """Applies each decision, with `num_not_ready` of the replicas still starting. Each step:
    (observation, state before it, decision); and the state after the last."""
    replicas, state = start, AutoscaleState.initial(now, start)
    steps = []
    for load in loads:
        now += load["dt"]
        ready = max(0, replicas - load["num_not_ready"])
        fields = {k: v for k, v in load.items() if k not in ("dt", "num_not_ready")}
        o = PoolObservation(now, replicas, ready, **fields)
        decision, new_state = decide(policy, state, o)
        steps.append((o, state, decision))
        replicas, state = decision.desired_replicas, new_state
    return steps, state


def lowest(policy: PoolPolicy, o: PoolObservation) -> int:
    return 0 if policy.scale_to_zero and o.is_idle else max(policy.min_replicas, 1)


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 30), st.lists(samples, min_size=1, max_size=40))
def test_bounds_and_rate_always_hold(policy, start, loads):
    for o, _, d in run(policy, start, loads)[0]:
        assert lowest(policy, o) <= d.desired_replicas <= policy.max_replicas
        assert d.direction == (
            "up"
            if d.desired_replicas > o.current_replicas
            else "down"
            if d.desired_replicas < o.current_replicas
            else "none"
        )
        up_limit = max(
            math.ceil(o.current_replicas * policy.max_scale_up_factor), o.current_replicas + 1
        )
        assert d.desired_replicas <= max(up_limit, lowest(policy, o))
        if d.direction == "down":
            assert (
                o.ready_replicas >= o.current_replicas or o.current_replicas > policy.max_replicas
            )


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 30), st.lists(samples, min_size=1, max_size=40))
def test_no_down_then_up_within_the_window_without_new_load(policy, start, loads):
    """After a scale-down at t1, the next change, if it comes before t1 + window, is an up
    only for a recommendation above every one made in the window up to t1: a scale-down never
    undoes a need it had seen."""
    steps, _ = run(policy, start, loads)
    window = policy.scale_down_stabilization_s
    for i, (o1, before, d1) in enumerate(steps):
        if d1.direction != "down" or o1.current_replicas > policy.max_replicas:
            continue  # (a down forced by the bounds is not the stabilization's)
        seen = [r for t, r in before.recommendations if o1.now_s - t < window]
        seen.append(recommend(policy, o1)[0])
        assert d1.desired_replicas >= max(seen)
        later = [(o, d) for o, _, d in steps[i + 1 :] if o.now_s - o1.now_s < window]
        changes = [(o, d) for o, d in later if d.direction != "none"]
        if changes and changes[0][1].direction == "up":
            assert recommend(policy, changes[0][0])[0] > max(seen)


@settings(max_examples=200, deadline=None)
@given(
    policies(),
    st.sampled_from([1, 2, 8]),
    st.integers(0, 200),
    st.integers(0, 2000),
    st.lists(st.sampled_from([1.0, 10.0, 29.0]), min_size=4, max_size=60),
)
def test_oscillating_load_never_scales_down_once_up(policy, start, low, high, gaps):
    """Load switching between two levels faster than the window: after the first window,
    replicas only ever rise."""
    policy = dataclasses.replace(policy, scale_down_stabilization_s=30.0)
    loads = [
        dict(dt=gap, queue=high if i % 2 else low, running=0, pooled=0, p99_tpot_s=None,
             kv_pool_usage=0.0, num_not_ready=0)
        for i, gap in enumerate(gaps)
    ]  # fmt: skip
    steps, _ = run(policy, start, loads)
    after_first_window = [d for o, _, d in steps if o.now_s >= 30.0]
    assert all(d.direction != "down" for d in after_first_window[1:])


@settings(max_examples=300, deadline=None)
@given(policies(), st.lists(samples, min_size=1, max_size=20), samples, st.integers(0, 2000))
def test_monotone_in_load(policy, history, last, extra):
    """With the same history, more queued requests never ask for fewer replicas."""
    *_, (o, state, d) = run(policy, 2, [*history, last])[0]
    more = dataclasses.replace(o, queue=o.queue + extra)
    assert decide(policy, state, more)[0].desired_replicas >= d.desired_replicas


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(samples, max_size=20), samples, st.integers(1, 5000))
def test_from_zero_on_the_first_request(policy, history, last, queue):
    """Whatever came before, a pool at zero scales up as soon as one request is queued."""
    policy = dataclasses.replace(policy, scale_to_zero=True)
    steps, state = run(policy, 1, history)
    now = (steps[-1][0].now_s if steps else 0.0) + last["dt"]
    decision, _ = decide(policy, state, obs(now, 0, 0, queue=queue))
    assert decision.direction == "up" and decision.desired_replicas >= 1
