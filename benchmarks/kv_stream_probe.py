"""How fast can a kernel read paged KV per SM? The decode attention's loads without its math.

    python3 benchmarks/kv_stream_probe.py --out "$OUT"   # one GPU, ~1 min

The forty-third session found the served decode attention reading ~34 GB/s of KV per SM on a
green-context partition, whatever its launch (green_overlap_probe.py): it needs ~120 SMs to
reach HBM's ~4.2 TB/s, which leaves nothing for GEMMs beside it. This asks whether the loads
themselves, addressed as the attention addresses them (each key's block looked up in the
request's table, one kv head's row of D values per key), can go faster per SM, and with which
launch: a persistent kernel over (request, kv head) items that loads each tile's K and V and
only sums them. Timed on 36 and 52 SMs (green_split.py) and on all of them, for B requests x L
keys of Llama-3-8B's KV shape; each layer its own blocks, as in overlap_probe.Work.

Results also go to OUT/kv_stream_probe.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import triton
import triton.language as tl
from green_overlap_probe import Timer, layers_of, on
from green_split import GreenSplit
from overlap_probe import BLOCK_TOKENS, Work, llama_shape, measured_device


@triton.jit
def _stream_kv(
    k_ptr, v_ptr, tables_ptr, out_ptr, num_items, tiles, kv_heads,
    stride_kb, stride_kt, stride_kh, stride_tb,
    BLOCK_N: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for item in range(pid, num_items, tl.num_programs(0)):
        b = item // kv_heads
        head = item % kv_heads
        for tile in range(tiles):
            pos = tile * BLOCK_N + offs_n
            block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_TOKENS).to(tl.int64)
            rows = block * stride_kb + (pos % BLOCK_TOKENS) * stride_kt + head * stride_kh
            k = tl.load(k_ptr + rows[:, None] + offs_d[None, :])
            v = tl.load(v_ptr + rows[:, None] + offs_d[None, :])
            acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), 0)
    tl.store(out_ptr + pid * HEAD_DIM + offs_d, acc)


# (keys a tile, warps, pipeline stages, programs per SM)
LAUNCHES = list(itertools.product((64, 128), (4, 8), (2, 4), (2, 4, 8)))


def stream(work: Work, batch: int, length: int, launch: tuple, sms: int):
    block_n, warps, stages, per_sm = launch
    programs = per_sm * sms
    out = torch.empty(programs, work.q.shape[-1], device="cuda")
    k0 = work.k_blocks[0]

    def run(layer: int) -> None:
        k, v = work.k_blocks[layer], work.v_blocks[layer]
        _stream_kv[(programs,)](
            k, v, work.tables, out, batch * k0.shape[2], length // block_n, k0.shape[2],
            k.stride(0), k.stride(1), k.stride(2), work.tables.stride(0),
            BLOCK_N=block_n, BLOCK_TOKENS=BLOCK_TOKENS, HEAD_DIM=k0.shape[3],
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return layers_of(run, work.layers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--cell", default="128x512", help="B x L")
    args = parser.parse_args()
    _, total = measured_device()
    batch, length = map(int, args.cell.split("x"))
    work = Work(llama_shape(), batch, length)
    kv_bytes = batch * work.kv_bytes_per_row
    timer = Timer(True)
    rows = []
    for attention_sms in (36, 52, total):
        split = GreenSplit(total - attention_sms) if attention_sms < total else None
        sms = split.second.sms if split else total
        try:
            for launch in LAUNCHES:
                run = stream(work, batch, length, launch, sms)
                ms = timer(on(split.second.stream, run) if split else run)
                per_sm = kv_bytes / (ms / 1e3) / sms / 1e9
                rows.append(dict(sms=sms, launch=launch, ms=ms, gb_s_per_sm=per_sm))
                print(
                    f"{batch} x {length} on {sms:3d} SMs, {launch[0]:3d} keys a tile, "
                    f"{launch[1]} warps, {launch[2]} stages, {launch[3]} programs an SM: "
                    f"{ms:6.2f} ms, {kv_bytes / ms / 1e6:6.0f} GB/s, {per_sm:5.1f} GB/s per SM",
                    flush=True,
                )
        finally:
            if split:
                split.close()
    (Path(args.out) / "kv_stream_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
