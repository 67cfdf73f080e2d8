"""Issue 6 in one call: aligned vs fcfs side by side through the HTTP API on a GPU pair, and
transformers' continuous batching on the same checkpoint and requests.

    python3 benchmarks/gpu_e2e.py --model-shape llama3-8b --num-requests 100 \\
        --rate 4 --rate 6 --rate 8 --peer-requests 48 --out "$OUT"  # nvidia-h200-x2; carry .wheels
    .venv/bin/python benchmarks/gpu_e2e.py --tiny --device cpu --prefetch-device "" \\
        --pool-gib 0.5 --device-kv-gib 0.25 --workload fixed-32-24 --num-requests 8 \\
        --rate 4 --peer-requests 4 --out /tmp/e2e  # a CPU dry run (1 min on 2 cores)

For one model shape (random weights, bf16; llama3-8b is GQA, opt-13b is MHA):
1. the checkpoint is written (on /dev/shm when it has room), with a tokenizer padded to the
   model's vocabulary, so that every id the model samples streams as text of its own;
2. the peer, benchmarks/hf_peer.py, generates for the bench's offline requests (a bounded
   subset: --peer-requests of them) on --device, before any server takes the GPU;
3. for each policy, `alignedserve serve` (router + batcher + worker on --device, the pair's
   prefetch GPU beside it) and `alignedserve bench` on it: offline, then each --rate (Poisson),
   the same requests for both policies, EOS ignored. The aligned server also runs the peer's
   requests offline, unless they are the offline run's own (--peer-requests = --num-requests);
4. the report, rewritten after each step so that a call cut short still returns what it did:
   OUT/gpu_e2e_<shape>.md and .json (every cell, aligned ÷ fcfs output tok/s and fcfs ÷ aligned
   p99 TPOT against the issue's targets, and the peer ratio), _tpot.png (TPOT CDFs), and
   .tar.gz (each bench's own JSON, Markdown and plots, and the peer's JSON).

--deadline-s (from the start) sizes each bench's per-run timeout, so that the call ends inside
the device tool's 10-minute limit; a cell cut short is reported with its unfinished requests.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_env import ROOT, child_pythonpath, import_alignedserve

import_alignedserve()
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402

POLICIES = ("aligned", "fcfs")
MIN_PEER_RATIO = 10.0  # issue 6: at least 10x the transformers peer's output tok/s
TINY_VOCAB = 8192  # a dry run's vocabulary: as in the full ones, nearly every id is a word
SERVER_OVERHEAD_S = 60.0  # reserved for each server still to start and stop
MIN_CHUNKS_PER_TOKEN = 0.9  # below it, the stream coalesced tokens: latency is suspect


@dataclass(frozen=True)
class Shape:
    arch: str  # key of tiny.TINY_CONFIGS; the full size is tiny.FULL_SIZE[name]
    attention: str
    checkpoint_gib: float  # bf16 weights, to decide whether /dev/shm has room
    min_throughput_ratio: float  # issue 6: aligned ÷ fcfs output tok/s
    min_tpot_ratio: float  # issue 6: fcfs ÷ aligned p99 TPOT


SHAPES = {
    "llama3-8b": Shape("llama", "GQA", 15.0, 1.2, 2.0),
    "opt-13b": Shape("opt", "MHA", 24.5, 1.5, 3.0),
}


# ---------------------------------------------------------------- the runs


class Clock:
    """Seconds left before the call's deadline."""

    def __init__(self, deadline_s: float):
        self.start = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def run_timeout(self, runs_left: int, servers_after: int, cap_s: float) -> float:
        """Each bench run still to come gets an equal share of what the servers leave."""
        share = (self.left() - servers_after * SERVER_OVERHEAD_S) / max(runs_left, 1)
        return max(10.0, min(cap_s, share))


def environment() -> dict[str, str]:
    """The child processes' environment: the project importable, the carried wheels in."""
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), PYTHONUNBUFFERED="1")
    wheels = ROOT / ".wheels"
    if wheels.is_dir():  # the router's and the bench's packages, carried along
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
             str(wheels), "fastapi", "uvicorn", "openai"],
            check=True,
        )  # fmt: skip
    return env


