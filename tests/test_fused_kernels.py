"""Fused Triton kernels (add + RMSNorm, RoPE + KV append, SiLU * up) against their torch twins,
and each twin against the model code it replaces (layers.RMSNorm, layers.RotaryEmbedding with
KVCache.write, F.silu(gate) * up).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tiny shapes). With one,
the same tiny cases run compiled on it, and the `gpu` tests add Llama-3-8B shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.model_config import RopeConfig
from alignedserve.worker.kv_cache import KVCache
from alignedserve.worker.models.layers import RMSNorm, RotaryEmbedding

from triton_cpu import DEVICE, HAS_CUDA, bf16_rounded_to_nearest, kernel_module, randn

fused = kernel_module("alignedserve.worker.kernels.fused", "_add_rms_norm_kernel")

HALF_DTYPES = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *HALF_DTYPES]
NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_rounding():
    with bf16_rounded_to_nearest():
        yield


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """fp32: tight. Half: a result may differ by an ulp or two where an fp32 intermediate
    (a mean's summation order, an exp) lands next to a rounding boundary."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=2e-2, rtol=2e-2)


# ---- residual add + RMSNorm ----


@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("hidden", [64, 40], ids=["h64", "h40-padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_kernel_matches_ref(dtype, hidden, has_residual):
    x = randn(5, hidden, dtype=dtype, seed=1)
    residual = randn(5, hidden, dtype=dtype, scale=3.0, seed=2) if has_residual else None
    weight = randn(hidden, dtype=dtype, seed=3)
    want, want_residual = fused.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    got, got_residual = fused.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **tolerances(dtype))
    assert torch.equal(got_residual, want_residual)  # one add, rounded once: exact
    if not has_residual:
        assert got_residual is x


def test_add_rms_norm_promotes_like_the_module():
    """An fp32 weight (a module not cast to the model dtype) on bf16 activations gives fp32,
    as `weight * x32.to(dtype)` does; the normalized row is still rounded to bf16 first."""
    x, residual = randn(3, 48, dtype=torch.bfloat16), randn(3, 48, dtype=torch.bfloat16, seed=1)
    weight = randn(48, seed=2)
    want, _ = fused.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    got, _ = fused.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("module_dtype", [None, torch.bfloat16], ids=["fp32-weight", "cast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_ref_matches_module(dtype, module_dtype):
    norm = RMSNorm(40, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(randn(40, seed=4))
    norm = norm.to(module_dtype or torch.float32)
    x, residual = randn(6, 40, dtype=dtype, seed=5), randn(6, 40, dtype=dtype, seed=6)
    with torch.no_grad():
        want = norm(x + residual)
        normed, new_residual = fused.fused_add_rms_norm_ref(x, residual, norm.weight, norm.eps)
        alone, same = fused.fused_add_rms_norm_ref(x, None, norm.weight, norm.eps)
    assert torch.equal(normed, want) and torch.equal(new_residual, x + residual)
    assert torch.equal(alone, norm(x)) and same is x


# ---- RoPE + KV cache append ----

ROPES = {
    "default": RopeConfig(theta=10000.0),
    # A short original context: the table's positions reach past it, all 3 bands are used.
    # A short original context puts head_dim 16's wavelengths (6, 32, 167, ...) in all three
    # bands: kept (< 16), smoothed (16..64), stretched (> 64).
    "llama3": RopeConfig(
        theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=64
    ),
}
MAX_POSITIONS = 4096


def make_rope_case(
    rope: RopeConfig,
    dtype: torch.dtype,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    num_tokens: int = 7,
    block_tokens: int = 4,
    cache_dtype: str | None = None,
    device: str = DEVICE,
):
    """q, k, v as split views of one fused qkv output (strided, like the model's), positions
    spread over the whole table, distinct slots in a NaN-filled two-layer cache."""
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn((num_tokens, (q_heads + 2 * kv_heads) * head_dim), generator=gen)
    q, k, v = qkv.to(device, dtype).split(
        [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1
    )
    q = q.view(num_tokens, q_heads, head_dim)
    k, v = k.view(num_tokens, kv_heads, head_dim), v.view(num_tokens, kv_heads, head_dim)
    ends = torch.tensor([0, MAX_POSITIONS - 1])  # both ends of the table, then random
    positions = torch.cat([ends, torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)])
    positions = positions[:num_tokens]
    dtype_name = str(dtype).removeprefix("torch.")
    layout = KVLayout(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim,
                      block_tokens=block_tokens, dtype=cache_dtype or dtype_name)  # fmt: skip
    num_blocks = -(-num_tokens // block_tokens) + 2
    cache = KVCache(layout, num_blocks, device=device)
    cache.blocks.fill_(NAN)  # stale slots: a stray write shows up as a number
    slots = torch.randperm(num_blocks * block_tokens, generator=gen)[:num_tokens]
    slot_block, slot_offset = (slots // block_tokens).to(device), (slots % block_tokens).to(device)
    rotary = RotaryEmbedding(rope, head_dim).to(device)
    rotary.materialize_buffers(device)
    return q, k, v, positions.to(device), rotary, cache, slot_block, slot_offset


def run_rope(fn, q, k, v, positions, rotary, cache, slot_block, slot_offset):
    table = fused.build_cos_sin_cache(rotary.inv_freq, MAX_POSITIONS)
    k_blocks, v_blocks = cache.layer(1)
    return fn(q, k, v, positions, table, k_blocks, v_blocks, slot_block, slot_offset)


@pytest.mark.parametrize(
    "shape",
    [dict(), dict(q_heads=6, kv_heads=3, head_dim=12), dict(q_heads=4, kv_heads=4, head_dim=32)],
    ids=["gqa", "padded-heads-and-dims", "mha"],
)
@pytest.mark.parametrize("rope", ROPES.values(), ids=ROPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_kv_write_kernel_matches_ref(dtype, rope, shape):
    q, k, v, positions, rotary, cache, slot_block, slot_offset = make_rope_case(
        rope, dtype, **shape
    )
    twin_cache = KVCache(cache.layout, cache.num_blocks, device=DEVICE)
    twin_cache.blocks.copy_(cache.blocks)
    want_q, want_k = run_rope(fused.rope_kv_write_ref, q, k, v, positions, rotary, twin_cache,
                              slot_block, slot_offset)  # fmt: skip
    got_q, got_k = run_rope(fused.rope_kv_write, q, k, v, positions, rotary, cache,
                            slot_block, slot_offset)  # fmt: skip
    assert got_q.shape == q.shape and got_k.shape == k.shape and got_q.dtype == dtype
    # Same table, same roundings, no fused multiply-adds: exact on every dtype.
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    torch.testing.assert_close(cache.blocks, twin_cache.blocks, equal_nan=True, atol=0, rtol=0)
    assert int((~cache.blocks.isnan()).sum()) == 2 * k.numel()  # written: N slots of K and V


def test_rope_kv_write_casts_to_the_cache_dtype():
    """bf16 activations into an fp32 cache (the CPU pool's dtype may differ), as KVCache.write."""
    case = make_rope_case(ROPES["default"], torch.bfloat16, cache_dtype="float32")
    v, cache, slot_block, slot_offset = case[2], case[5], case[6], case[7]
    _, k_rot = run_rope(fused.rope_kv_write, *case)
    k_blocks, v_blocks = cache.layer(1)
    assert torch.equal(k_blocks[slot_block, slot_offset], k_rot.float())
    assert torch.equal(v_blocks[slot_block, slot_offset], v.float())


@pytest.mark.parametrize("rope", ROPES.values(), ids=ROPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_kv_write_ref_matches_model_path(dtype, rope):
    """The twin equals RotaryEmbedding followed by KVCache.write, the path the models run."""
    case = make_rope_case(rope, dtype)
    q, k, v, positions, rotary, cache, slot_block, slot_offset = case
    model_cache = KVCache(cache.layout, cache.num_blocks, device=DEVICE)
    model_cache.blocks.copy_(cache.blocks)
    want_q, want_k = rotary(positions, q, k)
    model_cache.write(1, slot_block, slot_offset, want_k, v)
    got_q, got_k = run_rope(fused.rope_kv_write_ref, *case)
    # The table's cos/sin come from the same fp32 products as the module's; only the cos/sin
    # routines' vectorization may differ by an fp32 ulp, which can move a half rounding.
    tol = tolerances(dtype)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)
    torch.testing.assert_close(cache.blocks, model_cache.blocks, equal_nan=True, **tol)


def test_cos_sin_cache_layout():
    inv_freq = RotaryEmbedding(ROPES["default"], 8).inv_freq  # [4]
    table = fused.build_cos_sin_cache(inv_freq, 10)  # [10, 8]
    assert table.shape == (10, 8) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(table[3, 4:], torch.sin(3 * inv_freq))


# ---- SiLU(gate) * up ----


@pytest.mark.parametrize("inter", [40, 1500], ids=["i40", "i1500-two-programs-per-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_kernel_matches_ref(dtype, inter):
    gate_up = randn(3, 2 * inter, dtype=dtype, scale=4.0)  # gate spans silu's curved part
    got = fused.silu_and_mul(gate_up)
    assert got.shape == (3, inter) and got.dtype == dtype
    torch.testing.assert_close(got, fused.silu_and_mul_ref(gate_up), **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_ref_matches_model(dtype):
    gate_up = randn(4, 2 * 40, dtype=dtype, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused.silu_and_mul_ref(gate_up), F.silu(gate) * up)


# ---- edges ----


def test_empty_batch():
    x = torch.zeros((0, 32), device=DEVICE)
    assert fused.fused_add_rms_norm(x, x, torch.ones(32, device=DEVICE), 1e-5)[0].shape == (0, 32)
    assert fused.silu_and_mul(torch.zeros((0, 64), device=DEVICE)).shape == (0, 32)
    case = make_rope_case(ROPES["default"], torch.float32, num_tokens=0)
    got_q, got_k = run_rope(fused.rope_kv_write, *case)
    assert got_q.shape == (0, 4, 16) and got_k.shape == (0, 2, 16)
    assert case[5].blocks.isnan().all()  # nothing written


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fused.fused_add_rms_norm(randn(2, 8), None, randn(4), 1e-5), "weight"),
        (lambda: fused.fused_add_rms_norm(randn(2, 8), randn(2, 4), randn(8), 1e-5), "residual"),
        (lambda: fused.fused_add_rms_norm(randn(1, 9000), None, randn(9000), 1e-5), "9000"),
        (lambda: fused.silu_and_mul(randn(2, 7)), "2I"),
        (lambda: fused.silu_and_mul(randn(2, 8).long()), "dtype"),
    ],
    ids=["norm-weight", "norm-residual", "norm-too-wide", "silu-odd", "silu-int"],
)
def test_rejects_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rope_rejects_bad_inputs():
    q, k, v, positions, rotary, cache, slot_block, slot_offset = make_rope_case(
        ROPES["default"], torch.float32
    )
    table = fused.build_cos_sin_cache(rotary.inv_freq, MAX_POSITIONS)
    k_blocks, v_blocks = cache.layer(1)
    args = [q, k, v, positions, table, k_blocks, v_blocks, slot_block, slot_offset]
    for index, bad, message in [
        (1, k[:, :, :8], "want q"),
        (4, table.half(), "fp32"),
        (5, cache.layer(1)[0][:, :, :1], "blocks"),
        (3, positions.float(), "positions"),
        (7, slot_block[:3], "slot_block"),
    ]:
        with pytest.raises(ValueError, match=message):
            fused.rope_kv_write(*args[:index], bad, *args[index + 1 :])


# ---- GPU: Llama-3-8B shapes (pytest -m gpu) ----

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
LLAMA3_8B_ROPE = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)
GPU_TOKENS = [1, 64, 512]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_add_rms_norm_llama3_8b(num_tokens):
    x = randn(num_tokens, 4096, dtype=torch.bfloat16, seed=1)
    residual = randn(num_tokens, 4096, dtype=torch.bfloat16, scale=10.0, seed=2)
    norm = RMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(randn(4096, seed=3))
        want = norm(x + residual)
    got, new_residual = fused.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # An ulp apart at most, and only where the fp32 mean's order moved a rounding.
    assert (got != want).float().mean() < 0.01


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_rope_kv_write_llama3_8b(num_tokens):
    case = make_rope_case(LLAMA3_8B_ROPE, torch.bfloat16, q_heads=32, kv_heads=8, head_dim=128,
                          num_tokens=num_tokens, block_tokens=16, device="cuda")  # fmt: skip
    q, k, v, positions, rotary, cache, slot_block, slot_offset = case
    model_cache = KVCache(cache.layout, cache.num_blocks, device="cuda")
    model_cache.blocks.copy_(cache.blocks)
    want_q, want_k = rotary(positions, q, k)
    model_cache.write(1, slot_block, slot_offset, want_k, v)
    got_q, got_k = run_rope(fused.rope_kv_write, *case)
    # Against the model path itself: bf16 maths rounded where eager torch rounds is exact.
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    torch.testing.assert_close(cache.blocks, model_cache.blocks, equal_nan=True, atol=0, rtol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
def test_gpu_silu_and_mul_llama3_8b(num_tokens):
    gate_up = randn(num_tokens, 2 * 14336, dtype=torch.bfloat16, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = fused.silu_and_mul(gate_up)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert (got != want).float().mean() < 0.01  # exp's approximation may move a rounding


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replay():
    """All three read only device tensors: one captured graph serves every step."""
    case = make_rope_case(LLAMA3_8B_ROPE, torch.bfloat16, q_heads=32, kv_heads=8, head_dim=128,
                          num_tokens=64, block_tokens=16, device="cuda")  # fmt: skip
    q, k, v, positions, rotary, cache, slot_block, slot_offset = case
    table = fused.build_cos_sin_cache(rotary.inv_freq, MAX_POSITIONS)
    k_blocks, v_blocks = cache.layer(1)
    x, gate_up = randn(64, 4096, dtype=torch.bfloat16), randn(64, 2 * 14336, dtype=torch.bfloat16)
    weight = randn(4096, dtype=torch.bfloat16, seed=1)

    def step():
        normed, residual = fused.fused_add_rms_norm(x, x, weight, 1e-5)
        q_rot, _ = fused.rope_kv_write(
            q, k, v, positions, table, k_blocks, v_blocks, slot_block, slot_offset
        )
        return normed, residual, q_rot, fused.silu_and_mul(gate_up)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    positions.add_(5)
    x.mul_(2.0)
    graph.replay()
    want = step()
    for got, expected in zip(outs, want, strict=True):
        assert torch.equal(got, expected)
