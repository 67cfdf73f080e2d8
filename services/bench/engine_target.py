"""The in-process engine target: the benchmark's requests go straight into our batcher engine,
with no router and no HTTP in the way, so that engines (and scheduling policies) can be
compared on the engine alone.

The worker runs as `alignedserve serve` runs it: a supervised child process on loopback gRPC,
the tiny random-weight model when no model directory is given. Prompts are the workload's
token ids as they are (no tokenizer), decoded greedily with EOS ignored, the SamplingParams the
router builds for the HTTP target's request, so both targets do the same work. A chunk is
timed when the engine's delta for it reaches this coroutine, as a client times a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from alignedserve.batcher.engine import BatcherEngine
from alignedserve.batcher.streams import Delta
from alignedserve.bench.records import Chunk, RequestRecord
from alignedserve.bench.workload import BenchRequest
from alignedserve.common.errors import AlignedServeError, ConfigError, UnavailableError
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.serve import (
    EngineSettings,
    Supervisor,
    batcher_config,
    free_port,
    worker_args,
    write_tiny_model,
)

log = logging.getLogger(__name__)

START_POLL_S = 0.1


@dataclass(frozen=True)
class EngineTargetConfig(EngineSettings):
    """The engine and its worker, as `alignedserve serve` sets them up, with its defaults, so
    that a bench of the engine measures what it serves (the model directory is the
    benchmark's --model)."""

    def describe(self) -> str:
        devices = "+".join(d for d in (self.device, self.prefetch_device) if d)
        return f"the in-process engine ({self.policy}, worker on {devices})"


def sampling_params(request: BenchRequest) -> SamplingParams:
    """What the router makes of the HTTP target's request (token-id prompt, max_tokens,
    temperature 0, ignore_eos): exactly max_tokens greedy tokens."""
    return SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)


class EngineTarget:
    """Use as `async with`: it starts the worker and the engine, and stops both on exit."""

    def __init__(self, config: EngineTargetConfig, model_dir: str = ""):
        if model_dir and not Path(model_dir).is_dir():
            raise ConfigError(f"model={model_dir!r} is not a directory")
        self.config = config
        self.model_dir = model_dir
        self.engine: BatcherEngine | None = None
        self._supervisor: Supervisor | None = None  # once the engine has started
        self._exit = contextlib.AsyncExitStack()

    @property
    def model_name(self) -> str:
        return self.engine.info.model_name

    @property
    def vocab_size(self) -> int:
        return self.engine.info.vocab_size

    async def __aenter__(self) -> EngineTarget:
        try:
            await self._start()
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._supervisor is not None and self._supervisor.restarts:
            log.warning(
                "bench: the worker died and was restarted (%d times): the numbers include "
                "the engine's recoveries",
                self._supervisor.restarts,
            )
        await self._exit.aclose()

    async def _start(self) -> None:
        model_dir = self.model_dir
        if not model_dir:
            tmp = self._exit.enter_context(tempfile.TemporaryDirectory(prefix="alignedserve-"))
            model_dir = await asyncio.to_thread(write_tiny_model, Path(tmp) / "tiny")
        worker_port = free_port()
        supervisor = Supervisor("worker", worker_args(self.config, model_dir, worker_port))
        stop_worker = asyncio.Event()
        worker = asyncio.create_task(supervisor.run(stop_worker), name="worker-supervisor")

        async def stop_the_worker() -> None:
            stop_worker.set()
            await asyncio.gather(worker, return_exceptions=True)

        self._exit.push_async_callback(stop_the_worker)
        batcher = batcher_config(self.config, f"127.0.0.1:{worker_port}")
        self.engine = BatcherEngine(batcher.engine_config())
        self._exit.push_async_callback(self.engine.stop)  # stops before the worker does
        await self._start_engine(supervisor)
        self._supervisor = supervisor
        log.info("bench: %s serving %s", self.config.describe(), model_dir)

    async def _start_engine(self, supervisor: Supervisor) -> None:
        """The engine's start, failing at once if the worker dies first: the supervisor would
        restart it, and the engine would wait for it, again and again."""
        start = asyncio.create_task(self.engine.start())
        while not start.done():
            await asyncio.wait({start}, timeout=START_POLL_S)
            if supervisor.restarts and not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                raise UnavailableError(
                    f"the worker exited while starting (code {supervisor.process.returncode}): "
                    "its log is above"
                )
        start.result()

    async def run(self, request: BenchRequest) -> RequestRecord:
        chunks: list[Chunk] = []
        final: Delta | None = None
        error = None
        send_s = time.perf_counter()
        try:
            queue = self.engine.submit(
                request.request_id, request.prompt_token_ids, sampling_params(request)
            )
        except AlignedServeError as e:
            queue, error = None, f"{type(e).__name__}: {e}"
        try:
            while queue is not None and final is None:
                delta = await queue.get()
                now_s = time.perf_counter()
                if isinstance(delta, Exception):  # the worker was lost for good
                    error = f"{type(delta).__name__}: {delta}"
                    break
                if delta.token_ids:
                    chunks.append(Chunk(now_s, len(delta.token_ids)))
                if delta.finish_reason is not None:
                    final = delta
        finally:
            if queue is not None and final is None and error is None:
                self.engine.abort(request.request_id)  # cancelled: the run's timeout
        return RequestRecord(
            request_id=request.request_id,
            send_s=send_s,
            end_s=time.perf_counter(),
            chunks=tuple(chunks),
            prompt_tokens=final.prompt_tokens if final else len(request.prompt_token_ids),
            completion_tokens=final.completion_tokens
            if final
            else sum(c.num_tokens for c in chunks),
            error=error,
        )
