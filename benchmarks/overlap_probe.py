"""Can a decode step's GEMMs and its attention share the GPU? A probe for issue 5's last cells.

    python3 benchmarks/overlap_probe.py --out "$OUT"   # one GPU, ~1 min

Four cells of the Llama-3-8B decode grid stay under 75 % of the roofline (128 x 512,
256 x 512, 512 x 512, 512 x 1024; docs/benchmarks.md): there the projections are
compute-bound and the attention memory-bound, and a step runs one after the other, so it
takes about their sum where the roofline is their max. Splitting the batch in two halves
and running one half's GEMMs beside the other half's attention (two streams, the halves
alternating layer by layer) could approach the max, if the GPU can run both at once.

For each cell this times, with random bf16 weights and KV of the Llama-3-8B shape:
- the layer's GEMMs as served at M > 32 (F.linear: fused qkv, o, gate_up, down) x layers,
  at M = B and M = B / 2;
- the served decode attention kernel over B and B / 2 rows x layers, on one plan;
- one half's GEMMs and the other half's attention launched together on two streams, with
  the attention's persistent programs and cuBLAS's SMs (torch's SM carveout) split in
  several ways.
Printed: now (GEMMs(B) + attention(B)), the two halves at once, 2 x that (a bound on the
pipelined step, its dependencies left out), and each against the roofline of the same work.
Results also go to OUT/overlap_probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
import torch.nn.functional as F
from gpu_bench import FULL_SIZE, ceilings, cuda_time

from alignedserve.worker.kernels.decode_attention import decode_attention
from alignedserve.worker.kernels.decode_plan import PROGRAMS_PER_SM, plan_decode
from alignedserve.worker.kernels.device import num_sms

CELLS = [(128, 512), (256, 512), (512, 512), (512, 1024)]
BLOCK_TOKENS = 16
# (attention programs as SMs' worth, SMs cuBLAS leaves out); None: all of them
SPLITS = [(None, None), (66, None), (33, None), (66, 66), (33, 33), (20, 20)]


def llama_shape() -> dict:
    full = FULL_SIZE["llama3-8b"]
    hidden, heads = full["hidden_size"], full["num_attention_heads"]
    return dict(
        hidden=hidden,
        inter=full["intermediate_size"],
        layers=full["num_hidden_layers"],
        heads=heads,
        kv_heads=full["num_key_value_heads"],
        head_dim=hidden // heads,
    )


class Work:
    """One cell's inputs: the layer's weights, activations for B rows, the KV blocks."""

    def __init__(self, shape: dict, batch: int, length: int):
        h, i, d = shape["hidden"], shape["inter"], shape["head_dim"]
        qkv = (shape["heads"] + 2 * shape["kv_heads"]) * d
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        self.layers = shape["layers"]
        self.weights = [torch.randn(o, k, **bf16) * 0.02 for o, k in
                        ((qkv, h), (h, h), (2 * i, h), (h, i))]  # fmt: skip
        self.inputs = {k: torch.randn(batch, k, **bf16) for k in (h, i)}
        per = length // BLOCK_TOKENS
        # each layer its own blocks, as in a model: one layer's KV read 32 times would be
        # partly served from L2 (50 MB) at the small cells
        blocks = (self.layers, batch * per, BLOCK_TOKENS, shape["kv_heads"], d)
        self.k_blocks = torch.empty(blocks, **bf16).normal_()
        self.v_blocks = torch.empty(blocks, **bf16).normal_()
        self.tables = torch.arange(batch * per, device="cuda").view(batch, per)
        self.ctx = torch.full((batch,), length, dtype=torch.long, device="cuda")
        self.q = torch.randn(batch, shape["heads"], d, **bf16)
        self.scale = d**-0.5
        self.flops_per_row = 2 * sum(w.numel() for w in self.weights) * self.layers
        self.weight_bytes = 2 * sum(w.numel() for w in self.weights) * self.layers
        self.kv_bytes_per_row = 2 * 2 * length * shape["kv_heads"] * d * self.layers

    def gemms(self, rows: slice):
        def run():
            for _ in range(self.layers):
                for w in self.weights:
                    F.linear(self.inputs[w.shape[1]][rows], w)

        return run

    def attention(self, rows: slice, programs: int | None):
        q, tables, ctx = self.q[rows], self.tables[rows], self.ctx[rows]
        plan = plan_decode(q, self.k_blocks[0], tables, ctx, num_programs=programs)

        def run():
            for layer in range(self.layers):
                k, v = self.k_blocks[layer], self.v_blocks[layer]
                decode_attention(q, k, v, tables, ctx, self.scale, plan=plan)

        return run

    def roofline_ms(self, rows: int, ceil: dict) -> float:
        memory = (self.weight_bytes + rows * self.kv_bytes_per_row) / ceil["hbm_read_bytes_per_s"]
        compute = rows * self.flops_per_row / ceil["matmul_flops_per_s"]
        return max(memory, compute) * 1e3


def side_by_side(first, second):
    """first() and second() launched together on two streams."""
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def run():
        here = torch.cuda.current_stream()
        for stream, fn in zip(streams, (first, second), strict=True):
            stream.wait_stream(here)
            with torch.cuda.stream(stream):
                fn()
        for stream in streams:
            here.wait_stream(stream)

    return run


def carveout(sms: int | None) -> None:
    torch._C._set_sm_carveout_experimental(sms)


def probe_cell(shape: dict, batch: int, length: int, ceil: dict, sms: int) -> dict:
    work = Work(shape, batch, length)
    half = batch // 2
    whole, first, second = slice(0, batch), slice(0, half), slice(half, batch)
    ms = {
        "gemms_B": cuda_time(work.gemms(whole)) * 1e3,
        "attention_B": cuda_time(work.attention(whole, None)) * 1e3,
        "gemms_half": cuda_time(work.gemms(first)) * 1e3,
        "attention_half": cuda_time(work.attention(second, None)) * 1e3,
    }
    now = ms["gemms_B"] + ms["attention_B"]
    roof = work.roofline_ms(batch, ceil)
    row = dict(batch=batch, kv_len=length, roofline_ms=roof, now_ms=now, **ms, splits=[])
    print(
        f"B={batch} L={length}: roofline {roof:.2f} ms; now GEMMs {ms['gemms_B']:.2f} + "
        f"attention {ms['attention_B']:.2f} = {now:.2f} ms ({100 * roof / now:.0f}%); "
        f"halves alone: GEMMs {ms['gemms_half']:.2f}, attention {ms['attention_half']:.2f}",
        flush=True,
    )
    for attention_sms, gemm_carveout in SPLITS:
        programs = None if attention_sms is None else attention_sms * PROGRAMS_PER_SM
        attention = work.attention(second, programs)
        carveout(gemm_carveout)
        try:
            both = cuda_time(side_by_side(work.gemms(first), attention)) * 1e3
            gemms_alone = cuda_time(work.gemms(first)) * 1e3
        finally:
            carveout(None)
        attention_alone = cuda_time(attention) * 1e3
        pipelined = 2 * both
        split = dict(
            attention_sms=attention_sms or sms,
            gemm_carveout=gemm_carveout or 0,
            both_ms=both,
            gemms_alone_ms=gemms_alone,
            attention_alone_ms=attention_alone,
            pipelined_bound_ms=pipelined,
            pipelined_fraction=roof / pipelined,
        )
        row["splits"].append(split)
        print(
            f"  attention on {split['attention_sms']:3d} SMs' programs, cuBLAS leaving "
            f"{split['gemm_carveout']:2d} SMs: GEMMs {gemms_alone:.2f} | attention "
            f"{attention_alone:.2f} | at once {both:.2f} ms; 2x = {pipelined:.2f} ms "
            f"({100 * roof / pipelined:.0f}% of the roofline, {now / pipelined:.2f}x now)",
            flush=True,
        )
    del work
    torch.cuda.empty_cache()
    return row


def measured_device() -> tuple[dict, int]:
    """This GPU's ceilings (measured now) and SM count, printed as a header."""
    ceil = ceilings()
    sms = num_sms(torch.cuda.current_device())
    print(
        f"{torch.cuda.get_device_name()} ({sms} SMs): matmul "
        f"{ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, HBM read "
        f"{ceil['hbm_read_bytes_per_s'] / 1e9:.0f} GB/s",
        flush=True,
    )
    return ceil, sms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    ceil, sms = measured_device()
    shape = llama_shape()
    rows = [probe_cell(shape, b, length, ceil, sms) for b, length in CELLS]
    result = dict(device=torch.cuda.get_device_name(), ceilings=ceil, cells=rows)
    (Path(args.out) / "overlap_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
