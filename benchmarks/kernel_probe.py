"""The decode step's two kernel families one at a time, against their own ceilings, with the
alternatives that could replace them: are the grid's near-miss cells (64 x 512, 128 x 512,
256 x 512, 256 x 1024) short because of the GEMMs or because of attention?

    python3 benchmarks/kernel_probe.py --out "$OUT"             # nvidia-h200 (any one GPU)
    python3 benchmarks/kernel_probe.py --skip attention --out "$OUT"

1. GEMMs: the decode step's projections of the Llama-3-8B shape (fused qkv, o, fused
   gate/up, down, lm_head) at M = 1 ... 256 tokens, each 32 times over 32 layers' distinct
   weights (so no weight stays in L2), in one CUDA graph. Side by side: cuBLASLt (torch's
   default), cuBLAS (`torch.backends.cuda.preferred_blas_library("cublas")`), and our
   skinny GEMM (worker/kernels/skinny_linear.py, on its default tiles, and the fastest of
   `skinny_variants`: pipeline depths, and with --tile-sweep tile shapes).
   Each against its own roofline: max(weight bytes / HBM read rate, FLOPs / bf16 matmul
   rate).
2. Attention: the decode attention kernel alone over 32 layers (one graph) at the same
   cells, over keys per tile x warps x pipeline stages x programs per SM; the default is
   the first row. Against the KV bytes read at the HBM read rate.
Results go to stdout and OUT/kernel_probe.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import triton
from gpu_bench import (
    build_model,
    ceilings,
    cuda_time,
    length_cells,
    tables_for,
)
from kernel_variants import (
    add_previous_argument,
    current_split,
    plan_module,
    previous_kernel,
    previous_kernels,
    set_split,
    split_label,
    split_setting,
)
from step_profile import graph_of

dam = importlib.import_module("alignedserve.worker.kernels.decode_attention")
skinny = importlib.import_module("alignedserve.worker.kernels.skinny_linear")

TOKENS = [1, 16, 32, 64, 128, 256]
ATTENTION_CELLS = [
    (64, 512),
    (64, 1024),
    (64, 2048),
    (128, 512),
    (256, 512),
    (256, 1024),
    (512, 512),
]
MIXED = [8, 32, 128, 256]  # served-like mixed lengths (gpu_bench.served_lengths)
MIXED_LONG_LAST = [32, 128]  # the same, the long requests last
SKINNY_STAGES = [3, 4, 6, 8]  # beside the kernel's own choice


def skinny_variants(tile_sweep: bool) -> list:
    """The skinny GEMM's launches to time; the first is its default (`Tiles()`). By default
    only the pipeline depth varies; `--tile-sweep` adds tile shapes, warps and tokens per
    program, for M past the kernel's reach (the twenty-first session's sweep also tried TMA
    loads: docs/results/session21/variants/tma_tiles.patch)."""
    base = skinny.Tiles()
    variants = [base] + [skinny.Tiles(num_stages=st) for st in SKINNY_STAGES]
    if not tile_sweep:
        return variants
    shapes = [(64, 128, 4), (64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (256, 64, 8)]
    for (block_n, block_k, warps), stages in itertools.product(shapes, (None, 4, 6)):
        tiles = skinny.Tiles(block_n, block_k, warps, stages, max_block_m=128)
        if tiles not in variants:
            variants.append(tiles)
    return variants


def tiles_name(tiles) -> str:
    stages = "auto" if tiles.num_stages is None else tiles.num_stages
    return f"n{tiles.block_n} k{tiles.block_k} w{tiles.num_warps} s{stages} m{tiles.max_block_m}"


def cublas_layers(x, weights, out) -> None:
    for w in weights:
        torch.matmul(x, w.t(), out=out)


def skinny_layers(x, weights, out, tiles) -> None:
    for w in weights:
        skinny.skinny_linear(x, w, out=out, tiles=tiles)


def attention_layers(q, layers, tables, ctx, scale, programs, block_n, kernel=None) -> None:
    """One step's attention: a plan, then every layer's call on it; `kernel`: the
    (decode_attention, plan_decode) of an earlier file (kernel_variants.previous_kernel)."""
    attend, plan_decode = kernel or (dam.decode_attention, dam.plan_decode)
    plan = plan_decode(q, layers[0][0], tables, ctx, num_programs=programs, block_n=block_n)
    for k_blocks, v_blocks in layers:
        attend(q, k_blocks, v_blocks, tables, ctx, scale, plan=plan)


def launch_resources(jit_function) -> set[tuple[int, int]]:
    """(shared memory bytes, registers per thread) of each variant compiled so far."""
    found = set()
    for cache in jit_function.device_caches.values():
        for compiled in cache[0].values():
            found.add((compiled.metadata.shared, compiled.n_regs))
    return found


def projections(model) -> dict[str, list[torch.Tensor]]:
    layers = model.model.layers
    return {
        "qkv": [layer.self_attn.qkv_proj.weight for layer in layers],
        "o": [layer.self_attn.o_proj.weight for layer in layers],
        "gate_up": [layer.mlp.gate_up_proj.weight for layer in layers],
        "down": [layer.mlp.down_proj.weight for layer in layers],
        "lm_head": [model.lm_head.weight],
    }


def gemm_probe(model, ceil: dict, token_counts: list[int], variants: list) -> list[dict]:
    rows = []
    gemms = projections(model)
    for tokens in token_counts:
        for name, weights in gemms.items():
            n, k = weights[0].shape
            x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda")
            out = torch.empty(tokens, n, dtype=torch.bfloat16, device="cuda")
            flops = 2 * tokens * n * k * len(weights)
            roof_s = max(
                n * k * 2 * len(weights) / ceil["hbm_read_bytes_per_s"],
                flops / ceil["matmul_flops_per_s"],
            )
            want = torch.nn.functional.linear(x, weights[0]).float()
            times = {}
            for library in ("cublaslt", "cublas"):
                torch.backends.cuda.preferred_blas_library(library)
                graph = graph_of(functools.partial(cublas_layers, x, weights, out))
                times[library] = cuda_time(graph.replay)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            swept = {}
            for tiles in variants:
                try:
                    skinny.skinny_linear(x, weights[0], out=out, tiles=tiles)
                except triton.runtime.errors.OutOfResources:
                    continue
                err = (out.float() - want).abs().max().item() / want.abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"skinny GEMM ({tiles_name(tiles)}) off by {err:.3g}")
                layers = functools.partial(skinny_layers, x, weights, out, tiles)
                swept[tiles_name(tiles)] = cuda_time(graph_of(layers).replay)
            times["skinny"] = swept[tiles_name(variants[0])]
            best = min(swept, key=swept.get)
            row = dict(
                tokens=tokens,
                gemm=name,
                n=n,
                k=k,
                roofline_ms=roof_s * 1e3,
                ms={lib: s * 1e3 for lib, s in times.items()},
                skinny_variants_ms={v: s * 1e3 for v, s in swept.items()},
            )
            rows.append(row)
            parts = "  ".join(
                f"{lib} {s * 1e3:6.3f} ms ({roof_s / s:4.0%})" for lib, s in times.items()
            )
            print(
                f"  M={tokens:4d} {name:8s} [{n:6d} x {k:5d}] x{len(weights):2d}: roofline "
                f"{roof_s * 1e3:6.3f} ms | {parts} | skinny's best ({best}): "
                f"{swept[best] * 1e3:6.3f} ms ({roof_s / swept[best]:4.0%})",
                flush=True,
            )
        per_step = {
            lib: sum(r["ms"][lib] for r in rows if r["tokens"] == tokens)
            for lib in ("cublaslt", "cublas", "skinny")
        }
        fastest = sum(
            min(*r["ms"].values(), *r["skinny_variants_ms"].values())
            for r in rows
            if r["tokens"] == tokens
        )
        print(
            f"  M={tokens:4d} all projections: "
            + "  ".join(f"{lib} {ms:6.3f} ms" for lib, ms in per_step.items())
            + f"  fastest of each (any variant) {fastest:6.3f} ms",
            flush=True,
        )
    return rows


def attention_probe(
    model, config, kv, ceil: dict, sweep: bool, min_chunk_tiles: list[int], previous: dict,
    splits: list[tuple],
) -> list[dict]:  # fmt: skip
    """Each cell's default launch, every launch config of the sweep (`sweep`: keys per tile,
    warps, stages, programs per SM, shortest chunk), each work split of `splits` (as
    kernel_variants.split_setting gives them) on the default tiles, and each earlier kernel file's
    default (`previous`: name -> module)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    scale = config.head_dim**-0.5
    split = current_split(dam)
    # (keys per tile, warps, stages, work split as kernel_variants.split_setting gives it)
    default = (plan_module(dam).GPU_BLOCK_N, dam.NUM_WARPS, dam.NUM_STAGES, split)
    variants = [default]
    if sweep:
        grid = itertools.product((64, 128), (4, 8), (2, 3, 4), (4, 8), min_chunk_tiles)
        variants += [
            v
            for *tiles, per_sm, shortest in grid
            if (v := (*tiles, (per_sm, split[1], shortest, split[3]))) != default
        ]
    variants += [(*default[:3], s) for s in splits]
    variants += list(previous)
    layers = [kv.layer(i) for i in range(config.num_layers)]

    def label(variant) -> str:
        if variant in previous:
            return variant
        block_n, warps, stages, work_split = variant
        return f"block_n {block_n:3d} warps {warps} stages {stages} {split_label(work_split)}"

    rows = []
    for name, lengths in length_cells(ATTENTION_CELLS, MIXED, MIXED_LONG_LAST):
        batch = len(lengths)
        tables, ctx = tables_for(lengths, kv.layout.blocks_for(max(lengths)), kv)
        q = torch.randn(batch, config.num_heads, config.head_dim, dtype=torch.bfloat16,
                        device="cuda")  # fmt: skip
        kv_bytes = sum(lengths) * kv.layout.block_bytes // kv.layout.block_tokens
        floor_s = kv_bytes / ceil["hbm_read_bytes_per_s"]
        results = []
        for variant in variants:
            if variant in previous:  # on its own defaults
                module = previous[variant]
                plan = plan_module(module)
                attend = functools.partial(
                    attention_layers, q, layers, tables, ctx, scale,
                    plan.PROGRAMS_PER_SM * sms, plan.GPU_BLOCK_N, previous_kernel(module),
                )  # fmt: skip
            else:
                block_n, dam.NUM_WARPS, dam.NUM_STAGES, variant_split = variant
                set_split(dam, variant_split)
                attend = functools.partial(
                    attention_layers, q, layers, tables, ctx, scale, variant_split[0] * sms,
                    block_n,
                )  # fmt: skip
            try:
                seconds = cuda_time(graph_of(attend).replay)
            except triton.runtime.errors.OutOfResources:  # too many stages for shared memory
                continue
            results.append((variant, seconds))
        dam.NUM_WARPS, dam.NUM_STAGES = default[1], default[2]
        set_split(dam, split)
        base = results[0][1]
        ranked = sorted(results, key=lambda r: r[1])
        print(
            f"  {name}: KV floor {floor_s * 1e3:6.3f} ms | default "
            f"{base * 1e3:6.3f} ms ({kv_bytes / base / 1e9:5.0f} GB/s)",
            flush=True,
        )
        shown = ranked[:5] + [r for r in ranked[5:] if r[0] in previous]  # each once
        for variant, seconds in shown:
            print(
                f"      {label(variant)}: {seconds * 1e3:6.3f} ms ({kv_bytes / seconds / 1e9:5.0f} "
                f"GB/s, {seconds / base:5.3f}x default)"
            )
        rows.append(
            dict(cell=name, floor_ms=floor_s * 1e3, ms={label(v): s * 1e3 for v, s in results})
        )
    print(
        "  compiled attention kernels (shared memory bytes, registers per thread): "
        f"{sorted(launch_resources(dam._decode_attention_kernel))}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gemm", "attention"])
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS, help="GEMMs' M")
    parser.add_argument(
        "--tile-sweep", action="store_true", help="time the skinny GEMM's tile shapes too"
    )
    parser.add_argument(
        "--attention-default-only", action="store_true", help="no launch-config sweep"
    )
    add_previous_argument(parser)
    parser.add_argument(
        "--min-chunk-tiles", nargs="*", type=int, default=[4], help="the sweep's shortest chunks"
    )
    parser.add_argument(
        "--splits", nargs="*", default=[],
        help="work splits PxI[xM[xO]] on the default tiles (see decode_kernel_sweep.py)",
    )  # fmt: skip
    args = parser.parse_args()
    ceil = ceilings()
    print(
        f"ceilings: HBM read {ceil['hbm_read_bytes_per_s'] / 1e9:,.0f} GB/s, bf16 matmul "
        f"{ceil['matmul_flops_per_s'] / 1e12:,.0f} TFLOP/s",
        flush=True,
    )
    model, config, kv = build_model()
    result = {"device": torch.cuda.get_device_name(0), "ceilings": ceil}
    if "gemm" not in args.skip:
        print("GEMMs, 32 layers in one graph:", flush=True)
        result["gemm"] = gemm_probe(model, ceil, args.tokens, skinny_variants(args.tile_sweep))
    if "attention" not in args.skip:
        print("decode attention, 32 layers in one graph (fastest five of each cell):", flush=True)
        previous = previous_kernels(args.previous)
        result["attention"] = attention_probe(
            model, config, kv, ceil, not args.attention_default_only, args.min_chunk_tiles,
            previous, [split_setting(s, dam) for s in args.splits],
        )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
