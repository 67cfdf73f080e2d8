"""The simulator's decode step against served ones: how far off it is, and a calibration.

Each `gpu_e2e.py` archive holds the aligned worker's stats line, one a second: its resident
requests, how much of the decode GPU's KV they hold, the decode device's time per step
(CUDA events around each pass) and how far apart the steps were. For every steady window this
prices a decode step of that many residents over that much KV with the simulator's own cost
model (`CostModel.step_cost`, balanced: the aligned worker's kernel follows the sum of lengths)
and compares. It then fits, over both models' windows at once (each model weighing the same),

    served decode step = memory_s / hbm_efficiency + compute_s + fixed_s [+ per_layer_s x layers]

and measures the host's time between steps (`gap_s`: step period minus decode device time),
which the simulator has no term for but its `step_overhead_s`. A variant prices the linear
layers' FLOPs at the CUDA graph's batch, which the cost model does not: the next power of
two, as the worker padded its steps when these archives were served (sessions 33-36; since
the thirty-seventh session its graphs pad less, `common/decode_graphs.py`).

    .venv/bin/python benchmarks/sim_calibrate.py ARCHIVE [ARCHIVE ...]

ARCHIVE: a `gpu_e2e.py` archive (`.tar.gz`); every `aligned*` variant's `logs/serve.log` in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignedserve.batcher.sim.cost_model import SHAPES, CostModel, GpuSpec, StepCost
from alignedserve.common import decode_graphs

BLOCK_TOKENS = 16  # the worker's KV block (kv_layout.KVLayout's default)
MIN_STEPS = 20  # fewer steps in a ~1 s window: start-up, a run's tail, or mostly waiting
MAX_IDLE = 0.10  # idler windows wait for requests, not for the host
# the cost model's step at the window's two snapshots differs by more than this: their mean
# says little about the steps in between
MAX_CHANGE = 0.10
WORKER_LINE = re.compile(
    r"alignedserve\.worker\.service: [\d.]+ tokens/s, (?P<residents>\d+) resident requests, "
    r"device KV (?P<kv_pct>[\d.]+)% used; (?P<steps>\d+) steps (?P<apart_ms>[\d.]+) ms apart "
    r".*?decode device (?P<decode_ms>[\d.]+) ms, prefill device [\d.]+ ms; "
    r"idle (?P<idle_pct>\d+)%"
)
DEVICE_BLOCKS = re.compile(r"scheduler: aligned policy, (\d+) device blocks")
SERVED_MODEL = re.compile(r"worker serving (\S+) on ")


@dataclass(frozen=True)
class StatsLine:
    """One worker stats line. Residents and KV are the decode GPU's at the line's time;
    steps, times and idle are the window's since the line before."""

    num_residents: int
    kv_used_fraction: float
    num_steps: int
    apart_s: float  # the window's length over its steps
    decode_s: float  # the decode device's pass, per step
    idle_fraction: float  # of the window, with no step queued on the device


def parse_worker_line(line: str) -> StatsLine | None:
    m = WORKER_LINE.search(line)
    if m is None:
        return None
    return StatsLine(
        num_residents=int(m["residents"]),
        kv_used_fraction=float(m["kv_pct"]) / 100,
        num_steps=int(m["steps"]),
        apart_s=float(m["apart_ms"]) / 1e3,
        decode_s=float(m["decode_ms"]) / 1e3,
        idle_fraction=float(m["idle_pct"]) / 100,
    )


@dataclass(frozen=True)
class Window:
    """The steps between two stats lines; residents and KV tokens at its start and end."""

    source: str
    model: str  # a key of SHAPES
    residents: tuple[int, int]
    kv_tokens: tuple[float, float]
    num_steps: int
    decode_s: float
    apart_s: float
    idle_fraction: float

    @property
    def num_residents(self) -> float:
        return sum(self.residents) / 2

    @property
    def mean_kv_tokens(self) -> float:
        return sum(self.kv_tokens) / 2

    @property
    def gap_s(self) -> float:
        """Time a step took beyond the decode device's pass: the host's, and any idle."""
        return self.apart_s - self.decode_s


