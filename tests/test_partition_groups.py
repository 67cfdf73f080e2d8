"""The aligned policy's length-group DP against brute force over every contiguous partition,
and, partition for partition, against the plain DP (ties included: they decide the groups)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alignedserve.batcher.length_index import bucket_of
from alignedserve.batcher.scheduler import SchedulerConfig
from alignedserve.batcher.scheduler.lane import GROUP_SUB_BITS, Lane, partition_groups


def _groups(m: int):
    """Every split of range(m) into contiguous groups, as lists of start indices."""
    for cuts in itertools.product((False, True), repeat=m - 1):
        yield [0] + [i + 1 for i, cut in enumerate(cuts) if cut]


def _cost(starts, buckets, counts, ends, sums, w, padded, max_n, max_span, min_n):
    bounds = [*starts, len(buckets)]
    total_n = int(counts.sum())
    cost = 0
    for a, b in itertools.pairwise(bounds):
        n = int(counts[a:b].sum())
        if (n > max_n and b - a > 1) or buckets[b - 1] - buckets[a] >= max_span:
            return None
        if n < min(min_n, total_n):
            return None
        cost += w + (n * int(ends[b - 1]) if padded else int(sums[a:b].sum()))
    return cost


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=7),
    w=st.integers(0, 200),
    padded=st.booleans(),
    max_n=st.integers(1, 12),
    max_span=st.integers(1, 12),
    min_n=st.integers(1, 10),
)
def test_dp_is_optimal_and_respects_the_bounds(data, w, padded, max_n, max_span, min_n):
    gaps, counts = zip(*data, strict=True)
    buckets = np.cumsum(gaps)  # distinct, ascending
    counts = np.array(counts)
    ends = buckets * 10 + 5  # longest member of each bucket
    sums = counts * (buckets * 10)
    args = (buckets, counts, ends, sums, w, padded, max_n, max_span)
    starts = partition_groups(*args, min_n)
    costs = {tuple(s): _cost(s, *args, min_n) for s in _groups(len(buckets))}
    feasible = {s: c for s, c in costs.items() if c is not None}
    if feasible:
        assert _cost(starts, *args, min_n) == min(feasible.values())
    else:  # the minimum is dropped, never the span or size bounds
        relaxed = [c for s in _groups(len(buckets)) if (c := _cost(s, *args, 1)) is not None]
        assert _cost(starts, *args, 1) == min(relaxed)


def test_min_members_merges_small_groups():
    buckets = np.array([1, 50])  # far apart: without a minimum they decode apart
    counts = np.array([3, 3])
    ends, sums = np.array([10, 500]), np.array([30, 1500])
    assert partition_groups(buckets, counts, ends, sums, 100, True, 64, 113) == [0, 1]
    assert partition_groups(buckets, counts, ends, sums, 100, True, 64, 113, 6) == [0]


def _plain_dp(buckets, counts, ends, sums, w, padded, max_n, max_span, min_n=1) -> list[int]:
    """partition_groups written plainly, in Python ints: for each prefix of buckets, the
    cheapest last group; among equally cheap ones the first (the earliest start)."""
    m = len(buckets)
    cum_n = [0, *itertools.accumulate(counts)]
    cum_s = [0, *itertools.accumulate(sums)]
    best: list[int | None] = [0] + [None] * m
    start = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):
            n = cum_n[j] - cum_n[i]
            if best[i] is None or (n > max_n and j - i > 1) or n < min(min_n, cum_n[m]):
                continue
            if buckets[j - 1] - buckets[i] >= max_span:
                continue
            cost = best[i] + w + (n * ends[j - 1] if padded else cum_s[j] - cum_s[i])
            if best[j] is None or cost < best[j]:
                best[j], start[j] = cost, i
    if best[m] is None:  # the minimum is dropped, as partition_groups does
        return _plain_dp(buckets, counts, ends, sums, w, padded, max_n, max_span)
    starts = [m]
    while starts[-1]:
        starts.append(start[starts[-1]])
    return starts[:0:-1]


def _random_case(rng: np.random.Generator) -> tuple:
    """Buckets, their members and lengths, and bounds; small numbers make ties common (with
    a balanced kernel every split into as many groups costs the same)."""
    m = int(rng.integers(1, 114 if rng.random() < 0.1 else 24))
    buckets = np.sort(rng.choice(120, size=m, replace=False))  # [m] distinct, ascending
    counts = rng.integers(1, int(rng.choice([2, 5, 40, 200])), size=m)  # [m]
    ends = buckets * int(rng.choice([1, 3, 100])) + 1  # [m] ascending, as lengths are
    sums = counts * ends - rng.integers(0, 3, size=m) * (counts > 1)  # [m]
    w = int(rng.choice([0, 1, 7, 50, 1000, 122_000]))
    max_n = int(rng.choice([1, 3, 10, 64, 512]))
    max_span = int(rng.choice([1, 2, 5, 20, 113]))
    min_n = int(rng.choice([1, 1, 2, 8, 100]))
    return buckets, counts, ends, sums, w, bool(rng.random() < 0.5), max_n, max_span, min_n


def test_dp_matches_the_plain_one_partition_for_partition():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        case = _random_case(rng)
        assert partition_groups(*case) == _plain_dp(*case), case


def test_a_lanes_regroup_matches_the_plain_one():
    """Lane.regroup against its definition: residents sorted by length (stably: load order
    among equals), the plain DP over their group buckets, the groups cut from that order."""
    rng = np.random.default_rng(1)
    max_length = 1 << 16
    for case in range(300):
        config = SchedulerConfig(
            policy="aligned",
            kernel_cost=str(rng.choice(["padded", "balanced"])),
            weight_kv_tokens=int(rng.choice([1, 1000, 122_000])),
            max_batch_size=int(rng.choice([4, 64, 512])),
            min_batch_size=int(rng.choice([1, 2, 4])),
            max_band_buckets=int(rng.choice([3, 20, 113])),
        )
        lane = Lane(config, num_device_blocks=1 << 20, max_length=max_length, name="decode device")
        n = int(rng.integers(1, 700))
        short = rng.integers(1, 1024, size=n)  # [n]
        long = rng.integers(1024, max_length * 2, size=n)  # [n] (past max_length too)
        lengths = np.where(rng.random(n) < 0.8, short, long).tolist()
        lane.resident = {f"r{case}-{k}": length for k, length in enumerate(lengths)}
        lane.regroup()

        bucket = {
            r: bucket_of(min(n, max_length), GROUP_SUB_BITS) for r, n in lane.resident.items()
        }
        ranked = sorted(lane.resident, key=lane.resident.__getitem__)  # so by bucket too
        by_bucket = [list(g) for _, g in itertools.groupby(ranked, key=bucket.__getitem__)]
        starts = _plain_dp(
            [bucket[g[0]] for g in by_bucket],
            [len(g) for g in by_bucket],
            [max(lane.resident[r] for r in g) for g in by_bucket],
            [sum(lane.resident[r] for r in g) for g in by_bucket],
            config.weight_kv_tokens,
            config.kernel_cost == "padded",
            config.max_batch_size,
            config.max_band_buckets,
            config.min_batch_size,
        )
        cuts = [*starts, len(by_bucket)]
        groups = [list(itertools.chain(*by_bucket[a:b])) for a, b in itertools.pairwise(cuts)]
        assert lane.groups == groups, case
        assert lane.group_of == {r: g for g, group in enumerate(groups) for r in group}
        assert lane.group_ends == [(g[0], g[-1]) for g in groups]
