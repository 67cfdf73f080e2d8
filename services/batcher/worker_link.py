"""The batcher's connection to its worker: Describe, Attach, and the step session; and how
a failed step is read: the worker lost (reconnect and recover) or the plan rejected.

A worker that cannot run a step answers it with an error status and ends the session (see
worker/service.py), marking the answer with the step's number in the trailing metadata
`alignedserve-rejected-step`. Its status says why: RESOURCE_EXHAUSTED (the plan asked for
more device blocks than it has), INVALID_ARGUMENT or FAILED_PRECONDITION (the plan does not
match the worker's state or model), INTERNAL (the step raised). Sending the same plan to a
reconnected worker fails the same way, so such a step is `StepRejected`: its requests fail.
Anything else (UNAVAILABLE, CANCELLED, the session ending, or a refusal of the session
itself) is `WorkerLost`: reconnect, and the requests continue from the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common import wire
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc
from alignedserve.common.rpc import CHANNEL_OPTIONS, REJECTED_STEP_KEY

# Attach answers once the worker has mapped and page-locked the pool: 120 GiB took 43.5 s on
# 2xH200 (benchmarks/pool_pin.py), so the deadline grows with the pool, with a 3x margin.
# (A worker still loading its model answers once it is loaded, too: `attach`'s wait_s.)
ATTACH_BASE_S = 30.0
ATTACH_S_PER_GIB = 1.0


def attach_timeout_s(pool_bytes: int) -> float:
    return ATTACH_BASE_S + ATTACH_S_PER_GIB * pool_bytes / 2**30


PLAN_ERRORS = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
    }
)


class WorkerLost(Exception):
    """The worker's session broke (crash, restart, network)."""


class StepRejected(WorkerLost):
    """The worker could not run this step's plan (and ended the session, as after a loss)."""

    def __init__(self, step: int, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.step = step
        self.code = code
        self.details = details


def rejected_step(error: grpc.aio.AioRpcError) -> int | None:
    """The step the worker rejected with this error, or None if it is not a rejection."""
    if error.code() not in PLAN_ERRORS:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == REJECTED_STEP_KEY:
            return int(value)
    return None


class WorkerLink:
    """The batcher's connection to one worker: Describe, Attach, and the step session."""

    def __init__(self, address: str):
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._session = None

    async def connect(self) -> worker_pb2.ModelInfo:
        await self.close()
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self._channel)
        return await self.describe()

    async def describe(self) -> worker_pb2.ModelInfo:
        return await self.stub.Describe(worker_pb2.DescribeRequest(), timeout=10)

    async def attach(self, pool: CpuKVPool, wait_s: float = 0.0, mirror_only: bool = False) -> None:
        """Attach the pool and open the step session. `wait_s`: how long a worker still
        loading its model may take beyond the pool's own deadline. `mirror_only`: no KV is
        ever copied through it (AttachRequest.mirror_only)."""
        pool_s = attach_timeout_s(pool.num_blocks * pool.layout.block_bytes)
        await self.stub.Attach(
            worker_pb2.AttachRequest(
                pool_name=pool.name,
                num_pool_blocks=pool.num_blocks,
                kv_layout=wire.layout_to_proto(pool.layout),
                mirror_only=mirror_only,
            ),
            timeout=max(pool_s, wait_s),
        )
        self._session = self.stub.Session()

    async def send(self, request: worker_pb2.StepRequest) -> None:
        """Send a step; its answer comes, in order, from `receive`."""
        try:
            await self._session.write(request)
        except grpc.aio.AioRpcError as e:
            raise WorkerLost(f"{e.code().name}: {e.details()}") from e
        except asyncio.InvalidStateError as e:  # writing to a session the worker already ended
            raise WorkerLost(str(e)) from e

    async def receive(self, in_flight: Sequence[int]) -> worker_pb2.StepResponse:
        """The next answer. The worker's rejection of one of the steps `in_flight` (their
        numbers) raises StepRejected; any other failure, WorkerLost."""
        try:
            response = await self._session.read()
        except grpc.aio.AioRpcError as e:
            step = rejected_step(e)
            if step is not None and step in in_flight:
                raise StepRejected(step, e.code(), e.details()) from e
            raise WorkerLost(f"{e.code().name}: {e.details()}") from e
        if response is grpc.aio.EOF:
            raise WorkerLost("session ended")
        return response

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        """Send a step and wait for its answer (with no other step in flight)."""
        await self.send(request)
        return await self.receive([request.step])

    async def close(self) -> None:
        if self._session is not None:
            self._session.cancel()
            self._session = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