def shape_of(served_name: str) -> str:
    """The SHAPES key a served checkpoint's name starts with ("opt-13b-random": opt-13b)."""
    for name in SHAPES:
        if served_name.startswith(name):
            return name
    raise ValueError(f"no model shape for served model {served_name!r}")


def windows_from_log(lines: Iterable[str], source: str) -> list[Window]:
    """Every window of one aligned serve.log (steady or not)."""
    model, num_blocks, before = None, None, None
    windows = []
    for line in lines:
        if m := SERVED_MODEL.search(line):
            model = shape_of(m[1])
        elif m := DEVICE_BLOCKS.search(line):
            num_blocks = int(m[1])
        elif (stats := parse_worker_line(line)) is not None:
            if before is not None and model is not None and num_blocks is not None:
                windows.append(_window(before, stats, source, model, num_blocks))
            before = stats
    return windows


def _window(
    before: StatsLine, after: StatsLine, source: str, model: str, num_blocks: int
) -> Window:
    def tokens(s: StatsLine) -> float:  # a resident's last block is half full on average
        return max(0.0, (s.kv_used_fraction * num_blocks - s.num_residents / 2) * BLOCK_TOKENS)

    return Window(
        source=source,
        model=model,
        residents=(before.num_residents, after.num_residents),
        kv_tokens=(tokens(before), tokens(after)),
        num_steps=after.num_steps,
        decode_s=after.decode_s,
        apart_s=after.apart_s,
        idle_fraction=after.idle_fraction,
    )


def read_archive(path: Path) -> list[Window]:
    """Windows of every aligned variant's serve.log in a gpu_e2e archive."""
    windows = []
    with tarfile.open(path) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if parts[-2:] == ("logs", "serve.log") and parts[-3].startswith("aligned"):
                text = archive.extractfile(member).read().decode()
                call = path.name.removesuffix(".tar.gz").replace("gpu_e2e_", "")
                windows += windows_from_log(
                    text.splitlines(), f"{path.parent.name}/{call}/{parts[-3]}"
                )
    return windows


# ---------------------------------------------------------------- the model and the fit


# The rows of the graph a decode step of n requests replayed: powers of two when the archives
# of sessions 33-36 were served, the worker's graph sizes since (common/decode_graphs.py).
GRAPH_ROWS = {"pow2": lambda n: 1 << (n - 1).bit_length(), "sized": decode_graphs.graph_batch}
# The uncalibrated cost model: the simulator's before the thirty-seventh session, which
# these calibrations started from (a 30 us step floor; steps priced at their own rows).
UNCALIBRATED = GpuSpec(step_overhead_s=30e-6)


def cost_model(model: str, gpu: GpuSpec | None = None, graphs: str | None = None) -> CostModel:
    """The simulator's cost model of the served kernel (balanced: the aligned worker's
    attention follows the sum of lengths), optionally priced at the rows of the `graphs`
    (a key of GRAPH_ROWS): the empty rows cost their projections' FLOPs and no KV; mixed
    steps run without a graph."""
    return CostModel(
        SHAPES[model],
        gpu=gpu or UNCALIBRATED,
        padded=False,
        graph_rows=GRAPH_ROWS[graphs] if graphs else None,
    )


# uncalibrated, at the ceilings gpu-facts.md measured; by model, then graphs (None: own rows)
COSTS = {(m, g): cost_model(m, graphs=g) for m in SHAPES for g in (None, *GRAPH_ROWS)}


def step_at(
    model: str, num_residents: float, kv_tokens: float, graphs: str | None = None
) -> StepCost:
    """The uncalibrated cost model's decode step: the residents share the KV evenly (with
    balanced cost only the sum of lengths counts)."""
    n = max(1, round(num_residents))
    return COSTS[model, graphs].step_cost(np.full(n, kv_tokens / n))


def is_steady(w: Window) -> bool:
    ends = [step_at(w.model, *end).total_s for end in zip(w.residents, w.kv_tokens, strict=True)]
    return (
        w.num_steps >= MIN_STEPS
        and w.idle_fraction <= MAX_IDLE
        and min(w.residents) >= 1
        and w.decode_s > 0
        and abs(ends[1] - ends[0]) <= MAX_CHANGE * min(ends)
    )


