"""The batcher's CPU KV pool as the worker maps it.

Attach maps the shared-memory segment and, on a GPU, page-locks it, so that loads from it
and write-backs into it are DMA. Page-locking a large pool takes tens of seconds (160 GiB:
27-37 s on the 2xH200 host), so the worker does it while it still loads its model, and
keeps the mapping while the same pool is attached again. The residencies that copy between
the pool and device memory share one mapping and never unmap it: its owner (the service)
closes it after them.
"""

from __future__ import annotations

import torch

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.worker.kv_cache import TORCH_DTYPES

# How the worker maps a pool: "pinned", page-locked for DMA (a GPU that copies KV through it);
# "mapped", mapped alone (the CPU's copies are memcpy); "mirror", mapped alone and never copied
# through (fcfs's: AttachRequest.mirror_only), so its residencies copy nothing.
ACCESS = ("pinned", "mapped", "mirror")


class PoolMapping:
    def __init__(self, pool: CpuKVPool, access: str):
        """Views the pool's blocks over the segment (no copy); page-locks them for every GPU
        when `access` is "pinned" (blocking: see the module docstring)."""
        if access not in ACCESS:
            raise ValueError(f"pool {pool.name!r}: access {access!r} not one of {ACCESS}")
        self.pool = pool
        self.mirror_only = access == "mirror"
        layout = pool.layout
        # uint8 -> dtype is a reinterpretation, so bf16 works although numpy has no bf16.
        # [num_pool_blocks, layers, 2, block_tokens, kv_heads, head_dim]
        self.blocks: torch.Tensor | None = (
            torch.from_numpy(pool.blocks())
            .view(TORCH_DTYPES[layout.dtype])
            .view(pool.num_blocks, *layout.block_shape)
        )
        self.is_pinned = False
        if access == "pinned":
            from alignedserve.worker.prefetch import pin as page_lock

            page_lock(self.blocks)
            self.is_pinned = True

    def holds(self, pool_name: str, num_blocks: int) -> bool:
        return self.pool.name == pool_name and self.pool.num_blocks == num_blocks

    def close(self) -> None:
        """Unlock and unmap (idempotent). The residencies over it must be closed first: their
        copies done, their views of it gone."""
        if self.blocks is None:
            return
        if self.is_pinned:
            from alignedserve.worker.prefetch import unpin

            unpin(self.blocks)
            self.is_pinned = False
        # The segment cannot be unmapped while a view of it is alive.
        self.blocks = None
        self.pool.close()
