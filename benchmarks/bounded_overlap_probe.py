"""Can a decode step's GEMMs share the GPU with its attention if the GEMMs leave SMs free?

    python3 benchmarks/bounded_overlap_probe.py --out "$OUT"   # one GPU, ~3 min

The fortieth session's overlap_probe.py found no overlap between one half-batch's cuBLAS GEMMs
and the other half's attention on two streams: cuBLAS takes every SM, and torch's SM carveout
did not change its kernels. This probe puts a GEMM in their place that launches a given number
of persistent programs (bounded_gemm.py), and asks in turn:

1. How fast is it against cuBLAS at the decode step's shapes (Llama-3-8B's fused qkv, o,
   gate_up and down at M = 64-512), over every SM, with the best of a few tile shapes?
2. With it on G SMs and the attention's persistent programs on A SMs' worth, what does each
   take alone, and what do they take launched together on two streams?
3. The nano-batch pipeline those allow: per layer, half X's GEMMs beside half Y's attention,
   then the other way round (two phases, joined by events, 32 layers). Its time against the
   step it would replace (cuBLAS GEMMs over B rows, then attention over B rows) and against
   the roofline. Small ops (norms, RoPE, SiLU) are left out on both sides.

Results also go to OUT/bounded_overlap_probe.json.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import torch.nn.functional as F
from bounded_gemm import GemmTiles, persistent_linear
from gpu_bench import cuda_time
from overlap_probe import CELLS, Work, llama_shape, measured_device, side_by_side

from alignedserve.worker.kernels.decode_plan import PROGRAMS_PER_SM

TILES = [
    GemmTiles(128, 128, 64, num_stages=4, num_warps=8),
    GemmTiles(128, 128, 64, num_stages=4, num_warps=4),
    GemmTiles(128, 256, 64, num_stages=3, num_warps=8),
    GemmTiles(128, 64, 64, num_stages=4, num_warps=4),
    GemmTiles(64, 128, 64, num_stages=4, num_warps=4),
    GemmTiles(128, 128, 64, num_stages=2, num_warps=8),  # lean: room for attention beside
    GemmTiles(128, 128, 64, num_stages=4, num_warps=8, warp_specialize=True),
    GemmTiles(128, 256, 64, num_stages=3, num_warps=8, warp_specialize=True),
]
# (SMs the GEMMs' programs cover, SMs' worth of attention programs); None: all SMs
SPLITS = [(None, None), (100, 32), (88, 44), (66, 66)]


def tile_name(t: GemmTiles) -> str:
    ws = " ws" if t.warp_specialize else ""
    return f"{t.block_m}x{t.block_n}x{t.block_k} s{t.num_stages} w{t.num_warps}{ws}"


class Gemms:
    """The layer's four projections at M rows x layers, by cuBLAS or by the bounded GEMM
    with the fastest tile per projection at that program count (picked by timing)."""

    def __init__(self, work: Work, rows: slice):
        self.work, self.layers = work, work.layers
        self.x = [work.inputs[w.shape[1]][rows].contiguous() for w in work.weights]
        self.out = [x.new_empty(x.shape[0], w.shape[0]) for x, w in
                    zip(self.x, work.weights, strict=True)]  # fmt: skip
        self.best: dict[int, list[GemmTiles]] = {}

    def cublas(self):
        def run():
            for _ in range(self.layers):
                for x, w in zip(self.x, self.work.weights, strict=True):
                    F.linear(x, w)

        return run

    def one(self, i: int, programs: int, tiles: GemmTiles, layers: int):
        x, w, out = self.x[i], self.work.weights[i], self.out[i]

        def run():
            for _ in range(layers):
                persistent_linear(x, w, programs, tiles, out=out)

        return run

    def pick(self, programs: int) -> list[dict]:
        """The fastest tile of each projection at this program count; rows for the table."""
        rows, best = [], []
        for i, w in enumerate(self.work.weights):
            x = self.x[i]
            cublas = gpu_ms(lambda x=x, w=w: [F.linear(x, w) for _ in range(self.layers)])
            times = {}
            for tiles in TILES:
                try:
                    times[tiles] = gpu_ms(self.one(i, programs, tiles, self.layers))
                except Exception as err:  # a tile that does not compile or fit: skip it
                    print(f"    {tile_name(tiles)}: {type(err).__name__}: {err}"[:160])
            fastest = min(times, key=times.get)
            best.append(fastest)
            rows.append(
                dict(
                    m=x.shape[0], n=w.shape[0], k=w.shape[1], programs=programs,
                    cublas_ms=cublas, ours_ms=times[fastest],
                    tiles=tile_name(fastest),
                    all_ms={tile_name(t): s for t, s in times.items()},
                )
            )  # fmt: skip
        self.best[programs] = best
        return rows

    def bounded(self, programs: int, layers: int):
        """The four projections x layers, each with its picked tile at `programs`."""
        best = self.best[programs]

        def run():
            for _ in range(layers):
                for i, tiles in enumerate(best):
                    persistent_linear(self.x[i], self.work.weights[i], programs, tiles,
                                      out=self.out[i])  # fmt: skip

        return run


def graphed(fn):
    """fn captured once into a CUDA graph, as a decode step is served: timing its launches
    from Python would time the host (three descriptors and a launch per GEMM)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def gpu_ms(fn) -> float:
    return cuda_time(graphed(fn)) * 1e3


