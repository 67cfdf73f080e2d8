"""How well two decode-step cost models fit a measured decode grid (gpu_bench.py's JSON).

- max: the simulator's model, max(memory time, compute time) at its efficiencies;
- sum: memory time + compute time at the run's own measured ceilings (weights and KV at the
  HBM read rate, then the FLOPs at the matmul rate: the projections and attention run one
  after the other).

.venv/bin/python benchmarks/sim_grid_fit.py docs/results/session11/gpu_bench_call2.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from alignedserve.batcher.sim.cost_model import SHAPES, CostModel, GpuSpec


def main(path: str, shape: str = "llama3-8b") -> None:
    result = json.loads(Path(path).read_text())
    ceilings = result["ceilings"]
    m = SHAPES[shape]
    sim = CostModel(m, padded=False)  # the grid's members all have one length
    peak = GpuSpec(
        hbm_read_bytes_per_s=ceilings["hbm_read_bytes_per_s"],
        matmul_flops_per_s=ceilings["matmul_flops_per_s"],
    )
    print("| batch | KV length | measured ms | max model ÷ measured | sum model ÷ measured |")
    print("|---|---|---|---|---|")
    logs = {"max": [], "sum": []}
    for cell in result["decode"]["grid"]:
        b, length, measured_ms = cell["batch"], cell["kv_len"], cell["graph_ms"]
        max_ms = sim.decode_step_s([length] * b) * 1e3
        memory_s = (m.weight_bytes + b * length * m.kv_bytes_per_token) / peak.hbm_read_bytes_per_s
        flops = b * (m.linear_flops_per_token + length * m.attention_flops_per_kv_token)
        sum_ms = (memory_s + flops / peak.matmul_flops_per_s) * 1e3
        logs["max"].append(math.log(max_ms / measured_ms))
        logs["sum"].append(math.log(sum_ms / measured_ms))
        print(
            f"| {b} | {length} | {measured_ms:.2f} | {max_ms / measured_ms:.2f} "
            f"| {sum_ms / measured_ms:.2f} |"
        )
    for name, values in logs.items():
        mean = sum(abs(v) for v in values) / len(values)
        print(f"{name}: mean |log(model / measured)| = {mean:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
