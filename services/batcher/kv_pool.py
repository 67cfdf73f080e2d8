"""The batcher's CPU KV pool: one named POSIX shared-memory segment of fixed-size KV blocks.

The batcher creates the pool and is the only one to allocate from it; a worker process maps the
same segment by name and reads/writes block bytes directly (zero-copy numpy views). Blocks are in
the common block format (`common/kv_layout.py`): block `i` is bytes
`[i * block_bytes, (i + 1) * block_bytes)` of the segment, shaped `KVLayout.block_shape`.

Lifetime of the segment:
- It exists from `create()` until the owner calls `unlink()` (the context manager does it on
  exit). Closing a handle (`close()`) only unmaps it in that process.
- A worker that attaches and then exits or crashes never removes it. CPython before 3.13
  registers every `SharedMemory` it opens, attached or not, with a per-process-tree resource
  tracker that unlinks whatever is still registered when that tree exits (bpo-39959 /
  gh-82300), so a crashed worker would destroy the batcher's pool. Attaching therefore never
  registers: `track=False` on 3.13+, and before 3.13 the registration is suppressed while the
  segment is opened. (Registering and then unregistering is NOT equivalent: processes started
  through `multiprocessing` share their parent's tracker, so the worker's unregister would cancel
  the owner's registration, the owner would lose its crash clean-up, and its own unlink would
  make the tracker print a KeyError traceback.)
- The owner's segment is registered as usual, so if the batcher's own process tree dies without
  unlinking, the resource tracker removes the segment instead of leaking memory in /dev/shm.

Views and close(): `blocks()` and `block(i)` return numpy views straight into the mapping. A
mapping cannot be unmapped while any view of it is alive, so callers must drop (`del`) every
view they took before `close()`; `close()` drops the pool's own views, and if a caller still
holds one it raises `BufferError` (no new views can be taken from then on) and can be called
again once the views are gone. Never keep a view past `close()`.

Memory: `create()` reserves the whole segment up front (`posix_fallocate`, Linux) so that a
/dev/shm too small for the pool fails at start-up with a `ConfigError`, not later with SIGBUS on
first write. Containers often mount a small /dev/shm (Docker's default is 64 MiB); in Kubernetes
mount a memory-backed emptyDir there with a `sizeLimit` above the pool size.
"""

from __future__ import annotations

import errno
import os
import secrets
import sys
import threading
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.errors import ConfigError
from alignedserve.common.kv_layout import KVLayout

NAME_PREFIX = "alignedserve-kv-"
# 16 + 12 hex = 28 characters: macOS limits POSIX shared-memory names to 31 (with the "/").
_NAME_RANDOM_BYTES = 6
_SHM_DIR = "/dev/shm"

_attach_lock = threading.Lock()


def _new_name() -> str:
    return NAME_PREFIX + secrets.token_hex(_NAME_RANDOM_BYTES)


