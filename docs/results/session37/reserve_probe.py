"""Reserving a shared-memory pool: one posix_fallocate (the batcher's way) against
madvise(MADV_POPULATE_WRITE) over equal chunks from N threads. Thirty-seventh session, CPU
machine (2 cores): `python3 docs/results/session37/reserve_probe.py > reserve_probe.txt`."""

import ctypes
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

MADV_POPULATE_WRITE = 23  # Linux >= 5.14
GIB = 4
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def reserve(mode: str, threads: int) -> float:
    path = f"/dev/shm/reserve-probe-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    size = GIB << 30
    try:
        start = time.perf_counter()
        if mode == "fallocate":
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
            chunk = size // threads

            def populate(i: int) -> int:
                address = ctypes.c_void_p(base + i * chunk)
                return libc.madvise(address, ctypes.c_size_t(chunk), MADV_POPULATE_WRITE)

            with ThreadPoolExecutor(threads) as pool:
                assert all(r == 0 for r in pool.map(populate, range(threads)))
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    for _ in range(2):
        for mode, threads in (("fallocate", 1), ("populate-write", 1), ("populate-write", 2)):
            print(f"{GIB} GiB {mode}, {threads} thread(s): {reserve(mode, threads):.2f} s")


if __name__ == "__main__":
    main()
