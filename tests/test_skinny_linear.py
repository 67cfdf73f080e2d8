"""The skinny GEMM (worker/kernels/skinny_linear.py) against its torch twin, the twin against
nn.Linear, and layers.Linear's choice between the kernel and nn.Linear.

Without a GPU the kernel runs in Triton's interpreter on tiny fp32 shapes. The `gpu` tests add
the Llama-3-8B projections in bf16 and a fp32 case that must not round through tf32.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignedserve.worker.models.layers import Linear, fuse_linears

from triton_cpu import DEVICE, HAS_CUDA, kernel_module, randn

skl = kernel_module("alignedserve.worker.kernels.skinny_linear", "_skinny_linear_kernel")


def test_the_twin_is_nn_linear():
    linear = nn.Linear(24, 40)
    x = torch.randn(5, 24)
    torch.testing.assert_close(skl.linear_ref(x, linear.weight, linear.bias), linear(x))
    torch.testing.assert_close(skl.linear_ref(x, linear.weight), x @ linear.weight.t())


# (M, N, K): one token to past a 16-token tile; N not a multiple of 64; K a multiple of the
# K tile or not (the masked loop), and K smaller than one tile
SHAPES = [(1, 64, 256), (3, 100, 256), (16, 64, 200), (20, 130, 96), (40, 72, 24)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_matches_the_twin(m, n, k, has_bias):
    x, w = randn(m, k, seed=1), randn(n, k, seed=2)
    bias = randn(n, seed=3) if has_bias else None
    got = skl.skinny_linear(x, w, bias)
    torch.testing.assert_close(got, skl.linear_ref(x, w, bias), rtol=1e-4, atol=1e-4)


def test_writes_into_out_and_takes_strided_rows():
    base = randn(6, 160, seed=4)
    x = base[:, :128]  # rows 160 apart, columns contiguous
    w = randn(64, 128, seed=5)
    out = torch.full((6, 64), float("nan"), device=DEVICE)
    assert skl.skinny_linear(x, w, out=out, tiles=skl.Tiles(num_stages=2)) is out
    torch.testing.assert_close(out, skl.linear_ref(x, w), rtol=1e-4, atol=1e-4)


# tile shapes a sweep may pick: wider weight tiles, more warps, a shorter K step, more
# tokens per program
TILE_VARIANTS = [
    skl.Tiles(block_n=128, block_k=64, num_warps=8),
    skl.Tiles(block_n=32, block_k=32, num_stages=3),
    skl.Tiles(max_block_m=128),
]


@pytest.mark.parametrize("tiles", TILE_VARIANTS, ids=repr)
@pytest.mark.parametrize("m,n,k", [(3, 100, 256), (40, 72, 24), (70, 130, 96)])
def test_tile_variants_match_the_twin(tiles, m, n, k):
    x, w, bias = randn(m, k, seed=6), randn(n, k, seed=7), randn(n, seed=8)
    got = skl.skinny_linear(x, w, bias, tiles=tiles)
    torch.testing.assert_close(got, skl.linear_ref(x, w, bias), rtol=1e-4, atol=1e-4)


# (M, N, K) for the fused forms: N per half with silu_mul; K past one tile and masked
FUSED_SHAPES = [(1, 64, 256), (5, 100, 200), (20, 72, 96), (40, 130, 24)]


@pytest.mark.parametrize("m,n,k", FUSED_SHAPES)
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_normed_linear_matches_the_twin(m, n, k, silu_mul, has_bias):
    rows = 2 * n if silu_mul else n
    x, w = randn(m, k, seed=11, scale=3.0), randn(rows, k, seed=12)
    bias = randn(rows, seed=14) if has_bias else None
    got = skl.normed_linear(x, 1e-5, w, bias, silu_mul=silu_mul)
    want = skl.normed_linear_ref(x, 1e-5, w, bias, silu_mul=silu_mul)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,n,k", FUSED_SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_residual_matches_the_twin(m, n, k, has_bias):
    x, w, residual = randn(m, k, seed=15), randn(n, k, seed=16), randn(m, n, seed=17)
    bias = randn(n, seed=18) if has_bias else None
    got = skl.linear_residual(x, w, residual, bias)
    torch.testing.assert_close(
        got, skl.linear_residual_ref(x, w, residual, bias), rtol=1e-4, atol=1e-4
    )


def test_the_fused_twins_are_the_layers_arithmetic():
    """On weights with the norm's gain folded in (layers.fold_norm_weight), the twins give
    the layer's RMSNorm (with its gain), projection and silu(gate) * up."""
    x, w, gate_up = torch.randn(3, 16), torch.randn(8, 16), torch.randn(2 * 8, 16)
    norm = torch.rand(16) + 0.5
    normed = norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(skl.normed_linear_ref(x, 1e-6, w * norm), normed @ w.t())
    gate, up = (normed @ gate_up.t()).chunk(2, dim=-1)
    want = nn.functional.silu(gate) * up
    got = skl.normed_linear_ref(x, 1e-6, gate_up * norm, silu_mul=True)
    torch.testing.assert_close(got, want)
    res = torch.randn(3, 8)
    torch.testing.assert_close(skl.linear_residual_ref(x, w, res), x @ w.t() + res)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: skl.normed_linear(randn(4, 32), 1e-5, randn(8, 16)), "want x"),
        (lambda: skl.normed_linear(randn(4, 32), 1e-5, randn(9, 32), silu_mul=True), "gate | up"),
        (lambda: skl.linear_residual(randn(4, 32), randn(8, 32), randn(4, 9)), "residual"),
        (lambda: skl.linear_residual(randn(4, 32), randn(8, 32), randn(8, 4).t()), "residual"),
    ],
)
def test_bad_fused_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_zero_tokens_give_an_empty_result():
    w = randn(64, 128)
    assert skl.skinny_linear(w[:0], w).shape == (0, 64)


