"""The simulator's cost model: model arithmetic, and the shape of its decode/prefill/copy costs
against the numbers measured in ../shared/notes/gpu-facts.md."""

from __future__ import annotations

import numpy as np
import pytest

from alignedserve.batcher.sim.cost_model import (
    LLAMA3_8B,
    OPT_13B,
    SHAPES,
    CostModel,
    GpuSpec,
)

IDEAL = GpuSpec(prefill_efficiency=1.0, step_overhead_s=0.0)


def test_llama3_8b_arithmetic():
    assert LLAMA3_8B.weight_bytes == pytest.approx(16.06e9, rel=0.02)
    assert LLAMA3_8B.kv_bytes_per_token == 131072  # 32 layers × 8 heads × 128 × K,V × 2 B
    assert LLAMA3_8B.linear_flops_per_token == pytest.approx(15e9, rel=0.02)
    assert LLAMA3_8B.attention_flops(1024) == 4 * 32 * 128 * 1024 * 32


def test_opt_13b_arithmetic():
    assert OPT_13B.weight_bytes == pytest.approx(25.7e9, rel=0.02)
    assert OPT_13B.kv_bytes_per_token == 819200  # 40 layers × 40 heads × 128 × K,V × 2 B
    # lm_head is tied (stored once) but still multiplied every token.
    assert OPT_13B.linear_flops_per_token > 2 * OPT_13B.weight_params - 1


def test_registry():
    assert SHAPES == {"llama3-8b": LLAMA3_8B, "opt-13b": OPT_13B}
    assert all(name == shape.name for name, shape in SHAPES.items())


def test_roofline_point_from_gpu_facts():
    # 256 × 1024, Llama-3-8B: memory 11.9 ms (weights + every member's KV at 4.23 TB/s).
    cost = CostModel(LLAMA3_8B, IDEAL).step_cost([1024] * 256)
    assert cost.memory_s == pytest.approx(11.9e-3, rel=0.05)
    assert cost.compute_s == pytest.approx(4.8e-3, rel=0.10)  # 4.8 ms there, w/o attention
    assert not cost.compute_bound
    # The projections and attention run one after the other: their times add.
    step_s = CostModel(LLAMA3_8B, IDEAL).decode_step_s([1024] * 256)
    assert step_s == pytest.approx(cost.memory_s + cost.compute_s)


# CUDA-graph decode steps measured on an H200 (Llama-3-8B shape, random bf16 weights), with
# that run's ceilings: docs/results/session11/gpu_bench_call2.json.
H200_CEILINGS = GpuSpec(hbm_read_bytes_per_s=4.183e12, matmul_flops_per_s=779e12)
H200_GRID_MS = {
    (64, 512): 6.48, (64, 2048): 9.43, (64, 8192): 20.90, (128, 1024): 9.84,
    (128, 4096): 21.36, (256, 512): 12.16, (256, 2048): 23.51, (512, 512): 21.38,
    (512, 1024): 28.60,
}  # fmt: skip


@pytest.mark.parametrize(("batch", "length"), H200_GRID_MS)
def test_a_decode_step_costs_what_the_h200_measured(batch, length):
    """Within 10 % of every measured cell, short or long, memory- or compute-heavy (the
    larger of the two terms was off by up to 30 %)."""
    step_ms = CostModel(LLAMA3_8B, H200_CEILINGS).decode_step_s([length] * batch) * 1e3
    assert step_ms / H200_GRID_MS[(batch, length)] == pytest.approx(1.0, abs=0.1)


# OPT-13B (MHA: 6.25 times Llama-3-8B's KV per token) on an H200, the cells whose KV fits
# beside the weights: docs/results/session17/gpu_bench_opt13b_call4.json.
H200_OPT_CEILINGS = GpuSpec(hbm_read_bytes_per_s=4.167e12, matmul_flops_per_s=762e12)
H200_OPT_GRID_MS = {(64, 512): 15.60, (64, 1024): 21.86, (128, 512): 23.36}


@pytest.mark.parametrize(("batch", "length"), H200_OPT_GRID_MS)
def test_an_mha_decode_step_costs_what_the_h200_measured(batch, length):
    """The same model, unchanged, on MHA's KV-heavy steps: within 10 % too."""
    step_ms = CostModel(OPT_13B, H200_OPT_CEILINGS).decode_step_s([length] * batch) * 1e3
    assert step_ms / H200_OPT_GRID_MS[(batch, length)] == pytest.approx(1.0, abs=0.1)


