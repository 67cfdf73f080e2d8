"""GPU memory that fusing the projections leaves reserved: gpu_bench.build_model (Llama-3-8B
shape, random bf16 weights, projections fused as the loader does, a KV cache sized from the
device's free memory) with `torch.cuda.empty_cache` made a no-op, then as it is. Prints, for
each, the memory reserved but unused after the KV cache and the KV blocks it was given.

    python3 benchmarks/fusion_memory.py        # nvidia-h200 (any one GPU)
"""

from __future__ import annotations

import gc

import gpu_bench
import torch


def main() -> None:
    real = torch.cuda.empty_cache
    for label, hook in (("without empty_cache", lambda: None), ("with empty_cache", real)):
        torch.cuda.empty_cache = hook  # fuse_projections calls it by this name
        model, _, kv = gpu_bench.build_model()
        cached = (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30
        print(
            f"{label}: {cached:.2f} GiB reserved but free after the KV cache; "
            f"{kv.num_blocks} KV blocks sized from free memory",
            flush=True,
        )
        del model, kv
        gc.collect()
        real()
    torch.cuda.empty_cache = real


if __name__ == "__main__":
    main()
