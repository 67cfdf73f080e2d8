"""`alignedserve serve`: the embedded default. The router runs in this process, the batcher
and the worker each in a supervised child process (restarted if it dies: for the worker,
the batcher then recovers its requests), all over loopback gRPC: the router's per-token HTTP
work and the batcher's step loop do not share an event loop or a GIL. The router's /metrics
shows the batcher's series too (common/merged_metrics.py). No cluster and no downloads: without
--model it first writes a tiny random-weight model. This process never imports torch.
With --num-routers N > 1, N router child processes share the port instead (serve_routers).

SIGTERM or SIGINT drains: the routers stop taking requests (/ready turns 503) and let the
in-flight ones finish, then the batcher stops, then the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignedserve.batcher.service import BatcherConfig
from alignedserve.common import event_loop, flags
from alignedserve.common.errors import ConfigError
from alignedserve.common.model_config import DTYPES
from alignedserve.common.policy import LOAD_ORDERS, POLICIES, worker_prefill_decode_blocks
from alignedserve.supervisor import Supervisor
from alignedserve.worker.service import WorkerConfig
from alignedserve.worker.service import worker_args as worker_command

if TYPE_CHECKING:
    from alignedserve.router.config import RouterConfig
    from alignedserve.router.server import RouterServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """The engine and its worker: what `alignedserve serve` and the engine bench
    (`bench/engine_target.py`) both set up, declared once. Each field is the BatcherConfig
    (BATCHER_FIELDS) or WorkerConfig (WORKER_FIELDS; "" for None) field of the same name."""

    device: str = field(default="cpu", metadata={"help": "the worker's torch device"})
    prefetch_device: str = field(
        default="",
        metadata={"help": "the pair's prefetch GPU (e.g. cuda:1): loads over both links"},
    )
    dtype: str = field(
        default="",
        metadata={"help": f"weights and KV dtype, one of {list(DTYPES)}; empty: the checkpoint's"},
    )
    pool_gib: float = field(
        default=1.0,
        metadata={
            "help": "the CPU KV pool, GiB (aligned; fcfs keeps its KV on the device and "
            "reserves none)"
        },
    )
    policy: str = field(
        default="aligned", metadata={"help": "the batcher's policy", "choices": POLICIES}
    )
    num_device_blocks: int = field(
        default=2048, metadata={"help": "KV blocks on the worker's device"}
    )
    max_waiting: int = field(
        default=1024, metadata={"help": "admission queue bound (beyond it: 429)"}
    )
    min_batch: int = field(
        default=BatcherConfig.min_batch,
        metadata={"help": "aligned: fewest members of a decode group, when that many are resident"},
    )
    max_batch_kv_fraction: float = field(
        default=BatcherConfig.max_batch_kv_fraction,
        metadata={"help": "aligned: the decode GPU's KV that resident batches may use"},
    )
    max_steps_in_flight: int = field(
        default=BatcherConfig.max_steps_in_flight,
        metadata={"help": "steps the batcher sends before the first is answered (1: each waits)"},
    )
    decode_prefill_share: float = field(
        default=BatcherConfig.decode_prefill_share,
        metadata={
            "help": "aligned beside a prefill device: the most share of the decode GPU's time "
            "its prefill turns take while a backlog waits (0: never)"
        },
    )
    prefill_whole_prompts: bool = field(
        default=BatcherConfig.prefill_whole_prompts,
        metadata={
            "help": "aligned beside a prefill device: its batches take whole prompts (a "
            "prompt that would pass the prefill budget leads the next batch)"
        },
    )
    load_order: str = field(
        default=BatcherConfig.load_order,
        metadata={
            "help": "aligned: which pooled requests load first after the starving: those "
            "fitting a resident group, then the oldest (fit-groups); shortest-first sorts "
            "that order by the max_tokens their clients set, those that set none last",
            "choices": LOAD_ORDERS,
        },
    )
    starvation_s: float = field(
        default=BatcherConfig.starvation_s,
        metadata={"help": "aligned: the longest a pooled request waits for a batch"},
    )
    overlap_steps: bool = field(
        default=True,
        metadata={"help": "the worker queues a step on the device before answering the last"},
    )
    prefill_decode_blocks: int = field(
        default=WorkerConfig.prefill_decode_blocks,
        metadata={
            "help": "aligned with a prefetch device: KV blocks it decodes in, residents of its "
            "own, while no prompt waits (-1: as many as num_device_blocks, fewer if they do "
            "not fit; 0: it only prefills)"
        },
    )

    def __post_init__(self) -> None:
        if self.dtype and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} not one of {list(DTYPES)} (or empty)")
        if not self.num_device_blocks > 0:
            raise ConfigError(f"num_device_blocks={self.num_device_blocks} must be > 0")
        check_batcher_settings(self)  # policy, pool_gib, max_waiting, min_batch, ...


@dataclass(frozen=True)
class ServeConfig(EngineSettings):
    model: str = field(
        default="",
        metadata={"help": "model directory; empty: write a tiny random-weight model, serve it"},
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "HTTP address; 0.0.0.0 to serve other machines"}
    )
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    drain_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long in-flight requests may finish"}
    )
    num_routers: int = field(
        default=1,
        metadata={
            "help": "HTTP router processes (1: the router runs in this process; more: child "
            "processes sharing the port through SO_REUSEPORT, their /metrics summed)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port} outside 0..65535")
        if self.num_routers < 1:
            raise ConfigError(f"num_routers={self.num_routers} must be >= 1")
        if self.model and not Path(self.model).is_dir():
            raise ConfigError(f"model={self.model!r} is not a directory")


BATCHER_FIELDS = (
    "pool_gib",
    "policy",
    "max_waiting",
    "min_batch",
    "max_batch_kv_fraction",
    "max_steps_in_flight",
    "decode_prefill_share",
    "prefill_whole_prompts",
    "load_order",
    "starvation_s",
)


def batcher_config(settings: EngineSettings, worker: str, **more) -> BatcherConfig:
    """The embedded batcher's config: the settings' BATCHER_FIELDS, the worker's address and
    `more` (other BatcherConfig fields)."""
    return BatcherConfig(
        worker=worker, **{name: getattr(settings, name) for name in BATCHER_FIELDS}, **more
    )


def check_batcher_settings(settings: EngineSettings) -> None:
    """Raises ConfigError as the batcher would, before anything starts."""
    batcher_config(settings, worker="").engine_config()


WORKER_FIELDS = (
    "device",
    "prefetch_device",
    "dtype",
    "num_device_blocks",
    "overlap_steps",
    "prefill_decode_blocks",
)


def worker_args(settings: EngineSettings, model_dir: str, port: int) -> list[str]:
    """The command line of `alignedserve serve worker` for a supervised local worker."""
    values = {name: getattr(settings, name) for name in WORKER_FIELDS}
    values["prefill_decode_blocks"] = worker_prefill_decode_blocks(
        settings.policy, settings.prefill_decode_blocks
    )
    config = WorkerConfig(
        model_dir=model_dir, port=port, **{k: None if v == "" else v for k, v in values.items()}
    )
    return worker_command(config)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, ServeConfig)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return flags.from_args(ServeConfig, args)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, avoid: Collection[int] = ()) -> list[int]:
    """n distinct ports of 127.0.0.1 that were free, none of them in `avoid`. The sockets
    that find them stay bound until all are found: one bound and closed at a time, the
    kernel may hand out the same port again (a serve's batcher once got its own metrics
    port, and restarted until the test gave up)."""
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < n:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
    return ports


def batcher_args(config: BatcherConfig) -> list[str]:
    """The command line of `alignedserve serve batcher` that parses back to `config`."""
    return flags.to_args(config)


async def batcher_serving(address: str, stop: asyncio.Event, interval_s: float = 0.1) -> bool:
    """Waits until the batcher at `address` reports SERVING (a worker attached): True; or
    until `stop` is set first: False. It may be down for a while (starting, restarting)."""
    import grpc

    from alignedserve.batcher.service import SERVICE
    from alignedserve.common.proto import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    return False


async def serve_all(
    config: ServeConfig, started: asyncio.Future | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until `stop` is set, then drain. `started` receives the HTTP port ("http"), the
    batcher's gRPC port ("grpc") and the supervisors of the "worker" and the "batcher" (tests
    kill their processes through them); with several routers, theirs too ("routers") and
    their metrics directory ("router_metrics_dir")."""
    from alignedserve.common.merged_metrics import merged_into
    from alignedserve.router.config import RouterConfig
    from alignedserve.serve_routers import RouterProcesses, take_port

    stop = stop or asyncio.Event()
    with contextlib.ExitStack() as resources:
        tmp = resources.enter_context(tempfile.TemporaryDirectory(prefix="alignedserve-"))
        model_dir = config.model or write_tiny_model(Path(tmp) / "tiny")
        # not the HTTP port either: a port the caller picked is free until its router binds
        worker_port, batcher_port, metrics_port = free_ports(3, avoid={config.port})
        batcher_address = f"127.0.0.1:{batcher_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        router_config = RouterConfig(
            model_dir=model_dir,
            batcher_addresses=(batcher_address,),
            host=config.host,
            port=config.port,
            drain_timeout_s=config.drain_s,
        )
        # the port is taken (or picked) and claimed before anything starts; the router(s)
        # listen on it once all is up
        routers = holder = None
        if config.num_routers > 1:
            routers = resources.enter_context(
                RouterProcesses(router_config, config.num_routers, metrics_url)
            )
        else:
            resources.enter_context(merged_into(metrics_url))
            holder, claim = take_port(config.host, config.port)
            resources.callback(holder.close)
            resources.callback(claim.close)
        supervisors = {
            "worker": Supervisor("worker", worker_args(config, model_dir, worker_port)),
            "batcher": Supervisor(
                "batcher",
                batcher_args(
                    batcher_config(
                        config,
                        f"127.0.0.1:{worker_port}",
                        port=batcher_port,
                        metrics_port=metrics_port,
                        drain_s=config.drain_s,
                    )
                ),
                stop_timeout_s=config.drain_s + 10,  # its drain, then the server's stop
            ),
        }
        stops = {role: asyncio.Event() for role in supervisors}
        children = {
            role: asyncio.create_task(s.run(stops[role]), name=f"{role}-supervisor")
            for role, s in supervisors.items()
        }
        router = http = None
        try:
            if not await batcher_serving(batcher_address, stop):
                # Stopped while the worker loads (minutes; or it restarts forever): nothing
                # to drain, and a batcher still waiting for its worker would not yet heed a
                # SIGTERM.
                supervisors["batcher"].stop_timeout_s = 1.0
                return
            if routers is not None:
                routers.run()
                if not await routers.serving(stop):
                    return
                http_port = routers.port
                more = {"routers": routers.supervisors, "router_metrics_dir": routers.metrics_dir}
            else:
                bound = asyncio.Event()
                http = _router_here(router_config, bound)
                # uvicorn takes SIGTERM/SIGINT while it runs: the first drains the router; once
                # it has stopped it re-raises the signal, which reaches run_serve's handler.
                router = asyncio.create_task(http.serve(sockets=[holder]), name="router")
                await _first(asyncio.ensure_future(bound.wait()), router)
                http_port, more = http.servers[0].sockets[0].getsockname()[1], {}
            log.info("serving %s at http://%s:%d/v1", model_dir, config.host, http_port)
            if started is not None:
                started.set_result({"http": http_port, "grpc": batcher_port, **supervisors, **more})
            await stop.wait()
        finally:  # drain in order: routers, batcher, worker
            if http is not None:
                http.begin_drain()
            if router is not None:
                await asyncio.gather(router, return_exceptions=True)
            if routers is not None:
                await routers.drain()
            for role in ("batcher", "worker"):
                stops[role].set()
                await asyncio.gather(children[role], return_exceptions=True)


def _router_here(router_config: RouterConfig, bound: asyncio.Event) -> RouterServer:
    """The router's server for this process; it sets `bound` once its port is bound."""
    from alignedserve.router.app import create_app
    from alignedserve.router.client import BatcherClient
    from alignedserve.router.server import RouterServer

    client = BatcherClient.from_config(router_config)
    return RouterServer(router_config, create_app(router_config, client), bound)


async def _first(started: asyncio.Future, task: asyncio.Task):
    """What `started` receives, or the task's error if it dies first."""
    await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
    if started.done():
        return started.result()
    task.result()  # raises its error
    raise RuntimeError(f"{task.get_name()} stopped before it started")


def write_tiny_model(path: Path) -> str:
    """A tiny random-weight model (and tokenizer) written to `path`; returns the path."""
    # A child process: writing weights needs torch, and this process must not import it.
    cmd = [sys.executable, "-m", "alignedserve", "model", "init-tiny", str(path)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log.info("no --model given: serving a tiny random-weight model (its text is noise)")
    return str(path)


def run_serve(config: ServeConfig) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_all(config, stop=stop)

    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(main())  # uvloop where installed, as the router's own processes
    return 0
