"""Page-table population of a fresh shared-memory pool, three ways, on this machine's CPU:
`touch_pages` (the worker's `pin` reads a byte per page with torch threads) against
madvise(MADV_POPULATE_READ / _WRITE) from as many threads. Thirty-sixth session, CPU machine:
`.venv/bin/python docs/results/session36/populate_probe.py GIB MODE THREADS`, MODE touch, read
or write."""

import ctypes
import sys
import threading
import time

import torch

from alignedserve.batcher.kv_pool import PoolSegment, _attach_untracked
from alignedserve.worker.prefetch import touch_pages

MADV = {"read": 22, "write": 23}  # MADV_POPULATE_READ / _WRITE (Linux 5.14)


def populate(t: torch.Tensor, advice: int, threads: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    base, n = t.data_ptr(), t.numel()
    step = -(-n // threads) // 4096 * 4096
    errors = []

    def run(offset: int) -> None:
        length = min(step, n - offset)
        if libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(length), advice):
            errors.append(ctypes.get_errno())

    workers = [threading.Thread(target=run, args=(o,)) for o in range(0, n, step)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors


def main() -> None:
    gib, mode, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    segment = PoolSegment.reserve(gib << 30)
    shm = _attach_untracked(segment._shm.name)  # a second mapping, as the worker's
    t = torch.frombuffer(shm.buf, dtype=torch.uint8)
    start = time.perf_counter()
    if mode == "touch":
        touch_pages(t, threads)
    else:
        populate(t, MADV[mode], threads)
    print(mode, threads, f"{gib} GiB in {time.perf_counter() - start:.2f} s")
    del t
    shm.close()
    segment.discard()


if __name__ == "__main__":
    main()
