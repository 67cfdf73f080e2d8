"""The aligned policy's length-group DP against brute force over every contiguous partition."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alignedserve.batcher.scheduler.lane import partition_groups


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
