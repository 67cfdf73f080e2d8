"""How long creating and pinning a CPU KV pool takes, as the batcher and the worker do it,
and whether pinning it in parallel would start a server sooner.

The batcher creates the shared-memory pool and reserves its memory (`CpuKVPool.create_bytes`);
the worker page-locks it (`worker/prefetch.py: pin`, one cudaHostRegister) so that loads are
DMA. Both are part of a server's start (pinning 160 GiB took ~90 s of aligned's ~150 s start
on 2xH200 before the thirty-fifth session). For each size, in the OPT-13B block format,
each mode on a fresh pool:
- single: one cudaHostRegister of the whole pool (the worker's way before the thirty-fifth
  session);
- touch: the worker's `pin` with --threads torch threads: the process's page tables filled
  first by reading a byte of every page (`touch_pages`), then one cudaHostRegister;
- pin: the worker's `pin` as it runs there (a thread per core);
- chunks: --threads equal chunks registered at once, one per thread; then a copy to the GPU
  that spans two chunks is tried (on an H200 it fails, cudaErrorInvalidValue: a registration
  per chunk would need every copy cut at the chunk edges; thirty-fifth session).

    python3 benchmarks/pool_pin.py --gib 16 64 --modes single touch chunks --threads 8
"""

from __future__ import annotations

import argparse
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

from device_env import import_alignedserve

import_alignedserve()
import torch  # noqa: E402

from alignedserve.batcher.kv_pool import CpuKVPool  # noqa: E402
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.worker.prefetch import PAGE_BYTES, pin, register  # noqa: E402

OPT_13B = KVLayout(40, 40, 128, 16, "bfloat16")  # layers, kv heads, head dim, block tokens
COPY_BYTES = 1 << 30


def copy_rate(src: torch.Tensor, dst: torch.Tensor) -> float:
    """GB/s of one host-to-device copy, the best of three."""
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return src.numel() / best / 1e9


def pin_and_check(pool: CpuKVPool, mode: str, threads: int) -> str:
    """Pins the pool as `mode` says (unpinned again before it returns); its views of the
    pool end with it, so the pool can close."""
    flat = torch.from_numpy(pool.blocks()).view(torch.uint8).view(-1)  # [bytes]
    parts, out = [flat], ""
    start = time.perf_counter()
    if mode == "single":
        register(flat)
    elif mode in ("touch", "pin"):  # the worker's pin: with --threads, or a thread per core
        read_s, lock_s = pin(flat, threads if mode == "touch" else None)
        out += f", touch {read_s:.1f} s, register {lock_s:.1f} s"
    else:
        # chunk edges on page boundaries of the address space (two registrations may not
        # share a page)
        head = -flat.data_ptr() % PAGE_BYTES
        size = -(-flat.numel() // threads // PAGE_BYTES) * PAGE_BYTES
        edges = [0, *range(head + size, flat.numel(), size), flat.numel()]
        parts = [flat[a:b] for a, b in itertools.pairwise(edges) if b > a]
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(register, parts))
    out += f", pinned in {time.perf_counter() - start:.1f} s in all"
    try:
        if mode == "chunks" and len(parts) > 1:
            dst = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
            out += f"; 1 GiB copy inside one chunk {copy_rate(flat[:COPY_BYTES], dst):.1f} GB/s"
            edge = parts[0].numel()
            src = flat[edge - COPY_BYTES // 2 : edge + COPY_BYTES // 2]  # spans chunks 0 and 1
            try:
                across = copy_rate(src, dst)
                out += f", across two chunks {across:.1f} GB/s"
                out += f" (bytes equal: {bool(torch.equal(dst.cpu(), src))})"
            except RuntimeError as e:  # the CUDA context is unusable after this
                out += f", across two chunks FAILED: {str(e).splitlines()[0]}"
    finally:
        for part in parts:
            torch.cuda.cudart().cudaHostUnregister(part.data_ptr())
    return out


def run(gib: int, mode: str, threads: int) -> str:
    start = time.perf_counter()
    pool = CpuKVPool.create_bytes(OPT_13B, gib << 30)
    created = time.perf_counter() - start
    try:
        return f"{gib} GiB {mode}: create (reserve) {created:.1f} s" + pin_and_check(
            pool, mode, threads
        )
    finally:
        pool.close()
        pool.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, nargs="+", default=[16, 64, 120])
    parser.add_argument(
        "--modes", nargs="+", choices=["single", "touch", "pin", "chunks"], default=["pin"]
    )
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    torch.cuda.init()
    for gib in args.gib:
        for mode in args.modes:
            print(run(gib, mode, args.threads), flush=True)


if __name__ == "__main__":
    main()