@dataclass(frozen=True)
class Calibration:
    """What the fit changes: HBM reads at a share of the ceiling, a fixed device time per
    step (the cost model's `step_overhead_s`), optionally a device time per layer or the
    graph's padded batch, and the host's time between steps."""

    hbm_efficiency: float = 1.0
    fixed_s: float = UNCALIBRATED.step_overhead_s
    per_layer_s: float = 0.0
    graph_batch: bool = False
    graphs: str = "pow2"  # the graphs a graph_batch calibration prices (a key of GRAPH_ROWS)
    gap_s: float = 0.0

    def step(self, model: str, num_residents: float, kv_tokens: float) -> StepCost:
        """The uncalibrated cost model's step, over the batch this calibration prices."""
        return step_at(model, num_residents, kv_tokens, self.graphs if self.graph_batch else None)

    def decode_s(self, model: str, num_residents: float, kv_tokens: float) -> float:
        """The decode device's pass."""
        step = self.step(model, num_residents, kv_tokens)
        layers = SHAPES[model].num_layers
        return (
            step.memory_s / self.hbm_efficiency
            + step.compute_s
            + self.fixed_s
            + self.per_layer_s * layers
        )

    def gpu(self, model: str, base: GpuSpec | None = None) -> GpuSpec:
        """A GpuSpec that prices a step as this calibration does: the fixed terms and the
        gap go into `step_overhead_s` (a per-layer term is one more fixed time per model)."""
        base = base or UNCALIBRATED
        return dataclasses.replace(
            base,
            hbm_read_bytes_per_s=base.hbm_read_bytes_per_s * self.hbm_efficiency,
            step_overhead_s=self.fixed_s + self.per_layer_s * SHAPES[model].num_layers + self.gap_s,
        )

    def cost(self, model: str) -> CostModel:
        """The simulator's cost model with this calibration."""
        return cost_model(model, self.gpu(model), self.graphs if self.graph_batch else None)


TERMS = ("hbm", "fixed", "per_layer")


def fit(
    windows: Sequence[Window],
    free: Sequence[str] = ("hbm", "fixed"),
    graph_batch: bool = False,
    graphs: str = "pow2",
) -> Calibration:
    """Least squares on (modelled - served) / served, each model's windows weighing the same;
    terms not in `free` keep their uncalibrated value. Linear in 1 / hbm_efficiency, fixed_s
    and per_layer_s, so one solve."""
    if not free or not set(free) <= set(TERMS):
        raise ValueError(f"free terms must be among {TERMS}, got {free}")
    start = Calibration(graph_batch=graph_batch, graphs=graphs)
    counts = {m: sum(w.model == m for w in windows) for m in SHAPES}
    rows, targets, weights = [], [], []
    for w in windows:
        step = start.step(w.model, w.num_residents, w.mean_kv_tokens)
        layers = SHAPES[w.model].num_layers
        column = {"hbm": step.memory_s, "fixed": 1.0, "per_layer": float(layers)}
        target = w.decode_s - step.compute_s
        if "hbm" not in free:
            target -= step.memory_s / start.hbm_efficiency
        if "fixed" not in free:
            target -= start.fixed_s
        rows.append([column[t] for t in free])
        targets.append(target)
        weights.append(1 / (w.decode_s * np.sqrt(counts[w.model])))  # relative, per model
    weight = np.array(weights)
    x, *_ = np.linalg.lstsq(np.array(rows) * weight[:, None], np.array(targets) * weight)
    found = dict(zip(free, x, strict=True))
    return dataclasses.replace(
        start,
        hbm_efficiency=1 / found["hbm"] if "hbm" in found else start.hbm_efficiency,
        fixed_s=float(found.get("fixed", start.fixed_s)),
        per_layer_s=float(found.get("per_layer", start.per_layer_s)),
    )


def ratios(windows: Sequence[Window], cal: Calibration, model: str) -> np.ndarray:
    """Served / modelled decode device time of one model's windows."""
    return np.array(
        [
            w.decode_s / cal.decode_s(model, w.num_residents, w.mean_kv_tokens)
            for w in windows
            if w.model == model
        ]
    )


