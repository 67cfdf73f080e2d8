"""Time and peak host memory of writing a random-weight checkpoint (`init_tiny`), the step that
precedes every GPU benchmark run.

    .venv/bin/python benchmarks/write_checkpoint.py --dtype float16 [--device cuda:0]

The shape is benchmarks/load_rss.py's (Llama, hidden 2048, 8 layers: ~1 GiB in fp16).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import load_rss  # benchmarks/, beside this script

from alignedserve.worker.tiny import init_tiny

SHAPE = load_rss.CONFIG  # the same ~1 GiB-in-fp16 Llama shape


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    before = peak_rss_mib()  # python + torch imported
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        init_tiny(out, arch="llama", dtype=args.dtype, overrides=SHAPE, device=args.device)
        seconds = time.perf_counter() - start
        size = Path(out, "model.safetensors").stat().st_size / 2**20
    report = {
        "dtype": args.dtype,
        "device": args.device,
        "seconds": round(seconds, 2),
        "checkpoint_mib": round(size),
        "peak_rss_mib": round(peak_rss_mib()),
        "rss_after_import_mib": round(before),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