def pipeline(gemms: dict, attention: dict, layers: int, attention_first: bool):
    """Two halves, X and Y, per layer: X's GEMMs beside Y's attention, then Y's GEMMs beside
    X's attention; each phase starts when both kernels of the one before have ended. The
    kernel launched first is placed first: a GEMM that fills the SMs leaves the attention
    only what it does not hold."""
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def run():
        here = torch.cuda.current_stream()
        for layer in range(layers):
            for g, a in (("x", "y"), ("y", "x")):
                for stream in streams:
                    stream.wait_stream(here)
                launches = [gemms[g], functools.partial(attention[a], layer)]
                if attention_first:
                    launches.reverse()
                for stream, launch in zip(streams, launches, strict=True):
                    with torch.cuda.stream(stream):
                        launch()
                for stream in streams:
                    here.wait_stream(stream)

    return run


def attender(work: Work, halves: dict[str, slice], programs: int):
    """attend(h, layer): the served decode attention over half h's rows and that layer's
    KV, planned once for `programs` persistent programs."""
    from alignedserve.worker.kernels.decode_attention import decode_attention
    from alignedserve.worker.kernels.decode_plan import plan_decode

    plans = {}
    for h, rows in halves.items():
        q, tables, ctx = work.q[rows], work.tables[rows], work.ctx[rows]
        plan = plan_decode(q, work.k_blocks[0], tables, ctx, num_programs=programs)
        plans[h] = (q, tables, ctx, plan)

    def attend(h: str, layer: int) -> None:
        q, tables, ctx, plan = plans[h]
        k, v = work.k_blocks[layer], work.v_blocks[layer]
        decode_attention(q, k, v, tables, ctx, work.scale, plan=plan)

    return attend


