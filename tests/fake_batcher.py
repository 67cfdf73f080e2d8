"""A real grpc.aio Batcher server on loopback with deterministic behaviour, for router tests.

Generation: the prompt's byte tokens (ids < 256, special tokens skipped), cycled, one token
per message every `token_delay_s`; finishes with "stop" on a stop_token_id, "length" at
max_tokens or the context length, "abort" on Abort; the last message carries usage. The seed
and temperature change nothing (EOS is never generated). `reject_with` makes Generate fail
with that status before any token, `fail_after` after some tokens. Every request, abort and
cancellation is recorded. Stream (the router's multiplexed call) runs Generate for each of
its requests, and cancels it on the call's abort, so both RPCs behave alike.

Each fake runs its own event loop in a thread, like a separate process would.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import grpc

from alignedserve.common import wire
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.common.sampling_params import SamplingParams, finish_reason

NUM_BYTE_TOKENS = 256  # write_byte_tokenizer: ids 0..255 are bytes, the rest special


def logprob_of(index: int) -> float:
    """The logprob the fake reports for the index-th generated token."""
    return -0.25 * (index % 4) - 0.125


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Waits until condition() holds, letting the running loop work meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class FakeBatcher(batcher_pb2_grpc.BatcherServicer):
    def __init__(self, token_delay_s: float = 0.005, max_model_len: int = 2048):
        self.token_delay_s = token_delay_s
        self.max_model_len = max_model_len
        self.worker_ready = True
        self.reject_with: grpc.StatusCode | None = None  # Generate fails at once
        self.fail_after: int | None = None  # Generate fails (INTERNAL) after this many tokens
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []  # request ids named by Abort calls that found them
        self.cancelled: list[str] = []  # Generate calls the client cancelled
        self.aborts_received: list[str] = []  # every abort, by Abort or on a Stream call
        self.num_load_calls = 0
        self.load_delay_s = 0.0  # GetLoad answers this late
        self.reports_tokens = True  # False: a batcher older than num_context_tokens
        self.num_stream_calls = 0
        self.break_streams_with: grpc.StatusCode | None = None  # Stream calls end so at once
        self._abort_flags: dict[str, bool] = {}
        self._context_tokens: dict[str, int] = {}  # prompt + generated, of each live request
        self.address = ""

    # ---- the servicer ----------------------------------------------------------------------

    async def Generate(self, request, context):
        params = wire.sampling_from_proto(request.params)
        prompt = list(request.prompt_token_ids)
        self.requests.append((request.request_id, prompt, params))
        if self.reject_with is not None:
            await context.abort(self.reject_with, "fake: queue full, retry later")
        script = [t for t in prompt if t < NUM_BYTE_TOKENS] or [0]
        self._abort_flags[request.request_id] = False
        self._context_tokens[request.request_id] = len(prompt)
        ended = False  # by the fake: finished, aborted or failed
        try:
            for n, token in enumerate(itertools.cycle(script), start=1):
                await asyncio.sleep(self.token_delay_s)
                if self._abort_flags[request.request_id]:
                    ended = True
                    yield self._final([], [], "abort", len(prompt), n - 1)
                    return
                if self.fail_after is not None and n > self.fail_after:
                    ended = True
                    await context.abort(grpc.StatusCode.INTERNAL, "fake: worker lost")
                self._context_tokens[request.request_id] = len(prompt) + n
                logprobs = [logprob_of(n - 1)] if params.logprobs else []
                finish = finish_reason(params, token, n, len(prompt) + n, (), self.max_model_len)
                if finish is None:
                    yield batcher_pb2.GenerateResponse(token_ids=[token], logprobs=logprobs)
                else:
                    ended = True
                    yield self._final([token], logprobs, finish, len(prompt), n)
                    return
        finally:
            del self._abort_flags[request.request_id]
            del self._context_tokens[request.request_id]
            # Else the client cancelled: grpc cancels the servicer (CancelledError) or, when it
            # is suspended at a yield, closes it (GeneratorExit).
            if not ended:
                self.cancelled.append(request.request_id)

    async def Stream(self, request_iterator, context):
        self.num_stream_calls += 1
        outbox: asyncio.Queue[batcher_pb2.RequestDelta] = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def run(request) -> None:
            rid = request.request_id
            try:
                async for msg in self.Generate(request, _SubContext()):
                    delta = batcher_pb2.RequestDelta(
                        request_id=rid,
                        token_ids=msg.token_ids,
                        logprobs=msg.logprobs,
                        finish_reason=msg.finish_reason,
                    )
                    if msg.HasField("usage"):
                        delta.usage.CopyFrom(msg.usage)
                    outbox.put_nowait(delta)
            except _Aborted as e:
                outbox.put_nowait(
                    batcher_pb2.RequestDelta(
                        request_id=rid, error_code=e.code.value[0], error_message=e.details
                    )
                )

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("generate"):
                    rid = msg.generate.request_id
                    tasks[rid] = asyncio.create_task(run(msg.generate))
                    tasks[rid].add_done_callback(lambda _, rid=rid: tasks.pop(rid, None))
                elif msg.HasField("abort"):
                    self.aborts_received.append(msg.abort.request_id)
                    if msg.abort.request_id in tasks:
                        tasks[msg.abort.request_id].cancel()

        reader = asyncio.create_task(read())
        try:
            while True:
                deltas = [await outbox.get()]
                while not outbox.empty():
                    deltas.append(outbox.get_nowait())
                if self.break_streams_with is not None:
                    await context.abort(self.break_streams_with, "fake: stream broken")
                yield batcher_pb2.StreamResponse(deltas=deltas)
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()

    async def Abort(self, request, context):
        self.aborts_received.append(request.request_id)
        found = request.request_id in self._abort_flags
        if found:
            self._abort_flags[request.request_id] = True
            self.aborted.append(request.request_id)
        return batcher_pb2.AbortResponse(found=found)

    async def GetLoad(self, request, context):
        self.num_load_calls += 1
        await asyncio.sleep(self.load_delay_s)
        return batcher_pb2.LoadReport(
            num_waiting=0,
            num_running=len(self._abort_flags),
            worker_ready=self.worker_ready,
            max_model_len=self.max_model_len,
            model_name="fake",
            max_waiting=16,
            num_context_tokens=(
                sum(self._context_tokens.values()) if self.reports_tokens else None
            ),
        )

    @staticmethod
    def _final(tokens, logprobs, finish, num_prompt, num_generated):
        return batcher_pb2.GenerateResponse(
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            usage=batcher_pb2.Usage(prompt_tokens=num_prompt, completion_tokens=num_generated),
        )

    # ---- test helpers ------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.01)
        return condition()


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _SubContext:
    """What Generate needs of a servicer context, for a request on a Stream call."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class FakeBatcherFactory:
    """Starts fakes on free loopback ports; close() stops them all (use it as a fixture)."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []

    def __call__(self, **options) -> FakeBatcher:
        fake = FakeBatcher(**options)
        started = threading.Event()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        async def serve() -> None:
            server = grpc.aio.server()
            batcher_pb2_grpc.add_BatcherServicer_to_server(fake, server)
            fake.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            started.set()
            await stop.wait()
            await server.stop(grace=None)

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        thread.start()
        assert started.wait(10), "fake batcher did not start"

        def shutdown() -> None:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

        self._stops.append(shutdown)
        return fake

    def close(self) -> None:
        for shutdown in self._stops:
            shutdown()
