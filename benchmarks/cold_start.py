"""A GPU worker's start, cold and then warm: the same worker started --starts times over one
Triton kernel cache that begins empty, each start timed to serving.

    python3 benchmarks/cold_start.py --model-shape llama3-8b --out "$OUT"     # one GPU
    python3 benchmarks/cold_start.py --model-shape llama3-8b --as-user 10001 --out "$OUT"

Each start is `alignedserve serve worker` on --device, as its pod runs it (no batcher: the
worker loads and warms up on its own), stopped by SIGTERM once serving. Its log gives the
phases: the kernel cache's entries when it started, the weights loaded (the ceilings line
follows the load), the warm-up. The first start compiles every kernel; the next ones find
them in the cache (as a restarted worker container does on its pod's kernel-cache volume).

--as-user UID runs each worker as that uid with HOME=/nonexistent, as the image's user (who
has no home). A first start without TRITON_CACHE_DIR then shows what that user gets from
Triton's default cache (an error naming the variable, before the weights load). The project,
the checkpoint and the cache are made readable to it; the repository must be too (run from a
copy under /tmp). Results: OUT/cold_start.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_env import child_pythonpath
from e2e_report import SHAPES
from gpu_e2e import model_root, write_model

PHASES = {  # log line -> phase it ends
    "loading": re.compile(r"worker listening on"),
    "cache": re.compile(r"Triton kernel cache (\S+): (\d+) entries"),
    "loaded": re.compile(r"bf16 matmul .* ridge|warmed up in"),
    "warm_up": re.compile(r"warmed up in ([\d.]+) s"),
    "serving": re.compile(r"worker serving"),
    "error": re.compile(r"alignedserve: error: (.*)"),
}


def start_worker(
    args: argparse.Namespace, model: Path, env: dict[str, str], log: Path
) -> dict[str, object]:
    """One worker started, timed to serving from the log, then stopped by SIGTERM."""
    argv = [sys.executable, "-m", "alignedserve", "serve", "worker", "--model", str(model)]
    argv += ["--device", args.device, "--port", "0", "--warm-up-batch", str(args.warm_up_batch)]
    argv += ["--num-device-blocks", str(args.num_device_blocks)]
    if args.as_user is not None:
        uid = str(args.as_user)
        argv = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", *argv]
    begin = time.monotonic()
    seen: dict[str, object] = {}
    with (
        log.open("w") as sink,
        subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            for phase, pattern in PHASES.items():
                match = pattern.search(line)
                if match and phase not in seen:
                    seen[phase] = round(time.monotonic() - begin, 2)
                    if phase == "cache":
                        seen["cache_dir"], seen["cache_entries"] = match[1], int(match[2])
                    elif phase == "warm_up":
                        seen["warm_up_logged_s"] = float(match[1])
                    elif phase == "error":
                        seen["error_text"] = match[1]
            if "serving" in seen:
                proc.send_signal(signal.SIGTERM)
                break
            if time.monotonic() - begin > args.timeout_s:
                proc.kill()
                seen["timed_out"] = True
                break
        sink.write(proc.stdout.read())
        seen["exit_code"] = proc.wait(60)
    return seen


def du_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def markdown(rows: list[dict[str, object]], shape: str) -> str:
    lines = [
        f"# Worker starts, {shape}, one Triton kernel cache (cold, then warm)\n",
        "| start | cache | entries before | to loaded s | warm-up s | to serving s | "
        "cache MiB after | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["start"],
            row["cache"],
            row.get("cache_entries", "–"),
            row.get("loaded", "–"),
            row.get("warm_up_logged_s", "–"),
            row.get("serving", "–"),
            f"{row['cache_mib']:.1f}",
            row["exit_code"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    errors = [
        f"- start {row['start']}: `{row['error_text']}`" for row in rows if "error_text" in row
    ]
    return "\n".join(lines + (["", *errors] if errors else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="the shape's tiny config")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--warm-up-batch", type=int, default=512)
    parser.add_argument("--num-device-blocks", type=int, default=4096)
    parser.add_argument("--as-user", type=int, default=None, help="uid to run the workers as")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.model_shape]
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), PYTHONUNBUFFERED="1")
    env.pop("TRITON_CACHE_DIR", None)
    rows: list[dict[str, object]] = []
    with (
        tempfile.TemporaryDirectory(dir=model_root(shape, 0, args.tiny)) as tmp,
        tempfile.TemporaryDirectory() as cache_root,
    ):
        model = Path(tmp) / f"{args.model_shape}-random"
        draw_on = "cpu" if args.tiny else args.device  # a tiny one is drawn at once anywhere
        write_model(model, args.model_shape, shape, env, args.tiny, draw_on)
        cache = Path(cache_root) / "triton"
        runs = [("cold" if i == 0 else "warm", cache) for i in range(args.starts)]
        if args.as_user is not None:
            env["HOME"] = "/nonexistent"
            for path in (tmp, cache_root, *env["PYTHONPATH"].split(os.pathsep)):
                subprocess.run(["chmod", "-R", "a+rX", path], check=True)
            cache.mkdir()
            shutil.chown(cache, user=args.as_user, group=args.as_user)
            runs.insert(0, ("default", None))  # Triton's own choice: the user's home
        for i, (label, cache_dir) in enumerate(runs):
            run_env = dict(env)
            if cache_dir is not None:
                run_env["TRITON_CACHE_DIR"] = str(cache_dir)
            row = start_worker(args, model, run_env, out / f"worker{i}.log")
            row |= {"start": i, "cache": label, "cache_mib": du_mib(cache) if cache.is_dir() else 0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "cold_start.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows, args.model_shape + (" (tiny)" if args.tiny else ""))
    (out / "cold_start.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