def model_root(shape: Shape, pool_gib: float, tiny: bool) -> str | None:
    """/dev/shm when the checkpoint fits beside the KV pool (which lives there too): writing
    and loading skip the disk. None: the default temporary directory."""
    need_bytes = (0 if tiny else shape.checkpoint_gib + pool_gib + 8) * 2**30
    try:
        if shutil.disk_usage("/dev/shm").free > need_bytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def write_model(
    path: Path, name: str, shape: Shape, env: dict[str, str], tiny: bool, device: str
) -> None:
    """The random checkpoint, drawn on the decode device when it is a GPU (seconds instead of
    the CPU's minutes; CUDA's generator gives other weights than the CPU's for the seed)."""
    overrides = f"{{'vocab_size': {TINY_VOCAB}}}" if tiny else f"FULL_SIZE[{name!r}]"
    dtype = "float32" if tiny else "bfloat16"
    draw_on = device if device.startswith("cuda") else "cpu"
    code = (
        "from alignedserve.worker.tiny import FULL_SIZE, init_tiny; "
        f"init_tiny({str(path)!r}, arch={shape.arch!r}, dtype={dtype!r}, overrides={overrides}, "
        f"device={draw_on!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def device_blocks(model: Path, kv_gib: float) -> int:
    """KV blocks in kv_gib GiB of the decode GPU, for this checkpoint's layout."""
    layout = KVLayout.for_model(ModelConfig.from_dir(model))
    return int(kv_gib * 2**30 // layout.block_bytes)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("server never ready")


def bench_args(args, vocab: int, num_requests: int, rates: list[float], timeout_s: float):
    return [
        sys.executable, "-m", "alignedserve", "bench",
        "--base-url", f"http://127.0.0.1:{args.port}", "--vocab-size", str(vocab),
        "--workload", args.workload, "--num-requests", str(num_requests),
        *[x for r in rates for x in ("--rate", str(r))], "--timeout-s", f"{timeout_s:.0f}",
    ]  # fmt: skip


def run_policy(policy, args, model, env, vocab, blocks, work, clock, servers_after, timings):
    """Serve with this policy and run its benches; the benches' results land in work/."""
    serve = [
        sys.executable, "-m", "alignedserve", "serve", "--model", str(model),
        "--device", args.device, "--policy", policy, "--port", str(args.port),
        "--pool-gib", str(args.pool_gib), "--num-device-blocks", str(blocks),
    ]  # fmt: skip
    if args.prefetch_device:
        serve += ["--prefetch-device", args.prefetch_device]
    peer_run = policy == "aligned" and 0 < args.peer_requests != args.num_requests
    rates = [math.inf, *args.rate]
    start = time.monotonic()
    proc = subprocess.Popen(serve, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{args.port}", proc, timeout_s=300)
        timings[f"{policy}_server_start_s"] = time.monotonic() - start
        print(f"{policy}: serving after {time.monotonic() - start:.0f} s", flush=True)
        if peer_run:  # short, and first: the timeouts below then share what is left
            timeout = clock.run_timeout(1, servers_after, args.timeout_s)
            cmd = bench_args(args, vocab, args.peer_requests, [math.inf], timeout)
            subprocess.run([*cmd, "--out", str(work / "aligned-peer")], env=env, check=False)
        runs_left = len(rates) * (1 + servers_after)
        timeout = clock.run_timeout(runs_left, servers_after, args.timeout_s)
        print(f"{policy}: {len(rates)} runs, up to {timeout:.0f} s each", flush=True)
        start = time.monotonic()
        cmd = bench_args(args, vocab, args.num_requests, rates, timeout)
        subprocess.run([*cmd, "--out", str(work / policy)], env=env, check=False)
        timings[f"{policy}_bench_s"] = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_peer(args, model: Path, env, work: Path, clock: Clock, timings) -> None:
    """transformers on --device, before any server holds it; bounded by --peer-timeout-s."""
    script = Path(__file__).with_name("hf_peer.py")
    cmd = [
        sys.executable, str(script), "--model", str(model), "--device", args.device,
        "--dtype", "float32" if args.tiny else "bfloat16", "--workload", args.workload,
        "--num-requests", str(args.peer_requests), "--timeout-s", str(args.peer_timeout_s),
        "--out", str(work / "peer.json"),
    ]  # fmt: skip
    start = time.monotonic()
    try:  # loading and warm-up come on top of the generation's own timeout
        subprocess.run(cmd, env=env, check=False, timeout=args.peer_timeout_s + 180)
    except subprocess.TimeoutExpired:
        print("peer: killed (load + warm-up + generation ran too long)", flush=True)
    timings["peer_s"] = time.monotonic() - start


# ---------------------------------------------------------------- the report (pure)


def load_runs(work: Path) -> dict[str, dict[str, dict]]:
    """runs[load][policy] = that bench run's JSON (summary and per-request rows)."""
    runs: dict[str, dict[str, dict]] = {}
    for policy in POLICIES:
        path = work / policy / "bench.json"
        if path.is_file():
            for run in json.loads(path.read_text())["runs"]:
                runs.setdefault(run["load"], {})[policy] = run
    return runs


def chunks_per_token(run: dict) -> float | None:
    """Streamed chunks per output token: 1 when every token arrived as its own chunk."""
    ok = [r for r in run["requests"] if r["error"] is None]
    tokens = sum(r["completion_tokens"] for r in ok)
    return sum(r["num_chunks"] for r in ok) / tokens if tokens else None


def _p99_tpot_s(run: dict) -> float | None:
    tpot = run["summary"]["tpot_s"]
    return tpot["p99"] if tpot else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def cell(
    load: str, by_policy: dict[str, dict], shape: Shape, capacity_per_s: float | None
) -> dict[str, Any]:
    """One load's comparison against the issue's targets, with the reasons the numbers give.
    capacity_per_s: the lesser of the two policies' offline request rates."""
    a, f = by_policy.get("aligned"), by_policy.get("fcfs")
    row: dict[str, Any] = {"load": load, "notes": []}
    for policy, run in (("aligned", a), ("fcfs", f)):
        if run is None:
            row["notes"].append(f"{policy}: no run")
            continue
        s = run["summary"]
        row[policy] = {
            "requests_per_s": s["requests_per_s"],
            "output_tokens_per_s": s["output_tokens_per_s"],
            "p50_tpot_s": s["tpot_s"]["p50"] if s["tpot_s"] else None,
            "p99_tpot_s": _p99_tpot_s(run),
            "p99_ttft_s": s["ttft_s"]["p99"] if s["ttft_s"] else None,
            "chunks_per_token": chunks_per_token(run),
            "num_failed": s["num_failed"] + s["num_not_sent"],
        }
        if row[policy]["num_failed"]:
            row["notes"].append(
                f"{policy}: {row[policy]['num_failed']} requests unfinished (run timeout)"
            )
        cpt = row[policy]["chunks_per_token"]
        if cpt is not None and cpt < MIN_CHUNKS_PER_TOKEN:
            row["notes"].append(f"{policy}: {cpt:.2f} chunks per token, latency suspect")
    if a is None or f is None:
        return row
    rate = a["shape"].get("rate_per_s")
    row["offered_rate_per_s"] = rate
    row["throughput_ratio"] = _ratio(
        a["summary"]["output_tokens_per_s"], f["summary"]["output_tokens_per_s"]
    )
    row["tpot_ratio"] = _ratio(_p99_tpot_s(f), _p99_tpot_s(a))
    row["throughput_met"] = (row["throughput_ratio"] or 0) >= shape.min_throughput_ratio
    row["tpot_met"] = (row["tpot_ratio"] or 0) >= shape.min_tpot_ratio
    if isinstance(rate, int | float) and capacity_per_s and rate < capacity_per_s:
        row["notes"].append(
            f"{rate:g} req/s is below both policies' offline rate ({capacity_per_s:.2f} "
            "req/s): throughput follows the offered load"
        )
    return row


def offline_capacity(runs: dict[str, dict[str, dict]]) -> float | None:
    offline = runs.get("offline", {})
    if not set(POLICIES) <= offline.keys():
        return None
    return min(offline[p]["summary"]["requests_per_s"] for p in POLICIES)


def peer_cell(work: Path, runs: dict[str, dict[str, dict]], args) -> dict[str, Any] | None:
    path = work / "peer.json"
    if not path.is_file():
        return None
    peer = json.loads(path.read_text())
    ours_path = work / "aligned-peer" / "bench.json"
    if ours_path.is_file():
        ours = json.loads(ours_path.read_text())["runs"][0]
    else:  # the peer's requests are the offline run's own
        ours = runs.get("offline", {}).get("aligned")
    row = {"peer": peer, "notes": []}
    if ours is not None:
        s = ours["summary"]
        row["ours"] = {k: s[k] for k in ("num_ok", "duration_s", "output_tokens_per_s")}
        row["ratio"] = _ratio(s["output_tokens_per_s"], peer["output_tokens_per_s"])
        row["met"] = (row["ratio"] or 0) >= MIN_PEER_RATIO
    if peer["timed_out"]:
        row["notes"].append(
            f"peer stopped at its {args.peer_timeout_s:g} s timeout: "
            f"{peer['num_finished']}/{peer['num_requests']} requests finished"
        )
    if peer["num_full_length"] != peer["num_finished"]:
        row["notes"].append("peer: some requests stopped short of max_tokens")
    return row


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f}"


def _x(value: float | None, target: float, met: bool | None) -> str:
    if value is None:
        return f"– (≥ {target:g}×: missed)"
    return f"**{value:.2f}×** (≥ {target:g}×: {'met' if met else 'missed'})"


def _pair(row: dict, key: str, fmt: str) -> str:
    values = [row.get(p, {}).get(key) for p in POLICIES]
    return " / ".join("–" if v is None else format(v, fmt) for v in values)


def render_markdown(report: dict[str, Any]) -> str:
    shape = SHAPES[report["model_shape"]]
    c = report["config"]
    lines = [
        f"## {report['model_shape']} ({shape.attention}), {c['workload']}, "
        f"{c['num_requests']} requests per run, aligned vs fcfs",
        "",
        f"Device: {report.get('device', '?')}; date {report['date']}; "
        f"CPU pool {c['pool_gib']:g} GiB, {c['device_blocks']} device KV blocks "
        f"({c['device_kv_gib']:g} GiB). Timings: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()),
        "",
        "| load | req/s aligned / fcfs | output tok/s aligned / fcfs | aligned ÷ fcfs | "
        "p99 TPOT ms aligned / fcfs | fcfs ÷ aligned | chunks per token aligned / fcfs | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["cells"]:
        tpot = " / ".join(_ms(row.get(p, {}).get("p99_tpot_s")) for p in POLICIES)
        throughput = _x(
            row.get("throughput_ratio"), shape.min_throughput_ratio, row.get("throughput_met")
        )
        lines.append(
            f"| {row['load']} | {_pair(row, 'requests_per_s', '.2f')} "
            f"| {_pair(row, 'output_tokens_per_s', '.0f')} | {throughput} | {tpot} "
            f"| {_x(row.get('tpot_ratio'), shape.min_tpot_ratio, row.get('tpot_met'))} "
            f"| {_pair(row, 'chunks_per_token', '.3f')} | {'; '.join(row['notes']) or '–'} |"
        )  # fmt: skip
    peer = report.get("peer")
    if peer is not None:
        p = peer["peer"]
        lines += [
            "",
            f"Peer: transformers {p['transformers']} continuous batching "
            f"({p['attn_implementation']}, greedy, EOS ignored), the same checkpoint, "
            f"the {p['num_requests']} requests of an offline run: {p['num_finished']} finished, "
            f"{p['generated_tokens']}/{p['expected_tokens']} tokens in {p['wall_s']:.1f} s "
            f"(load {p['load_s']:.0f} s, warm-up {p['warmup_s']:.0f} s not counted): "
            f"**{p['output_tokens_per_s']:.0f} output tok/s**.",
        ]  # fmt: skip
        if "ours" in peer:
            o = peer["ours"]
            lines.append(
                f"AlignedServe (aligned), the same requests offline: {o['num_ok']} in "
                f"{o['duration_s']:.1f} s, **{o['output_tokens_per_s']:.0f} output tok/s**: "
                f"{_x(peer['ratio'], MIN_PEER_RATIO, peer['met'])}."
            )
        if peer["notes"]:
            lines.append("Notes: " + "; ".join(peer["notes"]) + ".")
    for policy, table in report["bench_tables"].items():
        lines += ["", f"### {policy}", "", table.strip()]
    return "\n".join(lines) + "\n"


def make_report(args, work: Path, timings: dict, blocks: int, device: str) -> dict[str, Any]:
    shape = SHAPES[args.model_shape]
    runs = load_runs(work)
    tables = {}
    for name in (*POLICIES, "aligned-peer"):
        if (work / name / "bench.md").is_file():
            tables[name] = (work / name / "bench.md").read_text()
    return {
        "model_shape": args.model_shape,
        "tiny": args.tiny,
        "device": device,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "config": {
            "workload": args.workload,
            "num_requests": args.num_requests,
            "rates": args.rate,
            "pool_gib": args.pool_gib,
            "device_kv_gib": args.device_kv_gib,
            "device_blocks": blocks,
            "peer_requests": args.peer_requests,
        },
        "targets": {
            "throughput_ratio": shape.min_throughput_ratio,
            "p99_tpot_ratio": shape.min_tpot_ratio,
            "peer_ratio": MIN_PEER_RATIO,
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "cells": [
            cell(load, by_policy, shape, offline_capacity(runs)) for load, by_policy in runs.items()
        ],
        "peer": peer_cell(work, runs, args),
        "bench_tables": tables,
    }


def plot_tpot(runs: dict[str, dict[str, dict]], path: Path, title: str) -> bool:
    """One panel per load: each policy's TPOT CDF over its requests."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not runs:
        return False
    figure, axes = plt.subplots(
        1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (load, by_policy) in zip(axes[0], runs.items(), strict=True):
        for policy, run in by_policy.items():
            tpots = [1e3 * r["tpot_s"] for r in run["requests"] if r["tpot_s"] is not None]
            if tpots:
                ax.ecdf(tpots, label=policy)
        ax.set(title=load, xlabel="TPOT (ms)", ylabel="fraction of requests")
        ax.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def write_outputs(args, work: Path, timings: dict, blocks: int, device: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_e2e_{args.model_shape}{'_tiny' if args.tiny else ''}"
    report = make_report(args, work, timings, blocks, device)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(report))
    plot_tpot(load_runs(work), out / f"{stem}_tpot.png", f"{args.model_shape}: TPOT per request")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(work, arcname=stem)
    (out / f"{stem}.tar.gz").write_bytes(buffer.getvalue())


def device_name(device: str) -> str:
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        return f"{len(line)} × {line[0]}" if line else device
    except (OSError, subprocess.CalledProcessError):
        return device


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (a dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prefetch-device", default="cuda:1")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--workload", default="paper-90")
    parser.add_argument("--num-requests", type=int, default=100, help="per run")
    parser.add_argument("--rate", type=float, action="append", default=[], help="req/s (repeat)")
    parser.add_argument("--timeout-s", type=float, default=240, help="cap per bench run")
    parser.add_argument("--deadline-s", type=float, default=560, help="the whole call's")
    parser.add_argument("--pool-gib", type=float, default=64)
    parser.add_argument("--device-kv-gib", type=float, default=88, help="decode GPU's KV")
    parser.add_argument("--peer-requests", type=int, default=48, help="0: no peer")
    parser.add_argument("--peer-timeout-s", type=float, default=120, help="its generation")
    parser.add_argument(
        "--peer-json", default="", help="an earlier hf_peer.py result for these requests: reused"
    )
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    clock = Clock(args.deadline_s)
    shape = SHAPES[args.model_shape]
    env = environment()
    device = device_name(args.device)
    timings: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(dir=model_root(shape, args.pool_gib, args.tiny)) as tmp,
        tempfile.TemporaryDirectory() as work_dir,
    ):
        model, work = Path(tmp) / f"{args.model_shape}-random", Path(work_dir)
        write_model(model, args.model_shape, shape, env, args.tiny, args.device)
        timings["model_write_s"] = clock.elapsed()
        print(f"model written to {model} in {timings['model_write_s']:.0f} s", flush=True)
        vocab = ModelConfig.from_dir(model).vocab_size
        blocks = device_blocks(model, args.device_kv_gib)
        if args.peer_json:  # our engine then runs the requests the peer ran
            shutil.copy(args.peer_json, work / "peer.json")
            args.peer_requests = json.loads(Path(args.peer_json).read_text())["num_requests"]
        elif args.peer_requests:
            run_peer(args, model, env, work, clock, timings)
            write_outputs(args, work, timings, blocks, device)
        for i, policy in enumerate(args.policies):
            servers_after = len(args.policies) - i - 1
            run_policy(policy, args, model, env, vocab, blocks, work, clock, servers_after, timings)
            timings.pop("total_s", None)  # kept last
            timings["total_s"] = clock.elapsed()
            write_outputs(args, work, timings, blocks, device)
    report = json.loads(
        Path(args.out, f"gpu_e2e_{args.model_shape}{'_tiny' if args.tiny else ''}.json").read_text()
    )
    print("\n" + render_markdown(report), flush=True)


if __name__ == "__main__":
    main()