@pytest.mark.parametrize(
    "x,w,match",
    [
        (randn(4, 128), randn(64, 96), "want x"),
        (randn(4, 96), randn(64, 96, dtype=torch.float64), "dtype"),
        (randn(64, 4).t(), randn(32, 64), "contiguous rows"),
    ],
)
def test_bad_inputs_raise(x, w, match):
    with pytest.raises(ValueError, match=match):
        skl.skinny_linear(x, w)


class _Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        original = skl.skinny_linear

        def record(x, weight, bias=None, **kwargs):
            self.calls.append(tuple(x.shape))
            return original(x, weight, bias, **kwargs)

        monkeypatch.setattr(skl, "skinny_linear", record)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors never take the kernel; covered by the GPU test")
def test_linear_keeps_nn_linear_on_cpu(monkeypatch):
    recorder = _Recorder(monkeypatch)
    layer = Linear(32, 48)
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert recorder.calls == []


def test_fused_projections_are_linear_too():
    fused = fuse_linears(nn.Linear(8, 4), nn.Linear(8, 6))
    assert type(fused) is Linear and fused.out_features == 10


# ---- on a GPU ----

LLAMA3_8B = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16, 32])
@pytest.mark.parametrize("name", list(LLAMA3_8B))
def test_llama_projections_in_bf16(m, name):
    n, k = LLAMA3_8B[name]
    x = randn(m, k, dtype=torch.bfloat16, seed=m)
    w = randn(n, k, dtype=torch.bfloat16, seed=n) * k**-0.5
    got = skl.skinny_linear(x, w)
    # fp32 accumulation in both; one bf16 rounding of the output (and sum order) apart
    torch.testing.assert_close(got.float(), skl.linear_ref(x, w).float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16, 32])
@pytest.mark.parametrize("name", ["qkv", "gate_up"])
def test_llama_normed_projections_in_bf16(m, name):
    n, k = LLAMA3_8B[name]
    x = randn(m, k, dtype=torch.bfloat16, seed=m, scale=4.0)
    w = randn(n, k, dtype=torch.bfloat16, seed=n) * k**-0.5
    silu_mul = name == "gate_up"
    got = skl.normed_linear(x, 1e-5, w, silu_mul=silu_mul)
    want = skl.normed_linear_ref(x, 1e-5, w, silu_mul=silu_mul)
    # the twin rounds the normed x to bf16; the kernel multiplies x itself and scales the
    # fp32 accumulator: a bf16 ulp or two apart
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 32])
@pytest.mark.parametrize("name", ["o", "down"])
def test_llama_residual_projections_equal_the_separate_kernels(m, name):
    n, k = LLAMA3_8B[name]
    x = randn(m, k, dtype=torch.bfloat16, seed=m)
    w = randn(n, k, dtype=torch.bfloat16, seed=n) * k**-0.5
    residual = randn(m, n, dtype=torch.bfloat16, seed=n + 1)
    got = skl.linear_residual(x, w, residual)
    # the same dot, rounded where the separate GEMM stores, then torch's add: bit for bit
    assert torch.equal(got, skl.skinny_linear(x, w) + residual)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_fp32_is_not_rounded_through_tf32():
    x, w = randn(8, 4096, seed=1), randn(512, 4096, seed=2)
    want = skl.linear_ref(x.double(), w.double()).float()
    # tf32 keeps 10 mantissa bits: its error here would be ~1e-2, fp32's ~1e-5
    torch.testing.assert_close(skl.skinny_linear(x, w), want, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_linear_takes_the_kernel_up_to_max_tokens(monkeypatch):
    recorder = _Recorder(monkeypatch)
    layer = Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    for m in (1, skl.MAX_TOKENS, skl.MAX_TOKENS + 1):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        want = nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), want, rtol=1.6e-2, atol=1e-2)
    assert recorder.calls == [(1, 256), (skl.MAX_TOKENS, 256)]


@pytest.mark.parametrize(
    "programs,stage_bytes,want",
    [
        (64, 24 << 10, 8),  # o and down at bf16: fewer programs than SMs, a deep pipeline
        (96 + 100, 24 << 10, 6),  # between one and two per SM
        (448, 24 << 10, 4),  # gate_up: many programs
        (64, 48 << 10, 4),  # fp32 tiles: capped by shared memory
        (64, 200 << 10, 2),  # never below double buffering
    ],
)
def test_pipeline_stages(programs, stage_bytes, want):
    assert skl.pipeline_stages(programs, 132, stage_bytes) == want
