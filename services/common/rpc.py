"""gRPC helpers shared by the services: the one error -> status table, and servers that
always carry the standard health service."""

from __future__ import annotations

import asyncio

import grpc

from alignedserve.common.errors import (
    AlignedServeError,
    ConfigError,
    InvalidRequestError,
    ModelLoadError,
    OutOfBlocksError,
    QueueFullError,
    UnavailableError,
)
from alignedserve.common.proto import health_pb2, health_pb2_grpc

# error class -> gRPC status; HTTP statuses live on the classes (AlignedServeError.http_status)
GRPC_STATUS: dict[type[AlignedServeError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    OutOfBlocksError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}
# and back, for clients turning a status into an HTTP answer
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 500,
}


def grpc_status(error: AlignedServeError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL


# Trailing metadata of a worker step the worker refused to run (the plan is wrong, not the
# worker gone): the batcher fails that step's requests instead of recovering and retrying.
REJECTED_STEP_KEY = "alignedserve-rejected-step"

# Large enough for a step carrying thousands of block tables; KV itself never travels here.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
]

# Accept the clients' keepalive pings (every 10 s, idle streams included): by default a server
# counts pings closer than 5 minutes as abuse and closes the connection with GOAWAY
# "too_many_pings", which ended idle batcher->worker sessions.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard gRPC health service (protos/alignedserve/v1/health.proto): a status per
    service name, "" meaning the whole server. Check answers now; Watch streams changes."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def set(self, service: str, status: int) -> None:
        self._status[service] = status
        async with self._changed:
            self._changed.notify_all()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        last = None
        while True:
            status = self._status.get(request.service, unknown)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            async with self._changed:
                await self._changed.wait()


def aio_server() -> tuple[grpc.aio.Server, HealthServicer]:
    """An asyncio gRPC server with the standard health service; the caller adds its own
    servicers, binds a port and flips health to SERVING when ready."""
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, *SERVER_OPTIONS])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, health


async def set_serving(health: HealthServicer, service_names: list[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health.set(name, status)
