"""CpuKVPool: allocator cost per block, and cross-process read bandwidth of the shared segment.

1. Allocate and free 1,000,000 blocks through CpuKVPool (the BlockAllocator behind it), one
   block per call and 64 blocks per call; prints ns per block. The pool uses a tiny layout
   (256-byte blocks, 256 MiB in all) so it fits in a container's /dev/shm.
2. The owner fills the same ~256 MiB segment; a second process attaches by name and reads it
   all twice (copy into a private buffer; then a uint64 checksum): the first pass pays the
   page faults of mapping the segment into the new process, the second does not. Prints GB/s
   (10^9 bytes per second).

    .venv/bin/python benchmarks/kv_pool.py [--blocks N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.block_allocator import BlockAllocator
from alignedserve.common.kv_layout import KVLayout

# 1 layer x (K, V) x 1 token x 1 head x 64 dims x fp16 = 256 bytes a block
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=1, dtype="float16")

READER = r"""
import json, sys, time
import numpy as np
from alignedserve.batcher.kv_pool import CpuKVPool
from alignedserve.common.kv_layout import KVLayout
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=1, dtype="float16")
name, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
pool = CpuKVPool.attach(name, LAYOUT, n)
attach_s = time.perf_counter() - t
src = pool.blocks()
dst = np.ones_like(src)  # private, already faulted in: the timed copies only fault the source
res = {"attach_s": attach_s}
for label in ("cold", "warm"):
    t = time.perf_counter()
    np.copyto(dst, src)
    res[f"copy_{label}_s"] = time.perf_counter() - t
t = time.perf_counter()
res["checksum"] = int(src.reshape(-1).view(np.uint64).sum(dtype=np.uint64))
res["sum_s"] = time.perf_counter() - t
res["copy_matches"] = bool(np.array_equal(dst[:: max(1, n // 1000)], src[:: max(1, n // 1000)]))
del src
pool.close()
print(json.dumps(res))
"""


def ns_per_block(seconds: float, blocks: int) -> float:
    return seconds * 1e9 / blocks


def bench_alloc(alloc, n: int, chunk: int) -> tuple[float, float]:
    """(allocate ns/block, free ns/block) for n blocks taken `chunk` at a time, all held at once."""
    calls = n // chunk
    allocate, free = alloc.allocate, alloc.free
    t = time.perf_counter()
    held = [allocate(chunk) for _ in range(calls)]
    t_alloc = time.perf_counter() - t
    assert alloc.num_free == alloc.num_blocks - calls * chunk
    t = time.perf_counter()
    for blocks in held:
        free(blocks)
    t_free = time.perf_counter() - t
    assert alloc.num_free == alloc.num_blocks
    return ns_per_block(t_alloc, calls * chunk), ns_per_block(t_free, calls * chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.blocks
    nbytes = n * LAYOUT.block_bytes
    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, numpy {np.__version__}"
        + (f", /dev/shm {shm.total / 2**30:.1f} GiB ({shm.free / 2**30:.1f} free)" if shm else "")
    )
    if shm and nbytes > shm.free // 2:
        sys.exit(f"/dev/shm has {shm.free} bytes free, want 2 x {nbytes}: pass --blocks smaller")

    t = time.perf_counter()
    pool = CpuKVPool.create(LAYOUT, n)
    create_s = time.perf_counter() - t
    print(
        f"pool: {n} blocks x {LAYOUT.block_bytes} B = {nbytes / 2**20:.0f} MiB "
        f"({nbytes / 1e6:.0f} MB), "
        f"create (shm_open + ftruncate + posix_fallocate + mmap) {create_s * 1e3:.1f} ms"
    )
    try:
        # ---- allocator
        direct = BlockAllocator(n)
        for chunk in (1, 64):
            a_ns, f_ns = bench_alloc(pool, n, chunk)
            print(
                f"allocator via CpuKVPool, {n} blocks in chunks of {chunk:>2}: "
                f"allocate {a_ns:6.1f} ns/block, free {f_ns:6.1f} ns/block"
            )
            a_ns, f_ns = bench_alloc(direct, n, chunk)
            print(
                f"BlockAllocator directly,  {n} blocks in chunks of {chunk:>2}: "
                f"allocate {a_ns:6.1f} ns/block, free {f_ns:6.1f} ns/block"
            )

        # ---- bandwidth
        blocks = pool.blocks()
        t = time.perf_counter()
        blocks.fill(0x5A)
        fill_s = time.perf_counter() - t
        flat64 = blocks.reshape(-1).view(np.uint64)
        flat64[:] = np.arange(flat64.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        expect = int(flat64.sum(dtype=np.uint64))
        del flat64, blocks
        print(
            f"owner: fill {nbytes / 2**20:.0f} MiB (first write after create): "
            f"{nbytes / fill_s / 1e9:.2f} GB/s"
        )
        proc = subprocess.run(
            [sys.executable, "-c", READER, pool.name, str(n)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            sys.exit(f"reader failed:\n{proc.stderr}")
        res = json.loads(proc.stdout)
        assert res["checksum"] == expect, (res["checksum"], expect)  # sanity: same bytes
        assert res["copy_matches"]
        print(f"second process: attach by name {res['attach_s'] * 1e3:.2f} ms")
        print(
            f"second process: read {nbytes / 2**20:.0f} MiB, copy, first pass (page faults): "
            f"{nbytes / res['copy_cold_s'] / 1e9:.2f} GB/s"
        )
        print(
            f"second process: read {nbytes / 2**20:.0f} MiB, copy, second pass:              "
            f"{nbytes / res['copy_warm_s'] / 1e9:.2f} GB/s"
        )
        print(
            f"second process: read {nbytes / 2**20:.0f} MiB, uint64 checksum:                "
            f"{nbytes / res['sum_s'] / 1e9:.2f} GB/s (checksum matches the owner's)"
        )
    finally:
        pool.close()
        pool.unlink()


if __name__ == "__main__":
    main()
