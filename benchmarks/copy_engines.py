"""Does a bulk copy on a side stream hold up a small copy on the compute stream?

The prefill device copies each batch's KV out to the pool on a copy stream while its next
pass runs; the next pass first uploads its inputs (token ids, positions, block tables) with
small host-to-device copies on the compute stream. If the GPU runs both streams' copies
through one copy engine in the order they were queued, the pass waits for the bulk copy.

On one GPU, per case (median of repeats), the ms from queueing a small copy (64 KiB) on the
current stream to the end of the work that needs it:
- an upload (a DMA copy from pinned memory) and a GEMM that reads it;
- the same through the worker's `to_device` (a kernel reads the pinned ring);
- a download (as a step's sampled tokens went to the host), and the same through the
  worker's `to_host` (a kernel stores into pinned memory).
Each alone, and with a bulk copy of `--gib` GiB queued on a side stream before it:
- to the host, as one copy or as 475 (a prefill batch's copies out are one per run of
  blocks);
- to the device (a load).
One case queues the bulk copy to the host between the upload and its GEMM. The bulk copy's
own ms are printed too. Each case's time is given twice: between CUDA events around it
(the GPU's view) and from queueing it to the host seeing its end event (what a caller waits).
The events alone mislead for a copy to the host: an event recorded on a stream whose next
work is a copy seems to run in the copy engine's queue too, so both events come after the
bulk copy and the copy seems to take no time (session 30's first call: 0.00 ms).

    PYTHONPATH=$S python3 benchmarks/copy_engines.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from device_env import event_ms, import_alignedserve

import_alignedserve()
import torch  # noqa: E402

from alignedserve.worker.transfer import PinnedOutputs, to_device, to_host  # noqa: E402


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

    small_out = torch.empty(32768, dtype=torch.bfloat16, pin_memory=True)
    small_bytes = small.numel() * small.element_size()
    out_host, out_on_device = PinnedOutputs(dev).take(small_bytes)
    out_host, out_on_device = out_host[:small_bytes], out_on_device[:small_bytes]

    def small_copy(kind: str, between=None) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """From queueing a small copy on the current stream to the end of the work that
        needs it: an upload (a DMA copy, or `to_device`, the worker's path for a step's
        inputs) and a GEMM that reads it; or a download (a step's sampled tokens)."""
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        if kind in ("download", "to_host"):
            if kind == "download":
                small_out.copy_(small, non_blocking=True)
            else:
                to_host(small, out_host, out_on_device)
            if between:
                between()
        else:
            up = to_device(small_src, dev) if kind == "to_device" else small
            if kind == "upload":
                small.copy_(small_host, non_blocking=True)
            if between:
                between()
            torch.mm(a + up[:4096].view(1, -1), a)  # reads the upload
        end.record()
        return begin, end

    def bulk(direction: str, pieces: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            step = nbytes // pieces
            for i in range(pieces):  # many copies, as the prefill's copies out are
                lo, hi = i * step, nbytes if i == pieces - 1 else (i + 1) * step
                if direction == "d2h":
                    host[lo:hi].copy_(device[lo:hi], non_blocking=True)
                else:
                    device[lo:hi].copy_(host[lo:hi], non_blocking=True)
            end.record()
        return begin, end

    # (small copy, the bulk copy's direction, its pieces, queued before or after the small)
    cases = (
        ("upload", None, 1, None),
        ("upload", "d2h", 1, "before"),
        ("upload", "h2d", 1, "before"),
        ("upload", "d2h", 1, "after"),
        ("upload", "d2h", 475, "before"),
        ("to_device", None, 1, None),
        ("to_device", "h2d", 1, "before"),
        ("download", None, 1, None),
        ("download", "d2h", 1, "before"),
        ("download", "d2h", 475, "before"),
        ("to_host", None, 1, None),
        ("to_host", "d2h", 1, "before"),
        ("to_host", "d2h", 475, "before"),
    )
    rows = []
    for kind, direction, pieces, when in cases:
        name = kind if direction is None else f"{kind}, {pieces} {direction} {when}"
        pass_ms, wait_ms, bulk_ms = [], [], []
        for _ in range(args.repeats + 1):  # the first warms up
            torch.cuda.synchronize()
            copies = []
            if when == "before":
                copies.append(bulk(direction, pieces))
            between = None
            if when == "after":  # the bulk copy queued after the small one
                between = lambda d=direction, c=copies: c.append(bulk(d, 1))  # noqa: E731
            queued = time.perf_counter()
            events = small_copy(kind, between)
            events[1].synchronize()
            wait_ms.append(1e3 * (time.perf_counter() - queued))
            pass_ms.append(event_ms(*events))
            bulk_ms += [event_ms(*copy) for copy in copies]
        row = dict(
            case=name,
            pass_ms=statistics.median(pass_ms[1:]),
            wait_ms=statistics.median(wait_ms[1:]),
        )
        if bulk_ms:
            row["bulk_ms"] = statistics.median(bulk_ms[1:])
            row["bulk_gb_per_s"] = nbytes / row["bulk_ms"] / 1e6
        rows.append(row)
        extra = (
            f"; the bulk copy {row['bulk_ms']:.1f} ms ({row['bulk_gb_per_s']:.1f} GB/s)"
            if bulk_ms
            else ""
        )
        print(
            f"{name:32s}: {row['pass_ms']:7.2f} ms on the GPU, {row['wait_ms']:7.2f} ms on the "
            f"host{extra}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "copy_engines.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
