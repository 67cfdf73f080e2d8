"""How well the simulator's decode-step cost fits a measured decode grid (gpu_bench.py's JSON).

The simulator charges a decode step its HBM traffic (weights and every member's KV) at the
read rate plus its FLOPs at the matmul rate: the projections and attention run one after
the other (services/batcher/sim/cost_model.py). Here both rates are the run's own measured
ceilings, so the ratio shows the model's shape, not a drift of the machine.

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
    peak = GpuSpec(
        hbm_read_bytes_per_s=ceilings["hbm_read_bytes_per_s"],
        matmul_flops_per_s=ceilings["matmul_flops_per_s"],
    )
    sim = CostModel(SHAPES[shape], peak, padded=False)  # the grid's members all have one length
    print("| batch | KV length | measured ms | simulated ms | simulated ÷ measured |")
    print("|---|---|---|---|---|")
    logs = []
    for cell in result["decode"]["grid"]:
        b, length, measured_ms = cell["batch"], cell["kv_len"], cell["graph_ms"]
        sim_ms = sim.decode_step_s([length] * b) * 1e3
        logs.append(math.log(sim_ms / measured_ms))
        print(f"| {b} | {length} | {measured_ms:.2f} | {sim_ms:.2f} | {sim_ms / measured_ms:.2f} |")
    print(f"mean |log(simulated / measured)| = {sum(map(abs, logs)) / len(logs):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