class _NoRegisterTracker:
    """Stands in for `multiprocessing.resource_tracker` inside `SharedMemory.__init__` (< 3.13)
    while attaching: `register` does nothing, everything else is the real module."""

    def __init__(self, real: Any):
        self._real = real

    def register(self, name: str, rtype: str) -> None:
        return None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real, attr)


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with this process's resource tracker."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    # SharedMemory.__init__ (3.8 - 3.12) calls `resource_tracker.register` through its module
    # global; swap that one reference for the duration of the call (serialized by a lock).
    with _attach_lock:
        real = shared_memory.resource_tracker
        shared_memory.resource_tracker = _NoRegisterTracker(real)  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            shared_memory.resource_tracker = real


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, or None where there is no such mount (not Linux)."""
    if not os.path.isdir(_SHM_DIR):
        return None
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _too_small_error(nbytes: int, reason: str) -> ConfigError:
    free = _shm_free_bytes()
    free_txt = f"; it has {free} bytes free" if free is not None else ""
    return ConfigError(
        f"cannot create a CPU KV pool of {nbytes} bytes in shared memory: {reason}. /dev/shm "
        f"(in a container: the memory-backed volume mounted there) may be too small{free_txt}; "
        f"lower the pool size (num_blocks / pool_bytes) or enlarge /dev/shm"
    )


def _no_block_error(pool_bytes: int, layout: KVLayout) -> ConfigError:
    return ConfigError(
        f"pool_bytes={pool_bytes} holds no KV block: one block is {layout.block_bytes} "
        f"bytes (shape {layout.block_shape}, {layout.dtype})"
    )


class PoolSegment:
    """A new shared-memory segment whose memory is allocated before the KV layout is known,
    and that becomes the pool of as many whole blocks as fit once it is (`carve`). The batcher
    reserves it while its worker loads the model, which brings the layout: reserving 160 GiB
    took ~19 s on the 2xH200 host. Never carved, it is removed with `discard`."""

    def __init__(self, shm: shared_memory.SharedMemory, nbytes: int):
        self._shm, self.nbytes = shm, nbytes

    @classmethod
    def reserve(cls, nbytes: int, name: str | None = None, *, reserve: bool = True) -> PoolSegment:
        """Create the segment (an existing `name` raises FileExistsError). With `reserve`
        (default) its memory is allocated now, so a too-small /dev/shm fails here; without,
        it is sparse: its pages take memory only once written."""
        free = _shm_free_bytes()
        if reserve and free is not None and nbytes > free:
            raise _too_small_error(nbytes, "not enough free space")
        try:
            shm = shared_memory.SharedMemory(name=name or _new_name(), create=True, size=nbytes)
        except FileExistsError:
            raise
        except OSError as e:  # ENOSPC, ENOMEM, EMFILE, ...: SharedMemory already cleaned up
            raise _too_small_error(nbytes, str(e)) from e
        fd = getattr(shm, "_fd", -1)  # POSIX: SharedMemory keeps the shm_open fd
        if reserve and fd >= 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                shm.close()
                shm.unlink()
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # fs cannot reserve
                    return cls.reserve(nbytes, name, reserve=False)
                raise _too_small_error(nbytes, str(e)) from e
        return cls(shm, nbytes)

    def carve(self, layout: KVLayout) -> CpuKVPool:
        """The pool of as many whole `layout` blocks as fit (owner). The segment is cut to
        their size, so a worker attaching by name finds exactly them; the tail's memory is
        freed."""
        num_blocks = self.nbytes // layout.block_bytes
        if num_blocks < 1:
            self.discard()
            raise _no_block_error(self.nbytes, layout)
        fd = getattr(self._shm, "_fd", -1)
        if num_blocks * layout.block_bytes < self.nbytes and fd >= 0:
            # this process's mapping keeps its length; nothing reads past the pool's last block
            os.ftruncate(fd, num_blocks * layout.block_bytes)
        return CpuKVPool(self._shm, layout, num_blocks, is_owner=True)

    def discard(self) -> None:
        """Unmap and remove a segment that was never carved."""
        self._shm.close()
        self._shm.unlink()


class CpuKVPool:
    """The batcher's CPU KV pool: one named shared-memory segment holding num_blocks blocks in the
    common block format (KVLayout.block_shape, KVLayout.block_bytes each), plus a BlockAllocator.
    The owner (batcher) creates it and allocates; a worker process attaches by name to read/write
    block bytes; the segment outlives a crashed worker.

    Use `create` / `create_bytes` / `PoolSegment.carve` (owner) or `attach` (worker), not the
    constructor. See the module docstring for the segment's lifetime and the rule about views
    before `close()`.
    """

    name: str
    layout: KVLayout
    num_blocks: int
    is_owner: bool
    allocator: BlockAllocator | None

    def __init__(
        self,
        shm: shared_memory.SharedMemory,
        layout: KVLayout,
        num_blocks: int,
        is_owner: bool,
    ):
        self._shm = shm
        self._closed = False
        self.name = shm.name
        self.layout = layout
        self.num_blocks = num_blocks
        self.is_owner = is_owner
        self.allocator = BlockAllocator(num_blocks) if is_owner else None
        self._unlinked = False
        self._array: np.ndarray | None = np.frombuffer(
            shm.buf, dtype=np.uint8, count=num_blocks * layout.block_bytes
        ).reshape(num_blocks, layout.block_bytes)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        layout: KVLayout,
        num_blocks: int,
        name: str | None = None,
        *,
        reserve: bool = True,
    ) -> CpuKVPool:
        """Create a new segment of `num_blocks` blocks (owner). `name` defaults to
        "alignedserve-kv-<random>"; an existing name raises FileExistsError. With `reserve`
        (default) the memory is allocated now, so a too-small /dev/shm fails here."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks={num_blocks!r} must be an integer >= 1")
        nbytes = num_blocks * layout.block_bytes
        return PoolSegment.reserve(nbytes, name, reserve=reserve).carve(layout)

    @classmethod
    def create_bytes(
        cls,
        layout: KVLayout,
        pool_bytes: int,
        name: str | None = None,
        *,
        reserve: bool = True,
    ) -> CpuKVPool:
        """Create a pool of as many whole blocks as fit in `pool_bytes` (owner)."""
        if pool_bytes < layout.block_bytes:
            raise _no_block_error(pool_bytes, layout)
        return PoolSegment.reserve(pool_bytes, name, reserve=reserve).carve(layout)

    @classmethod
    def attach(cls, name: str, layout: KVLayout, num_blocks: int) -> CpuKVPool:
        """Map an existing segment by name (worker). FileNotFoundError if there is none,
        ConfigError if its size is not num_blocks x layout.block_bytes. The attached pool reads
        and writes blocks but cannot allocate, and never removes the segment."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks={num_blocks!r} must be an integer >= 1")
        shm = _attach_untracked(name)
        expected = num_blocks * layout.block_bytes
        # Linux sizes a segment exactly; macOS rounds it up to whole pages.
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        allowed = {expected} if sys.platform == "linux" else {expected, -(-expected // page) * page}
        if shm.size not in allowed:
            actual = shm.size
            shm.close()
            raise ConfigError(
                f"shared-memory segment {name!r} is {actual} bytes, but num_blocks={num_blocks} x "
                f"block_bytes={layout.block_bytes} = {expected} bytes: the worker's layout or "
                f"num_blocks does not match the batcher's"
            )
        return cls(shm, layout, num_blocks, is_owner=False)

    # ------------------------------------------------------------------ block bytes

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def _view(self) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"CpuKVPool {self.name!r} is closed (or being closed)")
        return self._array

    def blocks(self) -> np.ndarray:
        """uint8 view [num_blocks, block_bytes] over the whole segment (zero-copy)."""
        return self._view().view()

    def block(self, index: int) -> np.ndarray:
        """uint8 view [block_bytes] of block `index` (zero-copy). Negative indices are errors."""
        arr = self._view()
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block index {index} out of range [0, {self.num_blocks})")
        return arr[index]

    # ------------------------------------------------------------------ allocation (owner)

    def _alloc(self) -> BlockAllocator:
        if self.allocator is None:
            raise RuntimeError(
                f"CpuKVPool {self.name!r} is attached, not owned: only the owner (the batcher) "
                f"allocates and frees blocks; a worker only reads and writes the blocks it is "
                f"told about"
            )
        return self.allocator

    def allocate(self, n: int) -> list[int]:
        """n free block indices; OutOfBlocksError (state unchanged) if fewer are free."""
        return self._alloc().allocate(n)

    def free(self, blocks) -> None:
        self._alloc().free(blocks)

    def can_allocate(self, n: int) -> bool:
        return self._alloc().can_allocate(n)

    @property
    def num_free(self) -> int:
        return self._alloc().num_free

    @property
    def num_used(self) -> int:
        return self._alloc().num_used

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self._alloc().usage

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap the segment in this process (owner and attached alike); idempotent. Every view
        from blocks()/block() must have been dropped: if one is still alive this raises
        BufferError: the views still work but no new ones can be taken, and close() can be
        called again once they are dropped."""
        if self._closed:
            return
        self._array = None  # the pool's own view; no new views can be taken from here on
        try:
            self._shm.close()
        except BufferError as e:
            raise BufferError(
                f"CpuKVPool {self.name!r}: cannot unmap while numpy views of it are alive; "
                f"drop (del) every array from blocks()/block(), then call close() again"
            ) from e
        self._closed = True

    def unlink(self) -> None:
        """Remove the segment's name (owner only; idempotent). Processes that still map it keep
        their mapping; the memory is freed once the last one unmaps."""
        if not self.is_owner:
            raise RuntimeError(
                f"CpuKVPool {self.name!r} is attached, not owned: only the owner unlinks it"
            )
        if self._unlinked:
            return
        self._unlinked = True
        try:
            # SharedMemory.unlink also unregisters the name from the resource tracker; it does
            # not need the mapping, so it works on a closed pool too.
            self._shm.unlink()
        except FileNotFoundError:
            # Removed behind our back: still drop our tracker registration so the tracker
            # does not try (and warn) at exit.
            tracked = getattr(self._shm, "_name", None) or "/" + self.name
            resource_tracker.unregister(tracked, "shared_memory")

    def __enter__(self) -> CpuKVPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            if self.is_owner:
                self.unlink()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "attached"
        state = "closed" if self.closed else "open"
        return (
            f"CpuKVPool(name={self.name!r}, num_blocks={self.num_blocks}, "
            f"block_bytes={self.layout.block_bytes}, {role}, {state})"
        )
