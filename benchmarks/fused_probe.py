"""The skinny GEMM's fused forms against the separate kernels they replace, one projection
kind at a time, over the 32 layers' own weights in one CUDA graph (Llama-3-8B shape, bf16;
the norms' gains folded into the weights, as the loader does, so the separate norm's is 1):

    qkv:      normed_linear                 vs  fused_add_rms_norm + skinny_linear
    o:        linear_residual               vs  skinny_linear + add
    gate_up:  normed_linear(silu_mul=True)  vs  fused_add_rms_norm + skinny_linear + silu_and_mul
    down:     linear_residual               vs  skinny_linear + add

    python3 benchmarks/fused_probe.py --out "$OUT"        # nvidia-h200 (any one GPU)

It also reports, for each compiled `_skinny_linear_kernel` in Triton's cache, what the
compiler made of it (async copies, wgmma or mma, shared-memory buffers).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import triton
from gpu_bench import build_model, cuda_time
from kernel_probe import projections
from step_profile import graph_of

skl = importlib.import_module("alignedserve.worker.kernels.skinny_linear")
fused = importlib.import_module("alignedserve.worker.kernels.fused")


def separate(kind, x, weights, ones, residual) -> None:
    for w in weights:
        h = fused.fused_add_rms_norm(x, None, ones, 1e-5)[0] if kind in ("qkv", "gate_up") else x
        y = skl.skinny_linear(h, w)
        if kind == "gate_up":
            fused.silu_and_mul(y)
        elif kind in ("o", "down"):
            y.add_(residual)


def fused_form(kind, x, weights, residual, tiles) -> None:
    for w in weights:
        if kind in ("qkv", "gate_up"):
            skl.normed_linear(x, 1e-5, w, silu_mul=kind == "gate_up", tiles=tiles)
        else:
            skl.linear_residual(x, w, residual, tiles=tiles)


def compiled_kernels() -> list[str]:
    """One line per compiled _skinny_linear_kernel: its constexprs and what the IR holds."""
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    lines = []
    for ttgir in sorted(root.glob("*/_skinny_linear_kernel.ttgir")):
        text = ttgir.read_text()
        meta = json.loads((ttgir.parent / "_skinny_linear_kernel.json").read_text())
        counts = {
            name: len(re.findall(pattern, text))
            for name, pattern in {
                "async_copy": r"async_copy_global_to_local",
                "wgmma": r"warp_group_dot\b",
                "mma_v2": r"\btt\.dot\b|mma_v2|#ttg\.nvidia_mma<\{versionMajor = 2",
                "local_alloc": r"local_alloc",
                "rsqrt": r"rsqrt",
                "exp": r"math\.exp|exp2",
            }.items()
        }
        shape = {k: meta.get(k) for k in ("num_stages", "num_warps", "shared")}
        lines.append(f"{ttgir.parent.name[:10]} {shape} {counts}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 16, 32])
    args = parser.parse_args()
    model, _, _ = build_model()
    gemms = projections(model)
    rows = []
    stage_variants = [None, 2, 3, 4, 6]
    for tokens in args.tokens:
        for kind in ("qkv", "o", "gate_up", "down"):
            weights = gemms[kind]
            n, k = weights[0].shape
            x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda")
            ones = torch.ones(k, dtype=torch.bfloat16, device="cuda")
            out_n = n // 2 if kind == "gate_up" else n
            residual = torch.randn(tokens, out_n, dtype=torch.bfloat16, device="cuda")
            base = cuda_time(
                graph_of(functools.partial(separate, kind, x, weights, ones, residual)).replay
            )
            times = {}
            for stages in stage_variants:
                tiles = skl.Tiles(num_stages=stages)
                try:
                    run = functools.partial(fused_form, kind, x, weights, residual, tiles)
                    times[str(stages)] = cuda_time(graph_of(run).replay)
                except triton.runtime.errors.OutOfResources:
                    print(f"    stages {stages}: out of shared memory", flush=True)
            rows.append(dict(tokens=tokens, kind=kind, separate_ms=base * 1e3,
                             fused_ms={s: t * 1e3 for s, t in times.items()}))  # fmt: skip
            print(
                f"M={tokens:3d} {kind:8s} separate {base * 1e3:6.3f} ms | fused "
                + "  ".join(f"s{s}: {t * 1e3:6.3f}" for s, t in times.items()),
                flush=True,
            )
    print("compiled kernels:")
    for line in compiled_kernels():
        print("  " + line)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fused_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