def test_prefill_efficiency_and_overhead_slow_a_step():
    ideal, real = CostModel(LLAMA3_8B, IDEAL), CostModel(LLAMA3_8B)
    lengths = [1024] * 256
    overhead_s = GpuSpec().step_overhead_s  # the host's gap between served steps
    assert overhead_s == pytest.approx(0.28e-3)
    assert real.decode_step_s(lengths) == pytest.approx(ideal.decode_step_s(lengths) + overhead_s)
    # Prefill counts its FLOPs at its in-serving share of the matmul rate, in a pass and in
    # a continuous-batching step alike; its weights are read at the full rate.
    for cost_of in (lambda m: m.prefill_cost([2048]), lambda m: m.step_cost([], 2048)):
        slow, fast = cost_of(real), cost_of(ideal)
        assert slow.compute_s == pytest.approx(fast.compute_s / 0.7)
        assert slow.memory_s == fast.memory_s


@pytest.mark.parametrize("shape", [LLAMA3_8B, OPT_13B])
def test_equal_lengths_cost_the_same_padded_or_balanced(shape):
    for lengths in ([2048] * 64, [1] * 3, [8192] * 200):
        padded = CostModel(shape, padded=True).decode_step_s(lengths)
        balanced = CostModel(shape, padded=False).decode_step_s(lengths)
        assert padded == pytest.approx(balanced)


def test_mixed_lengths_cost_more_padded():
    lengths = [100, 500, 4000, 7000]
    assert CostModel(LLAMA3_8B, padded=True).decode_step_s(lengths) > CostModel(
        LLAMA3_8B, padded=False
    ).decode_step_s(lengths)


def test_iteration_bubble_from_gpu_facts():
    # 64 requests, 131,072 useful tokens both ways: all 2048 vs half 256 + half 3840.
    aligned = [2048] * 64
    mixed = [256] * 32 + [3840] * 32
    assert sum(aligned) == sum(mixed)
    balanced = CostModel(LLAMA3_8B, padded=False)
    assert balanced.decode_step_s(mixed) == pytest.approx(balanced.decode_step_s(aligned))
    padded = CostModel(LLAMA3_8B, padded=True)
    # The KV term alone grows 3840/2048 = 1.875× (1.68× measured on attention); the whole
    # step less, since the 16 GB of weights are read either way.
    ratio = padded.decode_step_s(mixed) / padded.decode_step_s(aligned)
    assert 1.2 < ratio < 1.875
    ideal_padded = CostModel(LLAMA3_8B, IDEAL, padded=True)

    def kv_term(lengths: list[int]) -> float:
        return ideal_padded.step_cost(lengths).memory_s - LLAMA3_8B.weight_bytes / 4.23e12

    assert kv_term(mixed) / kv_term(aligned) == pytest.approx(3840 / 2048)


@pytest.mark.parametrize("padded", [True, False])
def test_monotonic(padded):
    model = CostModel(LLAMA3_8B, padded=padded)
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(0, 8192, size=int(rng.integers(1, 300)))
        base = model.decode_step_s(lengths)
        assert model.decode_step_s(np.append(lengths, rng.integers(0, 8192))) >= base
        longer = lengths.copy()
        longer[rng.integers(0, lengths.size)] += int(rng.integers(1, 1000))
        assert model.decode_step_s(longer) >= base
        assert model.mixed_step_s(lengths, 256) >= base
        assert model.mixed_step_s(lengths, 256, 1024) >= model.mixed_step_s(lengths, 256)


def test_empty():
    model = CostModel(LLAMA3_8B)
    assert model.decode_step_s([]) == 0.0
    assert model.decode_step_s(np.array([], dtype=np.int64)) == 0.0
    assert model.mixed_step_s([], 0) == 0.0
    assert model.prefill_s([]) == 0.0
    assert model.mixed_step_s([], 512) > 0.0  # a prefill-only continuous-batching step


def test_mixed_step_reads_weights_once():
    model = CostModel(LLAMA3_8B)
    lengths = [1024] * 32
    together = model.mixed_step_s(lengths, 512)
    apart = model.decode_step_s(lengths) + model.prefill_s([512])
    assert together < apart


