"""What the batcher takes from its worker: the decode cost model (weight bytes and kernel
kind from ModelInfo, unless configured), the batcher's metric series from the moment the
worker attaches, and how long the worker's loads took (StepResponse.load_s)."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from alignedserve.batcher.engine import BatcherEngine
from alignedserve.batcher.engine_config import EngineConfig, scheduler_config_for
from alignedserve.batcher.scheduler import SchedulerConfig
from alignedserve.batcher.service import BatcherConfig, add_batcher_arguments, config_from_args
from alignedserve.common import wire
from alignedserve.common.errors import ConfigError
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import worker_pb2
from alignedserve.worker.server import decode_kernel_cost, serve_worker
from alignedserve.worker.service import WorkerConfig
from alignedserve.worker.tiny import init_tiny

import factories
from factories import random_prompts


def sample(name: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model_name": model})


@pytest.mark.parametrize(
    ("device", "kernel_cost"),
    [
        ("cpu", "padded"),  # the torch path pads every member to the longest
        # the Triton paged kernel; loads on side streams, timed with CUDA events
        pytest.param("cuda", "balanced", marks=pytest.mark.gpu),
    ],
)
def test_a_worker_reports_its_cost_model_and_the_batcher_uses_it(tmp_path, device, kernel_cost):
    model_dir = init_tiny(tmp_path / f"cost-model-{device}", arch="llama")  # its own series
    model = model_dir.resolve().name
    tensors = load_file(model_dir / "model.safetensors").values()
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in tensors)

    async def main():
        ready = asyncio.Event()
        holder = {}
        worker = asyncio.create_task(
            serve_worker(
                WorkerConfig(str(model_dir), device=device, num_device_blocks=64),
                ready=ready,
                on_ready=lambda s: holder.setdefault("servicer", s),
            )
        )
        await asyncio.wait_for(ready.wait(), 60)
        engine = BatcherEngine(
            EngineConfig(
                f"127.0.0.1:{holder['servicer'].port}",
                pool_bytes=1 << 22,
                scheduler=SchedulerConfig(policy="aligned"),
            )
        )
        await engine.start()
        try:
            at_attach = {
                name: sample(name, model)
                for name in (
                    "alignedserve:batch_switches_total",
                    "alignedserve:prefetch_bytes_total",
                    "alignedserve:prefetch_seconds_count",
                    "alignedserve:batch_length_spread_count",
                    "alignedserve:request_queue_time_seconds_count",
                    "alignedserve:num_requests_pooled",
                    "alignedserve:kv_cache_usage_perc",
                )
            }
            queues = [
                engine.submit(f"c{i}", p, factories.greedy(8, ignore_eos=True))
                for i, p in enumerate(random_prompts((12, 30, 21), seed=3))
            ]
            for queue in queues:
                while (await asyncio.wait_for(queue.get(), 60)).finish_reason is None:
                    pass
            return engine.info, engine.scheduler.config, at_attach
        finally:
            await engine.stop()
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    info, config, at_attach = asyncio.run(main())
    layout = wire.layout_from_proto(info.kv_layout)
    kv_bytes_per_token = layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim * 4
    assert layout.dtype == "float32" and layout.block_bytes == kv_bytes_per_token * 16
    assert info.weight_bytes == checkpoint_bytes  # every weight once (fp32, none tied)
    assert info.decode_kernel_cost == config.kernel_cost == kernel_cost
    assert config.weight_kv_tokens == checkpoint_bytes // kv_bytes_per_token
    assert (config.gpu_kv_tokens, config.block_tokens) == (64 * 16, 16)
    if device == "cpu":  # nothing measured: the scheduler keeps its default ridge
        assert info.ridge_flops_per_byte == 0
        assert config.ridge_flops_per_byte == SchedulerConfig.ridge_flops_per_byte
        assert info.warm_up_seconds == 0 and info.kernel_cache_entries == 0  # no warm-up
    else:  # measured at start (H200 ~190; an H100 reads its HBM slower)
        assert 100 < info.ridge_flops_per_byte < 400
        assert config.ridge_flops_per_byte == info.ridge_flops_per_byte
        assert info.warm_up_seconds > 0  # kernels and graphs, on any cache
    # the worker's start by phase, as the batcher exports it
    start = {
        phase: REGISTRY.get_sample_value(
            "alignedserve:worker_start_seconds", {"model_name": model, "phase": phase}
        )
        for phase in ("load", "warm_up")
    }
    assert 0 < info.load_seconds < 60
    assert start == {"load": info.load_seconds, "warm_up": info.warm_up_seconds}
    entries = sample("alignedserve:worker_kernel_cache_entries", model)
    assert entries == info.kernel_cache_entries

    assert at_attach == dict.fromkeys(at_attach, 0.0)  # every series there, at zero
    assert sample("alignedserve:prefetch_seconds_count", model) >= 1  # aligned loads them all
    assert sample("alignedserve:prefetch_seconds_sum", model) > 0
    assert sample("alignedserve:prefetch_bytes_total", model) > 0


def test_configured_cost_settings_win_over_the_workers():
    layout = KVLayout(2, 2, 16, 16, "bfloat16")  # 256 bytes of KV per token
    info = worker_pb2.ModelInfo(
        kv_layout=wire.layout_to_proto(layout),
        num_device_blocks=100,
        weight_bytes=256 * 5000,
        decode_kernel_cost="balanced",
        ridge_flops_per_byte=250,
    )
    base = SchedulerConfig(kernel_cost="padded", weight_kv_tokens=122_000)

    reported = scheduler_config_for(EngineConfig("w:1", 1, base), info, 1000)
    assert (reported.kernel_cost, reported.weight_kv_tokens) == ("balanced", 5000)
    assert reported.ridge_flops_per_byte == 250  # the worker's GPU, as it measured it

    mine = EngineConfig("w:1", 1, base, kernel_cost="padded", weight_kv_tokens=777)
    configured = scheduler_config_for(mine, info, 1000)
    assert (configured.kernel_cost, configured.weight_kv_tokens) == ("padded", 777)

    silent = worker_pb2.ModelInfo(kv_layout=info.kv_layout, num_device_blocks=100)
    unreported = scheduler_config_for(EngineConfig("w:1", 1, base), silent, 1000)
    assert (unreported.kernel_cost, unreported.weight_kv_tokens) == ("padded", 122_000)
    assert unreported.ridge_flops_per_byte == base.ridge_flops_per_byte == 190

    # fcfs: the pool's blocks stand for the device's
    fcfs = scheduler_config_for(EngineConfig("w:1", 1, SchedulerConfig(policy="fcfs")), info, 1000)
    assert (fcfs.num_pool_blocks, fcfs.gpu_kv_tokens) == (100, 1600)


def test_batcher_flags_set_the_cost_model_or_leave_it_to_the_worker():
    parser = argparse.ArgumentParser()
    add_batcher_arguments(parser)
    default = config_from_args(parser.parse_args([]))
    assert (default.kernel_cost, default.weight_kv_tokens) == (None, None)
    args = parser.parse_args(["--kernel-cost", "balanced", "--weight-kv-tokens", "4096"])
    engine = config_from_args(args).engine_config()
    assert (engine.kernel_cost, engine.weight_kv_tokens) == ("balanced", 4096)
    with pytest.raises(ConfigError, match="kernel_cost"):
        BatcherConfig(kernel_cost="flat")
    with pytest.raises(ConfigError, match="weight_kv_tokens"):
        BatcherConfig(weight_kv_tokens=0)


def test_the_decode_kernel_cost_follows_the_device():
    assert decode_kernel_cost("cuda") == decode_kernel_cost("cuda:1") == "balanced"
    assert decode_kernel_cost("cpu") == "padded"
