"""O(1) allocation of fixed-size KV blocks by index. Holds no memory itself: the CPU pool and
each device cache put their tensors/segments behind the indices it hands out."""

from __future__ import annotations

from collections.abc import Iterable

from alignedserve.common.errors import OutOfBlocksError


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be > 0")
        self.num_blocks = num_blocks
        # A stack, top last: recently freed blocks are reused first (warm in caches), and a
        # run of consecutive ids goes out and comes back as one, in ascending order, so a
        # request's blocks copy between pool and device as few large transfers
        # (kv_cache.copy_blocks).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)  # 1 where allocated: O(1) double-free detection

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        if n <= 0:
            return []
        blocks = self._free[-n:]
        blocks.reverse()  # popped from the top, in order
        del self._free[-n:]
        for b in blocks:
            self._in_use[b] = 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks; a list with any bad entry is rejected whole, changing nothing."""
        blocks = list(blocks)
        for b in blocks:
            if not 0 <= b < self.num_blocks or not self._in_use[b]:
                raise ValueError(f"block {b} freed but not allocated")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"a block is freed twice in one call: {sorted(blocks)}")
        for b in blocks:
            self._in_use[b] = 0
        self._free.extend(reversed(blocks))  # the first freed on top
