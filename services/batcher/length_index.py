"""Pooled requests indexed by current KV length, for length-aligned ("prefix-aware") batching.

Only pooled requests are indexed: their lengths do not change until they run again (see
docs/batcher.md). Lengths fall into log-linear buckets: width 1 below 2**s, then 2**s
sub-buckets per power of two, so a bucket spans at most 1/2**s of its length and a band of
W adjacent buckets bounds the batch's *relative* length spread, which is what a padded decode
step wastes. add/remove are O(1); a query over a range of lengths visits its buckets (at most
~400), so its cost does not grow with the number of pooled requests; only non-empty buckets
are stored.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

import numpy as np

MAX_LENGTH = 65536


def bucket_of(length: int, sub_bits: int = 5) -> int:
    """Bucket index of a length >= 1; monotonic, contiguous."""
    if length < (1 << sub_bits):
        return length
    shift = length.bit_length() - 1 - sub_bits
    return ((shift + 1) << sub_bits) + (length >> shift) - (1 << sub_bits)


def bucket_of_array(lengths: np.ndarray, sub_bits: int = 5) -> np.ndarray:
    """bucket_of for an int array of lengths >= 1."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bit_length = np.frexp(lengths.astype(np.float64))[1]  # exact below 2**53
    shift = np.maximum(bit_length - 1 - sub_bits, 0)
    big = ((shift + 1) << sub_bits) + (lengths >> shift) - (1 << sub_bits)
    return np.where(lengths < (1 << sub_bits), lengths, big)


class LengthIndex:
    def __init__(self, max_length: int = MAX_LENGTH, sub_bits: int = 5):
        self.max_length, self.sub_bits = max_length, sub_bits
        # Per non-empty bucket, request_id -> entry order; dicts keep insertion order, so
        # iterating a bucket yields its members oldest-entry first. Sparse, so that an index
        # of a few requests is small (the pool keeps one per load-order class). Only ints
        # are stored: a tuple per request would be tracked by the cyclic GC and make churn
        # trigger long collections.
        self._buckets: dict[int, dict[str, int]] = {}
        self._where: dict[str, int] = {}  # request_id -> bucket
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def add(self, request_id: str, length: int) -> None:
        if not 1 <= length <= self.max_length:
            raise ValueError(f"length={length} outside 1..{self.max_length}")
        if request_id in self._where:
            raise KeyError(f"request {request_id!r} already indexed")
        b = bucket_of(length, self.sub_bits)
        self._buckets.setdefault(b, {})[request_id] = next(self._order)
        self._where[request_id] = b

    def remove(self, request_id: str) -> None:
        b = self._where.pop(request_id)
        bucket = self._buckets[b]
        del bucket[request_id]
        if not bucket:
            del self._buckets[b]

    def iter_lengths(self, min_length: int, max_length: int) -> Iterator[str]:
        """The request ids in the buckets of min_length..max_length (clamped to 1..max_length),
        oldest entry first, lazily: O(W) to start for W buckets, O(log W) each."""
        lo, hi = self._bucket(min_length), self._bucket(max_length)
        found = (self._buckets.get(b) for b in range(lo, hi + 1))
        buckets = (self._bucket_items(bucket) for bucket in found if bucket)
        return (rid for _, rid in heapq.merge(*buckets))

    @staticmethod
    def _bucket_items(bucket: dict[str, int]) -> Iterator[tuple[int, str]]:
        return ((order, rid) for rid, order in bucket.items())

    def _bucket(self, length: int) -> int:
        return bucket_of(min(max(length, 1), self.max_length), self.sub_bits)
