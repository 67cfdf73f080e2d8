"""What a pure decode step costs per GiB of KV, from a served run's 1 s stats lines.

A window counts when the worker's line shows >= 20 steps, >= 4 residents and <= 5 % idle,
and every batcher line within 1.5 s of it shows no request waiting for prefill (so no step
of the window carried a prompt chunk). Over those windows, a least-squares line
step_ms = base + per_gib * device KV GiB; device KV is the worker's "device KV %" of
--device-kv-gib. Comparing two variants' per_gib says whether one reads KV slower.

    python3 benchmarks/step_cost.py --worker W.log --batcher B.log [--worker ... --batcher ...]
    # aligned (serve.log holds both lines):
    python3 benchmarks/step_cost.py --worker serve.log --batcher serve.log
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from collections.abc import Iterable

import numpy as np

STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
WORKER = re.compile(
    STAMP + r".*worker\.service: [\d.]+ tokens/s, (\d+) resident requests, device KV ([\d.]+)% "
    r"used; (\d+) steps [\d.]+ ms apart.*decode device ([\d.]+) ms.*idle (\d+)%"
)
BATCHER = re.compile(STAMP + r".*batcher\.engine: .*requests: (\d+) waiting for prefill")
MIN_STEPS, MIN_RESIDENTS, MAX_IDLE_PERCENT, NEAR_S = 20, 4, 5, 1.5


def _seconds(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def decode_windows(
    worker_lines: Iterable[str], batcher_lines: Iterable[str], device_kv_gib: float
) -> list[tuple[int, float, float]]:
    """(residents, device KV GiB, decode device ms per step) of each pure-decode window."""
    waiting = [
        (_seconds(m[1]), int(m[2])) for m in map(BATCHER.search, batcher_lines) if m is not None
    ]
    windows = []
    for m in map(WORKER.search, worker_lines):
        if m is None:
            continue
        at, residents, kv_percent = _seconds(m[1]), int(m[2]), float(m[3])
        steps, step_ms, idle = int(m[4]), float(m[5]), int(m[6])
        near = [n for t, n in waiting if abs(t - at) <= NEAR_S]
        if steps < MIN_STEPS or residents < MIN_RESIDENTS or idle > MAX_IDLE_PERCENT:
            continue
        if near and max(near) == 0:
            windows.append((residents, kv_percent / 100 * device_kv_gib, step_ms))
    return windows


def fit(windows: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(base ms, ms per GiB of KV) of the least-squares line through the windows."""
    if len(windows) < 2:
        raise ValueError(f"{len(windows)} pure-decode windows: too few to fit a line")
    kv = np.array([w[1] for w in windows])
    ms = np.array([w[2] for w in windows])
    (base, per_gib), *_ = np.linalg.lstsq(np.c_[np.ones_like(kv), kv], ms, rcond=None)
    return float(base), float(per_gib)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="append", required=True, help="a worker's log")
    parser.add_argument("--batcher", action="append", required=True, help="its batcher's log")
    parser.add_argument("--device-kv-gib", type=float, default=88.0)
    args = parser.parse_args()
    if len(args.worker) != len(args.batcher):
        parser.error("one --batcher per --worker")
    windows = []
    for worker, batcher in zip(args.worker, args.batcher, strict=True):
        with open(worker) as w, open(batcher) as b:
            windows += decode_windows(w.readlines(), b.readlines(), args.device_kv_gib)
    base, per_gib = fit(windows)
    kv = [w[1] for w in windows]
    print(
        f"{len(windows)} pure-decode windows, KV {min(kv):.1f}-{max(kv):.1f} GiB: "
        f"step = {base:.2f} ms + {per_gib:.3f} ms per GiB of KV"
    )


if __name__ == "__main__":
    main()
