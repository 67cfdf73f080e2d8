"""The router's gRPC client for its batchers: sends each request to the least loaded one,
streams its tokens back, aborts, and polls every batcher's load in the background (routing
and /ready both read it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import grpc

from alignedserve.common.errors import AlignedServeError
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.common.rpc import CHANNEL_OPTIONS, HTTP_STATUS
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router import wire
from alignedserve.router.wire import GenerateChunk, LoadReport

log = logging.getLogger(__name__)

# A batcher slower than this to answer GetLoad or Abort counts as not answering.
CONTROL_TIMEOUT_S = 2.0
# "Not now" answers given before any token: another batcher may take the request.
TRY_ANOTHER = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


class BatcherError(AlignedServeError):
    """A batcher call failed; the HTTP status follows the one gRPC -> HTTP table."""

    def __init__(self, message: str, grpc_code: grpc.StatusCode):
        super().__init__(message)
        self.grpc_code = grpc_code
        self.http_status = HTTP_STATUS.get(grpc_code, 500)


def _error(address: str, e: grpc.aio.AioRpcError) -> BatcherError:
    return BatcherError(f"batcher {address}: {e.details() or e.code().name}", e.code())


@dataclass
class BatcherState:
    """What the router knows about one batcher (mutable: the poll loop updates it)."""

    address: str
    stub: batcher_pb2_grpc.BatcherStub
    load: LoadReport | None = None
    last_ready_s: float = -math.inf  # monotonic time of the last report with worker_ready
    num_sent: int = 0  # requests sent since `load` was reported, which it cannot count yet
    is_answering: bool = True  # for logging changes only

    @property
    def score(self) -> int:
        queued = self.load.num_waiting + self.load.num_running if self.load else 0
        return queued + self.num_sent


class BatcherClient:
    """Use inside one event loop: start() before the first call, close() after the last."""

    def __init__(
        self,
        addresses: Sequence[str],
        poll_interval_s: float = 0.5,
        request_timeout_s: float | None = None,
        ready_window_s: float = 5.0,
    ):
        self._addresses = tuple(addresses)
        self._poll_interval_s = poll_interval_s
        self._request_timeout_s = request_timeout_s
        self._ready_window_s = ready_window_s
        self._channels: list[grpc.aio.Channel] = []
        self._by_address: dict[str, BatcherState] = {}
        self._routes: dict[str, BatcherState] = {}  # request_id -> its batcher, while streaming
        self._turn = 0  # rotates the choice among equally loaded batchers
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # grpc.aio channels bind to the running loop, so they are made here, not in __init__.
        for address in self._addresses:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            self._by_address[address] = BatcherState(address, batcher_pb2_grpc.BatcherStub(channel))
        await self._poll_all()  # route and answer /ready from real data at once
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for channel in self._channels:
            await channel.close()

    @property
    def batchers(self) -> list[BatcherState]:
        return list(self._by_address.values())

    def is_ready(self) -> bool:
        """A batcher reported a ready worker within the ready window."""
        now = time.monotonic()
        return any(self._is_ready(b, now) for b in self.batchers)

    def _is_ready(self, batcher: BatcherState, now: float) -> bool:
        return now - batcher.last_ready_s <= self._ready_window_s

    async def get_load(self, address: str) -> LoadReport:
        batcher = self._by_address[address]
        try:
            msg = await batcher.stub.GetLoad(
                batcher_pb2.GetLoadRequest(), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise _error(address, e) from e
        return wire.load_from_proto(msg)

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[GenerateChunk, None]:
        """The request's chunks, the last with finish_reason set. Closing the iterator early
        (or cancelling the task reading it) cancels the call, and the batcher aborts it."""
        request = wire.generate_request_to_proto(request_id, prompt_ids, params)
        batcher, call, msg = await self._start_call(request)
        self._routes[request_id] = batcher
        try:
            while msg is not grpc.aio.EOF:
                chunk = wire.chunk_from_proto(msg)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                msg = await call.read()
            raise BatcherError(
                f"batcher {batcher.address} ended {request_id} without a finish reason",
                grpc.StatusCode.INTERNAL,
            )
        except grpc.aio.AioRpcError as e:
            raise _error(batcher.address, e) from e
        finally:
            del self._routes[request_id]
            call.cancel()  # a no-op once the call has ended

    async def abort(self, request_id: str) -> bool:
        """Best effort: False if the request is unknown, finished or the batcher did not
        answer (cancelling its Generate call aborts it as well)."""
        batcher = self._routes.get(request_id)
        if batcher is None:
            return False
        try:
            reply = await batcher.stub.Abort(
                batcher_pb2.AbortRequest(request_id=request_id), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            log.warning("abort %s: %s", request_id, _error(batcher.address, e))
            return False
        return reply.found

    async def _start_call(
        self, request: batcher_pb2.GenerateRequest
    ) -> tuple[BatcherState, grpc.aio.UnaryStreamCall, batcher_pb2.GenerateResponse]:
        """Sends the request to the least loaded batcher and waits for its first message:
        admission errors arrive before it, while another batcher can still be tried."""
        errors: list[BatcherError] = []
        for batcher in self._by_load():
            batcher.num_sent += 1
            call = batcher.stub.Generate(request, timeout=self._request_timeout_s)
            try:
                return batcher, call, await call.read()
            except grpc.aio.AioRpcError as e:
                errors.append(_error(batcher.address, e))
                if e.code() not in TRY_ANOTHER:
                    raise errors[-1] from e
            except BaseException:
                call.cancel()
                raise
        raise errors[-1]

    def _by_load(self) -> list[BatcherState]:
        """Batchers with a ready worker first, then by queued requests; ties rotate."""
        now = time.monotonic()
        self._turn += 1
        batchers = self.batchers
        n = len(batchers)
        order = sorted(
            range(n),
            key=lambda i: (
                not self._is_ready(batchers[i], now),
                batchers[i].score,
                (i - self._turn) % n,
            ),
        )
        return [batchers[i] for i in order]

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self._poll_all()

    async def _poll_all(self) -> None:
        await asyncio.gather(*(self._poll(b) for b in self.batchers))

    async def _poll(self, batcher: BatcherState) -> None:
        try:
            load = await self.get_load(batcher.address)
        except BatcherError as e:
            if batcher.is_answering:
                log.warning("batcher %s does not answer GetLoad: %s", batcher.address, e)
            batcher.is_answering = False
            return
        if not batcher.is_answering:
            log.info("batcher %s answers GetLoad again", batcher.address)
        batcher.is_answering = True
        batcher.load = load
        batcher.num_sent = 0
        if load.worker_ready:
            batcher.last_ready_s = time.monotonic()
