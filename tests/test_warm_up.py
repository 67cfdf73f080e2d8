"""The worker's warm-up before serving: which decode graphs it captures, and that a step it
covered then captures nothing new (GPU)."""

from __future__ import annotations

import pytest
import torch

from alignedserve.common.decode_graphs import graph_batch, graph_batches
from alignedserve.common.errors import ConfigError
from alignedserve.worker.cuda_graph import GraphInputs
from alignedserve.worker.service import WorkerConfig

from triton_cpu import HAS_CUDA


def test_a_step_replays_the_smallest_graph_that_holds_it_padding_under_a_quarter():
    sizes = graph_batches(512)
    assert sizes == sorted({graph_batch(n) for n in range(1, 513)}, reverse=True)
    assert len(sizes) == 28 and sizes[0] == 512 and sizes[-1] == 1
    for n in range(1, 1025):
        size = graph_batch(n)
        assert size >= n and graph_batch(size) == size
        assert size == n or size - n < max(n / 4, 4), n  # powers of two up to 8
        assert graph_batch(n + 1) >= size
    assert [graph_batch(n) for n in (5, 9, 58, 65, 73, 129)] == [8, 10, 64, 80, 80, 160]
    assert graph_batches(0) == [] and graph_batches(3) == [4, 2, 1]
    with pytest.raises(ValueError):
        graph_batch(0)


def test_graph_inputs_keep_every_row_past_a_step_padding_whatever_ran_before():
    """The graphs share their inputs: after any sequence of steps, rows past the step are a
    one-token context in the scratch block, and each row's entries past its table are the
    scratch block too."""
    scratch = 99
    inputs = GraphInputs(max_batch=8, max_blocks=6, scratch_block=scratch, device="cpu")

    def step(n: int, width: int) -> None:
        tables = torch.arange(n * width).view(n, width)
        inputs.write(torch.arange(n) + 1, tables, torch.full((n,), 5))
        assert torch.equal(inputs.block_tables[:n, :width], tables)
        assert bool((inputs.block_tables[:n, width:] == scratch).all())
        assert bool((inputs.block_tables[n:] == scratch).all())
        assert bool((inputs.ctx_lens[n:] == 1).all()) and bool((inputs.ctx_lens[:n] == 5).all())

    for n, width in [(8, 6), (3, 2), (5, 4), (1, 1), (8, 3), (2, 6), (7, 5)]:
        step(n, width)
    inputs.reset()  # before a capture: its passes must touch the scratch block alone
    assert bool((inputs.block_tables == scratch).all()) and bool((inputs.ctx_lens == 1).all())
    step(4, 3)
    with pytest.raises(ValueError, match="exceeds"):
        inputs.write(torch.zeros(9, dtype=torch.long), torch.zeros(9, 2), torch.ones(9))


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
    assert num == len(graph_batches(8))
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    runner.step([SeqChunk(f"r{i}", (1, 2, 3), 0, (i,), greedy) for i in range(5)])
    captured_s = runner.capture_s
    runner.step([SeqChunk(f"r{i}", (4,), 3, (i,), greedy) for i in range(5)])
    assert runner.capture_s == captured_s
    assert len(runner._graphs) == num


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_graphs_captured_while_serving_give_the_eager_steps_tokens(tmp_path):
    """Without a warm-up, graphs are captured on first use, over the inputs the graphs share,
    which then hold the last step's rows: a new capture must leave every request's KV as
    it was; a step with a table wider than the graphs' runs eagerly. Greedy tokens through
    graphs of 4, 10 and 4 rows again, and eager steps, equal eager steps' alone."""
    from alignedserve.common.kv_layout import KVLayout
    from alignedserve.common.model_config import ModelConfig
    from alignedserve.common.sampling_params import SamplingParams
    from alignedserve.worker.kv_cache import KVCache
    from alignedserve.worker.loader import load_model
    from alignedserve.worker.runner import ModelRunner, SeqChunk
    from alignedserve.worker.tiny import init_tiny

    path = init_tiny(tmp_path, arch="llama")
    layout = KVLayout.for_model(ModelConfig.from_dir(path), 16)
    model = load_model(path, device="cuda")
    greedy = SamplingParams(max_tokens=64, temperature=0.0)

    def run(use_graphs: bool) -> list[list[int]]:
        runner = ModelRunner(model, KVCache(layout, 256, "cuda", True))
        runner.use_graphs = use_graphs
        runner.graph_width = 3  # a step with a 4-block table (past 48 tokens) runs eagerly
        prompts = [[(7 * i + j) % 300 + 1 for j in range(5 + 5 * i)] for i in range(9)]
        out = [[] for _ in prompts]

        def table(i: int, num_tokens: int) -> tuple[int, ...]:  # its own 4 blocks, as needed
            return tuple(range(4 * i, 4 * i + layout.blocks_for(num_tokens)))

        for i, p in enumerate(prompts):  # prefill each, one at a time
            chunk = SeqChunk(f"r{i}", tuple(p), 0, table(i, len(p)), greedy)
            out[i].append(runner.step([chunk])[0].token_id)
        for members in (range(3), range(3), range(9), range(9), range(4), range(9), range(9)):
            chunks = []
            for i in members:
                cached = len(prompts[i]) + len(out[i]) - 1
                chunks.append(
                    SeqChunk(f"r{i}", (out[i][-1],), cached, table(i, cached + 1), greedy)
                )
            for i, t in zip(members, runner.step(chunks), strict=True):
                out[i].append(t.token_id)
        if use_graphs:  # the steps of 9 with r8's 49th token and on ran eagerly
            assert sorted(runner._graphs) == [4, 10]
        return out

    assert run(use_graphs=True) == run(use_graphs=False)