def gaps_s(windows: Sequence[Window]) -> dict[str, float]:
    """The median host time between steps per model, and the mean of those ("both")."""
    per_model = {
        m: float(np.median([w.gap_s for w in windows if w.model == m]))
        for m in SHAPES
        if any(w.model == m for w in windows)
    }
    return {**per_model, "both": float(np.mean(list(per_model.values())))}


def calibrate(windows: Sequence[Window], graphs: str = "pow2") -> Calibration:
    """The calibration the simulator gets: HBM efficiency and a fixed device time fitted
    over both models, and the host's median gap between steps (the two models' mean)."""
    steady = [w for w in windows if is_steady(w)]
    calibrated = fit(steady, ("hbm", "fixed"), graphs=graphs)
    return dataclasses.replace(calibrated, gap_s=gaps_s(steady)["both"])


# ---------------------------------------------------------------- the report


def spread(r: np.ndarray) -> str:
    if not len(r):
        return "-"
    p10, p50, p90 = np.percentile(r, [10, 50, 90])
    return f"{p50:.3f} ({p10:.3f}-{p90:.3f})"


def describe(cal: Calibration) -> str:
    layer = f", {1e6 * cal.per_layer_s:.1f} us/layer" if cal.per_layer_s else ""
    graph = ", graph batch" if cal.graph_batch else ""
    gap = f", gap {1e3 * cal.gap_s:.2f} ms" if cal.gap_s else ""
    return f"HBM x{cal.hbm_efficiency:.3f}, fixed {1e3 * cal.fixed_s:.2f} ms{layer}{graph}{gap}"


# the candidates: (name, free terms or none, graph batch, one model only or both)
CANDIDATES = (
    ("as is", (), False, None),
    ("hbm", ("hbm",), False, None),
    ("fixed", ("fixed",), False, None),
    ("hbm + fixed", ("hbm", "fixed"), False, None),
    ("hbm + per_layer", ("hbm", "per_layer"), False, None),
    ("graph batch", (), True, None),
    ("graph batch, hbm", ("hbm",), True, None),
    ("graph batch, hbm + fixed", ("hbm", "fixed"), True, None),
    *((f"hbm + fixed, {m} only", ("hbm", "fixed"), False, m) for m in SHAPES),
    *((f"graph batch, fixed, {m} only", ("fixed",), True, m) for m in SHAPES),
)


def fits(windows: Sequence[Window], graphs: str = "pow2") -> dict[str, Calibration]:
    """Each candidate fitted: over both models, or over one (can one calibration fit both?);
    `graphs`: the graphs the windows' workers replayed."""
    out = {}
    for name, free, graph_batch, only in CANDIDATES:
        own = [w for w in windows if only in (None, w.model)]
        if own:
            out[name] = (
                fit(own, free, graph_batch, graphs)
                if free
                else Calibration(graph_batch=graph_batch, graphs=graphs)
            )
    return out


def by_residents(windows: Sequence[Window], cals: dict[str, Calibration], model: str) -> list[str]:
    """Served / modelled by how many residents: a ratio that drifts with load is a
    calibration missing a term."""
    lines = []
    edges = (1, 8, 16, 32, 64, 128, 4096)
    own = [w for w in windows if w.model == model]
    n = np.array([w.num_residents for w in own])
    kv = np.array([w.mean_kv_tokens for w in own])
    r = {name: ratios(own, cal, model) for name, cal in cals.items()}
    for lo, hi in itertools.pairwise(edges):
        sel = (n >= lo) & (n < hi)
        if sel.any():
            cells = " | ".join(f"{np.median(x[sel]):.3f}" for x in r.values())
            lines.append(
                f"| {model} | {lo}-{hi - 1} | {sel.sum()} | {np.median(kv[sel]):,.0f} | {cells} |"
            )
    return lines


