"""The worker's warm-up before serving: which decode graphs it captures, and that a step it
covered then captures nothing new (GPU)."""

from __future__ import annotations

import pytest

from alignedserve.common.errors import ConfigError
from alignedserve.worker.runner import graph_buckets
from alignedserve.worker.service import WorkerConfig

from triton_cpu import HAS_CUDA


def test_graph_buckets_cover_every_step_up_to_the_bounds_largest_first():
    buckets = graph_buckets(max_batch=5, max_blocks=40)
    assert buckets[0] == (8, 64)  # 5 -> 8 requests, 40 -> 64 blocks
    assert sorted(buckets) == [(b, w) for b in (1, 2, 4, 8) for w in (16, 32, 64)]


def test_graph_buckets_start_at_the_narrowest_table_the_runner_uses():
    assert graph_buckets(max_batch=1, max_blocks=3) == [(1, 16)]
    assert graph_buckets(max_batch=0, max_blocks=128) == []


def test_warm_up_batch_is_validated():
    with pytest.raises(ConfigError, match="warm_up_batch"):
        WorkerConfig(model_dir="m", warm_up_batch=-1)


def test_warm_up_does_nothing_on_the_cpu(tmp_path):
    from alignedserve.common.kv_layout import KVLayout
    from alignedserve.common.model_config import ModelConfig
    from alignedserve.worker.kv_cache import KVCache
    from alignedserve.worker.loader import load_model
    from alignedserve.worker.runner import ModelRunner
    from alignedserve.worker.tiny import init_tiny

    path = init_tiny(tmp_path, arch="llama")
    layout = KVLayout.for_model(ModelConfig.from_dir(path), 16)
    cache = KVCache(layout, 32)
    cache.blocks.fill_(1.0)
    runner = ModelRunner(load_model(path), cache)
    assert runner.warm_up(max_batch=8, max_model_len=2048) == 0
    assert bool((cache.blocks == 1.0).all())  # no pass ran


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_a_warmed_up_decode_step_captures_nothing(tmp_path):
    from alignedserve.common.kv_layout import KVLayout
    from alignedserve.common.model_config import ModelConfig
    from alignedserve.common.sampling_params import SamplingParams
    from alignedserve.worker.kv_cache import KVCache
    from alignedserve.worker.loader import load_model
    from alignedserve.worker.runner import ModelRunner, SeqChunk
    from alignedserve.worker.tiny import init_tiny

    path = init_tiny(tmp_path, arch="llama")
    config = ModelConfig.from_dir(path)
    layout = KVLayout.for_model(config, 16)
    runner = ModelRunner(load_model(path, device="cuda"), KVCache(layout, 256, "cuda", True))
    num = runner.warm_up(max_batch=8, max_model_len=config.max_position_embeddings)
    assert num == len(graph_buckets(8, -(-config.max_position_embeddings // 16)))
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    runner.step([SeqChunk(f"r{i}", (1, 2, 3), 0, (i,), greedy) for i in range(5)])
    captured_s = runner.capture_s
    runner.step([SeqChunk(f"r{i}", (4,), 3, (i,), greedy) for i in range(5)])
    assert runner.capture_s == captured_s
    assert len(runner._graphs) == num
