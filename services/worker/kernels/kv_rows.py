"""K and V rows between a pass's packed tokens and the block format, one Triton kernel both ways.

A pass moves its tokens' K and V through the blocks: the append of its new tokens
(`KVCache.write`: MHA models; Llama's append is fused into RoPE, kernels/fused.py) and, for
chunks after cached tokens, the gather of each request's keys back into one packed tensor for
the varlen attention call (worker/attention.py). In eager torch both are advanced indexing,
whose kernel computes an offset per element: on an H200, an OPT-13B prefill pass of 8,192
fresh tokens spent 22.4 ms of its 358 ms in the append (~300 GB/s), and a 2,048-token chunk
after 6,144 cached 20.6 ms of its 142 ms in the gather and the append
(benchmarks/prefill_profile.py, thirty-ninth session).

Here one program moves one token's K row and V row, each [heads * head_dim] contiguous on both
sides (a block's tokens are rows of a per-layer view; a packed tensor may be a strided split of
a fused qkv output, as long as its rows are dense), casting to the destination's dtype.
Reads only device tensors: CUDA-graph safe (a decode step appends through it).

Shape letters: N tokens, H kv heads, D head_dim, T block_tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the twins: the CPU's path, in plain torch
from alignedserve.worker.kv_cache import gather_rows_ref, write_rows_ref  # noqa: F401

NUM_WARPS = 4


@triton.jit
def _kv_rows_kernel(
    k_ptr,  # [N, H, D] packed side: row i at i * stride_kn, dense
    v_ptr,
    stride_kn,
    stride_vn,
    k_blocks_ptr,  # [num_blocks, T, H, D] block side: row (b, t) at b * stride_kb + t * stride_kt
    v_blocks_ptr,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    slot_block_ptr,  # [N]
    slot_offset_ptr,  # [N]
    row_size,  # H * D
    TO_BLOCKS: tl.constexpr,  # append (packed -> blocks), else gather (blocks -> packed)
    BLOCK: tl.constexpr,  # columns per iteration
):
    i = tl.program_id(0).to(tl.int64)
    block = tl.load(slot_block_ptr + i).to(tl.int64)
    offset = tl.load(slot_offset_ptr + i).to(tl.int64)
    packed_k, packed_v = k_ptr + i * stride_kn, v_ptr + i * stride_vn
    slot_k = k_blocks_ptr + block * stride_kb + offset * stride_kt
    slot_v = v_blocks_ptr + block * stride_vb + offset * stride_vt
    for start in range(0, row_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < row_size
        if TO_BLOCKS:
            k = tl.load(packed_k + cols, mask=mask)
            v = tl.load(packed_v + cols, mask=mask)
            tl.store(slot_k + cols, k.to(k_blocks_ptr.dtype.element_ty), mask=mask)
            tl.store(slot_v + cols, v.to(v_blocks_ptr.dtype.element_ty), mask=mask)
        else:
            k = tl.load(slot_k + cols, mask=mask)
            v = tl.load(slot_v + cols, mask=mask)
            tl.store(packed_k + cols, k.to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(packed_v + cols, v.to(v_ptr.dtype.element_ty), mask=mask)


def _check(packed: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor], slots) -> None:
    (k_name, k), (v_name, v) = packed.items()
    (kb_name, k_blocks), (_, v_blocks) = blocks.items()
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"want {k_name}, {v_name} [N, H, D]; got {tuple(k.shape)}, {v.shape}")
    if k_blocks.dim() != 4 or v_blocks.shape != k_blocks.shape or k_blocks.shape[2:] != k.shape[1:]:
        raise ValueError(f"{kb_name} {tuple(k_blocks.shape)} vs {k_name} {tuple(k.shape)}")
    for name, t in {**packed, **blocks}.items():
        if t.dim() and (t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]):
            raise ValueError(f"{name}: each token's [H, D] row must be dense; strides {t.stride()}")
    for name, t in slots.items():
        if t.shape != (k.shape[0],) or t.is_floating_point():
            raise ValueError(f"{name} must be an int tensor [N={k.shape[0]}]; got {t.shape}")


def _launch(k, v, k_blocks, v_blocks, slot_block, slot_offset, to_blocks: bool) -> None:
    row_size = k.shape[1] * k.shape[2]
    _kv_rows_kernel[(k.shape[0],)](
        k, v, k.stride(0), v.stride(0),
        k_blocks, v_blocks, k_blocks.stride(0), k_blocks.stride(1),
        v_blocks.stride(0), v_blocks.stride(1),
        slot_block, slot_offset, row_size,
        TO_BLOCKS=to_blocks,
        BLOCK=min(triton.next_power_of_2(row_size), 2048),
        num_warps=NUM_WARPS,
    )  # fmt: skip


def write_rows(
    k: torch.Tensor,  # [N, H, D] (rows dense; e.g. a split of a fused qkv output)
    v: torch.Tensor,  # [N, H, D]
    k_blocks: torch.Tensor,  # [num_blocks, T, H, D] (strided per-layer view: KVCache.layer)
    v_blocks: torch.Tensor,
    slot_block: torch.Tensor,  # [N] int (not bounds-checked: no host sync)
    slot_offset: torch.Tensor,  # [N] int
) -> None:
    """k, v into the blocks at (slot_block[i], slot_offset[i]); matches `write_rows_ref`."""
    _check({"k": k, "v": v}, {"k_blocks": k_blocks, "v_blocks": v_blocks},
           {"slot_block": slot_block, "slot_offset": slot_offset})  # fmt: skip
    if k.shape[0]:
        _launch(k, v, k_blocks, v_blocks, slot_block, slot_offset, to_blocks=True)


def gather_rows(
    k_blocks: torch.Tensor,  # [num_blocks, T, H, D]
    v_blocks: torch.Tensor,
    slot_block: torch.Tensor,  # [N] int
    slot_offset: torch.Tensor,  # [N] int
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values [N, H, D] of dtype, contiguous
    """The rows at (slot_block[i], slot_offset[i]), packed; matches `gather_rows_ref`."""
    shape = (slot_block.shape[0], *k_blocks.shape[2:])
    keys = torch.empty(shape, dtype=dtype, device=k_blocks.device)
    values = torch.empty(shape, dtype=dtype, device=k_blocks.device)
    _check({"keys": keys, "values": values}, {"k_blocks": k_blocks, "v_blocks": v_blocks},
           {"slot_block": slot_block, "slot_offset": slot_offset})  # fmt: skip
    if shape[0]:
        _launch(keys, values, k_blocks, v_blocks, slot_block, slot_offset, to_blocks=False)
    return keys, values
