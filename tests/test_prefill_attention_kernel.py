"""kernels/prefill_attention.py (varlen causal prefill attention in Triton) against its torch
twin, the served path's CPU varlen call (attention.varlen_attention_ref, whose packing and
mask test_prefill_attention.py checks against the padded reference); here the twin's mask is
also checked on its own.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (small shapes that still
cross query blocks and key tiles, unmasked and masked); the `gpu` test compares it with torch's
flash kernel at Llama-3-8B's and OPT-13B's head shapes.
"""

from __future__ import annotations

import pytest
import torch

from triton_cpu import (
    DEVICE,
    HAS_CUDA,
    bf16_rounded_to_nearest,
    kernel_module,
    randn,
    scalar_loop_bounds,
)

attn = kernel_module("alignedserve.worker.kernels.prefill_attention", "_prefill_attention_kernel")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_patches():
    with scalar_loop_bounds(), bf16_rounded_to_nearest():
        yield


def case(q_lens, cached, q_heads, kv_heads, head_dim, dtype, seed=0, strided=False):
    ctx = [q + c for q, c in zip(q_lens, cached, strict=True)]
    n, num_keys = sum(q_lens), sum(ctx)
    if strided:  # q as a fused projection's split: rows of (q, other) side by side
        q = randn(n, 2 * q_heads * head_dim, dtype=dtype, seed=seed)[:, : q_heads * head_dim]
        q = q.view(n, q_heads, head_dim)
    else:
        q = randn(n, q_heads, head_dim, dtype=dtype, seed=seed)
    k = randn(num_keys, kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    v = randn(num_keys, kv_heads, head_dim, dtype=dtype, seed=seed + 2)
    zero = torch.zeros(1, dtype=torch.int32)
    cu_q = torch.cat([zero, torch.tensor(q_lens).cumsum(0).int()]).to(DEVICE)
    cu_k = torch.cat([zero, torch.tensor(ctx).cumsum(0).int()]).to(DEVICE)
    return q, k, v, cu_q, cu_k, max(q_lens)


@pytest.mark.parametrize(
    ("q_lens", "cached", "q_heads", "kv_heads"),
    [
        ([5, 130, 1], [0, 70, 200], 4, 2),  # GQA; two query blocks; tiles before the diagonal
        ([64, 129], [0, 0], 2, 2),  # MHA, fresh prompts: every tile on the diagonal masked
        ([3], [300], 2, 1),  # a short chunk after many cached keys: mostly unmasked tiles
    ],
    ids=["gqa-mixed", "mha-fresh", "chunk-after-cache"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_its_twin(q_lens, cached, q_heads, kv_heads, dtype):
    q, k, v, cu_q, cu_k, max_q = case(q_lens, cached, q_heads, kv_heads, 16, dtype, seed=3)
    want = attn.prefill_attention_ref(q, k, v, cu_q, cu_k, 0.25)
    got = attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, 0.25)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("tiling", attn.SWEEP, ids=str)
def test_every_tiling_the_benchmark_sweeps_matches_the_twin(tiling):
    q, k, v, cu_q, cu_k, max_q = case([5, 130, 70], [0, 70, 200], 4, 2, 16, torch.float32)
    want = attn.prefill_attention_ref(q, k, v, cu_q, cu_k, 0.25)
    got = attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, 0.25, tiling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_strided_queries_and_the_twins_bottom_right_mask():
    q, k, v, cu_q, cu_k, max_q = case([7, 20], [9, 0], 2, 2, 16, torch.float32, strided=True)
    assert not q.is_contiguous()
    got = attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, 0.3)
    torch.testing.assert_close(got, attn.prefill_attention_ref(q, k, v, cu_q, cu_k, 0.3))
    # the twin's mask: the first query of the first request (9 cached keys) sees keys 0..9,
    # so changing key 10 (its request's next) leaves it alone and moves the second query
    k2 = k.clone()
    k2[10] += 1.0
    moved = attn.prefill_attention_ref(q, k2, v, cu_q, cu_k, 0.3)
    want = attn.prefill_attention_ref(q, k, v, cu_q, cu_k, 0.3)
    assert torch.equal(moved[0], want[0]) and not torch.equal(moved[1], want[1])


def test_bad_shapes_are_refused():
    q, k, v, cu_q, cu_k, max_q = case([4], [0], 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, 1.0)
    q, k, v, cu_q, cu_k, max_q = case([4], [0], 2, 2, 24, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 8), (40, 40)], ids=["llama3-8b", "opt-13b"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_kernel_matches_torch(q_heads, kv_heads, dtype):
    """At the served shapes (head_dim 128): prompts of 2,048, 777 and 1 fresh, and a 2,048-token
    chunk after 6,144 cached. bf16 (served) against torch's flash kernel on the same inputs;
    float32 (the model tests' dtype, multiplied without TF32) against the twin's SDPA."""
    q_lens, cached = [2048, 777, 1, 2048], [0, 0, 0, 6144]
    q, k, v, cu_q, cu_k, max_q = case(q_lens, cached, q_heads, kv_heads, 128, dtype)
    scale = 128**-0.5
    got = attn.prefill_attention(q, k, v, cu_q, cu_k, max_q, scale)
    if dtype == torch.float32:
        want = attn.prefill_attention_ref(q, k, v, cu_q, cu_k, scale)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return
    want = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, int((cu_k[1:] - cu_k[:-1]).max()), 0.0, True, False,
        scale=scale,
    )[0]  # fmt: skip
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
