"""The written results: one JSON document (configuration, environment, each run's summary
and per-request rows) and one Markdown table with a row per run, so a sweep reads side by
side."""

from __future__ import annotations

import datetime
import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from alignedserve.bench.metrics import Stats, Summary, e2e_s, tpot_s, ttft_s
from alignedserve.bench.records import RequestRecord, RunRecords
from alignedserve.bench.shapes import LoadShape, describe

VERSIONS_OF = ("alignedserve", "httpx", "numpy")


@dataclass(frozen=True)
class BenchRun:
    shape: LoadShape
    run: RunRecords
    summary: Summary


def environment() -> dict[str, str]:
    """What a reader needs to place the numbers: when, on what, with which versions."""
    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in VERSIONS_OF:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    return env


def _finite(value: Any) -> Any:
    """Strict JSON has no Infinity: an offline rate is written "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """One row per request sent, times in seconds after the run's first send."""
    start_s = min((r.send_s for r in records), default=0.0)
    return [
        {
            "request_id": r.request_id,
            "send_s": r.send_s - start_s,
            "ttft_s": ttft_s(r),
            "tpot_s": tpot_s(r),
            "e2e_s": e2e_s(r),
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "num_chunks": len(r.chunks),
            "error": r.error,
        }
        for r in records
    ]


def to_json(config: Mapping[str, Any], runs: Sequence[BenchRun]) -> dict[str, Any]:
    return _finite(
        {
            "config": config,
            "environment": environment(),
            "runs": [
                {
                    "load": describe(b.shape),
                    "shape": {"kind": type(b.shape).__name__.lower(), **asdict(b.shape)},
                    "summary": asdict(b.summary),
                    "requests": request_rows(b.run.records),
                }
                for b in runs
            ],
        }
    )


def write_json(path: Path, config: Mapping[str, Any], runs: Sequence[BenchRun]) -> None:
    path.write_text(json.dumps(to_json(config, runs), indent=1, allow_nan=False) + "\n")


def _spread(stats: Stats | None, scale: float, digits: int) -> str:
    if stats is None:
        return "–"
    return " / ".join(f"{v * scale:.{digits}f}" for v in (stats.p50, stats.p90, stats.p99))


def _failed(s: Summary) -> str:
    return f"{s.num_failed} (+{s.num_not_sent} not sent)" if s.num_not_sent else f"{s.num_failed}"


def _goodput(s: Summary) -> str:
    return "–" if s.goodput_requests_per_s is None else f"{s.goodput_requests_per_s:.2f}"


COLUMNS: tuple[tuple[str, Callable[[Summary], str]], ...] = (
    ("ok", lambda s: f"{s.num_ok}"),
    ("failed", _failed),
    ("req/s", lambda s: f"{s.requests_per_s:.2f}"),
    ("output tok/s", lambda s: f"{s.output_tokens_per_s:.0f}"),
    ("total tok/s", lambda s: f"{s.total_tokens_per_s:.0f}"),
    ("goodput req/s", _goodput),
    ("TTFT ms p50 / p90 / p99", lambda s: _spread(s.ttft_s, 1e3, 1)),
    ("TPOT ms p50 / p90 / p99", lambda s: _spread(s.tpot_s, 1e3, 2)),
    ("ITL ms p50 / p90 / p99", lambda s: _spread(s.itl_s, 1e3, 2)),
    ("E2E s p50 / p90 / p99", lambda s: _spread(s.e2e_s, 1.0, 2)),
)


def markdown_table(runs: Sequence[BenchRun]) -> str:
    header = ["load", *(name for name, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in runs:
        cells = [describe(b.shape), *(cell(b.summary) for _, cell in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, runs: Sequence[BenchRun]) -> None:
    path.write_text(f"{title}\n\n{markdown_table(runs)}")
