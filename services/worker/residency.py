"""Which requests have their KV on the decode device, and the block copies between the
batcher's CPU pool and device memory.

The batcher decides everything (which request, which pool blocks, when); this module only
keeps the device side consistent with its plan: a device block list per resident request,
how many tokens of KV it holds, and how many of those are also in the pool (`num_synced`).
A request's i-th device block mirrors its i-th pool block, so moving KV either way is one
indexed copy of whole blocks, never a re-layout (the block format is the same on both sides).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import ConfigError, InvalidRequestError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.kv_cache import KVCache, copy_blocks
from alignedserve.worker.pool_mapping import PoolMapping
from alignedserve.worker.runner import SeqChunk


@dataclass
class _Resident:
    device_blocks: list[int]
    num_kv_tokens: int  # tokens whose KV is on the device
    num_synced: int  # of those, tokens whose KV is also in the pool
    # a GPU load's copies still running on side streams: whatever first uses the device
    # blocks (a pass, a write-back, freeing them) makes the current stream wait for it
    landing: torch.cuda.Event | None = None


class DeviceResidency:
    """Device KV blocks of the resident requests, over one attached CPU pool. Not thread-safe:
    the service calls it from one step at a time.

    `second`: the residents of the pair's prefill device, when it decodes too
    (`prefill_decode_kv`, its decode KV cache): the same kind of object over the same pool
    mapping, loading over that device's own link."""

    def __init__(
        self,
        kv_cache: KVCache,
        mapping: PoolMapping,  # the attached pool, pinned on a GPU; its owner closes it
        prefetch_device: str | None = None,
        prefill_decode_kv: KVCache | None = None,
        *,
        on_prefill_device: bool = False,  # this is the prefill device's (`second`)
    ):
        pool = mapping.pool
        if pool.layout != kv_cache.layout:
            raise ConfigError(
                f"pool {pool.name!r} has layout {pool.layout}, the device cache {kv_cache.layout}"
            )
        if kv_cache.blocks.is_cuda and not (mapping.is_pinned or mapping.mirror_only):
            raise ConfigError(f"pool {pool.name!r} is not page-locked: GPU copies need it")
        self.mirror_only = mapping.mirror_only  # no KV is copied through the pool (fcfs)
        self.kv_cache = kv_cache
        self.pool = pool
        self.allocator = BlockAllocator(kv_cache.num_blocks)
        self._block_tokens = kv_cache.layout.block_tokens
        # [num_pool_blocks, layers, 2, block_tokens, kv_heads, head_dim], over the segment
        self._pool_blocks: torch.Tensor | None = mapping.blocks
        self._requests: dict[str, _Resident] = {}
        # Loads whose copies may still run (GPU): each request's end of copies, and each load
        # batch's (begin, end), or its seconds where the copies are done when `load_batch`
        # returns (CPU).
        # Queried, never waited for: a step that uses none of them answers without them.
        self._copying: dict[str, torch.cuda.Event] = {}
        self._batches: list[tuple[torch.cuda.Event, torch.cuda.Event] | float] = []
        # On a GPU: loads are DMA on a copy stream (Prefetcher) and write-backs are DMA too;
        # on the CPU the indexed copies below are already direct.
        self._prefetcher = None
        if kv_cache.blocks.is_cuda and not self.mirror_only:
            from alignedserve.worker.prefetch import Prefetcher

            self._prefetcher = Prefetcher(
                self._pool_blocks, kv_cache.blocks, staging_device=prefetch_device
            )
            # waits for each load's copies and marks their end, holding up no pass
            self._landing_stream = torch.cuda.Stream(kv_cache.blocks.device)
        self.on_prefill_device = on_prefill_device
        self.second = (
            DeviceResidency(prefill_decode_kv, mapping, on_prefill_device=True)
            if prefill_decode_kv is not None
            else None
        )

    # ---------------------------------------------------------------- queries

    @property
    def num_resident(self) -> int:
        return len(self._requests)

    def is_resident(self, request_id: str) -> bool:
        return request_id in self._requests

    def num_kv_tokens(self, request_id: str) -> int:
        return self._get(request_id, "query").num_kv_tokens

    def num_synced(self, request_id: str) -> int:
        return self._get(request_id, "query").num_synced

    def block_table(self, request_id: str) -> tuple[int, ...]:
        """The request's device blocks, in token order."""
        return tuple(self._get(request_id, "query").device_blocks)

    # ---------------------------------------------------------------- residency

    def load(self, request_id: str, pool_blocks: Sequence[int], num_kv_tokens: int) -> None:
        """Bring the first num_kv_tokens tokens of KV from the request's pool blocks onto the
        device; it is resident after, fully synced. num_kv_tokens=0 only registers it."""
        self.load_batch([(request_id, pool_blocks, num_kv_tokens)])

    def load_batch(self, loads: Sequence[tuple[str, Sequence[int], int]]) -> None:
        """`load` each (request_id, pool_blocks, num_kv_tokens), their copies started
        together. On a GPU they run on side streams, beside the passes: `copying` tells who
        still waits for them, `landed_seconds` the time they took once done."""
        if not loads:
            return
        if self._prefetcher is None:  # plain copies: done when they return
            start = time.perf_counter()
            self._load_all(loads)
            self._batches.append(time.perf_counter() - start)
            return
        # The copies start once the work queued on the current stream before them is done
        # (Prefetcher.start): `begin` marks that point, the landing event their end.
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        end = self._load_all(loads)
        if end is not None:
            self._batches.append((begin, end))

    @property
    def direct_share(self) -> float | None:
        """The share of a load's blocks the decode GPU copies over its own link, where a
        prefetch GPU takes the rest (it follows the loads' rates: prefetch.SplitBalance);
        None with one link."""
        if self._prefetcher is None or self._prefetcher.staging_device is None:
            return None
        return self._prefetcher.direct_share

    def landed_seconds(self) -> float:
        """The longest time one load batch took, of those whose copies ended since the last
        call (0: none). Does not wait."""
        done, pending = [], []
        for batch in self._batches:
            if isinstance(batch, float):
                done.append(batch)
            elif batch[1].query():
                done.append(batch[0].elapsed_time(batch[1]) / 1000)
            else:
                pending.append(batch)
        self._batches = pending
        return max(done, default=0.0)

    def copying(self) -> list[str]:
        """Residents whose load's copies still run (on a GPU). Does not wait."""
        for request_id in [r for r, event in self._copying.items() if event.query()]:
            del self._copying[request_id]
        return list(self._copying)

    def _load_all(self, loads: Sequence[tuple[str, Sequence[int], int]]) -> torch.cuda.Event | None:
        """Register each load with its device blocks, then copy all their blocks in at once:
        one `Prefetcher.start` a step, so its host work (stream orders, block lists, the
        gather) is paid once, and runs of blocks coalesce across requests. On a GPU returns
        the event every use of these blocks waits for (`_landed`). A load that fails (already
        resident, bad pool blocks, device full) raises after the ones before it are in."""
        pool_side: list[int] = []
        device_side: list[int] = []
        loaded: dict[str, _Resident] = {}
        try:
            for request_id, pool_blocks, num_kv_tokens in loads:
                if request_id in self._requests:
                    raise InvalidRequestError(f"load {request_id!r}: it is already resident")
                num_blocks = self.kv_cache.layout.blocks_for(num_kv_tokens)
                self._check_pool_blocks("load", request_id, pool_blocks, num_blocks)
                device_blocks = self.allocator.allocate(num_blocks)
                pool_side += pool_blocks[:num_blocks]
                device_side += device_blocks
                r = _Resident(device_blocks, num_kv_tokens, num_kv_tokens)
                self._requests[request_id] = r
                loaded[request_id] = r
        finally:
            landing = self._copy_in(pool_side, device_side)
            for request_id, r in loaded.items():
                r.landing = landing
                if landing is not None:
                    self._copying[request_id] = landing
        return landing

    def _copy_in(self, pool_blocks: list[int], device_blocks: list[int]) -> torch.cuda.Event | None:
        if not pool_blocks:
            return None
        if self._prefetcher is None:
            pairs = list(zip(device_blocks, pool_blocks, strict=True))
            copy_blocks(self.kv_cache.blocks, self.pool_view(), pairs)
            return None
        # Copy engines on side streams, beside the passes queued meanwhile; only a use of
        # these blocks waits for them (`_landed`).
        for event in self._prefetcher.start(pool_blocks, device_blocks):
            self._landing_stream.wait_event(event)
        landing = torch.cuda.Event(enable_timing=True)
        landing.record(self._landing_stream)
        return landing

    def ensure_room(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """Grow the request's device blocks to hold num_tokens tokens; its block table.
        OutOfBlocksError (nothing allocated) when the device is full."""
        r = self._get(request_id, "ensure_room")
        need = self.kv_cache.layout.blocks_for(num_tokens) - len(r.device_blocks)
        if need > 0:
            r.device_blocks.extend(self.allocator.allocate(need))
        return tuple(r.device_blocks)

    def advance(self, request_id: str, num_new_tokens: int) -> None:
        """num_new_tokens more tokens of KV were written on the device (after a forward)."""
        r = self._get(request_id, "advance")
        num_tokens = r.num_kv_tokens + num_new_tokens
        if num_tokens > len(r.device_blocks) * self._block_tokens:
            raise ValueError(f"{request_id!r}: {num_tokens} tokens exceed its device blocks")
        r.num_kv_tokens = num_tokens

    def write_back(self, request_id: str, pool_blocks: Sequence[int]) -> None:
        """Copy the KV not yet in the pool (tokens [num_synced, num_kv_tokens)) to the
        matching pool blocks: whole blocks, from the one holding token num_synced. On a GPU
        the copies are queued on the current stream: the batcher counts these tokens safe in
        the pool once the step answers, so the step waits for the stream before answering
        (worker/executor.py)."""
        r = self._landed(self._get(request_id, "write_back"))
        num_blocks = self.kv_cache.layout.blocks_for(r.num_kv_tokens)
        self._check_pool_blocks("write_back", request_id, pool_blocks, num_blocks)
        if r.num_synced < r.num_kv_tokens:
            first = r.num_synced // self._block_tokens
            dst, src = pool_blocks[first:num_blocks], r.device_blocks[first:num_blocks]
            copy_blocks(self.pool_view(), self.kv_cache.blocks, list(zip(dst, src, strict=True)))
        r.num_synced = r.num_kv_tokens

    def release(self, request_id: str) -> None:
        """Free the request's device blocks, no write-back. Not resident: nothing to do, so
        the batcher may release a finished or aborted request wherever its KV lives."""
        r = self._requests.pop(request_id, None)
        self._copying.pop(request_id, None)
        if r is not None:
            self._landed(r)  # whoever gets the blocks next writes them after the copies
            self.allocator.free(r.device_blocks)

    def release_all(self) -> None:
        for request_id in list(self._requests):
            self.release(request_id)
        self._batches.clear()
        if self.second is not None:
            self.second.release_all()

    def close(self) -> None:
        """Release everything, once the device's copies are done; the pool's mapping is its
        owner's to close after."""
        self.release_all()
        if self.second is not None:
            self.second.close()
            self.second = None
        if self._prefetcher is not None:
            torch.cuda.synchronize(self.kv_cache.blocks.device)
            self._prefetcher = None
        self._pool_blocks = None

    # ---------------------------------------------------------------- one step's chunks

    def prefill_chunk(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_cached_tokens: int,
        pool_blocks: Sequence[int],
        sampling: SamplingParams | None,
    ) -> SeqChunk:
        """Make the request resident with room for the chunk. A request not resident has its
        first num_cached_tokens tokens of KV in the pool (an earlier chunk, or a re-prefill
        after a worker restart): they are loaded first."""
        if request_id in self._requests:
            self._check_length("prefill", request_id, "num_cached_tokens", num_cached_tokens)
        else:
            self.load(request_id, pool_blocks, num_cached_tokens)
        self._landed(self._requests[request_id])
        table = self.ensure_room(request_id, num_cached_tokens + len(token_ids))
        return SeqChunk(request_id, tuple(token_ids), num_cached_tokens, table, sampling)

    def decode_chunk(
        self, request_id: str, token_id: int, num_kv_tokens: int, sampling: SamplingParams
    ) -> SeqChunk:
        """One decode token for a resident request whose device KV must hold num_kv_tokens."""
        self._landed(self._get(request_id, "decode"))
        self._check_length("decode", request_id, "num_kv_tokens", num_kv_tokens)
        table = self.ensure_room(request_id, num_kv_tokens + 1)
        return SeqChunk(request_id, (token_id,), num_kv_tokens, table, sampling)

    # ---------------------------------------------------------------- helpers

    def _get(self, request_id: str, op: str) -> _Resident:
        r = self._requests.get(request_id)
        if r is None:
            raise InvalidRequestError(f"{op} {request_id!r}: it is not resident on the device")
        return r

    def _landed(self, r: _Resident) -> _Resident:
        """The request's blocks are about to be used: work queued on the current stream from
        now on runs after its load's copies (the host does not wait)."""
        if r.landing is not None:
            torch.cuda.current_stream(self.kv_cache.blocks.device).wait_event(r.landing)
            r.landing = None
        return r

    def _check_length(self, op: str, request_id: str, field: str, value: int) -> None:
        have = self._requests[request_id].num_kv_tokens
        if value != have:
            raise InvalidRequestError(
                f"{op} {request_id!r}: {field}={value}, but the device holds {have} tokens "
                f"of its KV",
                param=field,
            )

    def _check_pool_blocks(
        self, op: str, request_id: str, pool_blocks: Sequence[int], num_blocks: int
    ) -> None:
        if len(pool_blocks) < num_blocks:
            raise InvalidRequestError(
                f"{op} {request_id!r}: {len(pool_blocks)} pool blocks given, its KV needs "
                f"{num_blocks}",
                param="pool_blocks",
            )
        bad = [b for b in pool_blocks[:num_blocks] if not 0 <= b < self.pool.num_blocks]
        if bad:
            raise InvalidRequestError(
                f"{op} {request_id!r}: pool blocks {bad[:3]} out of range "
                f"[0, {self.pool.num_blocks})",
                param="pool_blocks",
            )

    def pool_view(self) -> torch.Tensor:
        """The pool's blocks as a tensor: [num_pool_blocks, *block_shape] (pinned on a GPU)."""
        if self._pool_blocks is None:
            raise RuntimeError(f"the pool {self.pool.name!r} was closed")
        if self.mirror_only:  # a copy here would read or write an unlocked, sparse segment
            raise RuntimeError(
                f"the pool {self.pool.name!r} is mirror-only: no KV moves through it"
            )
        return self._pool_blocks
