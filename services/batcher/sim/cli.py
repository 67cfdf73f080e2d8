"""`alignedserve sim`: aligned vs fcfs side by side on one workload, per model shape and cost
model, with the ratios. Everything it prints is a prediction of the cost model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict

from alignedserve.batcher.scheduler import SchedulerConfig
from alignedserve.batcher.sim.cost_model import SHAPES, CostModel
from alignedserve.batcher.sim.simulator import configs_for, simulate
from alignedserve.batcher.sim.workload import WORKLOADS
from alignedserve.common.errors import ConfigError

COLUMNS = (
    ("tok/s", "throughput_tok_s", "{:>9.0f}"),
    ("TTFT p50 s", "ttft_p50_s", "{:>11.2f}"),
    ("TTFT p99 s", "ttft_p99_s", "{:>11.2f}"),
    ("TPOT p50 ms", "tpot_p50_s", "{:>12.1f}"),
    ("TPOT p99 ms", "tpot_p99_s", "{:>12.1f}"),
    ("batch", "mean_batch", "{:>7.0f}"),
    ("spread", "mean_spread", "{:>7.2f}"),
    ("switch/it", "switch_fraction", "{:>10.3f}"),
    ("sched p99 ms", "schedule_p99_ms", "{:>13.3f}"),
    ("pool peak", "peak_pool_fraction", "{:>10.2f}"),
)
MS = {"tpot_p50_s", "tpot_p99_s"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="paper-90")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument(
        "--rate", type=float, action="append", help="requests/s per run (repeat); default offline"
    )
    parser.add_argument("--model-shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--cost-model", choices=("padded", "balanced", "all"), default="all")
    parser.add_argument("--pairs", type=int, default=1, help="GPU pairs (fcfs: 2 engines each)")
    parser.add_argument("--pool-gib", type=float, default=400.0, help="CPU KV pool per pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="POLICY.FIELD=VALUE",
        help="override a SchedulerConfig field, e.g. aligned.starvation_s=1 (repeat)",
    )


TEXT_OVERRIDES = ("load_order", "pool_full", "kernel_cost")


def parse_overrides(items: list[str]) -> dict[str, dict[str, object]]:
    fields = {f.name: f.type for f in dataclasses.fields(SchedulerConfig)}
    out: dict[str, dict[str, object]] = {"aligned": {}, "fcfs": {}}
    for item in items:
        key, _, value = item.partition("=")
        policy, _, name = key.partition(".")
        if policy not in out or name not in fields or not value:
            raise ConfigError(f"--set {item!r}: expected aligned|fcfs.FIELD=VALUE")
        if fields[name] == "bool":
            if value not in ("true", "false"):
                raise ConfigError(f"--set {item!r}: {name} is true or false")
            out[policy][name] = value == "true"
        elif fields[name] == "str":
            if name not in TEXT_OVERRIDES:  # the policy, say: each row is its own
                raise ConfigError(f"--set {item!r}: {name} is not one to set")
            out[policy][name] = value  # SchedulerConfig checks it
        else:
            try:
                out[policy][name] = float(value) if fields[name] == "float" else int(value)
            except ValueError:
                raise ConfigError(f"--set {item!r}: {name} is {fields[name]}") from None
    return out


def run_sim(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    shapes = list(SHAPES) if args.model_shape == "all" else [args.model_shape]
    padded = {"padded": [True], "balanced": [False], "all": [True, False]}[args.cost_model]
    results = []
    for rate in args.rate or [None]:
        requests = WORKLOADS[args.workload](args.num_requests, args.seed, rate)
        load = "offline" if rate is None else f"{rate:g} req/s"
        print(
            f"\n{args.workload}, {args.num_requests} requests, {load}, {args.pairs} GPU pair(s), "
            f"CPU pool {args.pool_gib:g} GiB/pair (cost-model predictions)"
        )
        header = f"{'model':<10}{'cost':<9}{'policy':<9}" + "".join(
            f"{name:>{len(fmt.format(0))}}" for name, _, fmt in COLUMNS
        )
        print(header)
        for shape in shapes:
            for is_padded in padded:
                cost = CostModel(SHAPES[shape], padded=is_padded)
                row = {}
                configs = configs_for(cost, args.pool_gib * 2**30, **overrides)
                for policy, config in configs.items():
                    start = time.perf_counter()
                    summary = simulate(requests, config, cost, num_pairs=args.pairs)
                    row[policy] = summary
                    results.append(
                        dict(
                            asdict(summary),
                            shape=shape,
                            cost_model="padded" if is_padded else "balanced",
                            rate=rate,
                            wall_s=time.perf_counter() - start,
                        )
                    )
                cost_name = "padded" if is_padded else "balanced"
                for policy, s in row.items():
                    print(f"{shape:<10}{cost_name:<9}{policy:<9}" + _cells(s))
                a, f = row["aligned"], row["fcfs"]
                if a.lane_wait_fraction:
                    print(
                        f"{'':<19}aligned: the decode GPU waited for the prefill device's pass "
                        f"{100 * a.lane_wait_fraction:.1f} % of the step time"
                    )
                speedup = a.throughput_tok_s / f.throughput_tok_s
                print(
                    f"{'':<19}ratio    aligned/fcfs throughput {speedup:.2f}x"
                    f", fcfs/aligned p99 TPOT {f.tpot_p99_s / a.tpot_p99_s:.2f}x"
                    f", p99 TTFT {f.ttft_p99_s / a.ttft_p99_s:.2f}x"
                )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


def _cells(summary) -> str:
    cells = []
    for _, field, fmt in COLUMNS:
        value = getattr(summary, field)
        cells.append(fmt.format(value * 1e3 if field in MS else value))
    return "".join(cells)
