"""The whole stack on a GPU node, aligned vs fcfs side by side, through the HTTP API.

    python3 benchmarks/gpu_e2e.py --out "$OUT"        # on nvidia-h200-x2, with .wheels carried

For each policy: `alignedserve serve` (router + batcher + worker on cuda:0, the pair's
prefetch GPU cuda:1) on a random-weight Llama-3-8B-shaped checkpoint, then `alignedserve
bench` on the paper's 90%-short mix, offline and at one Poisson rate (EOS ignored, so both
policies generate the same tokens). Prints both tables and the aligned/fcfs ratios; the
benches' JSON and Markdown land in OUT/<policy>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_env import ROOT, import_alignedserve, project_path

import_alignedserve()
from alignedserve.worker.tiny import FULL_SIZE  # noqa: E402


def environment() -> dict[str, str]:
    """The child processes' environment: the project importable, the carried wheels in."""
    path = f"{project_path()}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=path)
    wheels = ROOT / ".wheels"
    if wheels.is_dir():  # the router's and the bench's packages, carried along
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
             str(wheels), "fastapi", "uvicorn", "openai"],
            check=True,
        )  # fmt: skip
    return env


def write_model(path: Path, env: dict[str, str], tiny: bool) -> None:
    overrides = "None" if tiny else "FULL_SIZE['llama3-8b']"
    dtype = "float32" if tiny else "bfloat16"
    code = (
        "from alignedserve.worker.tiny import FULL_SIZE, init_tiny; "
        f"init_tiny({str(path)!r}, arch='llama', dtype={dtype!r}, overrides={overrides})"
    )
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    print(f"model written to {path} in {time.monotonic() - start:.0f} s", flush=True)


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


def run_policy(policy: str, args, model: Path, env: dict[str, str], vocab: int) -> dict:
    out = Path(args.out) / policy
    serve = [
        sys.executable, "-m", "alignedserve", "serve", "--model", str(model),
        "--device", args.device, "--policy", policy, "--port", str(args.port),
        "--pool-gib", str(args.pool_gib), "--num-device-blocks", str(args.device_blocks),
    ]  # fmt: skip
    if args.prefetch_device:
        serve += ["--prefetch-device", args.prefetch_device]
    start = time.monotonic()
    proc = subprocess.Popen(serve, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{args.port}", proc, timeout_s=300)
        print(f"{policy}: serving after {time.monotonic() - start:.0f} s", flush=True)
        bench = [
            sys.executable, "-m", "alignedserve", "bench",
            "--base-url", f"http://127.0.0.1:{args.port}", "--vocab-size", str(vocab),
            "--workload", args.workload, "--num-requests", str(args.num_requests),
            "--rate", "inf", *[x for r in args.rate for x in ("--rate", str(r))],
            "--timeout-s", str(args.timeout_s), "--out", str(out),
        ]  # fmt: skip
        subprocess.run(bench, env=env, check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return json.loads((out / "bench.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (a dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prefetch-device", default="cuda:1")
    parser.add_argument("--policies", nargs="+", default=["aligned", "fcfs"])
    parser.add_argument("--workload", default="paper-90")
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--rate", type=float, action="append", default=[])
    parser.add_argument("--timeout-s", type=float, default=240)
    parser.add_argument("--pool-gib", type=float, default=64)
    parser.add_argument("--device-blocks", type=int, default=45000)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / ("tiny" if args.tiny else "llama3-8b-random")
        write_model(model, env, args.tiny)
        vocab = 320 if args.tiny else FULL_SIZE["llama3-8b"]["vocab_size"]
        results = {p: run_policy(p, args, model, env, vocab) for p in args.policies}
    summary = {}
    for policy, result in results.items():
        for run in result["runs"]:
            summary.setdefault(run["load"], {})[policy] = run
    print("\naligned / fcfs, same engine, same kernels, same requests:")
    for load, by_policy in summary.items():
        if {"aligned", "fcfs"} <= by_policy.keys():
            a, f = by_policy["aligned"]["summary"], by_policy["fcfs"]["summary"]
            print(
                f"  {load}: output tok/s {a['output_tokens_per_s']:.0f} vs "
                f"{f['output_tokens_per_s']:.0f}"
                f" ({a['output_tokens_per_s'] / f['output_tokens_per_s']:.2f}x); p99 TPOT "
                f"{1e3 * a['tpot_s']['p99']:.1f} vs {1e3 * f['tpot_s']['p99']:.1f} ms"
                f" ({f['tpot_s']['p99'] / a['tpot_s']['p99']:.2f}x lower)"
            )
    Path(args.out, "gpu_e2e.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
