"""Runs the router's HTTP server, and drains it on SIGTERM: /ready turns 503 and new requests
are refused (held ones too: they have not started) while in-flight ones (streams included)
finish, for up to drain_timeout_s; then the server stops. With reuse_port, several router
processes listen on one port (`alignedserve serve --num-routers`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from alignedserve.common import event_loop
from alignedserve.router.app import create_app
from alignedserve.router.client import BatcherClient
from alignedserve.router.config import RouterConfig
from alignedserve.router.guard import RouterState

log = logging.getLogger(__name__)

# After the drain, how long uvicorn waits for connections before cancelling what is left.
SHUTDOWN_GRACE_S = 1.0


class RouterServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown."""

    def __init__(
        self,
        config: RouterConfig,
        app: FastAPI,
        ready_event: threading.Event | asyncio.Event | None = None,
    ):
        super().__init__(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                lifespan="on",
                http=config.http_parser,
                loop=config.event_loop,  # where uvicorn makes the loop (Server.run)
                log_config=None,  # the process configures logging (alignedserve CLI)
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            )
        )
        self._state: RouterState = app.state.router
        self._client: BatcherClient = app.state.client
        self._drain_timeout_s = config.drain_timeout_s
        self._ready_event = ready_event
        self._reuse_port = config.reuse_port
        self._drain_requested = False  # set from a signal handler or another thread
        self._drain_started_s: float | None = None
        self._stop_requested = False  # a second signal: abort what is in flight, then stop
        self._aborting: asyncio.Future | None = None

    def begin_drain(self) -> None:
        """Thread-safe; the server loop notices within a tick (0.1 s)."""
        self._drain_requested = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # The first SIGTERM/SIGINT drains; a second one stops now: the streams in flight are
        # aborted (they end, and their batchers free them) and then the server stops.
        if self._drain_requested:
            log.warning("signal %s during the drain: stopping now", signal.Signals(sig).name)
            self._stop_requested = True
        else:
            self.begin_drain()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None and self._reuse_port:
            sockets = [bind_reuse_port(self.config.host, self.config.port)]
            log.info(
                "router %d on %s:%d, beside the others on the port (SO_REUSEPORT)",
                os.getpid(),
                self.config.host,
                self.config.port,
            )
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._ready_event is not None:
            self._ready_event.set()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_started_s is None:
            log.info(
                "draining: %d requests in flight, up to %.0f s",
                self._state.num_inflight,
                self._drain_timeout_s,
            )
            self._state.is_draining = True
            self._client.stop_holding()
            self._drain_started_s = time.monotonic()
        if self._stop_requested and not self.should_exit:
            if self._aborting is None:  # each Abort call is bounded: CONTROL_TIMEOUT_S
                self._aborting = asyncio.ensure_future(self._client.abort_all())
            elif self._aborting.done():
                aborted = self._aborting.exception() or self._aborting.result()
                log.info("stopping: %s requests in flight aborted", aborted)
                self.should_exit = True
        if self._drain_started_s is not None and not self.should_exit:
            waited_s = time.monotonic() - self._drain_started_s
            if self._state.num_inflight == 0 or waited_s > self._drain_timeout_s:
                log.info(
                    "drained (%d left in flight after %.1f s)", self._state.num_inflight, waited_s
                )
                self.should_exit = True
        return await super().on_tick(counter)


def bind_reuse_port(host: str, port: int, exclusive: bool = False) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not listening yet. Every socket
    bound so, by the same user, shares the port: the kernel deals the connections among those
    that listen (one bound but not listening gets none, and holds the port). `exclusive`: the
    bind fails if any socket listens on the port, even with SO_REUSEPORT (another serve's
    routers), and only then are others let in."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind
        if exclusive:
            sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if not exclusive:
            sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_router(
    config: RouterConfig, ready_event: threading.Event | asyncio.Event | None = None
) -> None:
    """Serves until SIGTERM/SIGINT (main thread only) has drained it. `ready_event` is set once
    the port is bound."""
    client = BatcherClient.from_config(config)
    await RouterServer(config, create_app(config, client), ready_event).serve()


def run_router(config: RouterConfig) -> int:
    """Blocking entry point; the exit status once drained."""
    event_loop.run(serve_router(config), config.event_loop)
    return 0
