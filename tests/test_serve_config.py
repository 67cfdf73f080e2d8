"""`alignedserve serve`'s settings reach its parts: the worker's command line (parsed by the
worker's own flags), the embedded batcher's config and scheduler, the router's batcher client
(built from the router's config). serve_all runs for real with its worker supervisor and its
batcher replaced by recorders: no child process, the router on a free port."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import pytest

import alignedserve.batcher.service
import alignedserve.serve
from alignedserve.batcher.service import BatcherConfig
from alignedserve.bench.engine_target import EngineTargetConfig
from alignedserve.cli import build_parser, main
from alignedserve.common.errors import ConfigError
from alignedserve.router.client import BatcherClient
from alignedserve.serve import (
    BATCHER_FIELDS,
    WORKER_FIELDS,
    EngineSettings,
    ServeConfig,
    batcher_args,
    batcher_config,
    config_from_args,
    free_ports,
    serve_all,
    worker_args,
)
from alignedserve.worker import service as worker_service


def serve_config(*argv: str) -> ServeConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def parse_worker(args: list[str]) -> worker_service.WorkerConfig:
    parser = argparse.ArgumentParser()
    worker_service.add_worker_arguments(parser)
    return worker_service.config_from_args(parser.parse_args(args))


def test_batcher_knobs_have_the_batchers_defaults_and_flags():
    for name in BATCHER_FIELDS:
        assert getattr(ServeConfig(), name) == getattr(BatcherConfig(), name), name
    config = serve_config("--min-batch", "3", "--max-batch-kv-fraction", "0.5")
    assert (config.min_batch, config.max_batch_kv_fraction) == (3, 0.5)
    scheduler = batcher_config(config, "127.0.0.1:1").engine_config().scheduler
    assert (scheduler.min_batch_size, scheduler.max_resident_kv_fraction) == (3, 0.5)
    assert scheduler.prefill_whole_prompts  # the default
    assert scheduler.load_order == "shortest-first"
    config = serve_config("--no-prefill-whole-prompts", "--load-order", "fit-groups")
    scheduler = batcher_config(config, "127.0.0.1:1").engine_config().scheduler
    assert not scheduler.prefill_whole_prompts
    assert scheduler.load_order == "fit-groups"


@pytest.mark.parametrize("config_cls", [ServeConfig, EngineTargetConfig])
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"min_batch": 0}, "min_batch_size=0"),
        ({"min_batch": 513}, "min_batch_size=513 exceeds max_batch_size"),
        ({"max_batch_kv_fraction": 1.5}, r"max_resident_kv_fraction=1.5 must be in \(0, 1\]"),
        ({"max_batch_kv_fraction": 0.0}, "max_resident_kv_fraction=0.0"),
        ({"pool_gib": 0.0}, "pool_gib=0.0 must be > 0"),
        ({"policy": "lifo"}, "policy='lifo' not one of"),
    ],
)
def test_bad_batcher_knobs_fail_the_config_at_once(config_cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        config_cls(**bad)


def test_a_bad_knob_is_a_clean_cli_error_before_anything_starts(capsys):
    assert main(["serve", "--min-batch", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("alignedserve: error: ") and "min_batch_size=0" in err


def test_num_routers_has_a_flag_defaults_to_one_and_must_be_at_least_one(capsys):
    assert ServeConfig().num_routers == 1  # the router in the serve process, as before
    assert serve_config("--num-routers", "3").num_routers == 3
    with pytest.raises(ConfigError, match="num_routers=0 must be >= 1"):
        ServeConfig(num_routers=0)
    assert main(["serve", "--num-routers", "-2"]) == 1
    assert "num_routers=-2 must be >= 1" in capsys.readouterr().err


def test_engine_settings_default_to_the_workers_and_batchers_own():
    """Each EngineSettings field is a WorkerConfig or BatcherConfig field of the same name
    ("" standing for None), with its default: `serve` and the engine bench set up exactly
    what a worker and a batcher started alone would be."""
    names = {f.name for f in dataclasses.fields(EngineSettings)}
    assert names == set(BATCHER_FIELDS) | set(WORKER_FIELDS)
    worker = worker_service.WorkerConfig(model_dir="/m")
    for name in WORKER_FIELDS:
        value = getattr(EngineSettings(), name)
        assert (None if value == "" else value) == getattr(worker, name), name
    for name in BATCHER_FIELDS:
        assert getattr(EngineSettings(), name) == getattr(BatcherConfig(), name), name


@pytest.mark.parametrize("config_cls", [ServeConfig, EngineTargetConfig])
def test_worker_args_are_the_workers_own_flags(config_cls):
    settings = config_cls(
        device="cuda:0",
        prefetch_device="cuda:1",
        dtype="bfloat16",
        num_device_blocks=77,
        overlap_steps=False,
    )
    worker = parse_worker(worker_args(settings, "/models/m", 5123))
    assert worker == worker_service.WorkerConfig(
        model_dir="/models/m",
        device="cuda:0",
        prefetch_device="cuda:1",
        dtype="bfloat16",
        port=5123,
        num_device_blocks=77,
        overlap_steps=False,
    )
    plain = parse_worker(worker_args(config_cls(), "/models/m", 1))
    assert (plain.dtype, plain.prefetch_device, plain.device) == (None, None, "cpu")
    assert plain.overlap_steps
    # the prefill device decoding too (sized by the worker) reaches the worker under aligned;
    # fcfs never sends it residents, so it gets no decode KV there
    both = dict(device="cuda:0", prefetch_device="cuda:1", prefill_decode_blocks=-1)
    aligned = parse_worker(worker_args(config_cls(**both), "/m", 1))
    assert aligned.prefill_decode_blocks == worker_service.AUTO_BLOCKS
    fcfs = parse_worker(worker_args(config_cls(**both, policy="fcfs"), "/m", 1))
    assert fcfs.prefill_decode_blocks == 0


def parse_batcher(args: list[str]) -> BatcherConfig:
    parser = argparse.ArgumentParser()
    alignedserve.batcher.service.add_batcher_arguments(parser)
    return alignedserve.batcher.service.config_from_args(parser.parse_args(args))


def test_batcher_args_parse_back_to_the_config():
    config = BatcherConfig(
        worker="127.0.0.1:7", port=9, metrics_port=11, pool_gib=0.3, policy="fcfs", min_batch=3
    )
    assert parse_batcher(batcher_args(config)) == config
    tuned = BatcherConfig(kernel_cost="balanced", weight_kv_tokens=4096, drain_s=2.5)
    assert parse_batcher(batcher_args(tuned)) == tuned


def test_serve_all_passes_its_settings_to_worker_batcher_and_router(model_dir, monkeypatch):
    supervisors, clients = {}, []

    class RecordingSupervisor:
        """Stands in for Supervisor: records each child's command line, runs nothing."""

        def __init__(self, role: str, args: list[str], stop_timeout_s: float = 10.0):
            self.args, self.stop_timeout_s = args, stop_timeout_s
            self.restarts = 0
            supervisors[role] = self

        async def run(self, stop: asyncio.Event) -> None:
            await stop.wait()

    async def batcher_serving(address, stop):  # nothing listens there: the router is told
        return True

    real_from_config = BatcherClient.from_config.__func__

    def recording_from_config(cls, config, **overrides):
        clients.append(config)
        return real_from_config(cls, config, **overrides)

    monkeypatch.setattr(alignedserve.serve, "Supervisor", RecordingSupervisor)
    monkeypatch.setattr(alignedserve.serve, "batcher_serving", batcher_serving)
    monkeypatch.setattr(BatcherClient, "from_config", classmethod(recording_from_config))
    argv = ["--model", model_dir, "--port", "0", "--policy", "fcfs", "--pool-gib", "0.25"]
    argv += ["--max-waiting", "9", "--min-batch", "4", "--max-batch-kv-fraction", "0.6"]
    argv += ["--drain-s", "2", "--dtype", "float32", "--num-device-blocks", "64"]
    config = serve_config(*argv)

    async def run():
        started = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        serving = asyncio.create_task(serve_all(config, started=started, stop=stop))
        ports = await asyncio.wait_for(started, 60)
        stop.set()
        await asyncio.wait_for(serving, 60)
        return ports

    ports = asyncio.run(run())
    assert set(supervisors) == {"worker", "batcher"}
    assert ports["worker"] is supervisors["worker"] and ports["http"] > 0
    assert ports["batcher"] is supervisors["batcher"] and ports["grpc"] > 0
    worker = parse_worker(supervisors["worker"].args)
    assert (worker.model_dir, worker.dtype, worker.num_device_blocks) == (model_dir, "float32", 64)
    batcher = parse_batcher(supervisors["batcher"].args)
    assert batcher.port == ports["grpc"] and batcher.metrics_port > 0
    assert batcher == BatcherConfig(
        worker=f"127.0.0.1:{worker.port}",
        port=batcher.port,
        metrics_port=batcher.metrics_port,
        pool_gib=0.25,
        policy="fcfs",
        max_waiting=9,
        min_batch=4,
        max_batch_kv_fraction=0.6,
        drain_s=2.0,
    )
    # SIGTERM gives the batcher its drain and then some before a SIGKILL
    assert supervisors["batcher"].stop_timeout_s > batcher.drain_s
    (router,) = clients
    assert router.batcher_addresses == (f"127.0.0.1:{batcher.port}",)
    assert (router.model_dir, router.port, router.drain_timeout_s) == (model_dir, 0, 2.0)


