"""Where two servers differ: each started once, then offline runs of several workloads.

    python3 benchmarks/phase_compare.py --model-shape llama3-8b --vllm-site /var/tmp/vsite \\
        --variants vllm-samekv fcfs --workload fixed-2048-1:240 --workload fixed-128-512:256 \\
        --workload paper-90:240 --out "$OUT"   # one GPU; carry .wheels
    .venv/bin/python benchmarks/phase_compare.py --tiny --device cpu --variants fcfs aligned \\
        --workload fixed-64-1:8 --workload fixed-16-24:8 --out /tmp/phases  # a CPU dry run

gpu_e2e.py's paper-90 run mixes prefill and decode, and a server that is slower there does not
say in which. Here each workload isolates a phase, the same requests for every variant
(offline, EOS ignored, through the same HTTP API and `alignedserve bench`):
- fixed-P-1 (one output token): prefill alone; total tokens/s is the prefill rate, TTFT the
  queue through it;
- fixed-P-O with short P and long O: decode alone, after one burst of prefill; output tokens/s
  at a batch of the request count;
- paper-90: the mix, as gpu_e2e.py runs it.
Servers are gpu_e2e.py's variants (e2e_servers.py) on --device alone, with --device-kv-gib of
KV; a server is started once for all workloads (vLLM takes 2-3 minutes to start). Results:
OUT/phase_compare.md and .json (each cell, and each variant's ratio to the first), and
OUT/phase_compare_logs.tar.gz (servers' logs, each bench's JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from device_env import import_alignedserve
from e2e_report import SHAPES, VARIANTS
from e2e_servers import serving
from gpu_e2e import (
    add_server_arguments,
    bench_args,
    device_blocks,
    device_name,
    environment,
    model_root,
    write_model,
)

import_alignedserve()
from alignedserve.common.model_config import ModelConfig  # noqa: E402

COLUMNS = (  # (label, summary key, stat or None, scale)
    ("output tok/s", "output_tokens_per_s", None, 1),
    ("total tok/s", "total_tokens_per_s", None, 1),
    ("TTFT p50 s", "ttft_s", "p50", 1),
    ("TPOT p50 ms", "tpot_s", "p50", 1e3),
    ("TPOT p99 ms", "tpot_s", "p99", 1e3),
)


def parse_workload(text: str) -> tuple[str, int]:
    """NAME:REQUESTS, e.g. fixed-2048-1:240."""
    name, _, count = text.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:REQUESTS, e.g. paper-90:240")
    return name, int(count)


def bench(args, name: str, count: int, vocab: int, out: Path, env) -> dict | None:
    cmd = bench_args(args, vocab, name, count, [math.inf], args.timeout_s)
    subprocess.run([*cmd, "--out", str(out)], env=env, check=False)
    path = out / "bench.json"
    return json.loads(path.read_text())["runs"][0]["summary"] if path.is_file() else None


def cell(summary: dict | None, key: str, stat: str | None, scale: float) -> float | None:
    value = summary and summary.get(key)
    if isinstance(value, dict):
        value = value.get(stat)
    return None if value is None else value * scale


def markdown(results: dict, variants: list[str], device: str) -> str:
    lines = [f"# Phases side by side ({device})", ""]
    for workload, by_variant in results.items():
        lines += [f"## {workload}", "", "| variant | " + " | ".join(c[0] for c in COLUMNS)]
        lines[-1] += " | output ÷ first |"
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        first = cell(by_variant.get(variants[0]), "output_tokens_per_s", None, 1)
        for variant in variants:
            summary = by_variant.get(variant)
            values = [cell(summary, *c[1:]) for c in COLUMNS]
            text = ["–" if v is None else f"{v:,.2f}" for v in values]
            ratio = "–" if not (first and values[0]) else f"{values[0] / first:.2f}×"
            lines.append(f"| {variant} | " + " | ".join(text) + f" | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["vllm-samekv", "fcfs"])
    parser.add_argument(
        "--workload", type=parse_workload, action="append", required=True,
        help="NAME:REQUESTS (repeat), each run offline on every variant",
    )  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=120, help="cap per bench run")
    args = parser.parse_args()
    # what e2e_servers reads: one GPU, no pool beyond what aligned needs, one router
    args.prefetch_device, args.num_routers = "", 1
    args.device_kv_gib = args.device_kv_gib or (0.25 if args.tiny else 88)
    args.pool_gib = 0.5 if args.tiny else 48
    shape, out = SHAPES[args.model_shape], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, device = environment(), device_name(args.device)
    results: dict[str, dict[str, dict | None]] = {f"{n}:{c}": {} for n, c in args.workload}
    with (
        tempfile.TemporaryDirectory(dir=model_root(shape, args.pool_gib, args.tiny)) as tmp,
        tempfile.TemporaryDirectory() as work_dir,
    ):
        model, work = Path(tmp) / f"{args.model_shape}-random", Path(work_dir)
        write_model(model, args.model_shape, shape, env, args.tiny, args.device)
        vocab = ModelConfig.from_dir(model).vocab_size
        blocks = device_blocks(model, args.device_kv_gib)
        for variant in args.variants:
            start = time.monotonic()
            try:
                with serving(variant, args, model, env, blocks, work / variant / "logs"):
                    print(f"{variant}: serving after {time.monotonic() - start:.0f} s", flush=True)
                    for name, count in args.workload:
                        key = f"{name}:{count}"
                        summary = bench(args, name, count, vocab, work / variant / name, env)
                        results[key][variant] = summary
                        text = markdown(results, args.variants, device)
                        (out / "phase_compare.md").write_text(text)
            except (RuntimeError, TimeoutError) as e:
                print(f"{variant}: failed: {e}", flush=True)
        (out / "phase_compare.json").write_text(json.dumps(results, indent=1))
        with tarfile.open(out / "phase_compare_logs.tar.gz", "w:gz") as tar:
            tar.add(work, arcname="phase_compare")
    print("\n" + markdown(results, args.variants, device), flush=True)


if __name__ == "__main__":
    main()
