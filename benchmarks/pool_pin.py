"""How long creating and pinning a CPU KV pool takes, as the batcher and the worker do it.

The batcher creates the shared-memory pool and reserves its memory (`CpuKVPool.create_bytes`);
the worker page-locks it (`worker/prefetch.py: pin`, cudaHostRegister) so that loads are DMA.
Both are part of a server's start. For each size, in the OPT-13B block format:

    python3 benchmarks/pool_pin.py --gib 16 64 120    # a GPU machine with host memory for it
"""

from __future__ import annotations

import argparse
import time

from device_env import import_alignedserve

import_alignedserve()
import torch  # noqa: E402

from alignedserve.batcher.kv_pool import CpuKVPool  # noqa: E402
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.worker.prefetch import pin  # noqa: E402

OPT_13B = KVLayout(40, 40, 128, 16, "bfloat16")  # layers, kv heads, head dim, block tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=int, nargs="+", default=[16, 64, 120])
    args = parser.parse_args()
    for gib in args.gib:
        start = time.time()
        pool = CpuKVPool.create_bytes(OPT_13B, gib << 30)
        created = time.time() - start
        view = torch.from_numpy(pool.blocks())
        start = time.time()
        pin(view)
        pinned = time.time() - start
        print(f"{gib} GiB: create (reserve) {created:.1f} s, pin {pinned:.1f} s", flush=True)
        torch.cuda.cudart().cudaHostUnregister(view.data_ptr())
        del view
        pool.close()
        pool.unlink()


if __name__ == "__main__":
    main()
