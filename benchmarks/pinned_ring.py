"""A step's host-to-GPU inputs three ways, side by side: the host's time to queue them while
the GPU is still busy with the step before (a queued matmul chain, ~28 ms), and whether the
host waited for it.

- ring: `worker/transfer.to_device`, staged in the thread's pinned ring (what the worker does);
- pin per copy: `t.pin_memory().to(device, non_blocking=True)` for each input;
- pageable: `t.to(device)` from ordinary host memory (waits for the queued work).

The inputs are a decode step's for B requests: token ids, positions, context lengths, slot
blocks and offsets (int64 [B] each), a block table (int32 [B, 512]) and four sampling vectors
(float32 [B]).

    python3 benchmarks/pinned_ring.py --batches 8 64 256 --out "$OUT"   # any GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import device_env
import torch

device_env.import_alignedserve()
from alignedserve.worker import transfer  # noqa: E402

WAYS = {
    "ring": lambda t, dev: transfer.to_device(t, dev),
    "pin per copy": lambda t, dev: t.pin_memory().to(dev, non_blocking=True),
    "pageable": lambda t, dev: t.to(dev),
}


def step_inputs(batch: int) -> list[torch.Tensor]:
    longs = [torch.randint(0, 1 << 20, (batch,)) for _ in range(5)]
    table = torch.randint(0, 1 << 20, (batch, 512), dtype=torch.int32)
    floats = [torch.rand(batch) for _ in range(4)]
    return [*longs, table, *floats]


def busy_gpu(device: torch.device) -> None:
    """Queue ~28 ms of matmuls on the current stream (returns at once)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        a = a @ a
        a = a / a.norm()


def host_us(way: str, batch: int, device: torch.device, steps: int) -> dict:
    send = WAYS[way]
    times, waited = [], []
    for _ in range(steps):
        inputs = step_inputs(batch)
        torch.cuda.synchronize(device)
        busy_gpu(device)
        done = torch.cuda.Event()
        done.record()
        start = time.perf_counter()
        outs = [send(t, device) for t in inputs]
        times.append(time.perf_counter() - start)
        waited.append(done.query())  # True: the host got here after the queued work ended
        del outs
    torch.cuda.synchronize(device)
    return {
        "way": way,
        "batch": batch,
        "host_us_median": statistics.median(times) * 1e6,
        "host_us_max": max(times) * 1e6,
        "waited_share": sum(waited) / len(waited),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    for way in WAYS:  # warm: the ring's buffer, the pinned allocator, the CUDA context
        host_us(way, 8, device, 3)
    rows = []
    for batch in args.batches:
        for way in WAYS:
            row = host_us(way, batch, device, args.steps)
            rows.append(row)
            print(
                f"B={batch:4d} {way:13s}: host {row['host_us_median']:8.1f} us per step "
                f"(max {row['host_us_max']:8.1f}); waited for the queued work in "
                f"{100 * row['waited_share']:.0f}% of steps",
                flush=True,
            )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pinned_ring.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
