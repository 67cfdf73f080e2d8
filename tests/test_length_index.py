"""LengthIndex and its log-linear buckets, checked against brute force.

Buckets: every length 1..70000 lands in exactly one contiguous bucket of relative width
<= 1/2**sub_bits. The index: random add/remove sequences (hypothesis stateful) against a plain
dict id -> length, whose insertion order is the index's entry order (oldest first).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from alignedserve.batcher.length_index import (
    MAX_LENGTH,
    LengthIndex,
    bucket_of,
    bucket_of_array,
)

# ---- buckets ---------------------------------------------------------------------------------


def bucket_start(bucket: int, sub_bits: int = 5) -> int:
    """Smallest length in a bucket, from the bucket geometry the index documents (width 1
    below 2**sub_bits, then 2**sub_bits buckets per power of two): the oracle that
    bucket_of is checked against."""
    if bucket < (1 << sub_bits):
        return bucket
    shift = (bucket >> sub_bits) - 1
    return ((bucket & ((1 << sub_bits) - 1)) + (1 << sub_bits)) << shift


ALL_LENGTHS = np.arange(1, 70_001)


@pytest.fixture(scope="module")
def buckets_of_all() -> np.ndarray:
    return np.array([bucket_of(int(n)) for n in ALL_LENGTHS])


def test_bucket_contains_its_lengths(buckets_of_all):
    starts = np.array([bucket_start(int(b)) for b in range(int(buckets_of_all[-1]) + 2)])
    assert np.all(starts[buckets_of_all] <= ALL_LENGTHS)
    assert np.all(starts[buckets_of_all + 1] > ALL_LENGTHS)


def test_buckets_monotonic_and_contiguous(buckets_of_all):
    steps = np.diff(buckets_of_all)
    assert set(np.unique(steps).tolist()) <= {0, 1}
    assert buckets_of_all[0] == bucket_of(1) == 1
    # every bucket from 1 to the last is used: no gaps, so adjacent buckets are adjacent lengths
    assert np.array_equal(np.unique(buckets_of_all), np.arange(1, buckets_of_all[-1] + 1))


def test_bucket_relative_width(buckets_of_all):
    """A bucket spans at most max(1, length/32) tokens for every length in it (sub_bits=5)."""
    last = int(buckets_of_all[-1])
    starts = np.array([bucket_start(b) for b in range(last + 2)])
    widths = np.diff(starts)  # [last + 1] tokens in bucket b
    width_of = widths[buckets_of_all]
    assert np.all(width_of <= np.maximum(1, ALL_LENGTHS / 32))
    # lengths below 32 get a bucket each; the bound is tight at each bucket's first length
    assert np.all(widths[1:32] == 1)
    assert widths[bucket_of(1024)] == 1024 // 32


def test_bucket_start_inverts_bucket_of():
    for b in range(1, bucket_of(MAX_LENGTH) + 2):
        assert bucket_of(bucket_start(b)) == b
        assert bucket_of(bucket_start(b + 1) - 1) == b


@pytest.mark.parametrize("sub_bits", [2, 3, 4, 5, 6])
def test_other_sub_bits(sub_bits):
    lengths = np.unique(
        np.concatenate(
            [np.arange(1, 3000), np.random.default_rng(sub_bits).integers(1, 70_000, 3000)]
        )
    )
    prev = 0
    for n in lengths.tolist():
        b = bucket_of(n, sub_bits)
        lo, hi = bucket_start(b, sub_bits), bucket_start(b + 1, sub_bits)
        assert lo <= n < hi
        assert hi - lo <= max(1, n / 2**sub_bits)
        assert b >= prev
        prev = b


# ---- errors ----------------------------------------------------------------------------------


def test_errors():
    index = LengthIndex(max_length=1000)
    index.add("a", 10)
    with pytest.raises(KeyError):
        index.add("a", 20)
    assert list(index.iter_lengths(10, 10)) == ["a"]  # the failed add changed nothing
    for bad in (0, -5, 1001):
        with pytest.raises(ValueError):
            index.add("b", bad)
    assert "b" not in index and len(index) == 1
    with pytest.raises(KeyError):
        index.remove("nope")
    index.remove("a")
    with pytest.raises(KeyError):
        index.remove("a")
    assert len(index) == 0 and list(index.iter_lengths(1, 1000)) == []
    index.add("a", 1000)  # max_length itself is allowed; ids are reusable after removal
    assert list(index.iter_lengths(999, 1000)) == ["a"]


def test_lengths_past_the_range_clamp():
    index = LengthIndex()
    index.add("long", MAX_LENGTH)
    index.add("short", 1)
    assert list(index.iter_lengths(70_000, 70_001)) == ["long"]
    assert list(index.iter_lengths(-3, 0)) == ["short"]


def young_objects_after_churn(index: LengthIndex, churn: int) -> int:
    """GC-tracked objects left in generation 0 by `churn` remove+add pairs, GC paused."""
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(generation=0))
        for i in range(churn):
            index.remove(f"r{i}")
            index.add(f"r{i}", 100 + (i + 1) % 2000)
        return len(gc.get_objects(generation=0)) - before
    finally:
        gc.enable()


def test_churn_allocates_no_gc_tracked_objects():
    index = LengthIndex()
    for i in range(5000):
        index.add(f"r{i}", 100 + i % 2000)
    assert young_objects_after_churn(index, 5000) < 500


# ---- the index against a brute-force model ---------------------------------------------------


class IndexVsModel(RuleBasedStateMachine):
    """Random add/remove against a dict id -> length (dict order = entry order)."""

    max_length = MAX_LENGTH
    ids = Bundle("ids")

    def __init__(self):
        super().__init__()
        self.index = LengthIndex(max_length=self.max_length)
        self.model: dict[str, int] = {}
        self.next_id = 0

    def lengths(self):
        """Clustered lengths (so bands hold several members), plus the extremes."""
        top = self.max_length
        return st.one_of(
            st.integers(1, 40),
            st.integers(500, 560),
            st.integers(1, top),
            st.sampled_from(
                [n for n in (1, 31, 32, 33, 63, 64, 1023, 1024, top - 1, top) if n <= top]
            ),
        )

    @rule(target=ids, data=st.data())
    def add(self, data):
        length = data.draw(self.lengths(), label="length")
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.index.add(request_id, length)
        self.model[request_id] = length
        return request_id

    @rule(target=ids, request_id=consumes(ids), data=st.data())
    def remove(self, request_id, data):
        self.index.remove(request_id)
        self.model.pop(request_id)
        assert request_id not in self.index
        if not data.draw(st.booleans(), label="re-add"):
            return multiple()
        length = data.draw(self.lengths(), label="new length")  # it re-enters as the newest
        self.index.add(request_id, length)
        self.model[request_id] = length
        return request_id

    @rule(request_id=ids)
    def add_duplicate_fails(self, request_id):
        if request_id in self.model:
            with pytest.raises(KeyError):
                self.index.add(request_id, 7)

    @rule(data=st.data())
    def iter_lengths(self, data):
        a = data.draw(self.lengths(), label="a")
        b = data.draw(st.integers(a, self.max_length), label="b")
        lo, hi = bucket_of(a), bucket_of(b)
        expected = [r for r, n in self.model.items() if lo <= bucket_of(n) <= hi]
        assert list(self.index.iter_lengths(a, b)) == expected

    @invariant()
    def agrees_with_model(self):
        assert len(self.index) == len(self.model)
        assert all(request_id in self.index for request_id in self.model)
        assert "never-added" not in self.index
        assert list(self.index.iter_lengths(1, self.max_length)) == list(self.model)
        for request_id, length in self.model.items():  # each one in its own length's bucket
            assert request_id in self.index.iter_lengths(length, length)


class SmallIndexVsModel(IndexVsModel):
    """A max_length that is not a bucket boundary, so the last bucket is partly out of range."""

    max_length = 1000


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestIndexVsModel = IndexVsModel.TestCase
TestIndexVsModel.settings = SETTINGS
TestSmallIndexVsModel = SmallIndexVsModel.TestCase
TestSmallIndexVsModel.settings = SETTINGS


def test_oldest_first_across_buckets():
    index = LengthIndex()
    for i, length in enumerate([100, 40, 100, 41, 3000, 40]):
        index.add(f"r{i}", length)
    assert list(index.iter_lengths(40, 100)) == ["r0", "r1", "r2", "r3", "r5"]
    index.remove("r0")
    index.add("r0", 41)  # re-entry makes it the newest
    assert list(index.iter_lengths(40, 100)) == ["r1", "r2", "r3", "r5", "r0"]
    assert list(index.iter_lengths(41, 41)) == ["r3", "r0"]


@pytest.mark.parametrize("sub_bits", [3, 4, 5])
def test_vectorised_buckets_equal_scalar(sub_bits):
    lengths = np.arange(1, 70_001)
    expected = np.array([bucket_of(int(x), sub_bits) for x in lengths])
    assert (bucket_of_array(lengths, sub_bits) == expected).all()
