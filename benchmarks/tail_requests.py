"""The requests that set a run's p99 TPOT: the slowest few of each `alignedserve bench` run.

A p99 over 160 requests is decided by the slowest two, so which requests those are says more
than the figure. For each run this prints its p99 TPOT and its slowest requests: TPOT, output
and prompt tokens, TTFT, and when each finished (seconds from the run's start).

    .venv/bin/python benchmarks/tail_requests.py RESULT [RESULT ...] [--top N]

RESULT: a bench's JSON (`OUT/<load>/bench.json`) or a `gpu_e2e.py` archive (`.tar.gz`, every
bench inside it).
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path


def bench_files(path: Path) -> Iterator[tuple[str, dict]]:
    """(name, bench JSON) of each bench in a bench.json or a gpu_e2e archive."""
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if member.name.endswith("bench.json"):
                    name = "/".join(Path(member.name).parts[-3:-1])  # variant/load
                    yield name, json.load(archive.extractfile(member))
    else:
        yield str(path), json.loads(path.read_text())


def report(name: str, bench: dict, top: int) -> list[str]:
    lines = []
    for run in bench["runs"]:
        done = [r for r in run["requests"] if r["error"] is None and r["tpot_s"] is not None]
        done.sort(key=lambda r: r["tpot_s"], reverse=True)
        p99 = run["summary"]["tpot_s"]["p99"]
        lines.append(f"{name} [{run['load']}]: {len(done)} requests, p99 TPOT {p99 * 1e3:.1f} ms")
        for r in done[:top]:
            lines.append(
                f"  TPOT {r['tpot_s'] * 1e3:6.1f} ms  output {r['completion_tokens']:4d}  "
                f"prompt {r['prompt_tokens']:5d}  TTFT {r['ttft_s']:6.2f} s  "
                f"done at {r['send_s'] + r['e2e_s']:6.2f} s"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=4, help="requests listed per run")
    args = ap.parse_args()
    for path in args.results:
        for name, bench in bench_files(path):
            print("\n".join(report(name, bench, args.top)))


if __name__ == "__main__":
    main()
