"""The aligned policy's pool (scheduler/pool.py): its lazy load order against the plain
definition it replaces, a stable sort of the fit-groups order by key."""

from __future__ import annotations

import itertools
import random

import pytest

from alignedserve.batcher.length_index import MAX_LENGTH, bucket_of
from alignedserve.batcher.request import Request
from alignedserve.batcher.scheduler.aligned import declared_output_tokens
from alignedserve.batcher.scheduler.pool import Pool
from alignedserve.common.sampling_params import SamplingParams


def make_request(request_id: str, length: int, declared: float) -> Request:
    """`declared` max_tokens; inf: none (the router filled one in)."""
    is_default = declared == float("inf")
    max_tokens = 1 if is_default else int(declared)
    params = SamplingParams(max_tokens=max_tokens, is_default_max_tokens=is_default)
    return Request(request_id, range(length), params, arrival_s=0.0)


def fit_groups_order(entries, pool_order, groups, seen):
    """The definition: for each group in turn, the pooled whose length's bucket lies in the
    group's bucket range, in entry order; then the rest in pool order (none of `seen`)."""
    order, seen = [], set(seen)
    for shortest, longest in groups:
        lo, hi = (bucket_of(min(max(n, 1), MAX_LENGTH)) for n in (shortest, longest))
        for rid, length in entries:
            if rid not in seen and lo <= bucket_of(length) <= hi:
                seen.add(rid)
                order.append(rid)
    return order + [rid for rid in pool_order if rid not in seen]


@pytest.mark.parametrize("seed", range(40))
def test_the_load_order_is_the_fit_groups_order_sorted_stably_by_key(seed):
    rng = random.Random(seed)
    keys = [8.0, 64.0, 512.0, float("inf")][: rng.randint(1, 4)]
    by_key = Pool(key=declared_output_tokens) if len(keys) > 1 else Pool()
    key_of, length_of, entries, pool_order = {}, {}, [], []
    ids = (f"r{i}" for i in itertools.count())
    for _ in range(rng.randint(0, 120)):
        if pool_order and rng.random() < 0.25:  # one leaves
            rid = rng.choice(pool_order)
            by_key.remove(rid)
            pool_order.remove(rid)
            entries = [e for e in entries if e[0] != rid]
            continue
        rid, length = next(ids), rng.choice([rng.randint(1, 64), rng.randint(100, 140)])
        key = rng.choice(keys)
        by_key.add(make_request(rid, length, key))
        key_of[rid], length_of[rid] = (key if len(keys) > 1 else 0.0), length
        entries.append((rid, length))
        pool_order.append(rid)
    if rng.random() < 0.5:  # some came back to the pool, in their old places
        since = {rid: rng.random() for rid in pool_order}
        by_key.sort(since.__getitem__)
        pool_order.sort(key=since.__getitem__)
    groups = [(n, n + rng.randint(0, 30)) for n in rng.sample([5, 40, 110, 130], rng.randint(0, 3))]
    seen = set(rng.sample(pool_order, min(len(pool_order), rng.randint(0, 3))))
    expected = fit_groups_order(entries, pool_order, groups, seen)
    expected.sort(key=key_of.__getitem__)  # stable
    assert list(by_key.load_order(groups, set(seen))) == expected
    assert list(by_key) == pool_order
    by_key.check_invariants()


def test_the_newest_is_the_last_in_pool_order():
    """preempt_one recomputes the most recently pooled request: the pool's last."""
    pool = Pool(key=declared_output_tokens)
    for rid, declared in (("a", 64), ("b", 8), ("c", 512)):
        pool.add(make_request(rid, 100, declared))
    assert pool.newest() == "c"
    pool.sort({"a": 3.0, "b": 1.0, "c": 2.0}.__getitem__)  # "a" came back, waiting since 3
    assert list(pool) == ["b", "c", "a"] and pool.newest() == "a"
    pool.remove("a")
    assert pool.newest() == "c" and len(pool) == 2 and "a" not in pool
