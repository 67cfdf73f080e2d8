"""Render `alignedserve sim --json` result files as the Markdown table in docs/benchmarks.md.

.venv/bin/python benchmarks/sim_table.py offline.json llama_rates.json opt_rates.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"llama3-8b": "Llama-3-8B", "opt-13b": "OPT-13B"}


def main(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["shape"], r["cost_model"], r["rate"]), {})[r["policy"]] = r
    print(
        "| model | kernel | load | aligned tok/s | fcfs tok/s | throughput ratio "
        "| aligned p99 TPOT | fcfs p99 TPOT | TPOT ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    order = sorted(cells, key=lambda k: (k[0] != "llama3-8b", k[1], k[2] or 0))
    for shape, kernel, rate in order:
        a, f = cells[(shape, kernel, rate)]["aligned"], cells[(shape, kernel, rate)]["fcfs"]
        load = "offline" if rate is None else f"{rate:g} req/s"
        speed = a["throughput_tok_s"] / f["throughput_tok_s"]
        tpot = f["tpot_p99_s"] / a["tpot_p99_s"]
        print(
            f"| {NAMES[shape]} | {kernel} | {load} | {a['throughput_tok_s']:.0f} "
            f"| {f['throughput_tok_s']:.0f} | {speed:.2f}× | {a['tpot_p99_s'] * 1e3:.1f} ms "
            f"| {f['tpot_p99_s'] * 1e3:.1f} ms | {tpot:.2f}× |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
