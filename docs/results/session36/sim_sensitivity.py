"""How far the simulator's OPT-13B predictions move when its decode steps are as slow as the
served ones: HBM reads at a share of the measured ceiling, and a host gap per step. Thirty-
sixth session, CPU machine: `.venv/bin/python docs/results/session36/sim_sensitivity.py`."""

import dataclasses

from alignedserve.batcher.sim.cost_model import SHAPES, CostModel, GpuSpec
from alignedserve.batcher.sim.simulator import configs_for, simulate
from alignedserve.batcher.sim.workload import WORKLOADS

SPECS = {
    "as is": GpuSpec(),
    "HBM 90 %": dataclasses.replace(
        GpuSpec(), hbm_read_bytes_per_s=0.9 * GpuSpec().hbm_read_bytes_per_s
    ),
    "HBM 90 %, 1 ms gap": dataclasses.replace(
        GpuSpec(), hbm_read_bytes_per_s=0.9 * GpuSpec().hbm_read_bytes_per_s, step_overhead_s=1e-3
    ),
}
CELLS = [(160, None), (400, None), (400, 14.0)]


def main() -> None:
    print("spec | requests | load | aligned tok/s, p99 TPOT ms | fcfs tok/s, p99 TPOT ms")
    for name, gpu in SPECS.items():
        cost = CostModel(SHAPES["opt-13b"], gpu=gpu, padded=False)
        for n, rate in CELLS:
            requests = WORKLOADS["paper-90"](n, 0, rate)
            row = {}
            for policy, config in configs_for(cost, 160 * 2**30).items():
                s = simulate(requests, config, cost)
                row[policy] = f"{s.throughput_tok_s:,.0f}, {1e3 * s.tpot_p99_s:.1f}"
            load = "offline" if rate is None else f"{rate:g} req/s"
            print(f"{name} | {n} | {load} | {row['aligned']} | {row['fcfs']}", flush=True)


if __name__ == "__main__":
    main()