def probe_cell(shape: dict, batch: int, length: int, ceil: dict, sms: int) -> dict:
    work = Work(shape, batch, length)
    layers, half = work.layers, batch // 2
    halves = {"x": slice(0, half), "y": slice(half, batch)}
    whole = Gemms(work, slice(0, batch))
    now_gemms = gpu_ms(whole.cublas())
    now_attention = gpu_ms(work.attention(slice(0, batch), None))
    now = now_gemms + now_attention
    roof = work.roofline_ms(batch, ceil)
    print(
        f"B={batch} L={length}: roofline {roof:.2f} ms; now cuBLAS GEMMs {now_gemms:.2f} + "
        f"attention {now_attention:.2f} = {now:.2f} ms ({100 * roof / now:.1f}%)",
        flush=True,
    )
    row = dict(batch=batch, kv_len=length, roofline_ms=roof, now_ms=now,
               now_gemms_ms=now_gemms, now_attention_ms=now_attention, splits=[])  # fmt: skip
    gemms = {h: Gemms(work, rows) for h, rows in halves.items()}
    for gemm_sms, attention_sms in SPLITS:
        g_programs = gemm_sms or sms
        a_programs = (attention_sms or sms) * PROGRAMS_PER_SM
        if g_programs not in gemms["x"].best:
            gemms["x"].pick(g_programs)  # the halves have one shape: y takes x's tiles
        gemms["y"].best = gemms["x"].best
        attend = attender(work, halves, a_programs)

        def attention_all(h: str, attend=attend):
            return lambda: [attend(h, layer) for layer in range(layers)]

        gemms_alone = gpu_ms(gemms["x"].bounded(g_programs, layers))
        cublas_half = gpu_ms(gemms["x"].cublas())
        attention_alone = gpu_ms(attention_all("y"))
        both = gpu_ms(side_by_side(gemms["x"].bounded(g_programs, layers), attention_all("y")))
        both_a = gpu_ms(side_by_side(attention_all("y"), gemms["x"].bounded(g_programs, layers)))
        piped, piped_a = (
            gpu_ms(
                pipeline(
                    {h: g.bounded(g_programs, 1) for h, g in gemms.items()},
                    {h: functools.partial(attend, h) for h in halves},
                    layers,
                    attention_first,
                )
            )
            for attention_first in (False, True)
        )
        split = dict(
            gemm_sms=g_programs, attention_sms=a_programs // PROGRAMS_PER_SM,
            gemms_half_ms=gemms_alone, cublas_half_ms=cublas_half,
            attention_half_ms=attention_alone, both_ms=both,
            overlap=(gemms_alone + attention_alone) / both, pipelined_ms=piped,
            pipelined_fraction=roof / piped, speedup=now / piped,
            attention_first_both_ms=both_a, attention_first_pipelined_ms=piped_a,
        )  # fmt: skip
        row["splits"].append(split)
        print(
            f"  GEMMs on {g_programs:3d} SMs {gemms_alone:6.2f} (cuBLAS, all {cublas_half:6.2f})"
            f" | attention on {split['attention_sms']:3d} SMs' programs {attention_alone:6.2f}"
            f" | at once {both:6.2f} ms ({split['overlap']:.2f}x their sum) | pipelined step "
            f"{piped:6.2f} ms = {100 * roof / piped:.1f}% of the roofline, {now / piped:.2f}x now"
            f" | attention launched first: at once {both_a:6.2f}, pipelined {piped_a:6.2f} ms",
            flush=True,
        )
    del work, whole, gemms
    torch.cuda.empty_cache()
    return row


def gemm_table(shape: dict, sms: int) -> list[dict]:
    """Part 1: the bounded GEMM over every SM against cuBLAS, per projection and M."""
    rows = []
    for m in (64, 128, 256, 512):
        work = Work(shape, m, 16)
        got = Gemms(work, slice(0, m)).pick(sms)
        for r in got:
            print(
                f"M={m:3d} N={r['n']:5d} K={r['k']:5d}: cuBLAS {r['cublas_ms']:6.3f} ms, "
                f"bounded GEMM on all SMs {r['ours_ms']:6.3f} ms ({r['tiles']}), "
                f"{r['ours_ms'] / r['cublas_ms']:.2f}x",
                flush=True,
            )
        total_c = sum(r["cublas_ms"] for r in got)
        total_o = sum(r["ours_ms"] for r in got)
        print(f"M={m:3d} all four x 32 layers: cuBLAS {total_c:.2f} ms, ours {total_o:.2f} ms "
              f"({total_o / total_c:.2f}x)", flush=True)  # fmt: skip
        rows += got
        del work
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip-table", action="store_true", help="skip part 1")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=[f"{b}x{length}" for b, length in CELLS],
        help="B x L cells of parts 2-3 (default: the four the grid misses)",
    )
    args = parser.parse_args()
    ceil, sms = measured_device()
    shape = llama_shape()
    table = [] if args.skip_table else gemm_table(shape, sms)
    cells = [probe_cell(shape, *map(int, c.split("x")), ceil, sms) for c in args.cells]
    result = dict(device=torch.cuda.get_device_name(), ceilings=ceil, gemms=table, cells=cells)
    (Path(args.out) / "bounded_overlap_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