def test_a_stop_while_the_worker_loads_ends_serve_all_at_once(model_dir, monkeypatch):
    """SIGTERM before the worker attaches (a load takes minutes; a worker that cannot start is
    restarted forever): the real batcher process, waiting for a worker that never comes, is
    stopped at once and the worker supervisor too, instead of the stop waiting for
    worker_startup_s or the batcher's drain."""
    supervisor_runs, batchers = [], []
    real = alignedserve.serve.Supervisor

    class NeverStartsWorker(real):
        async def run(self, stop: asyncio.Event) -> None:
            if self.role == "batcher":
                batchers.append(self)
                return await super().run(stop)
            supervisor_runs.append("running")
            await stop.wait()
            supervisor_runs.append("stopped")

    monkeypatch.setattr(alignedserve.serve, "Supervisor", NeverStartsWorker)
    config = ServeConfig(model=model_dir, port=0, pool_gib=0.05)

    async def run():
        started = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        serving = asyncio.create_task(serve_all(config, started=started, stop=stop))
        await asyncio.sleep(4.0)  # the batcher process is up, trying to reach the worker
        assert not serving.done() and not started.done()
        (batcher,) = batchers
        assert batcher.process is not None and batcher.process.returncode is None
        stop.set()
        begin = time.monotonic()
        await asyncio.wait_for(serving, 30)
        return time.monotonic() - begin, started.done(), batcher.process.returncode

    took_s, was_started, batcher_exit = asyncio.run(run())
    assert took_s < 5 and not was_started
    assert batcher_exit is not None  # no batcher process is left behind
    assert supervisor_runs == ["running", "stopped"]


