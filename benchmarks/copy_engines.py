"""Does a bulk copy on a side stream hold up a small copy on the compute stream?

The prefill device copies each batch's KV out to the pool on a copy stream while its next
pass runs; the next pass first uploads its inputs (token ids, positions, block tables) with
small host-to-device copies on the compute stream. If the GPU runs both streams' copies
through one copy engine in the order they were queued, the pass waits for the bulk copy.

On one GPU, per case (median of repeats): the ms from queueing a small pinned copy (64 KiB)
on the current stream, then a GEMM that reads it, to the GEMM's end; alone, and just after a
bulk copy of `--gib` GiB was queued on a side stream: device to pinned host (the prefill's
copies out) and pinned host to device (a load); and with the bulk copy to the host queued
after the upload, before the GEMM; and the upload through the worker's `to_device` (a
kernel reads the pinned ring), alone and after a bulk copy to the device. Also the bulk
copy's own ms.

    PYTHONPATH=$S python3 benchmarks/copy_engines.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from device_env import import_alignedserve

import_alignedserve()
import torch  # noqa: E402

from alignedserve.worker.transfer import to_device  # noqa: E402


def elapsed_ms(begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
    end.synchronize()
    return begin.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    dev = torch.device("cuda:0")
    nbytes = int(args.gib * 2**30)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    small_host = torch.ones(32768, dtype=torch.bfloat16, pin_memory=True)
    small = torch.empty(32768, dtype=torch.bfloat16, device=dev)
    small_src = torch.ones(32768, dtype=torch.bfloat16)  # pageable: to_device stages it
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
    side = torch.cuda.Stream(dev)

    def small_then_gemm(between=None, ours=False) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        # ours: the worker's path for a step's inputs
        up = to_device(small_src, dev) if ours else small.copy_(small_host, non_blocking=True)
        if between:
            between()
        torch.mm(a + up[:4096].view(1, -1), a)  # reads the upload
        end.record()
        return begin, end

    def bulk(direction: str) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            if direction == "d2h":
                host.copy_(device, non_blocking=True)
            else:
                device.copy_(host, non_blocking=True)
            end.record()
        return begin, end

    rows = []
    cases = (
        "alone",
        "after a bulk d2h",
        "after a bulk h2d",
        "before a bulk d2h",
        "to_device alone",
        "to_device after a bulk h2d",
    )
    for case in cases:
        ours = case.startswith("to_device")
        pass_ms, bulk_ms = [], []
        for _ in range(args.repeats + 1):  # the first warms up
            torch.cuda.synchronize()
            copies = []
            direction = case.split()[-1]
            if "after" in case:
                copies.append(bulk(direction))
                events = small_then_gemm(ours=ours)
            elif "before" in case:  # the bulk copy queued after the upload
                events = small_then_gemm(lambda d=direction, c=copies: c.append(bulk(d)))
            else:
                events = small_then_gemm(ours=ours)
            pass_ms.append(elapsed_ms(*events))
            bulk_ms += [elapsed_ms(*copy) for copy in copies]
        row = dict(case=case, pass_ms=statistics.median(pass_ms[1:]))
        if bulk_ms:
            row["bulk_ms"] = statistics.median(bulk_ms[1:])
            row["bulk_gb_per_s"] = nbytes / row["bulk_ms"] / 1e6
        rows.append(row)
        extra = (
            f"; the bulk copy {row['bulk_ms']:.1f} ms ({row['bulk_gb_per_s']:.1f} GB/s)"
            if bulk_ms
            else ""
        )
        print(f"{case:26s}: small upload + GEMM {row['pass_ms']:7.2f} ms{extra}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "copy_engines.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