def by_graph_batch(windows: Sequence[Window], model: str, graphs: str = "pow2") -> list[str]:
    """Windows of about the same KV (within 15 % of the model's median) by the graph batch
    their residents round up to: a step that grows at a bucket's edge, beyond the model's
    FLOPs for the real members, is paying for the empty rows."""
    own = [w for w in windows if w.model == model]
    if not own:
        return []
    kv = float(np.median([w.mean_kv_tokens for w in own]))
    near = [w for w in own if abs(w.mean_kv_tokens - kv) <= 0.15 * kv]
    buckets = {}
    for w in near:
        buckets.setdefault(GRAPH_ROWS[graphs](max(1, round(w.num_residents))), []).append(w)
    lines = []
    for bucket, ws in sorted(buckets.items()):
        served, plain, graph = (
            1e3 * np.median([f(w) for w in ws])
            for f in (
                lambda w: w.decode_s,
                lambda w: Calibration().decode_s(model, w.num_residents, w.mean_kv_tokens),
                lambda w: Calibration(graph_batch=True, graphs=graphs).decode_s(
                    model, w.num_residents, w.mean_kv_tokens
                ),
            )
        )
        residents = np.median([w.num_residents for w in ws])
        lines.append(
            f"| {model} | {bucket} | {len(ws)} | {residents:.0f} | {kv:,.0f} | {served:.2f} | "
            f"{plain:.2f} ({served - plain:+.2f}) | {graph:.2f} ({served - graph:+.2f}) |"
        )
    return lines


def table(title: str, columns: Sequence[str]) -> list[str]:
    """A section's opening: its title and a Markdown table's header."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def report(windows: Sequence[Window], graphs: str = "pow2") -> list[str]:
    """The whole report over an archive's windows; `graphs`: the graphs its workers
    replayed (main's --graphs)."""
    steady = [w for w in windows if is_steady(w)]
    models = [m for m in SHAPES if any(w.model == m for w in steady)]
    lines = [
        f"{len(windows)} windows, {len(steady)} steady ({MIN_STEPS}+ steps, idle <= "
        f"{MAX_IDLE:.0%}, residents >= 1, modelled step at the two ends within {MAX_CHANGE:.0%})",
        *table(
            "Served / modelled decode device time per source, the model as is:",
            ["source", "model", "windows", "median (p10-p90)", "gap median ms"],
        ),
    ]
    for source in dict.fromkeys(w.source for w in steady):
        own = [w for w in steady if w.source == source]
        model = own[0].model
        lines.append(
            f"| {source} | {model} | {len(own)} | {spread(ratios(own, Calibration(), model))}"
            f" | {1e3 * np.median([w.gap_s for w in own]):.2f} |"
        )
    candidates = fits(steady, graphs)
    lines += table(
        "Candidate calibrations: served / modelled, median (p10-p90):",
        ["fit", "parameters", *models],
    )
    for name, cal in candidates.items():
        cells = " | ".join(spread(ratios(steady, cal, m)) for m in models)
        lines.append(f"| {name} | {describe(cal)} | {cells} |")
    shown = {k: candidates[k] for k in ("as is", "hbm + fixed", "graph batch")}
    lines += table(
        "Median served / modelled by residents:",
        ["model", "residents", "windows", "median KV tokens", *shown],
    )
    for model in models:
        lines += by_residents(steady, shown, model)
    lines += table(
        "At about the same KV, by the graph's batch: served ms, modelled as is and at the graph's"
        " batch (served - modelled):",
        [
            "model",
            "graph batch",
            "windows",
            "residents",
            "KV tokens",
            "served",
            "as is",
            "graph batch",
        ],
    )
    for model in models:
        lines += by_graph_batch(steady, model, graphs)
    gaps = gaps_s(steady)
    final = calibrate(windows, graphs)
    lines += [
        "",
        "Host time between steps (period - decode device time), median ms: "
        + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in gaps.items()),
        f"For the simulator: {describe(final)}: hbm_read_bytes_per_s "
        f"{final.gpu(models[0]).hbm_read_bytes_per_s:.4g}, step_overhead_s "
        f"{final.gpu(models[0]).step_overhead_s:.4g}",
    ]
    return lines


def load(paths: Sequence[Path]) -> list[Window]:
    return [w for path in paths for w in read_archive(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archives", nargs="+", type=Path)
    parser.add_argument(
        "--graphs",
        choices=sorted(GRAPH_ROWS),
        default="pow2",
        help="the decode graphs the archives' workers padded to: pow2 (sessions 33-37's call "
        "1), sized (since: common/decode_graphs.py)",
    )
    args = parser.parse_args()
    print("\n".join(report(load(args.archives), args.graphs)))


if __name__ == "__main__":
    main()
