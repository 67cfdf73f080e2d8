"""The simulator with its decode step calibrated on served steps, against the served end-to-end
results of every cell the thirty-second to thirty-sixth sessions served (2xH200, paper-90,
seed 0, balanced cost as `docs/results/session36/sim_sensitivity.py`). CPU machine:

    .venv/bin/python docs/results/session37/calibration/sim_calibrated.py

Specs (`benchmarks/sim_calibrate.py` fits them on the sessions' archives):
- as is: the defaults;
- calibrated: HBM efficiency and a fixed device time fitted over both models, plus the host's
  median gap between steps, in `step_overhead_s` (no new knob);
- graph batch: no fitted term, pure decode steps priced at the CUDA graph's batch (a knob
  the cost model lacks: `proposed.patch`), plus the gap;
- graph batch, own fixed: the same with each model's own fixed time (a diagnostic, not one
  calibration: how close the simulator gets when each model's steps are right).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignedserve.batcher.sim.cost_model import CostModel
from alignedserve.batcher.sim.simulator import configs_for, simulate
from alignedserve.batcher.sim.workload import WORKLOADS

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sim_calibrate  # noqa: E402  (a sibling script, not a package)

RESULTS = ROOT / "docs" / "results"
ARCHIVES = sorted(RESULTS.glob("session3[3-6]/*gpu_e2e_*.tar.gz"))  # power-of-two graphs
CALLS = sorted(RESULTS.glob("session3[2-6]/*gpu_e2e_*.json"))


@dataclass(frozen=True)
class Cell:
    model: str
    num_requests: int
    rate: float | None  # requests/s; None: offline
    pool_gib: float

    @property
    def load(self) -> str:
        return "offline" if self.rate is None else f"{self.rate:g} req/s"


@dataclass(frozen=True)
class Run:
    cell: Cell
    policy: str  # the simulator's: aligned | fcfs
    source: str
    tok_s: float
    tpot_p99_s: float


def today_aligned(policies: list[str]) -> str:
    """The variant of a call that made today's aligned decisions: where a call also ran
    aligned-fewestleft (session 32), its `aligned` had the old fit-groups order; where it ran
    aligned-flatwait (session 35), its `aligned` carried the per-token wait bound (not kept)."""
    for variant in ("aligned-fewestleft", "aligned-flatwait"):
        if variant in policies:
            return variant
    return "aligned"


def served_runs(path: Path) -> Iterator[Run]:
    """Every finished run of a call's report JSON that the simulator models; fcfs-dp2
    (round-robin split, like the simulator's two engines) and the aligned variant above, and
    aligned-pool80 as aligned with an 80 GiB pool. Runs with unfinished requests are left out."""
    call = json.loads(path.read_text())
    config = call["config"]
    aligned = today_aligned(config["policies"])
    for result in call["cells"]:
        rate = None if result["load"].startswith("offline") else float(result["load"].split()[0])
        for variant, policy, pool_gib in (
            (aligned, "aligned", config["pool_gib"]),
            ("aligned-pool80", "aligned", 80.0),
            ("fcfs-dp2", "fcfs", config["pool_gib"]),
        ):
            got = result.get(variant)
            if got is None or got["num_failed"]:
                continue
            cell = Cell(call["model_shape"], config["num_requests"], rate, float(pool_gib))
            source = f"{path.parent.name}/{path.stem} {result['load']} {variant}"
            yield Run(cell, policy, source, got["output_tokens_per_s"], got["p99_tpot_s"])


def specs(
    windows: list[sim_calibrate.Window],
) -> tuple[dict[str, Callable[[str], CostModel]], dict[str, sim_calibrate.Calibration]]:
    """The cost model of each spec, by model; and the calibrations behind them."""
    steady = [w for w in windows if sim_calibrate.is_steady(w)]
    calibrated = sim_calibrate.calibrate(windows)
    gap_s = calibrated.gap_s
    graph = sim_calibrate.Calibration(graph_batch=True, gap_s=gap_s)
    own = {
        m: dataclasses.replace(
            sim_calibrate.fit([w for w in steady if w.model == m], ("fixed",), graph_batch=True),
            gap_s=gap_s,
        )
        for m in sorted({w.model for w in steady})
    }
    costs = {
        "as is": sim_calibrate.Calibration().cost,
        "calibrated": calibrated.cost,
        "graph batch": graph.cost,
        "graph batch, own fixed": lambda m: own[m].cost(m),
    }
    named = {"calibrated": calibrated, "graph batch": graph}
    return costs, named | {f"graph batch, own fixed, {m}": c for m, c in own.items()}


# The simulator's decisions are discrete: a 0.2 % change in a rate can flip which requests
# load when, and move aligned's tokens/s by a few % (400 requests offline: 2,682-2,804 for
# HBM efficiencies 0.912-0.916). Each cell is simulated at these shares of its spec's HBM
# rate too, and shows their median and range.
PERTURBATIONS = (0.99, 0.995, 1.0, 1.005, 1.01)


def predict(cell: Cell, policy: str, cost: CostModel) -> np.ndarray:
    """Simulated [tok/s, p99 TPOT s] of a cell on one GPU pair, one row per perturbation."""
    requests = WORKLOADS["paper-90"](cell.num_requests, 0, cell.rate)
    out = []
    for share in PERTURBATIONS:
        rate = share * cost.gpu.hbm_read_bytes_per_s
        perturbed = dataclasses.replace(
            cost, gpu=dataclasses.replace(cost.gpu, hbm_read_bytes_per_s=rate)
        )
        summary = simulate(
            requests, configs_for(perturbed, cell.pool_gib * 2**30)[policy], perturbed
        )
        out.append((summary.throughput_tok_s, summary.tpot_p99_s))
    return np.array(out)


def predicted_cell(results: np.ndarray) -> str:
    tok, p99 = results[:, 0], 1e3 * results[:, 1]
    return (
        f"{np.median(tok):,.0f} ({tok.min():,.0f}-{tok.max():,.0f}), "
        f"{np.median(p99):.1f} ({p99.min():.1f}-{p99.max():.1f})"
    )


def served_cell(runs: list[Run]) -> str:
    tok = [r.tok_s for r in runs]
    tpot = [1e3 * r.tpot_p99_s for r in runs]
    return (
        f"{np.median(tok):,.0f} ({min(tok):,.0f}-{max(tok):,.0f}), "
        f"{np.median(tpot):.1f} ({min(tpot):.1f}-{max(tpot):.1f}) [{len(runs)}]"
    )


def main() -> None:
    windows = sim_calibrate.load(ARCHIVES)
    costs, calibrations = specs(windows)
    print("Calibrations (decode device: memory / HBM efficiency + compute + fixed; the gap is")
    print("the host's median time between steps; the simulator gets fixed + gap as")
    print("step_overhead_s):")
    for name, cal in calibrations.items():
        print(f"- {name}: {sim_calibrate.describe(cal)}")
    runs = [run for path in CALLS for run in served_runs(path)]
    cells: dict[tuple[Cell, str], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.cell, run.policy), []).append(run)
    order = sorted(cells, key=lambda k: (k[0].model, k[0].pool_gib, k[0].num_requests,
                                         k[0].rate or 0.0, k[1]))  # fmt: skip
    print("\nEach cell: tok/s, p99 TPOT ms; median (min-max). Served: over the runs [how many];")
    print(f"predicted: over HBM rates of {PERTURBATIONS} x the spec's.\n")
    print("| model | requests | load | pool GiB | policy | served | " + " | ".join(costs) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(costs))
    errors: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for cell, policy in order:
        own = cells[cell, policy]
        row = []
        served = np.median([[r.tok_s, r.tpot_p99_s] for r in own], axis=0)
        for name, cost_of in costs.items():
            results = predict(cell, policy, cost_of(cell.model))
            row.append(predicted_cell(results))
            errors.setdefault((name, policy), []).append(np.median(results, axis=0) / served)
        print(
            f"| {cell.model} | {cell.num_requests} | {cell.load} | {cell.pool_gib:g} | {policy} | "
            f"{served_cell(own)} | " + " | ".join(row) + " |",
            flush=True,
        )
    print("\nPredicted / served (medians of each cell), over the cells above: median (min-max):\n")
    print("| spec | policy | tok/s | p99 TPOT |")
    print("|---|---|---|---|")
    for (name, policy), pairs in errors.items():
        tok, p99 = np.array(pairs).T
        print(
            f"| {name} | {policy} | {np.median(tok):.2f} ({tok.min():.2f}-{tok.max():.2f}) | "
            f"{np.median(p99):.2f} ({p99.min():.2f}-{p99.max():.2f}) |"
        )
    print("\nServed runs used:")
    for run in runs:
        p99_ms = 1e3 * run.tpot_p99_s
        print(f"- {run.source}: {run.cell.load}, {run.tok_s:,.0f} tok/s, p99 {p99_ms:.1f} ms")


if __name__ == "__main__":
    main()
