"""kernels/kv_rows.py (the K/V append and gather between packed tokens and the block format)
against its torch twins, and the twins against KVCache.write's indexing.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tiny shapes); with one,
compiled there, and the `gpu` test adds OPT-13B's shape inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from alignedserve.common.kv_layout import KVLayout
from alignedserve.worker.kv_cache import KVCache

from triton_cpu import (
    DEVICE,
    HAS_CUDA,
    bf16_rounded_to_nearest,
    kernel_module,
    randn,
    scalar_loop_bounds,
)

kv_rows = kernel_module("alignedserve.worker.kernels.kv_rows", "_kv_rows_kernel")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_patches():
    # the kernel loops over a row in column blocks; fp32 -> bf16 casts round to nearest
    with scalar_loop_bounds(), bf16_rounded_to_nearest():
        yield


def cache(dtype, num_blocks=6, layers=3, heads=3, head_dim=40, block_tokens=4) -> KVCache:
    layout = KVLayout(layers, heads, head_dim, block_tokens, str(dtype).removeprefix("torch."))
    kv = KVCache(layout, num_blocks, device=DEVICE)
    kv.blocks.copy_(randn(*kv.blocks.shape, dtype=dtype, seed=7))
    return kv


def slots(n: int, num_blocks: int, block_tokens: int, seed: int):
    """n distinct (block, offset) slots, shuffled: no two tokens write one slot."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(num_blocks * block_tokens, generator=gen)[:n]
    return (flat // block_tokens).to(DEVICE), (flat % block_tokens).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_append_writes_each_token_into_its_slot_as_kvcache_write_does(dtype, packed_dtype):
    kv, want = cache(dtype), cache(dtype)
    block, offset = slots(9, kv.num_blocks, kv.layout.block_tokens, seed=1)
    # k, v as a fused qkv output's splits: strided rows, each dense (heads 3 x head_dim 40)
    qkv = randn(9, 3 * 120, dtype=packed_dtype, seed=2)
    k, v = qkv[:, 120:240].view(9, 3, 40), qkv[:, 240:].view(9, 3, 40)
    kv_rows.write_rows_ref(k, v, *want.layer(1), block, offset)
    kv_rows.write_rows(k, v, *kv.layer(1), block, offset)
    assert torch.equal(kv.blocks, want.blocks)  # other layers and slots untouched too
    # the twin is KVCache.write's indexing (the CPU path), from the same start
    twin = cache(dtype)
    twin.blocks[block, 1, 0, offset] = k.to(dtype)
    twin.blocks[block, 1, 1, offset] = v.to(dtype)
    assert torch.equal(want.blocks, twin.blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_packs_each_slots_rows_in_the_order_asked(dtype):
    kv = cache(dtype)
    block, offset = slots(11, kv.num_blocks, kv.layout.block_tokens, seed=3)
    block, offset = torch.cat([block, block[:2]]), torch.cat([offset, offset[:2]])  # repeats
    for out_dtype in (dtype, torch.float32):
        keys, values = kv_rows.gather_rows(*kv.layer(2), block, offset, out_dtype)
        want_k, want_v = kv_rows.gather_rows_ref(*kv.layer(2), block, offset, out_dtype)
        assert keys.dtype == out_dtype and keys.is_contiguous() and keys.shape == (13, 3, 40)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert torch.equal(want_k[0], kv.blocks[block[0], 2, 0, offset[0]].float())


def test_no_tokens_move_nothing_and_bad_shapes_are_refused():
    kv = cache(torch.float32)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    before = kv.blocks.clone()
    k = randn(0, 3, 40, seed=1)
    kv_rows.write_rows(k, k, *kv.layer(0), empty, empty)
    assert torch.equal(kv.blocks, before)
    keys, _ = kv_rows.gather_rows(*kv.layer(0), empty, empty, torch.float32)
    assert keys.shape == (0, 3, 40)
    block, offset = slots(4, kv.num_blocks, 4, seed=5)
    k = randn(4, 3, 40, seed=2)
    with pytest.raises(ValueError, match=r"k_blocks .* vs k"):
        kv_rows.write_rows(randn(4, 2, 40, seed=2), randn(4, 2, 40, seed=3), *kv.layer(0),
                           block, offset)  # fmt: skip
    with pytest.raises(ValueError, match="dense"):
        kv_rows.write_rows(k.transpose(1, 2).contiguous().transpose(1, 2), k, *kv.layer(0),
                           block, offset)  # fmt: skip
    with pytest.raises(ValueError, match="slot_offset must be an int tensor"):
        kv_rows.write_rows(k, k, *kv.layer(0), block, offset.float())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_opt13b_rows_through_a_cuda_graph():
    """OPT-13B's rows (40 heads x 128), 2,048 tokens, appended and gathered back inside one
    captured graph whose slots change between replays."""
    layout = KVLayout(2, 40, 128, 16, "bfloat16")
    kv = KVCache(layout, 200, device="cuda")
    want = KVCache(layout, 200, device="cuda")
    k = randn(2048, 40, 128, dtype=torch.bfloat16, seed=1)
    v = randn(2048, 40, 128, dtype=torch.bfloat16, seed=2)
    block, offset = slots(2048, 200, 16, seed=3)

    def step():
        kv_rows.write_rows(k, v, *kv.layer(1), block, offset)
        return kv_rows.gather_rows(*kv.layer(1), block, offset, torch.bfloat16)

    step()  # compile outside the capture: it writes the first slots
    kv_rows.write_rows_ref(k, v, *want.layer(1), block, offset)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keys, values = step()
    new_block, new_offset = slots(2048, 200, 16, seed=4)
    block.copy_(new_block)
    offset.copy_(new_offset)
    graph.replay()  # the new slots, some of them the first's
    kv_rows.write_rows_ref(k, v, *want.layer(1), block, offset)
    assert torch.equal(kv.blocks[:, 1], want.blocks[:, 1])
    assert torch.equal(keys, k) and torch.equal(values, v)
