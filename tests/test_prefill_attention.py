"""Prefill attention (one varlen call over keys gathered from the blocks) against the padded
torch reference. On CPU the varlen call is its torch twin, so these tests check the key
packing and the bottom-right causal mask; the `gpu` tests run the served kernels (the Triton
varlen prefill kernel, and the paged decode kernel for a mixed step's decode rows) on
realistic shapes in bf16 / fp16.
"""

from __future__ import annotations

import random

import pytest
import torch

from alignedserve.worker.attention import (
    AttentionMetadata,
    _attend_ref,
    attend_prefill,
    decode_first,
)

from triton_cpu import HAS_CUDA


def make_case(
    q_lens: list[int],
    cached: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
):
    """Shuffled, non-contiguous block tables into a pool of [num_blocks, T, Hk, D] views of
    a two-layer cache; every slot no query may read (the other layer, spare blocks, tails
    of last blocks) holds NaN, so reading one shows in the output."""
    rng = random.Random(seed)
    block_tokens = 16
    need = [-(-(q + c) // block_tokens) for q, c in zip(q_lens, cached, strict=True)]
    ids = list(range(sum(need) + 3))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in need:
        tables.append(ids[at : at + n])
        at += n
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (len(ids), 2, 2, block_tokens, kv_heads, head_dim)
    blocks = torch.full(shape, float("nan"), dtype=dtype, device=device)
    for table, q, c in zip(tables, q_lens, cached, strict=True):
        for pos in range(q + c):
            slot = (table[pos // block_tokens], 1, slice(None), pos % block_tokens)
            blocks[slot] = torch.randn((2, kv_heads, head_dim), generator=gen, device=device)
    k_blocks, v_blocks = blocks[:, 1, 0], blocks[:, 1, 1]
    meta = AttentionMetadata.build(q_lens, cached, tables, block_tokens, device)
    q = torch.randn((sum(q_lens), q_heads, head_dim), generator=gen, device=device)
    return q.to(dtype), k_blocks, v_blocks, meta, head_dim**-0.5


def reference(q, k_blocks, v_blocks, meta, scale):
    """The padded path in float32, with the NaN of unused slots zeroed: its mask hides them,
    but 0 x NaN is NaN."""
    k32 = torch.nan_to_num(k_blocks.float())
    v32 = torch.nan_to_num(v_blocks.float())
    return _attend_ref(q.float(), k32, v32, meta, scale, None)


CASES = {
    "fresh prompts": ([5, 40, 17], [0, 0, 0]),
    "later chunks": ([12, 33], [7, 64]),
    "with a decode row": ([1, 5, 12], [9, 0, 7]),  # a mixed step packs its decode rows first
    "three decode rows": ([1, 1, 1, 5, 12], [30, 9, 100, 0, 7]),
}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prefill_matches_padded_reference(case, heads):
    q_lens, cached = case
    q, k_blocks, v_blocks, meta, scale = make_case(
        q_lens, cached, *heads, head_dim=16, dtype=torch.float32, device="cpu"
    )
    got = attend_prefill(q, k_blocks, v_blocks, meta, scale)
    ref = reference(q, k_blocks, v_blocks, meta, scale)
    assert not got.isnan().any()
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_only_fresh_prompts_alone_attend_over_the_new_keys(case):
    meta = make_case(*case, q_heads=2, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")[3]
    assert meta.keys_are_new == (case is CASES["fresh prompts"])


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_fresh_prompts_attend_over_the_new_keys_without_reading_the_blocks(heads):
    """The pass's own k, v (as a fused projection's strided views) give what the keys
    gathered from the blocks give; the blocks are all NaN here, so a read would show."""
    q_lens, cached = CASES["fresh prompts"]
    q, k_blocks, v_blocks, meta, scale = make_case(
        q_lens, cached, *heads, head_dim=16, dtype=torch.float32, device="cpu"
    )
    ref = reference(q, k_blocks, v_blocks, meta, scale)
    packed = torch.stack([k_blocks[meta.key_block, meta.key_offset]] * 3, dim=1)  # [K, 3, ...]
    packed[:, 2] = v_blocks[meta.key_block, meta.key_offset]
    new_kv = (packed[:, 0], packed[:, 2])  # strided views, as qkv.chunk gives them
    k_blocks.fill_(float("nan"))
    v_blocks.fill_(float("nan"))
    got = attend_prefill(q, k_blocks, v_blocks, meta, scale, new_kv)
    assert not got.isnan().any()
    assert (got - ref).abs().max().item() <= 1e-5
    # later chunks read their cached keys from the blocks, whatever new_kv says
    q_lens, cached = CASES["later chunks"]
    q, k_blocks, v_blocks, meta, scale = make_case(
        q_lens, cached, *heads, head_dim=16, dtype=torch.float32, device="cpu"
    )
    k_blocks.fill_(float("nan"))
    assert attend_prefill(q, k_blocks, v_blocks, meta, scale, new_kv).isnan().all()


def test_keys_are_packed_request_by_request():
    """The gather indices walk each request's own table, position by position."""
    meta = AttentionMetadata.build([2, 3], [18, 0], [[7, 4], [9]], 16, "cpu")
    pairs = list(zip(meta.key_block.tolist(), meta.key_offset.tolist(), strict=True))
    assert pairs == [(7, i) for i in range(16)] + [(4, 0), (4, 1), (4, 2), (4, 3)] + [
        (9, 0),
        (9, 1),
        (9, 2),
    ]
    assert meta.cu_q_lens.tolist() == [0, 2, 5]
    assert meta.cu_ctx_lens.tolist() == [0, 20, 23]


def test_a_mixed_step_packs_only_the_chunks_keys():
    """Decode rows (one new token) are left to the paged decode kernel: their keys are not
    gathered; they lead the pass, and their tables and lengths are its first ones."""
    meta = AttentionMetadata.build([1, 2, 3], [40, 18, 0], [[5, 6, 8], [7, 4], [9]], 16, "cpu")
    pairs = list(zip(meta.key_block.tolist(), meta.key_offset.tolist(), strict=True))
    assert pairs == [(7, i) for i in range(16)] + [(4, i) for i in range(4)] + [
        (9, i) for i in range(3)
    ]
    assert meta.cu_q_lens.tolist() == [0, 2, 5]
    assert meta.cu_ctx_lens.tolist() == [0, 20, 23]
    assert meta.num_decode_rows == 1
    assert meta.decode_tables.tolist() == [[5, 6, 8]]
    assert meta.decode_ctx_lens.tolist() == [41]


def test_a_mixed_step_with_a_decode_row_after_a_chunk_is_refused():
    with pytest.raises(ValueError, match=r"decode rows .* first"):
        AttentionMetadata.build([2, 1, 3], [18, 40, 0], [[7, 4], [5, 6, 8], [9]], 16, "cpu")
    assert decode_first([2, 1, 3, 1]) == [1, 3, 0, 2]  # the order that packs them right
    assert decode_first([4, 3]) == [0, 1] and decode_first([1, 1]) == [0, 1]


def test_a_prefill_only_step_splits_nothing():
    meta = AttentionMetadata.build([2, 3], [18, 0], [[7, 4], [9]], 16, "cpu")
    assert meta.num_decode_rows == 0 and meta.decode_tables is None


def test_a_pure_decode_step_packs_no_keys():
    meta = AttentionMetadata.build([1, 1], [18, 0], [[7, 4], [9]], 16, "cpu")
    assert meta.key_block is None and meta.cu_ctx_lens is None


needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
GPU_SHAPES = {"llama3-8b": (32, 8, 128), "opt-13b": (40, 40, 128)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_gpu_prefill_with_decode_rows(shape, dtype):
    # decode rows before the chunks (as a mixed step packs them): the decode kernel takes those
    q_lens, cached = [1, 1, 700, 129, 1000], [300, 4000, 0, 513, 0]
    q, k_blocks, v_blocks, meta, scale = make_case(q_lens, cached, *shape, dtype, "cuda")
    got = attend_prefill(q, k_blocks, v_blocks, meta, scale)
    ref = reference(q, k_blocks, v_blocks, meta, scale)
    assert not got.isnan().any()
    assert (got.float() - ref).abs().max().item() <= 2e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_gpu_prefill_over_the_new_keys(shape, dtype):
    """Fresh prompts: the Triton prefill kernel over the pass's own k, v, strided views of a
    fused projection as the models hand them over, against the padded reference."""
    q_lens = [700, 129, 1000, 3]
    q, k_blocks, v_blocks, meta, scale = make_case(q_lens, [0] * 4, *shape, dtype, "cuda")
    assert meta.keys_are_new
    ref = reference(q, k_blocks, v_blocks, meta, scale)
    fused = torch.empty((q.shape[0], 3, *k_blocks.shape[2:]), dtype=dtype, device="cuda")
    fused[:, 0] = k_blocks[meta.key_block, meta.key_offset]
    fused[:, 2] = v_blocks[meta.key_block, meta.key_offset]
    k_blocks.fill_(float("nan"))
    got = attend_prefill(q, k_blocks, v_blocks, meta, scale, (fused[:, 0], fused[:, 2]))
    assert not got.isnan().any()
    assert (got.float() - ref).abs().max().item() <= 2e-2
