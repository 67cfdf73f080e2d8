"""The Worker gRPC service: runs the batcher's step plans on one model (`worker.proto`).

The worker follows plans and decides nothing: per step it loads KV from the batcher's CPU
pool, runs one forward pass over every prefill chunk and decode entry, samples, then writes
back and frees what the plan says. It keeps no request state beyond device residency, so a
batcher that loses its worker re-prefills each request from its last write-back, and one that
restarts re-attaches its pool.

This module imports no torch at import time: the CLI builds its parser from `WorkerConfig`,
and `--help` must not pay for torch. The torch side is imported where the model is loaded
(`server.py`, which also runs the process).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common import flags
from alignedserve.common.errors import AlignedServeError, ConfigError, InvalidRequestError
from alignedserve.common.model_config import DTYPES
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import REJECTED_STEP_KEY, grpc_status
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.common.wire import layout_from_proto, sampling_from_proto

if TYPE_CHECKING:
    from alignedserve.worker.prefiller import Prefiller
    from alignedserve.worker.residency import DeviceResidency
    from alignedserve.worker.runner import ModelRunner, SampledToken, SeqChunk

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
STOP_GRACE_S = 5.0  # on shutdown, in-flight RPCs get this long before they are cancelled
STATS_INTERVAL_S = 10.0
# Default staging room on the prefill device beyond one whole context: the batcher's default
# prefill budget per step, so a long request's last chunk and a step's other chunks fit at once.
PREFILL_STAGING_EXTRA_TOKENS = 8192


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str = field(metadata={"help": "Hugging Face model directory"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1"})
    dtype: str | None = field(
        default=None,
        metadata={"help": "weights and KV dtype (default: the checkpoint's)", "choices": DTYPES},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "port to listen on; 0 picks a free one"})
    num_device_blocks: int = field(
        default=2048, metadata={"help": "KV blocks on the device (the decode KV capacity)"}
    )
    block_tokens: int = field(default=16, metadata={"help": "tokens per KV block"})
    prefetch_device: str | None = field(
        default=None,
        metadata={
            "help": "the pair's prefetch GPU (e.g. cuda:1): loads use both PCIe links, and "
            "prefill runs there (see offload_prefill)"
        },
    )
    offload_prefill: bool = field(
        default=True,
        metadata={
            "help": "with a prefetch device: prefill on a replica of the weights there, "
            "beside the decode step (else every chunk runs on the decode device)"
        },
    )
    prefill_kv_tokens: int = field(
        default=0,
        metadata={
            "help": "staging KV on the prefetch device, tokens; 0: one whole context plus "
            f"{PREFILL_STAGING_EXTRA_TOKENS} (a step's chunks)"
        },
    )
    # A batcher that reconnects may open its new Session before the worker has seen the old
    # stream end (and finished its in-flight step): it waits this long, then is refused.
    session_handover_s: float = field(
        default=5.0, metadata={"help": "how long a new Session waits for the previous to end"}
    )

    def __post_init__(self) -> None:
        checks = (
            ("model_dir", bool(self.model_dir), "must name a directory"),
            ("device", bool(self.device), "must name a torch device"),
            ("dtype", self.dtype is None or self.dtype in DTYPES, f"not one of {list(DTYPES)}"),
            ("host", bool(self.host), "must name an address"),
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
            ("num_device_blocks", self.num_device_blocks >= 1, "must be >= 1"),
            ("block_tokens", self.block_tokens >= 1, "must be >= 1"),
            ("session_handover_s", self.session_handover_s >= 0, "must be >= 0"),
            ("prefill_kv_tokens", self.prefill_kv_tokens >= 0, "must be >= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"WorkerConfig.{name}={getattr(self, name)!r} {rule}")


# ---------------------------------------------------------------- CLI flags from the config


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, WorkerConfig, renames={"model_dir": "--model"})


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return flags.from_args(WorkerConfig, args)


# ---------------------------------------------------------------- the service


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Describe / Attach / Session over one loaded model. One Session at a time; its steps
    run strictly in order, each in a worker thread so the event loop keeps serving."""

    def __init__(
        self,
        info: worker_pb2.ModelInfo,
        runner: ModelRunner,
        new_residency: Callable[[CpuKVPool], DeviceResidency],
        session_handover_s: float = 5.0,
        prefiller: Prefiller | None = None,
    ):
        self.info = info
        self.layout = layout_from_proto(info.kv_layout)
        self.port: int | None = None  # set by serve_worker once bound
        self.residency: DeviceResidency | None = None  # set by Attach
        self._runner = runner
        self._new_residency = new_residency
        self._handover_s = session_handover_s
        self._session_lock = asyncio.Lock()
        self._prefiller = prefiller
        # One thread drives the prefill device: its batch of chunks runs across decode steps.
        self._prefill_thread = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefill")
            if prefiller is not None
            else None
        )
        self._prefilling: concurrent.futures.Future | None = None  # the batch in flight
        self._prefilling_ids: frozenset[str] = frozenset()
        self._stats = StepStats()  # since the last stats line
        self._stats_at = time.monotonic()
        # each live request's latest sampled token, this session: a decode the batcher sent
        # before that token's step was answered takes it as input (DecodeEntry.last_sampled)
        self._last_sampled: dict[str, int] = {}

    async def Describe(self, request, context) -> worker_pb2.ModelInfo:
        return self.info

    async def Attach(self, request, context) -> worker_pb2.AttachResponse:
        if self._session_lock.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "a Session is running: end it before Attach"
            )
        try:
            layout = layout_from_proto(request.kv_layout)
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Attach: kv_layout: {e}")
        if layout != self.layout:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Attach: the pool's kv_layout {layout} differs from the model's {self.layout}",
            )
        try:
            pool = CpuKVPool.attach(request.pool_name, layout, request.num_pool_blocks)
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Attach: no shared-memory pool {request.pool_name!r}"
            )
        except ConfigError as e:  # size mismatch, num_pool_blocks < 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Attach: {e}")
        self.close()  # a batcher restart: the previous pool is gone from its side
        self.residency = self._new_residency(pool)
        logger.info("attached pool %r (%d blocks)", pool.name, pool.num_blocks)
        return worker_pb2.AttachResponse()

    async def Session(self, request_iterator, context) -> None:
        try:
            await asyncio.wait_for(self._session_lock.acquire(), self._handover_s)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another Session is running on this worker"
            )
        step: asyncio.Future[worker_pb2.StepResponse] | None = None
        try:
            if self.residency is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "no pool attached: call Attach first"
                )
            logger.info("session started")
            while (request := await context.read()) is not grpc.aio.EOF:
                began = time.perf_counter()
                step = asyncio.ensure_future(asyncio.to_thread(self._execute, request))
                # a step it cannot run ends the session, marked as that step's rejection
                rejected = ((REJECTED_STEP_KEY, str(request.step)),)
                try:
                    # shielded: a cancelled stream must not forget a step still running
                    response = await asyncio.shield(step)
                except AlignedServeError as e:
                    await context.abort(grpc_status(e), f"step {request.step}: {e}", rejected)
                except Exception as e:  # a bug or a device error: end the session, not the process
                    logger.exception("step %d failed", request.step)
                    await context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"step {request.step}: {type(e).__name__}: {e}",
                        rejected,
                    )
                await context.write(response)
                self._stats.add(response, time.perf_counter() - began)
                self._log_stats()
        finally:
            # A thread cannot be interrupted: free the device only once its step is done.
            if step is None or step.done():
                self._end_session(step)
            else:
                step.add_done_callback(self._end_session)

    def close(self) -> None:
        """Release the device and unmap the pool (at re-Attach and at shutdown)."""
        if self.residency is not None:
            self.residency.close()
            self.residency = None

    def _end_session(self, step: asyncio.Future | None) -> None:
        if step is not None and not step.cancelled():
            step.exception()  # retrieved here, so asyncio does not log it as never retrieved
        if self._prefilling is not None:
            # it writes into the pool's blocks: no next session (or pool) before it is done
            concurrent.futures.wait([self._prefilling])
            self._prefilling, self._prefilling_ids = None, frozenset()
        if self.residency is not None:
            self.residency.release_all()
        self._last_sampled.clear()
        self._session_lock.release()
        logger.info("session ended")

    # ---------------------------------------------------------------- one step (worker thread)

    def _execute(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        # asyncio.to_thread picks any pool thread: each step sets the device it runs on
        with self._runner.on_device():
            return self._execute_on_device(request)

    def _execute_on_device(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        res = self.residency
        assert res is not None, "Session checks Attach"
        self._check_unique(request)
        # First free what the batcher already counts as free (requests that finished before
        # this step): its plan may give their device blocks to this step's new requests.
        for request_id in request.release:
            res.release(request_id)
            self._last_sampled.pop(request_id, None)
        load_s = res.load_batch(
            [(e.request_id, e.pool_blocks, e.num_kv_tokens) for e in request.load]
        )
        # the prefill device's chunks start first and run while this thread does the rest
        self._start_offloaded(request)
        sampled, compute_s = self._execute_here(request, res)
        if request.wait_prefill and self._prefilling is not None:
            concurrent.futures.wait([self._prefilling])
        prefilled, sampled_there, prefill_s = self._take_prefilled()
        self._last_sampled.update((t.request_id, t.token_id) for t in (*sampled, *sampled_there))
        return worker_pb2.StepResponse(
            step=request.step,
            tokens=[
                worker_pb2.SampledToken(
                    request_id=t.request_id, token_id=t.token_id, logprob=t.logprob
                )
                for t in (*sampled, *sampled_there)
            ],
            compute_s=compute_s,
            load_s=load_s(),
            prefilled=prefilled,
            prefill_s=prefill_s,
        )

    def _take_prefilled(self) -> tuple[list[str], list[SampledToken], float]:
        """The prefill device's batch, if done: its request ids, sampled tokens and seconds
        (a batch that failed raises its error here, failing this step)."""
        if self._prefilling is None or not self._prefilling.done():
            return [], [], 0.0
        done, ids = self._prefilling, self._prefilling_ids
        self._prefilling, self._prefilling_ids = None, frozenset()
        sampled, seconds = done.result()
        return sorted(ids), sampled, seconds

    def _start_offloaded(self, request: worker_pb2.StepRequest) -> None:
        """Submit the step's on_prefill_device chunks to the prefill device's thread."""
        from alignedserve.worker.prefiller import PrefillJob

        jobs = []
        for c in request.prefill:
            if not c.on_prefill_device:
                continue
            if self._prefiller is None:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device, but this worker has no "
                    f"prefill device",
                    param="on_prefill_device",
                )
            if self._prefilling is not None:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: the prefill device still runs the batch of "
                    f"{sorted(self._prefilling_ids)[:3]}; send the next once it is done",
                    param="on_prefill_device",
                )
            if c.keep_resident:
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device chunks land in the pool; "
                    f"keep_resident must be false",
                    param="keep_resident",
                )
            if self.residency.is_resident(c.request_id):
                raise InvalidRequestError(
                    f"prefill {c.request_id!r}: on_prefill_device, but its KV is resident on "
                    f"the decode device",
                    param="on_prefill_device",
                )
            self._check_tokens(c.request_id, c.token_ids, c.num_cached_tokens)
            sampling = self._sampling(c.request_id, c.params) if c.sample else None
            jobs.append(
                PrefillJob(
                    c.request_id,
                    tuple(c.token_ids),
                    c.num_cached_tokens,
                    tuple(c.pool_blocks),
                    sampling,
                )
            )
        if jobs:
            pool = self.residency.pool_view()
            self._prefilling = self._prefill_thread.submit(self._prefiller.run, jobs, pool)
            self._prefilling_ids = frozenset(job.request_id for job in jobs)

    def _execute_here(
        self, request: worker_pb2.StepRequest, res: DeviceResidency
    ) -> tuple[list[SampledToken], float]:
        """The decode device's part of the step: its prefill chunks and decodes in one
        forward pass, then write-backs. Returns the tokens sampled and the pass's seconds."""
        chunks: list[SeqChunk] = []
        write_back = []  # prefill chunks not kept resident, then the evicted
        for c in request.prefill:
            if c.on_prefill_device:
                continue
            self._check_tokens(c.request_id, c.token_ids, c.num_cached_tokens)
            sampling = self._sampling(c.request_id, c.params) if c.sample else None
            chunks.append(
                res.prefill_chunk(
                    c.request_id, c.token_ids, c.num_cached_tokens, c.pool_blocks, sampling
                )
            )
            if not c.keep_resident:
                write_back.append((c.request_id, c.pool_blocks))
        for d in request.decode:
            token = self._decode_input(d)
            self._check_tokens(d.request_id, [token], d.num_kv_tokens)
            sampling = self._sampling(d.request_id, d.params)
            chunks.append(res.decode_chunk(d.request_id, token, d.num_kv_tokens, sampling))
        write_back += [(e.request_id, e.pool_blocks) for e in request.evict]
        compute_s = 0.0
        sampled: list[SampledToken] = []
        if chunks:
            start = time.perf_counter()
            sampled = self._runner.step(chunks)  # returns host values: the device is done
            compute_s = time.perf_counter() - start
            for chunk in chunks:
                res.advance(chunk.request_id, len(chunk.token_ids))
        for request_id, pool_blocks in write_back:
            res.write_back(request_id, pool_blocks)
            res.release(request_id)
        return sampled, compute_s

    def _decode_input(self, d: worker_pb2.DecodeEntry) -> int:
        if not d.last_sampled:
            return d.token_id
        token = self._last_sampled.get(d.request_id)
        if token is None:
            raise InvalidRequestError(
                f"decode {d.request_id!r}: last_sampled, but this session sampled no token for it",
                param="last_sampled",
            )
        return token

    def _check_unique(self, request: worker_pb2.StepRequest) -> None:
        ids = [c.request_id for c in request.prefill] + [d.request_id for d in request.decode]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidRequestError(f"requests {dup} appear twice in one forward pass")
        busy = self._prefilling_ids & {
            *ids,
            *(e.request_id for e in (*request.load, *request.evict)),
        }
        if busy:
            raise InvalidRequestError(
                f"requests {sorted(busy)[:3]} are being prefilled on the prefill device"
            )

    def _check_tokens(self, request_id: str, token_ids: Sequence[int], num_cached: int) -> None:
        # On a GPU an out-of-range index is a device-side assert that poisons the whole
        # context, so the plan is checked here, not left to the embedding lookup.
        if not token_ids:
            raise InvalidRequestError(f"{request_id!r}: no tokens to compute", param="token_ids")
        bad = [t for t in token_ids if t >= self.info.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{request_id!r}: token ids {bad[:3]} not below vocab_size={self.info.vocab_size}",
                param="token_ids",
            )
        if num_cached + len(token_ids) > self.info.max_model_len:
            raise InvalidRequestError(
                f"{request_id!r}: {num_cached} + {len(token_ids)} tokens exceed "
                f"max_model_len={self.info.max_model_len}",
                param="token_ids",
            )

    def _sampling(self, request_id: str, params) -> SamplingParams:
        try:
            return sampling_from_proto(params)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{request_id!r}: {e}", param=e.param) from e

    def _log_stats(self) -> None:
        """The periodic stats line: throughput, and where a step's time goes."""
        elapsed = time.monotonic() - self._stats_at
        if elapsed < STATS_INTERVAL_S or self.residency is None:
            return
        w, capture_s = self._stats, self._runner.capture_s
        per_step = max(w.steps, 1) * 1e-3
        logger.info(
            "%.1f tokens/s, %d resident requests, device KV %.1f%% used; %d steps: %.1f ms "
            "each, decode device %.1f ms, prefill device %.1f ms; %.1f s capturing graphs",
            w.tokens / elapsed,
            self.residency.num_resident,
            100 * self.residency.allocator.usage,
            w.steps,
            w.step_s / per_step,
            w.compute_s / per_step,
            w.prefill_s / per_step,
            capture_s - w.capture_s_before,
        )
        self._stats = StepStats(capture_s_before=capture_s)
        self._stats_at = time.monotonic()


@dataclass
class StepStats:
    """Sums over the steps since the last stats line."""

    steps: int = 0
    tokens: int = 0
    step_s: float = 0.0  # from receiving the plan to answering it
    compute_s: float = 0.0
    prefill_s: float = 0.0
    capture_s_before: float = 0.0  # the runner's capture time at the window's start

    def add(self, response: worker_pb2.StepResponse, step_s: float) -> None:
        self.steps += 1
        self.tokens += len(response.tokens)
        self.step_s += step_s
        self.compute_s += response.compute_s
        self.prefill_s += response.prefill_s
