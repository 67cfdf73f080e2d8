"""Runs the router's HTTP server, and drains it on SIGTERM: /ready turns 503 and new requests
are refused (held ones too: they have not started) while in-flight ones (streams included)
finish, for up to drain_timeout_s; then the server stops."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

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
                log_config=None,  # the process configures logging (alignedserve CLI)
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            )
        )
        self._state: RouterState = app.state.router
        self._client: BatcherClient = app.state.client
        self._drain_timeout_s = config.drain_timeout_s
        self._ready_event = ready_event
        self._drain_requested = False  # set from a signal handler or another thread
        self._drain_started_s: float | None = None

    def begin_drain(self) -> None:
        """Thread-safe; the server loop notices within a tick (0.1 s)."""
        self._drain_requested = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # The first SIGTERM/SIGINT drains; a second one stops now.
        if self._drain_requested:
            log.warning("signal %s during the drain: stopping now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        else:
            self.begin_drain()

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
        if self._drain_started_s is not None and not self.should_exit:
            waited_s = time.monotonic() - self._drain_started_s
            if self._state.num_inflight == 0 or waited_s > self._drain_timeout_s:
                log.info(
                    "drained (%d left in flight after %.1f s)", self._state.num_inflight, waited_s
                )
                self.should_exit = True
        return await super().on_tick(counter)


async def serve_router(
    config: RouterConfig, ready_event: threading.Event | asyncio.Event | None = None
) -> None:
    """Serves until SIGTERM/SIGINT (main thread only) has drained it. `ready_event` is set once
    the port is bound."""
    client = BatcherClient.from_config(config)
    await RouterServer(config, create_app(config, client), ready_event).serve()


def run_router(config: RouterConfig) -> int:
    """Blocking entry point; the exit status once drained."""
    asyncio.run(serve_router(config))
    return 0
