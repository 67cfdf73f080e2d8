"""Prefill on the pair's second GPU, beside the decode GPU's step; its KV lands in the pool.

The prefill device holds a replica of the weights and a staging KV cache. It keeps nothing
between steps: a chunk's cached KV is copied in from the request's pool blocks, the chunk
runs, and its new KV is copied out to the pool blocks. A batch counts as prefilled once its
copies out are done (`PrefillRun.is_copied`), so a prefilled request's KV is whole in the
pool, as after any write-back, and the decode device never spends a block or a moment on it
until the batcher loads it into a batch.

Why a second device: a prompt chunk is compute-bound and long (8,192 tokens of an 8B model:
~190 ms on an H200), a decode step is memory-bound and short (~10-30 ms). Mixed into the
decode step, every chunk stretches the time per output token of every running request; on
its own device it only costs the batcher one step's wait for its first token.

The staging cache is a ring: each pass takes the next blocks, and its copies out run on a
copy stream of their own while the next pass computes in the blocks after them (a pass waits
only for copies out still reading its own blocks). Copying a batch's KV out takes ~11 % of
its pass (Llama-3-8B, 8k tokens: 1 GiB over PCIe), which the device otherwise idles through.

Chunks that do not fit the staging cache together run as several forward passes, each
within it. One chunk alone always fits: the batcher admits no request whose context could
outgrow the cache (ModelInfo.num_prefill_blocks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from alignedserve.common import stats_line
from alignedserve.common.errors import InvalidRequestError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.worker.kv_cache import copy_blocks
from alignedserve.worker.runner import LaunchedStep, ModelRunner, SampledToken, SeqChunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillJob:
    """One prompt chunk for the prefill device."""

    request_id: str
    token_ids: tuple[int, ...]
    num_cached_tokens: int  # tokens whose KV is in pool_blocks already
    pool_blocks: tuple[int, ...]  # cover num_cached_tokens + len(token_ids)
    sampling: SamplingParams | None  # None: a chunk that does not end the prompt


@dataclass(frozen=True)
class PrefillRun:
    """A batch of chunks, computed; its KV may still be on its way to the pool."""

    sampled: list[SampledToken]
    seconds: float  # from the run's start until its passes were done (not its copies out)
    copied: torch.cuda.Event | None  # its copies out to the pool; None: done with the run
    # each pass's span on the device, first kernel to last (CUDA events; CPU: the host's):
    # gaps inside a pass, the device waiting for the host's launches, count in it
    pass_span_s: float

    def is_copied(self) -> bool:
        return self.copied is None or self.copied.query()

    def wait_copied(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


class Prefiller:
    def __init__(self, runner: ModelRunner):
        self.runner = runner  # over the prefill device's staging cache (eager: no graphs)
        self.blocks = runner.kv_cache.blocks  # [staging blocks, layers, 2, T, kv_heads, D]
        self.num_blocks = runner.kv_cache.num_blocks
        self.layout = runner.kv_cache.layout
        self.device = self.blocks.device
        on_gpu = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._next_block = 0  # the ring's cursor: where the next pass's blocks start
        # copies out still in flight: (first block, end block, done) in the staging cache
        self._copying: list[tuple[int, int, torch.cuda.Event]] = []
        self._stats = _RunStats(self.device)

    def run(self, jobs: Sequence[PrefillJob], pool: torch.Tensor) -> PrefillRun:
        """Run the chunks against the pool's blocks ([num_pool_blocks, *block_shape], pinned
        on a GPU machine): their sampled tokens, once computed. Called from a thread of its
        own while the decode device runs its step."""
        start = time.perf_counter()
        with self.runner.on_device():
            # every pass queued before the first result is awaited: no gap between them
            launched = [self._launch(batch, pool) for batch in self._batches(jobs)]
            sampled = [t for step in launched for t in step.result()]
        seconds = time.perf_counter() - start
        pass_span_s = sum(step.compute_s for step in launched)
        self._stats.add(
            sum(len(job.token_ids) for job in jobs),
            seconds,
            pass_span_s,
            sum(step.host_s for step in launched),
        )
        # (on a GPU, the run's last pass queued the newest copy out: it ends them all)
        copied = self._copying[-1][2] if self._copying else None
        return PrefillRun(sampled, seconds, copied, pass_span_s)

    def _batches(self, jobs: Sequence[PrefillJob]) -> Iterator[list[tuple[PrefillJob, int]]]:
        """Consecutive jobs whose staging blocks fit the cache together, each with its
        blocks."""
        batch: list[tuple[PrefillJob, int]] = []
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
            batch.append((job, need))
            used += need
        if batch:
            yield batch

    def _take_blocks(self, num_blocks: int) -> int:
        """The first of the ring's next `num_blocks` blocks (from its start again when they
        would pass its end). The device's work from here on waits for the copies out still
        reading any of them."""
        first = self._next_block if self._next_block + num_blocks <= self.num_blocks else 0
        end = self._next_block = first + num_blocks
        still: list[tuple[int, int, torch.cuda.Event]] = []
        for lo, hi, done in self._copying:
            if first < hi and lo < end:
                torch.cuda.current_stream().wait_event(done)
            elif not done.query():
                still.append((lo, hi, done))
        self._copying = still
        return first

    def _launch(self, batch: list[tuple[PrefillJob, int]], pool: torch.Tensor) -> LaunchedStep:
        """Queue one pass: copies in, the forward pass, copies out (on the copy stream)."""
        first = self._take_blocks(sum(need for _, need in batch))
        chunks: list[SeqChunk] = []
        into: list[tuple[int, int]] = []  # (staging block, pool block) of the cached KV
        out: list[tuple[int, int]] = []  # (pool block, staging block) of the new KV
        end = first
        for job, need in batch:
            table = tuple(range(end, end + need))
            end += need
            num_cached_blocks = self.layout.blocks_for(job.num_cached_tokens)
            into += zip(table[:num_cached_blocks], job.pool_blocks[:num_cached_blocks], strict=True)
            # from the block holding the first new token (it may also hold cached tokens)
            keep = job.num_cached_tokens // self.layout.block_tokens
            out += zip(job.pool_blocks[keep:need], table[keep:], strict=True)
            chunks.append(
                SeqChunk(job.request_id, job.token_ids, job.num_cached_tokens, table, job.sampling)
            )
        copy_blocks(self.blocks, pool, into)
        launched = self.runner.launch(chunks)
        if self._copy_stream is None:  # on the CPU the pass is done: copy now
            copy_blocks(pool, self.blocks, out)
            return launched
        self._copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._copy_stream):
            copy_blocks(pool, self.blocks, out)
            done = self._copy_stream.record_event()
        self._copying.append((first, end, done))
        return launched


class _RunStats:
    """The prefill device's periodic line (`common/stats_line`'s interval): the runs since
    the last line, their prompt tokens per second of wall time and of the passes' spans on
    the device, the share of their wall time the passes spanned and the host spent queueing
    them, and the caching allocator's new device allocations and retries (either can wait
    for the whole device). Wall time outside the passes' spans is the device waiting between
    passes: for the host to queue the next (its thread held up, by the GIL for one, or by the
    allocator), or for copies in the pass waits on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self._reset()

    def _allocs(self) -> tuple[int, int]:
        if self.device is None:
            return 0, 0
        stats = torch.cuda.memory_stats(self.device)
        return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)

    def _reset(self) -> None:
        self.num_runs = self.tokens = 0
        self.wall_s = self.span_s = self.host_s = 0.0
        self.window = stats_line.Window()
        self.allocs_then = self._allocs()

    def add(self, tokens: int, wall_s: float, span_s: float, host_s: float) -> None:
        self.num_runs += 1
        self.tokens += tokens
        self.wall_s += wall_s
        self.span_s += span_s
        self.host_s += host_s
        if not self.window.is_due(self.num_runs):
            return
        allocs = [n - then for n, then in zip(self._allocs(), self.allocs_then, strict=True)]
        logger.info(
            "prefill: %d prompt tokens in %d runs, %.2f s (%.0f tokens/s; %.0f per second of "
            "the passes' spans on the device): the passes spanned %.0f%% of it, the host "
            "queued them %.0f%%; %.0f%% of the last %.1f s in runs; %d new device "
            "allocations, %d allocation retries",
            self.tokens,
            self.num_runs,
            self.wall_s,
            self.tokens / max(self.wall_s, 1e-9),
            self.tokens / max(self.span_s, 1e-9),
            100 * self.span_s / max(self.wall_s, 1e-9),
            100 * self.host_s / max(self.wall_s, 1e-9),
            100 * self.wall_s / max(self.window.elapsed_s, 1e-9),
            self.window.elapsed_s,
            *allocs,
        )
        self._reset()
