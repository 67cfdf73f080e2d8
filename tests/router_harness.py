"""A real router (uvicorn on a loopback port, in a background thread) over real fake batchers,
for tests of the router's pieces and of what reads it (the operator's load collection)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alignedserve.router.app import create_app
from alignedserve.router.client import BatcherClient
from alignedserve.router.config import RouterConfig
from alignedserve.router.server import RouterServer
from alignedserve.serve import free_port


def tiny_model(directory: Path) -> Path:
    from alignedserve.worker.tiny import init_tiny  # torch, in the test process only

    return init_tiny(directory / "tiny", arch="llama")


@dataclass(frozen=True)
class RunningRouter:
    url: str
    server: RouterServer


@contextmanager
def running_router(
    model_dir: Path, batcher_addresses: list[str], **options
) -> Iterator[RunningRouter]:
    """Options are RouterConfig's fields. The router drains and stops on leaving."""
    config = RouterConfig(
        model_dir=str(model_dir),
        batcher_addresses=tuple(batcher_addresses),
        host="127.0.0.1",
        port=free_port(),
        **({"load_poll_interval_s": 0.05, "ready_window_s": 0.5} | options),
    )
    ready = threading.Event()
    app = create_app(config, BatcherClient.from_config(config))
    server = RouterServer(config, app, ready_event=ready)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert ready.wait(10), "router did not start"
    try:
        yield RunningRouter(f"http://127.0.0.1:{config.port}", server)
    finally:
        server.begin_drain()
        thread.join(10)
        assert not thread.is_alive(), "router did not stop"
