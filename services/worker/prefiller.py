"""Prefill on the pair's second GPU, beside the decode GPU's step; its KV lands in the pool.

The prefill device holds a replica of the weights and a staging KV cache. It keeps nothing
between steps: a chunk's cached KV is copied in from the request's pool blocks, the chunk
runs, and its new KV is copied out to the pool blocks before the step answers. So a
prefilled request's KV is whole in the pool, as after any write-back, and the decode device
never spends a block or a moment on it until the batcher loads it into a batch.

Why a second device: a prompt chunk is compute-bound and long (8,192 tokens of an 8B model:
~190 ms on an H200), a decode step is memory-bound and short (~10-30 ms). Mixed into the
decode step, every chunk stretches the time per output token of every running request; on
its own device it only costs the batcher one step's wait for its first token.

Chunks that do not fit the staging cache together run as several forward passes, each
within it. One chunk alone always fits: the batcher admits no request whose context could
outgrow the cache (ModelInfo.num_prefill_blocks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.kv_cache import copy_blocks
from alignedserve.worker.runner import ModelRunner, SampledToken, SeqChunk


@dataclass(frozen=True)
class PrefillJob:
    """One prompt chunk for the prefill device."""

    request_id: str
    token_ids: tuple[int, ...]
    num_cached_tokens: int  # tokens whose KV is in pool_blocks already
    pool_blocks: tuple[int, ...]  # cover num_cached_tokens + len(token_ids)
    sampling: SamplingParams | None  # None: a chunk that does not end the prompt


class Prefiller:
    def __init__(self, runner: ModelRunner):
        self.runner = runner  # over the prefill device's staging cache (eager: no graphs)
        self.blocks = runner.kv_cache.blocks  # [staging blocks, layers, 2, T, kv_heads, D]
        self.num_blocks = runner.kv_cache.num_blocks
        self.layout = runner.kv_cache.layout
        self.device = self.blocks.device

    def run(
        self, jobs: Sequence[PrefillJob], pool: torch.Tensor
    ) -> tuple[list[SampledToken], float]:
        """Run the chunks against the pool's blocks ([num_pool_blocks, *block_shape], pinned
        on a GPU machine); returns their sampled tokens and the seconds it took. Called from
        a thread of its own while the decode device runs its step."""
        start = time.perf_counter()
        sampled: list[SampledToken] = []
        with self.runner.on_device():
            for batch in self._batches(jobs):
                sampled += self._run_batch(batch, pool)
            # the copies out must reach the pool before the step answers
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        return sampled, time.perf_counter() - start

    def _batches(self, jobs: Sequence[PrefillJob]) -> Iterator[list[PrefillJob]]:
        """Consecutive jobs whose staging blocks fit the cache together."""
        batch: list[PrefillJob] = []
        used = 0
        for job in jobs:
            need = self.layout.blocks_for(job.num_cached_tokens + len(job.token_ids))
            if need > self.num_blocks:
                raise InvalidRequestError(
                    f"prefill {job.request_id!r}: {need} KV blocks, more than the prefill "
                    f"device's {self.num_blocks}",
                    param="num_cached_tokens",
                )
            if len(job.pool_blocks) < need:
                raise InvalidRequestError(
                    f"prefill {job.request_id!r}: {len(job.pool_blocks)} pool blocks given, "
                    f"its KV needs {need}",
                    param="pool_blocks",
                )
            if used + need > self.num_blocks:
                yield batch
                batch, used = [], 0
            batch.append(job)
            used += need
        if batch:
            yield batch

    def _run_batch(self, batch: list[PrefillJob], pool: torch.Tensor) -> list[SampledToken]:
        chunks: list[SeqChunk] = []
        into: list[tuple[int, int]] = []  # (staging block, pool block) of the cached KV
        out: list[tuple[int, int]] = []  # (pool block, staging block) of the new KV
        first = 0
        for job in batch:
            end = job.num_cached_tokens + len(job.token_ids)
            table = tuple(range(first, first + self.layout.blocks_for(end)))
            first += len(table)
            num_cached_blocks = self.layout.blocks_for(job.num_cached_tokens)
            into += zip(table[:num_cached_blocks], job.pool_blocks[:num_cached_blocks], strict=True)
            # from the block holding the first new token (it may also hold cached tokens)
            keep = job.num_cached_tokens // self.layout.block_tokens
            out += zip(job.pool_blocks[keep : len(table)], table[keep:], strict=True)
            chunks.append(
                SeqChunk(job.request_id, job.token_ids, job.num_cached_tokens, table, job.sampling)
            )
        copy_blocks(self.blocks, pool, into)
        sampled = self.runner.step(chunks)  # host values: the forward pass is done
        copy_blocks(pool, self.blocks, out)
        return sampled
