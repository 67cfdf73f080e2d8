"""One gRPC Stream call per batcher, shared by every request the router sends it (the
batcher sends one message per engine step with every request's tokens, fanned out here to
the requests), and the errors of batcher calls."""

from __future__ import annotations

import asyncio

import grpc

from alignedserve.common.errors import AlignedServeError
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.common.rpc import HTTP_STATUS
from alignedserve.router import wire
from alignedserve.router.wire import GenerateChunk, merge_chunks


class BatcherError(AlignedServeError):
    """A batcher call failed; the HTTP status follows the one gRPC -> HTTP table."""

    def __init__(self, message: str, grpc_code: grpc.StatusCode):
        super().__init__(message)
        self.grpc_code = grpc_code
        self.http_status = HTTP_STATUS.get(grpc_code, 500)


def rpc_error(address: str, e: grpc.aio.AioRpcError) -> BatcherError:
    """A failed call to the batcher at `address`, as a BatcherError."""
    return BatcherError(f"batcher {address}: {e.details() or e.code().name}", e.code())


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _delta_error(address: str, delta: batcher_pb2.RequestDelta) -> BatcherError:
    code = _CODES.get(delta.error_code, grpc.StatusCode.UNKNOWN)
    return BatcherError(f"batcher {address}: {delta.error_message or code.name}", code)


class StreamMux:
    """One Stream call to a batcher, shared by the requests the router sends it: requests
    and aborts go out in order; each delta that comes back goes to its request's queue (an
    error delta as a BatcherError). When the call ends, every request still on it gets the
    error (UNAVAILABLE if the batcher ended it cleanly)."""

    def __init__(self, address: str, stub: batcher_pb2_grpc.BatcherStub):
        self.address = address
        self.is_done = False
        self._sends: asyncio.Queue[batcher_pb2.StreamRequest | None] = asyncio.Queue()
        self._requests: dict[str, asyncio.Queue] = {}
        self._call = stub.Stream(self._outgoing())
        self._reader = asyncio.create_task(self._read())

    def open(self, request: batcher_pb2.GenerateRequest) -> asyncio.Queue:
        """Send the request; its deltas (then a BatcherError, if it fails) arrive in the queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._requests[request.request_id] = queue
        self._sends.put_nowait(batcher_pb2.StreamRequest(generate=request))
        return queue

    def release(self, request_id: str, abort: bool) -> None:
        """The request is done with here; `abort`: it has not finished at the batcher."""
        if self._requests.pop(request_id, None) is not None and abort and not self.is_done:
            abort_msg = batcher_pb2.AbortRequest(request_id=request_id)
            self._sends.put_nowait(batcher_pb2.StreamRequest(abort=abort_msg))

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _outgoing(self):
        while (msg := await self._sends.get()) is not None:
            yield msg

    async def _read(self) -> None:
        error = BatcherError(
            f"batcher {self.address} ended its stream", grpc.StatusCode.UNAVAILABLE
        )
        try:
            async for msg in self._call:
                requests = self._requests
                for delta in msg.deltas:
                    queue = requests.get(delta.request_id)
                    if queue is not None:
                        queue.put_nowait(
                            _delta_error(self.address, delta) if delta.error_code else delta
                        )
        except grpc.aio.AioRpcError as e:
            error = rpc_error(self.address, e)
        finally:
            self.is_done = True
            self._sends.put_nowait(None)
            for queue in self._requests.values():
                queue.put_nowait(error)


def coalesced(chunk: GenerateChunk, queue: asyncio.Queue) -> tuple[GenerateChunk, object]:
    """The chunk with the deltas already queued behind it: one chunk, when the router has
    fallen behind the batcher (a step's tokens arrive for every request at once). So the
    per-chunk work downstream (detokenizing, the SSE event, its socket write: ~50 us) is paid
    once for them, and a loaded router keeps up instead of queueing, as vLLM's output
    collector merges deltas its API server has not taken yet. Returns the chunk and an error
    queued behind the deltas (None if none): it is raised after they are delivered."""
    if queue.empty() or chunk.finish_reason is not None:
        return chunk, None
    parts = [chunk]
    while not queue.empty() and parts[-1].finish_reason is None:
        msg = queue.get_nowait()
        if isinstance(msg, BatcherError):
            return merge_chunks(parts), msg
        parts.append(wire.chunk_from_proto(msg))
    return merge_chunks(parts), None