def compiled_variants(*kernels) -> int:
    """How many variants of these Triton kernels this process has compiled, on any device."""
    return sum(len(caches[0]) for k in kernels for caches in k.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gpu_a_warmed_up_prefill_compiles_nothing_whatever_its_chunks_length(tmp_path, arch):
    """Prompt chunks whose longest spans one query block, a multiple of 16 of them and
    another count, fresh and after cached tokens, and mixed steps whose tables are 16 and 19
    blocks wide, once warmed up: no new variant of the prefill attention, the K/V rows, the
    decode attention or its plan kernel (a compile while serving holds up a step)."""
    from alignedserve.common.kv_layout import KVLayout
    from alignedserve.common.model_config import ModelConfig
    from alignedserve.common.sampling_params import SamplingParams
    from alignedserve.worker.kernels import kv_rows, prefill_attention
    from alignedserve.worker.kernels.decode_attention import _decode_attention_kernel
    from alignedserve.worker.kernels.decode_plan import _decode_plan_kernel
    from alignedserve.worker.kv_cache import KVCache
    from alignedserve.worker.loader import load_model
    from alignedserve.worker.runner import ModelRunner, SeqChunk
    from alignedserve.worker.tiny import init_tiny

    path = init_tiny(tmp_path, arch=arch)
    config = ModelConfig.from_dir(path)
    layout = KVLayout.for_model(config, 16)
    runner = ModelRunner(load_model(path, device="cuda"), KVCache(layout, 256, "cuda", True))
    runner.warm_up(max_batch=8, max_model_len=config.max_position_embeddings)
    kernels = (
        prefill_attention._prefill_attention_kernel,
        kv_rows._kv_rows_kernel,
        _decode_attention_kernel,
        _decode_plan_kernel,
    )
    before = compiled_variants(*kernels)
    block_m = prefill_attention.DEFAULT_TILING.block_m
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    for n in (40, 3 * block_m + 5, 16 * block_m):  # 1, 4 and 16 query blocks
        table = tuple(range(layout.blocks_for(n + 7)))
        runner.step([SeqChunk("a", (1,) * n, 0, table, greedy)])
        runner.step([SeqChunk("a", (2,) * 7, n, table, greedy)])  # a chunk after cached ones
    decoding = tuple(range(19))  # 19 blocks: a request of up to 304 tokens
    runner.step([SeqChunk("d", (3,) * 255, 0, decoding, greedy)])
    for cached in (255, 299):  # its table 16, then 19 blocks wide, beside a prompt chunk
        runner.step(
            [SeqChunk("c", (4,) * 40, 0, (100, 101, 102), greedy),
             SeqChunk("d", (5,), cached, decoding[: layout.blocks_for(cached + 1)], greedy)]
        )  # fmt: skip
    assert compiled_variants(*kernels) == before
