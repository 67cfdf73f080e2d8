"""GPU memory that fusing the projections leaves reserved, with `torch.cuda.empty_cache` made a
no-op and then as it is (`loader.fuse_projections` calls it): the memory reserved but unused
afterwards. Two builds of the Llama-3-8B shape (random bf16 weights):
- `build`: gpu_bench.build_model (weights drawn on the GPU, then a KV cache sized from the
  device's free memory: its blocks are printed too);
- `load`: the worker's `load_model` from a checkpoint written first (to /dev/shm when it has
  room), as a served model loads.

    python3 benchmarks/fusion_memory.py                # nvidia-h200 (any one GPU)
    python3 benchmarks/fusion_memory.py --paths load
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile

import gpu_bench
import torch

from alignedserve.worker.loader import load_model
from alignedserve.worker.tiny import FULL_SIZE, init_tiny


def reserved_free_gib() -> float:
    return (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30


def build() -> str:
    model, _, kv = gpu_bench.build_model()
    line = f"{reserved_free_gib():.2f} GiB reserved but free; {kv.num_blocks} KV blocks"
    del model, kv
    return line


def load(model_dir: str) -> str:
    model = load_model(model_dir, device="cuda", dtype="bfloat16")
    line = f"{reserved_free_gib():.2f} GiB reserved but free"
    del model
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=["build", "load"], default=["build", "load"])
    args = parser.parse_args()
    real = torch.cuda.empty_cache
    model_dir = None
    if "load" in args.paths:
        root = "/dev/shm" if shutil.disk_usage("/dev/shm").free > 40e9 else None
        model_dir = tempfile.mkdtemp(prefix="fusion-memory-", dir=root)
        init_tiny(model_dir, arch="llama", dtype="bfloat16", overrides=FULL_SIZE["llama3-8b"],
                  device="cuda")  # fmt: skip
        gc.collect()
        real()
    try:
        for path in args.paths:
            for label, hook in (("without empty_cache", lambda: None), ("with", real)):
                torch.cuda.empty_cache = hook  # looked up by name when called
                line = build() if path == "build" else load(model_dir)
                print(f"{path}, {label}: {line}", flush=True)
                gc.collect()
                real()
    finally:
        torch.cuda.empty_cache = real
        if model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