def test_the_prefill_devices_decode_blocks_auto_sized_like_the_decode_devices_within_its_memory(
    monkeypatch,
):
    import torch

    from alignedserve.worker.server import PREFILL_DEVICE_RESERVE_BYTES, prefill_decode_blocks

    def config(**kw):
        return worker_service.WorkerConfig(model_dir="/m", num_device_blocks=1000, **kw)

    def auto(device):
        return config(prefetch_device=device, prefill_decode_blocks=worker_service.AUTO_BLOCKS)

    block = 2 << 20
    assert config().prefill_decode_blocks == worker_service.AUTO_BLOCKS  # on by default
    assert prefill_decode_blocks(auto("cpu"), block) == 1000
    assert prefill_decode_blocks(config(prefetch_device="cpu", prefill_decode_blocks=7), block) == 7
    assert prefill_decode_blocks(config(prefetch_device="cpu", prefill_decode_blocks=0), block) == 0
    asked = []

    def free(blocks):  # free memory on the prefill GPU: `blocks` beyond the reserve
        def mem_get_info(device):
            asked.append(device)
            return PREFILL_DEVICE_RESERVE_BYTES + blocks * block + block // 2, 141 << 30

        monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)

    free(5000)
    assert prefill_decode_blocks(auto("cuda:1"), block) == 1000
    free(600)
    assert prefill_decode_blocks(auto("cuda:1"), block) == 600
    free(-3)
    assert prefill_decode_blocks(auto("cuda:1"), block) == 0
    assert asked == [torch.device("cuda:1")] * 3
    with pytest.raises(ConfigError, match="prefill_decode_blocks=-2"):
        config(prefetch_device="cuda:1", prefill_decode_blocks=-2)
    with pytest.raises(ConfigError, match="needs a prefetch_device"):
        config(prefill_decode_blocks=8)
    # allowed without a prefetch device: the worker then makes none
    assert config(prefill_decode_blocks=-1).prefill_decode_blocks == -1


def test_free_ports_are_distinct_and_avoid_the_given_ones(monkeypatch):
    """The kernel may hand a closed port out again at once; the ports are found with their
    sockets all held, and a repeated or avoided one is skipped."""
    handed_out = iter([7, 7, 8, 9, 7, 10])

    class Socket:
        def __enter__(self):
            self.port = next(handed_out)
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            assert address == ("127.0.0.1", 0)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    with monkeypatch.context() as m:
        m.setattr(alignedserve.serve.socket, "socket", Socket)
        assert free_ports(3, avoid={8}) == [7, 9, 10]
    real = free_ports(20)
    assert len(set(real)) == 20 and all(1024 <= p < 65536 for p in real)
