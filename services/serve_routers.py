"""`alignedserve serve --num-routers N` (N > 1): N supervised `alignedserve serve router` child
processes on one host:port. Each binds its own socket with SO_REUSEPORT and the kernel deals
the connections among them, so the HTTP front end's per-token work spreads over N cores (one
router process tops out near 18-19k output tokens/s). This process holds the port bound, not
listening, for as long as it serves: a port 0 is picked once, and a restarted router takes
its place again. The routers run in prometheus_client's multiprocess mode over a directory
this process owns, so a scrape of any of them shows the sum over all, merged with the
batcher's series (common/merged_metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.request

from prometheus_client.multiprocess import mark_process_dead

from alignedserve.common import flags
from alignedserve.common.errors import ConfigError
from alignedserve.common.merged_metrics import MULTIPROC_DIR_ENV
from alignedserve.common.process_metrics import remove_pid
from alignedserve.router.config import RouterConfig
from alignedserve.router.server import bind_reuse_port
from alignedserve.supervisor import Supervisor

log = logging.getLogger(__name__)


class RouterProcesses:
    """Use as a context manager (the port and the metrics directory); run() starts the
    routers, drain() stops them, each draining its in-flight requests."""

    def __init__(self, config: RouterConfig, num_routers: int, metrics_url: str):
        self._holder, self._claim = take_port(config.host, config.port)
        self.port = self._holder.getsockname()[1]
        self.config = dataclasses.replace(
            config, port=self.port, reuse_port=True, merge_metrics_url=metrics_url
        )
        self.metrics_dir = tempfile.mkdtemp(prefix="alignedserve-routers-")
        env = {**os.environ, MULTIPROC_DIR_ENV: self.metrics_dir}
        self.supervisors = [
            Supervisor(
                "router",
                flags.to_args(self.config),
                stop_timeout_s=config.drain_timeout_s + 10,  # its drain, then the server's stop
                env=env,
                on_exit=self._mark_dead,
            )
            for _ in range(num_routers)
        ]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def __enter__(self) -> RouterProcesses:
        return self

    def __exit__(self, *exc_info) -> None:
        self._holder.close()
        self._claim.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _mark_dead(self, pid: int) -> None:
        # Its live gauges leave the sums; its counters and histograms stay in them; its
        # process_* series leave /metrics.
        mark_process_dead(pid, self.metrics_dir)
        remove_pid(self.metrics_dir, pid)

    def run(self) -> None:
        self._tasks = [
            asyncio.create_task(s.run(self._stop), name=f"router-supervisor-{i}")
            for i, s in enumerate(self.supervisors)
        ]

    async def serving(self, stop: asyncio.Event, interval_s: float = 0.05) -> bool:
        """Waits until each router process now running has answered /health on the port:
        True; or until `stop` is set first: False. Raises if a router exits before then."""
        url = f"http://{_loopback(self.config.host)}:{self.port}/health"
        answered: set[int] = set()
        while not stop.is_set():
            if any(s.restarts for s in self.supervisors):
                raise RuntimeError("a router process exited before it served")
            pid = await asyncio.to_thread(health_pid, url)  # a new connection each time
            if pid is not None:
                answered.add(pid)
            running = {s.process.pid for s in self.supervisors if s.process is not None}
            if len(running) == len(self.supervisors) and running <= answered:
                log.info("%d router processes on port %d", len(running), self.port)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
        return False

    async def drain(self) -> None:
        """SIGTERM to every router at once; returns once all have drained and exited."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def take_port(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """(holder, claim): the port bound, not listening (refused where something listens; a
    port 0 is picked), and claimed among serve processes. A ConfigError if it is taken."""
    try:
        holder = bind_reuse_port(host, port, exclusive=True)
    except OSError as e:
        raise ConfigError(f"port {port} on {host!r}: {e.strerror}") from e
    try:
        return holder, claim_port(host, holder.getsockname()[1])
    except ConfigError:
        holder.close()
        raise


def claim_port(host: str, port: int) -> socket.socket:
    """A claim on the port among `serve` processes of this host (its network namespace),
    whatever address they bind: an abstract unix socket named after it, which the kernel
    lets one process bind and frees when it exits, however it exits. The port holder alone
    cannot refuse a second serve while the first still loads: with SO_REUSEADDR, two
    sockets that do not listen may both bind one port, and their routers would then share
    it."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0alignedserve-serve-port-{port}")
    except OSError as e:
        claim.close()
        raise ConfigError(
            f"port {port} on {host!r}: another alignedserve serve holds it ({e.strerror})"
        ) from e
    return claim


def health_pid(url: str) -> int | None:
    """The pid of the router that answered /health at `url`, or None if none did."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with direct.open(url, timeout=1.0) as answer:
            return json.loads(answer.read())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _loopback(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
