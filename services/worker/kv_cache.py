"""A device's KV memory: `num_blocks` blocks in the common block format (see common.kv_layout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignedserve.common.kv_layout import KVLayout

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVCache:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: str | torch.device = "cpu",
        scratch_block: bool = False,
    ):
        self.layout = layout
        self.num_blocks = num_blocks  # blocks requests may own
        # One more block that nobody owns: CUDA-graph padding rows read and write it.
        self.scratch_block = num_blocks if scratch_block else None
        # [num_blocks (+ scratch), layers, 2, block_tokens, kv_heads, head_dim]
        self.blocks = torch.zeros(
            (num_blocks + scratch_block, *layout.block_shape),
            dtype=TORCH_DTYPES[layout.dtype],
            device=device,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's K and V: each [num_blocks, block_tokens, kv_heads, head_dim]."""
        return self.blocks[:, layer, 0], self.blocks[:, layer, 1]

    def write(
        self,
        layer: int,
        slot_block: torch.Tensor,  # [N] block index of each new token
        slot_offset: torch.Tensor,  # [N] position inside that block
        k: torch.Tensor,  # [N, kv_heads, head_dim]
        v: torch.Tensor,  # [N, kv_heads, head_dim]
    ) -> None:
        if self.blocks.is_cuda:  # one kernel, a token's row per program (kernels/kv_rows.py)
            from alignedserve.worker.kernels.kv_rows import write_rows

            write_rows(k, v, *self.layer(layer), slot_block, slot_offset)
        else:
            write_rows_ref(k, v, *self.layer(layer), slot_block, slot_offset)


def write_rows_ref(
    k: torch.Tensor,  # [N, H, D]
    v: torch.Tensor,  # [N, H, D]
    k_blocks: torch.Tensor,  # [num_blocks, T, H, D] (a strided per-layer view is fine)
    v_blocks: torch.Tensor,  # [num_blocks, T, H, D]
    slot_block: torch.Tensor,  # [N] int: block of each token
    slot_offset: torch.Tensor,  # [N] int: its offset in that block
) -> None:
    """k, v into the blocks by advanced indexing: the CPU's append, and the twin of
    kernels/kv_rows.write_rows."""
    k_blocks[slot_block, slot_offset] = k.to(k_blocks.dtype)
    v_blocks[slot_block, slot_offset] = v.to(v_blocks.dtype)


def gather_rows_ref(
    k_blocks: torch.Tensor,  # [num_blocks, T, H, D]
    v_blocks: torch.Tensor,
    slot_block: torch.Tensor,  # [N] int
    slot_offset: torch.Tensor,  # [N] int
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values [N, H, D] of dtype
    """The rows at (slot_block[i], slot_offset[i]), packed: the CPU's gather, and the twin
    of kernels/kv_rows.gather_rows."""
    return (
        k_blocks[slot_block, slot_offset].to(dtype),
        v_blocks[slot_block, slot_offset].to(dtype),
    )


def block_runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(d0, s0, n) for each run of pairs (d0 + i, s0 + i), i < n, in order."""
    runs: list[tuple[int, int, int]] = []
    for d, s in pairs:
        if runs:
            d0, s0, n = runs[-1]
            if (d, s) == (d0 + n, s0 + n):
                runs[-1] = (d0, s0, n + 1)
                continue
        runs.append((d, s, 1))
    return runs


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """dst[d] = src[s] for each (d, s): one copy per run of consecutive ids on both sides, so
    pinned host <-> GPU copies are few large DMA transfers (asynchronous on a GPU), each a
    host call. (The block allocator hands out and takes back runs in ascending order.)"""
    for d0, s0, n in block_runs(pairs):
        dst[d0 : d0 + n].copy_(src[s0 : s0 + n], non_blocking=True)
