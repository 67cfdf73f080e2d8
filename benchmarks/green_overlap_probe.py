"""Do a decode step's GEMMs and its attention overlap when green contexts split the SMs?

    python3 benchmarks/green_overlap_probe.py --out "$OUT"   # one GPU, ~3 min

Issue 5's four missed grid cells (128 x 512, 256 x 512, 512 x 512, 512 x 1024) run
compute-bound GEMMs and memory-bound attention one after the other, so a step takes their
sum where the roofline is their max. Two earlier probes tried to run one half-batch's GEMMs
beside the other half's attention: cuBLAS on two streams (overlap_probe.py, fortieth session)
took every SM, and a GEMM launching fewer programs (bounded_overlap_probe.py, forty-second)
was slower than cuBLAS and still left the attention too few SMs. Neither could confine a
kernel to SMs. Green contexts can (green_split.py): here cuBLAS runs on a partition of G SMs
and the served attention kernel on the rest, planned for their count.

1. Checks: results on the green streams equal the primary stream's; a GEMM on G SMs takes
   longer than on all of them (the partition holds); whether one CUDA graph can hold work of
   both partitions (else every time below is of eager launches, queued back to back).
2. Per cell and split: cuBLAS GEMMs of half the batch on G SMs, attention of the other half
   on the rest, each alone and both at once.
3. The nano-batch pipeline those allow: per layer, half X's GEMMs beside half Y's attention,
   then the other way round (each phase after both kernels of the one before, which is what
   the layer's dependencies need), 32 layers; against today's step (cuBLAS GEMMs over B rows,
   then attention over B rows, all SMs), timed the same way, and against the roofline.
   Small ops (norms, RoPE, SiLU, lm_head) are left out on both sides.

Results also go to OUT/green_overlap_probe.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import torch.nn.functional as F
from bounded_overlap_probe import graphed
from gpu_bench import cuda_time, stream_time
from green_split import GreenSplit
from overlap_probe import CELLS, Work, llama_shape, measured_device

from alignedserve.worker.kernels.decode_plan import PROGRAMS_PER_SM

GEMM_SMS = [64, 80, 88, 96, 104, 112]  # asked for; the driver rounds up to its granularity
# the attention kernel's launch: (warps, pipeline stages, keys per tile, programs per SM);
# the first is the served one
SETTINGS = [
    (4, 3, 128, 8), (8, 3, 128, 8), (4, 2, 128, 8), (4, 4, 128, 8), (8, 4, 128, 8),
    (4, 3, 64, 8), (8, 3, 64, 8), (4, 3, 64, 16), (4, 4, 64, 16), (2, 3, 64, 16),
]  # fmt: skip


@contextlib.contextmanager
def launch(setting):
    """The attention kernel launched with `setting`'s warps and stages meanwhile, and with TMA
    loads of whole blocks where its optional fifth field is 1 (a kernel option that was
    measured and not kept: docs/results/session43/variants/tma_block_loads.patch adds it)."""
    dam = importlib.import_module("alignedserve.worker.kernels.decode_attention")
    tma = len(setting) > 4 and bool(setting[4])
    if tma and not hasattr(dam, "KV_LOADS"):
        raise ValueError("TMA loads: apply docs/results/session43/variants/tma_block_loads.patch")
    served = dam.NUM_WARPS, dam.NUM_STAGES
    dam.NUM_WARPS, dam.NUM_STAGES = setting[0], setting[1]
    if tma:
        dam.KV_LOADS = "tma"
    try:
        yield
    finally:
        dam.NUM_WARPS, dam.NUM_STAGES = served
        if tma:
            dam.KV_LOADS = "pointers"


@contextlib.contextmanager
def cublas_for(sms: int | None, total: int):
    """F.linear through cuBLASLt told to size its grids for `sms` SMs (torch's SM carveout,
    which only the Lt path reads); None: torch's default library, every SM."""
    if sms is None:
        yield
        return
    library = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(total - sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(library)


def projections(work: Work, rows: slice):
    """One layer's four projections (fused qkv, o, gate_up, down) over `rows`, by cuBLAS."""
    xs = [work.inputs[w.shape[1]][rows] for w in work.weights]

    def run():
        for x, w in zip(xs, work.weights, strict=True):
            F.linear(x, w)

    return run


def on(stream, fn):
    """fn queued on `stream`, after what the current stream holds; the current stream then
    waits for it."""

    def run():
        here = torch.cuda.current_stream()
        stream.wait_stream(here)
        with torch.cuda.stream(stream):
            fn()
        here.wait_stream(stream)

    return run


def together(*pairs):
    """Each (stream, fn) queued on its stream at once; the current stream waits for all."""

    def run():
        here = torch.cuda.current_stream()
        for stream, _ in pairs:
            stream.wait_stream(here)
        for stream, fn in pairs:
            with torch.cuda.stream(stream):
                fn()
        for stream, _ in pairs:
            here.wait_stream(stream)

    return run


def layers_of(fn_of_layer, layers: int):
    return lambda: [fn_of_layer(layer) for layer in range(layers)]


class Timer:
    """Milliseconds per call: CUDA-graph replays where a graph holds the work, else eager
    launches queued back to back (stream_time), so the host's launches overlap the device."""

    def __init__(self, graphs: bool):
        self.graphs = graphs
        self.mode = "graph" if graphs else "eager"

    def __call__(self, fn) -> float:
        if self.graphs:
            return cuda_time(graphed(fn)) * 1e3
        return stream_time(fn) * 1e3


def checks(work: Work, split: GreenSplit) -> dict:
    """Part 1 on one split: equal results, a partition that holds, graphs or not."""
    rows = slice(0, work.inputs[work.weights[0].shape[1]].shape[0] // 2)
    x, w = work.inputs[work.weights[2].shape[1]][rows], work.weights[2]
    want = F.linear(x, w)
    got = {}
    for name, part in (("first", split.first), ("second", split.second)):
        with torch.cuda.stream(part.stream):
            got[name] = F.linear(x, w)
        torch.cuda.current_stream().wait_stream(part.stream)
    from alignedserve.worker.kernels.decode_attention import decode_attention

    reference = decode_attention(
        work.q[rows], work.k_blocks[0], work.v_blocks[0], work.tables[rows], work.ctx[rows],
        work.scale,
    )  # fmt: skip
    torch.cuda.synchronize()
    out = {}
    attend = planned(work, {"y": rows}, split.second.sms * PROGRAMS_PER_SM)
    on(split.second.stream, lambda: out.setdefault("a", attend("y", 0)))()
    torch.cuda.synchronize()
    equal = {
        "gemm_first": bool(torch.equal(got["first"], want)),
        "gemm_second": bool(torch.equal(got["second"], want)),
        "attention_second_max_abs_diff": float((out["a"] - reference).abs().max()),
    }
    layer = projections(work, rows)
    gemm_all = stream_time(layers_of(lambda _: layer(), work.layers)) * 1e3
    gemm_first = stream_time(on(split.first.stream, layers_of(lambda _: layer(), work.layers)))
    gemm_first *= 1e3
    graphs, graph_error = graph_check()
    result = dict(
        sms=[split.first.sms, split.second.sms], total_sms=split.total_sms, **equal,
        gemms_all_sms_ms=gemm_all, gemms_first_ms=gemm_first, graphs=graphs,
        graph_error=graph_error,
    )  # fmt: skip
    print(f"checks: {json.dumps(result)}", flush=True)
    return result


def graph_check() -> tuple[bool, str]:
    """Whether one CUDA graph can hold work queued on both partitions' streams. Tried in a
    child process: a capture the driver refuses can leave the streams unusable."""
    child = subprocess.run(
        [sys.executable, __file__, "--graph-check"], capture_output=True, text=True, timeout=300
    )
    if child.returncode == 0:
        return True, ""
    return False, (child.stdout + child.stderr).strip()[-400:]


def capture_both() -> None:
    """The child of graph_check: capture one layer's GEMMs on one partition beside the
    attention on the other, replay it, and check the replay's GEMM output."""
    work = Work(llama_shape(), 64, 512)
    rows = slice(0, 32)
    x, w = work.inputs[work.weights[2].shape[1]][rows], work.weights[2]
    want = F.linear(x, w)
    out = torch.zeros_like(want)
    with GreenSplit(GEMM_SMS[1]) as split:
        attend = planned(work, {"y": rows}, split.second.sms * PROGRAMS_PER_SM)
        replay = graphed(
            together(
                (split.first.stream, lambda: out.copy_(F.linear(x, w))),
                (split.second.stream, lambda: attend("y", 0)),
            )
        )
        out.zero_()
        replay()
        torch.cuda.synchronize()
    assert torch.equal(out, want), "the replayed GEMM differs"
    print("one graph holds both partitions' work")


def planned(work: Work, halves: dict[str, slice], programs: int | None, block_n=None):
    """attend(h, layer): the served attention over half h's rows and that layer's KV, planned
    once for `programs` persistent programs (None: the served count) and `block_n` keys a tile."""
    from alignedserve.worker.kernels.decode_attention import decode_attention
    from alignedserve.worker.kernels.decode_plan import plan_decode

    plans = {}
    for h, rows in halves.items():
        q, tables, ctx = work.q[rows], work.tables[rows], work.ctx[rows]
        plan = plan_decode(q, work.k_blocks[0], tables, ctx, num_programs=programs,
                           block_n=block_n)  # fmt: skip
        plans[h] = (q, tables, ctx, plan)

    def attend(h: str, layer: int) -> torch.Tensor:
        q, tables, ctx, plan = plans[h]
        return decode_attention(q, work.k_blocks[layer], work.v_blocks[layer], tables, ctx,
                                work.scale, plan=plan)  # fmt: skip

    return attend


def attention_sweep(
    shape: dict, timer: Timer, total: int, cells: list[tuple[int, int]], settings: list[tuple]
) -> list[dict]:
    """Part 1b: KV read per SM by the attention kernel over B rows x L keys (by default 128 x
    512, half of the 256 x 512 cell), per launch setting, on 36 and 52 SMs and on all."""
    out = []
    for batch, length in cells:
        work = Work(shape, batch, length)
        rows = {"y": slice(0, batch)}
        kv_bytes = batch * work.kv_bytes_per_row
        for attention_sms in (36, 52, total):
            split = GreenSplit(total - attention_sms) if attention_sms < total else None
            try:
                sms = split.second.sms if split else total
                for setting in settings:
                    warps, stages, block_n, per_sm = setting[:4]
                    with launch(setting):
                        attend = planned(work, rows, per_sm * sms, block_n)
                        run = layers_of(lambda la, attend=attend: attend("y", la), work.layers)
                        try:
                            ms = timer(on(split.second.stream, run) if split else run)
                        except Exception as err:  # a setting that fails to compile
                            print(f"  {setting}: {type(err).__name__}: {err}"[:200], flush=True)
                            continue
                    per_sm_gbs = kv_bytes / (ms / 1e3) / sms / 1e9
                    tma = len(setting) > 4 and bool(setting[4])
                    out.append(dict(batch=batch, kv_len=length, sms=sms, warps=warps,
                                    stages=stages, block_n=block_n, programs_per_sm=per_sm,
                                    tma=tma, ms=ms, gb_s_per_sm=per_sm_gbs))  # fmt: skip
                    print(
                        f"  {batch} x {length}: attention on {sms:3d} SMs, {warps} warps, "
                        f"{stages} stages, {block_n} keys a tile{', TMA' if tma else ''}, "
                        f"{per_sm} programs an SM: "
                        f"{ms:6.2f} ms, {kv_bytes / ms / 1e6:6.0f} GB/s, {per_sm_gbs:5.1f} GB/s "
                        "per SM",
                        flush=True,
                    )
            finally:
                if split:
                    split.close()
        del work
        torch.cuda.empty_cache()
    return out


def gemm_sweep(shape: dict, timer: Timer, total: int) -> list[dict]:
    """Part 1c: the four projections x 32 layers at M = 128 and 256 on G SMs, by torch's
    default cuBLAS and by cuBLASLt sized for G, against all SMs."""
    out = []
    for m in (128, 256):
        work = Work(shape, m, 16)
        layer = projections(work, slice(0, m))
        run = layers_of(lambda _, layer=layer: layer(), work.layers)
        whole = timer(run)
        with cublas_for(total, total):
            whole_lt = timer(run)
        print(f"M={m}: all {total} SMs, cuBLAS {whole:.2f} ms, cuBLASLt {whole_lt:.2f} ms",
              flush=True)  # fmt: skip
        for gemm_sms in GEMM_SMS:
            with GreenSplit(gemm_sms) as split:
                g = split.first
                default = timer(on(g.stream, run))
                with cublas_for(g.sms, total):
                    sized = timer(on(g.stream, run))
            ideal = whole * total / g.sms
            out.append(dict(m=m, sms=g.sms, all_sms_ms=whole, all_sms_lt_ms=whole_lt,
                            cublas_ms=default, cublaslt_ms=sized, scaled_ms=ideal))  # fmt: skip
            print(
                f"  on {g.sms:3d} SMs: cuBLAS {default:6.2f} ms, cuBLASLt sized for them "
                f"{sized:6.2f} ms; all SMs' time scaled by {total}/{g.sms}: {ideal:6.2f} ms",
                flush=True,
            )
        del work
        torch.cuda.empty_cache()
    return out


def probe_cell(
    shape: dict, batch: int, length: int, ceil: dict, timer: Timer, setting: tuple, lt: bool
) -> dict:
    """Parts 2 and 3 for one cell: the attention launched with `setting` on its partition,
    the GEMMs by cuBLASLt sized for theirs (`lt`) or by torch's default cuBLAS."""
    work = Work(shape, batch, length)
    layers, half = work.layers, batch // 2
    halves = {"x": slice(0, half), "y": slice(half, batch)}
    whole = slice(0, batch)
    full, gemm_whole = planned(work, {"all": whole}, None), projections(work, whole)
    now_gemms = timer(layers_of(lambda _: gemm_whole(), layers))
    now_attention = timer(layers_of(lambda layer: full("all", layer), layers))
    now = timer(layers_of(lambda layer: (gemm_whole(), full("all", layer)), layers))
    roof = work.roofline_ms(batch, ceil)
    print(
        f"B={batch} L={length} ({timer.mode}): roofline {roof:.2f} ms; now cuBLAS GEMMs "
        f"{now_gemms:.2f} + attention {now_attention:.2f}, in one step {now:.2f} ms "
        f"({100 * roof / now:.1f}%)",
        flush=True,
    )
    row = dict(batch=batch, kv_len=length, roofline_ms=roof, now_ms=now, now_gemms_ms=now_gemms,
               now_attention_ms=now_attention, setting=setting, cublaslt=lt, splits=[])  # fmt: skip
    gemm = {h: projections(work, rows) for h, rows in halves.items()}
    for gemm_sms in GEMM_SMS:
        with (
            GreenSplit(gemm_sms) as split,
            launch(setting),
            cublas_for(split.first.sms if lt else None, split.total_sms),
        ):
            g, a = split.first, split.second
            attend = planned(work, halves, a.sms * setting[3], setting[2])
            gemms_alone = timer(on(g.stream, layers_of(lambda _: gemm["x"](), layers)))
            y_attention = layers_of(lambda la, attend=attend: attend("y", la), layers)
            attention_alone = timer(on(a.stream, y_attention))
            both = timer(
                together(
                    (g.stream, layers_of(lambda _: gemm["x"](), layers)), (a.stream, y_attention)
                )
            )

            def step(attend=attend, g=g, a=a):
                for layer in range(layers):
                    for mine, other in (("x", "y"), ("y", "x")):
                        together(
                            (g.stream, gemm[mine]),
                            (a.stream, lambda other=other, layer=layer: attend(other, layer)),
                        )()

            piped = timer(step)
        split_row = dict(
            gemm_sms=g.sms, attention_sms=a.sms, gemms_half_ms=gemms_alone,
            attention_half_ms=attention_alone, both_ms=both,
            overlap=(gemms_alone + attention_alone) / both, pipelined_ms=piped,
            pipelined_fraction=roof / piped, speedup=now / piped,
        )  # fmt: skip
        row["splits"].append(split_row)
        print(
            f"  GEMMs on {g.sms:3d} SMs {gemms_alone:6.2f} | attention on {a.sms:3d} SMs "
            f"{attention_alone:6.2f} | at once {both:6.2f} ms ({split_row['overlap']:.2f}x "
            f"faster than their sum) | pipelined step {piped:6.2f} ms = "
            f"{100 * roof / piped:.1f}% of the roofline, {now / piped:.2f}x now",
            flush=True,
        )
    del work
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=[f"{b}x{length}" for b, length in CELLS],
        help="B x L cells (default: the four the grid misses)",
    )
    parser.add_argument("--eager", action="store_true", help="never capture graphs")
    parser.add_argument(
        "--parts", nargs="+", default=["sweep", "cells"], choices=["sweep", "cells"]
    )
    parser.add_argument(
        "--setting", default="", help="warps,stages,block_n,programs_per_sm of the attention "
        "for the cells (default: the sweep's best on 36 SMs, else the served launch)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-cells", nargs="+", default=["128x512"], help="B x L of the attention sweep"
    )
    parser.add_argument(
        "--sweep-settings", nargs="*", default=[],
        help="warps,stages,block_n,programs_per_sm[,tma] launches of the attention sweep "
        "(default: ten, the served one first; tma 1: TMA loads of whole blocks, block_n 16)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", nargs="*", default=["gemms"], choices=["gemms"], help="the GEMMs' sweep too"
    )
    parser.add_argument("--blas", nargs="+", default=["lt", "default"], choices=["lt", "default"])
    parser.add_argument("--graph-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.graph_check:
        capture_both()
        return
    ceil, sms = measured_device()
    shape = llama_shape()
    work = Work(shape, 256, 512)
    with GreenSplit(GEMM_SMS[1]) as split:
        check = checks(work, split)
    del work
    timer = Timer(check["graphs"] and not args.eager)
    result = dict(device=torch.cuda.get_device_name(), ceilings=ceil, checks=check,
                  timing=timer.mode)  # fmt: skip
    setting = SETTINGS[0]
    if "sweep" in args.parts:
        cells = [tuple(map(int, c.split("x"))) for c in args.sweep_cells]
        settings = [tuple(int(v) for v in t.split(",")) for t in args.sweep_settings]
        result["attention"] = attention_sweep(shape, timer, sms, cells, settings or SETTINGS)
        if "gemms" in args.sweep:
            result["gemms"] = gemm_sweep(shape, timer, sms)
        few = [r for r in result["attention"] if r["sms"] == 36 and r["kv_len"] == cells[0][1]]
        best = max(few, key=lambda r: r["gb_s_per_sm"])
        setting = (best["warps"], best["stages"], best["block_n"], best["programs_per_sm"],
                   int(best["tma"]))  # fmt: skip
    if args.setting:
        setting = tuple(int(v) for v in args.setting.split(","))
    print(f"attention launch for the cells: {setting}", flush=True)
    result["cells"] = [
        probe_cell(shape, *map(int, c.split("x")), ceil, timer, setting, blas == "lt")
        for blas in args.blas
        for c in args.cells
        if "cells" in args.parts
    ]
    (Path(args.out) / "green_overlap_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
