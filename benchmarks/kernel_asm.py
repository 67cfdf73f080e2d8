"""The served decode attention kernel as Triton compiled it: registers, spills, shared memory,
and what its PTX is made of (async copies, tensor-core instructions, barriers).

    python3 benchmarks/kernel_asm.py --out "$OUT"   # one GPU, seconds

It runs the kernel once at the Llama-3-8B layer (B requests x L keys, overlap_probe.Work),
prints the counts, and writes the PTX and the TTGIR (Triton's GPU-level IR, where the
pipeliner's buffers show as `memdesc<stages x ...>`) to OUT.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
from overlap_probe import Work, llama_shape

# PTX instructions counted: async copies (cp.async; TMA is cp.async.bulk), tensor cores
# (mma.sync; Hopper's wgmma), barriers (mbarrier: TMA's and warp specialisation's; bar.sync)
INSTRUCTIONS = ["cp.async", "cp.async.bulk", "ld.global", "mma.sync", "wgmma", "mbarrier",
                "bar.sync"]  # fmt: skip


def compiled_kernels(jit_function) -> list:
    """The kernels a @triton.jit function has compiled so far (Triton 3.6's caches)."""
    found = []
    for entry in jit_function.device_caches.values():
        for part in entry:
            if isinstance(part, dict):
                found += [c for c in part.values() if hasattr(c, "asm")]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--cell", default="64x512", help="B x L")
    args = parser.parse_args()
    dam = importlib.import_module("alignedserve.worker.kernels.decode_attention")
    batch, length = map(int, args.cell.split("x"))
    work = Work(llama_shape(), batch, length)
    rows = slice(0, batch)
    dam.decode_attention(work.q[rows], work.k_blocks[0], work.v_blocks[0], work.tables[rows],
                         work.ctx[rows], work.scale)  # fmt: skip
    torch.cuda.synchronize()
    report = []
    for i, kernel in enumerate(compiled_kernels(dam._decode_attention_kernel)):
        ptx = kernel.asm["ptx"]
        row = dict(
            registers=kernel.n_regs,
            spills=kernel.n_spills,
            shared_bytes=kernel.metadata.shared,
            ptx_counts={name: len(re.findall(re.escape(name), ptx)) for name in INSTRUCTIONS},
        )
        report.append(row)
        print(json.dumps(row), flush=True)
        (Path(args.out) / f"attn{i}.ptx").write_text(ptx)
        (Path(args.out) / f"attn{i}.ttgir").write_text(kernel.asm.get("ttgir", ""))
    (Path(args.out) / "kernel_asm.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
