"""The decode attention kernel's work split, side by side: CUDA-graph decode steps of the
Llama-3-8B shape (random bf16 weights) on uniform and served-like mixed lengths, for each
(programs per SM, chunks per program) setting and, with --previous (repeatable), for the
kernel of an earlier checkout (its decode_attention.py, or a folder of its
decode_attention.py and decode_plan.py, loaded by path, named by its last part), all in one
process. --repeats N captures and times each variant N times, the variants in turn, and
keeps every time (the table shows the median and the range): two captures of one variant can
differ by ~1-2 % (cuBLAS's choice of kernel, memory placement).

    python3 benchmarks/decode_kernel_sweep.py --out "$OUT"
    python3 benchmarks/decode_kernel_sweep.py --settings 4x2 2x2 --repeats 3 --out "$OUT"
    python3 benchmarks/decode_kernel_sweep.py --previous old/decode_attention.py --out "$OUT"
    python3 benchmarks/decode_kernel_sweep.py --previous previous/s25 --out "$OUT"  # a folder
    python3 benchmarks/decode_kernel_sweep.py --settings 4x2 --previous a.py --previous b.py
    python3 benchmarks/decode_kernel_sweep.py --small --skinny-max-tokens 0 16 32 --out "$OUT"
    python3 benchmarks/decode_kernel_sweep.py --batches 64 --skinny-max-tokens 0 64 --out "$OUT"
    python3 benchmarks/decode_kernel_sweep.py --small --skinny-max-tokens 32 --skinny-fused on off
    python3 benchmarks/decode_kernel_sweep.py --settings 8x0.5 --launches 2x3x64x16 --out "$OUT"

--skinny-max-tokens makes the variants the skinny GEMM's reach instead (kernels/
skinny_linear.MAX_TOKENS: 0 = cuBLAS for every projection), with the default attention split,
each with the layer's small ops fused into it or not (--skinny-fused, default on: kernels/
skinny_linear.FUSED_OPS); --small takes batches of 1-32 (where the skinny GEMM applies)
instead of the grid's cells, and --batches keeps the cells of the given batch sizes.
--launches adds variants of the attention kernel's launch (warps, stages, keys a tile,
programs per SM), each with the served split otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
from gpu_bench import (
    build_model,
    cuda_time,
    length_cells,
    tables_for,
)
from kernel_variants import (
    add_previous_argument,
    current_split,
    previous_kernel,
    previous_kernels,
    set_split,
    split_label,
    split_setting,
)

from alignedserve.worker.cuda_graph import DecodeGraph, GraphInputs

# the modules (the package's own name for decode_attention is the function, re-exported);
# the model's attention layer takes both functions from them at each call
dam = importlib.import_module("alignedserve.worker.kernels.decode_attention")
dpm = importlib.import_module("alignedserve.worker.kernels.decode_plan")
skinny = importlib.import_module("alignedserve.worker.kernels.skinny_linear")

SETTINGS = [(1, 4), (2, 2), (4, 1), (4, 2), (8, 1)]  # (programs per SM, chunks per program)
UNIFORM = [
    (64, 512),
    (64, 1024),
    (64, 2048),
    (128, 512),
    (128, 1024),
    (256, 512),
    (256, 1024),
    (256, 2048),
    (512, 512),
    (512, 1024),
]
MIXED = [8, 32, 128, 256]
MIXED_LONG_LAST = [32, 128]
SMALL_UNIFORM = [(b, n) for b in (1, 2, 4, 8, 16, 32) for n in (512, 4096)]
SMALL_MIXED = [8, 16, 32]


def cells(small: bool = False) -> list[tuple[str, list[int]]]:
    if small:
        return length_cells(SMALL_UNIFORM, SMALL_MIXED)
    return length_cells(UNIFORM, MIXED, MIXED_LONG_LAST)


def step_ms(model, config, kv, lengths: list[int]) -> float:
    batch = len(lengths)
    width = kv.layout.blocks_for(max(lengths))
    graph = DecodeGraph(model, kv, GraphInputs(batch, width, kv.num_blocks - 1, "cuda"))
    tables, ctx = tables_for(lengths, width, kv)
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
    seconds = cuda_time(lambda g=graph: g.replay(ids, tables, ctx).argmax(-1))
    del graph  # its memory pool, before the next capture
    return seconds * 1e3


def spread(times: list[float]) -> str:
    return f" ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    add_previous_argument(parser)
    parser.add_argument(
        "--settings",
        nargs="*",
        default=[f"{p}x{i}" for p, i in SETTINGS],
        help="PxI, PxIxM or PxIxMxO: programs per SM x chunks per program (may be a fraction) "
        "x the shortest chunk in key tiles x longest item first (1) or not (0); M and O default "
        "to kernels/decode_plan's MIN_CHUNK_TILES and LONGEST_FIRST; of the current kernel",
    )
    parser.add_argument("--repeats", type=int, default=1, help="captures per variant, in turn")
    parser.add_argument(
        "--skinny-max-tokens", nargs="*", type=int, default=[],
        help="variants: the skinny GEMM up to this many tokens (0: cuBLAS only)",
    )  # fmt: skip
    parser.add_argument(
        "--skinny-fused", nargs="*", default=["on"], choices=["on", "off"],
        help="with --skinny-max-tokens: the layer's small ops inside the skinny GEMMs or not",
    )  # fmt: skip
    parser.add_argument(
        "--launches", nargs="*", default=[],
        help="variants: the attention kernel launched with WxSxN[xP]: W warps, S pipeline "
        "stages, N keys a tile, P programs per SM (default: the served split's)",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="batches of 1-32")
    parser.add_argument("--batches", nargs="*", type=int, help="only cells of these batch sizes")
    args = parser.parse_args()
    model, config, kv = build_model()
    settings = [split_setting(s, dam) for s in args.settings]
    # variant -> (attention work split, skinny GEMM's reach, fused ops, attention launch);
    # None: an earlier checkout's kernel
    served = (dam.NUM_WARPS, dam.NUM_STAGES, dpm.GPU_BLOCK_N)
    default = (skinny.MAX_TOKENS, skinny.FUSED_OPS, served)
    variants = {split_label(split): (split, *default) for split in settings}
    for text in args.launches:
        fields = [int(v) for v in text.split("x")]
        split = current_split(dam)
        if len(fields) == 4:
            split = (fields[3], *split[1:])
        label = f"{fields[0]} warps, {fields[1]} stages, {fields[2]} keys, {split[0]}x SMs"
        variants[label] = (split, *default[:2], tuple(fields[:3]))
    if args.skinny_max_tokens:
        split = current_split(dam)
        variants = {
            f"skinny<={t}{' fused' if f == 'on' else ''}": (split, t, f == "on", served)
            for t, f in itertools.product(args.skinny_max_tokens, args.skinny_fused)
        }
    current = dam.decode_attention, dpm.plan_decode
    served_split = current_split(dam)

    def launch(setting):
        dam.NUM_WARPS, dam.NUM_STAGES, dpm.GPU_BLOCK_N = setting

    previous = previous_kernels(args.previous)
    variants = {**dict.fromkeys(previous), **variants}
    rows = []
    for name, lengths in cells(args.small):
        if args.batches and len(lengths) not in args.batches:
            continue
        row = {"cell": name, "max": max(lengths), "mean": sum(lengths) // len(lengths)}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _, (variant, setting) in itertools.product(range(args.repeats), variants.items()):
            if setting is None:
                dam.decode_attention, dpm.plan_decode = previous_kernel(previous[variant])
                skinny.MAX_TOKENS, skinny.FUSED_OPS = default[:2]
                launch(served)
            else:  # all are captured into the graph: set before step_ms
                dam.decode_attention, dpm.plan_decode = current
                split, skinny.MAX_TOKENS, skinny.FUSED_OPS, attention_launch = setting
                set_split(dam, split)
                launch(attention_launch)
            times[variant].append(step_ms(model, config, kv, lengths))
        row.update({v: statistics.median(t) for v, t in times.items()}, times_ms=times)
        dam.decode_attention, dpm.plan_decode = current
        skinny.MAX_TOKENS, skinny.FUSED_OPS = default[:2]
        launch(served)
        set_split(dam, served_split)
        rows.append(row)
        print(
            f"{name:22s} max {row['max']:5d} mean {row['mean']:5d}: "
            + "  ".join(f"{v}: {row[v]:6.2f} ms{spread(times[v])}" for v in variants),
            flush=True,
        )
    (Path(args.out) / "decode_kernel_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
