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


class PoolMapping:
    def __init__(self, pool: CpuKVPool, pin: bool, mirror_only: bool = False):
        """Views the pool's blocks over the segment (no copy) and, with `pin`, page-locks
        them for every GPU (blocking: see the module docstring). `mirror_only`: no KV is ever
        copied through this pool (fcfs's: AttachRequest.mirror_only), so it is never pinned
        and its residencies copy nothing."""
        if pin and mirror_only:
            raise ValueError(f"pool {pool.name!r}: a mirror-only pool is never page-locked")
        self.pool = pool
        self.mirror_only = mirror_only
        layout = pool.layout
        # uint8 -> dtype is a reinterpretation, so bf16 works although numpy has no bf16.
        # [num_pool_blocks, layers, 2, block_tokens, kv_heads, head_dim]
        self.blocks: torch.Tensor | None = (
            torch.from_numpy(pool.blocks())
            .view(TORCH_DTYPES[layout.dtype])
            .view(pool.num_blocks, *layout.block_shape)
        )
        self.is_pinned = False
        if pin:
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