def test_prefill_grows_and_is_compute_bound():
    model = CostModel(LLAMA3_8B)
    times = [model.prefill_s([n]) for n in (1, 64, 512, 2048, 8192)]
    assert times == sorted(times)
    # Short prompts are bound by reading the weights; from a few hundred tokens on, by FLOPs.
    assert not model.prefill_cost([64]).compute_bound
    assert times[2] < times[3] < times[4]
    assert model.prefill_cost([2048]).compute_bound
    # Causal attention is quadratic: one 8k prompt costs more than four 2k prompts.
    assert model.prefill_s([8192]) > model.prefill_s([2048] * 4)


def test_copies():
    model = CostModel(LLAMA3_8B)
    one_gb = 1e9
    assert model.h2d_s(one_gb) == pytest.approx(one_gb / 55.5e9)
    assert model.h2d_s(one_gb, links=2) == pytest.approx(model.h2d_s(one_gb) / 2)
    assert model.nvlink_s(one_gb) == pytest.approx(one_gb / 396e9)
    assert model.nvlink_s(one_gb) < model.h2d_s(one_gb)
    with pytest.raises(ValueError):
        model.h2d_s(one_gb, links=3)


def test_kv_capacity():
    tokens = CostModel(LLAMA3_8B).kv_capacity_tokens(0.1)
    assert 850_000 <= tokens <= 900_000
    assert CostModel(LLAMA3_8B).kv_capacity_tokens(0.0) > tokens
    # MHA OPT-13B: 6.25× the bytes per token and more weights → far fewer tokens.
    assert CostModel(OPT_13B).kv_capacity_tokens() < tokens / 6


def test_rejects_negative():
    model = CostModel(LLAMA3_8B)
    with pytest.raises(ValueError):
        model.decode_step_s([5, -1])
    with pytest.raises(ValueError):
        model.mixed_step_s([5], -1)


def test_write_back_copy():
    model = CostModel(OPT_13B)
    assert model.d2h_s(1e9) == pytest.approx(1e9 / 55.4e9)
    with pytest.raises(ValueError):
        model.d2h_s(-1)


def test_a_prompt_in_two_chunks_computes_what_it_computes_whole():
    """The second chunk attends to the first's tokens too: the chunks' FLOPs add up to the
    whole prompt's (causal pairs: a²/2 + b·a + b²/2 = (a + b)²/2); it also reads their KV."""
    model = CostModel(OPT_13B, IDEAL)
    whole = model.prefill_cost([3000])
    first, second = model.prefill_cost([1000]), model.prefill_cost([2000], [1000])
    assert first.compute_s + second.compute_s == pytest.approx(whole.compute_s)
    assert second.compute_s > model.prefill_cost([2000]).compute_s
    assert second.memory_s > model.prefill_cost([2000]).memory_s


def test_a_pure_decode_step_pays_its_cuda_graphs_empty_rows_and_a_mixed_step_none():
    """The worker replays the graph of the smallest batch size holding a decode step (65
    requests: 80 rows); each empty row costs its projections' FLOPs, no KV. A step with a
    prefill chunk runs without a graph."""
    cost = CostModel(LLAMA3_8B, IDEAL, padded=False)
    lengths = [512] * 65
    step = cost.step_cost(lengths)
    exact = cost.step_cost([512] * 64)  # a graph of 64: no empty row
    per_row_s = LLAMA3_8B.linear_flops_per_token / IDEAL.matmul_flops_per_s
    attention_s = 512 * LLAMA3_8B.attention_flops_per_kv_token / IDEAL.matmul_flops_per_s
    assert step.compute_s == pytest.approx(exact.compute_s + 16 * per_row_s + attention_s)
    assert step.memory_s == pytest.approx(
        exact.memory_s + 512 * LLAMA3_8B.kv_bytes_per_token / IDEAL.hbm_read_bytes_per_s
    )
    mixed = cost.step_cost(lengths, prefill_tokens=1)
    mixed_rows = mixed.compute_s - cost.step_cost([], prefill_tokens=1).compute_s
    assert mixed_rows == pytest.approx(65 * per_row_s + 65 * attention_s)
