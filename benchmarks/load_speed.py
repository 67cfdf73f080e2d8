"""A checkpoint's weights onto a GPU: our pinned, double-buffered upload against safetensors'
own device loads, side by side in one process, then the whole `load_model`.

    python3 benchmarks/load_speed.py --model-shape llama3-8b --out "$OUT"     # one GPU

The checkpoint (random bf16 weights, tiny.FULL_SIZE) is written to /dev/shm, so every route
reads it from memory, as a node's page cache serves a model read before. Routes, each over
every tensor of the checkpoint, alternated for --rounds rounds:
- pinned: `transfer.PinnedUpload` (the host fills one pinned buffer while the other crosses);
- safe_open: `safe_open(..., device="cuda:0")` tensor by tensor (the loader's route before);
- load_file: `safetensors.torch.load_file(..., device="cuda:0")`, all at once;
then `load_model` itself (model built on meta, uploads, projections fused). --root DIR
writes the checkpoint there instead (a disk), and --drop-caches empties the page cache before
each route (root only: /proc/sys/vm/drop_caches), so each reads the disk. Results:
OUT/load_speed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from device_env import import_alignedserve
from e2e_report import SHAPES
from gpu_e2e import model_root

import_alignedserve()
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from alignedserve.worker.loader import checkpoint_files, load_model  # noqa: E402
from alignedserve.worker.tiny import FULL_SIZE, init_tiny  # noqa: E402
from alignedserve.worker.transfer import PinnedUpload  # noqa: E402


def pinned(files: list[Path], device: str) -> list[torch.Tensor]:
    upload = PinnedUpload(device)
    out = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out += [upload(f.get_tensor(k)) for k in f.keys()]  # noqa: SIM118
    upload.finish()
    return out


def by_safe_open(files: list[Path], device: str) -> list[torch.Tensor]:
    out = []
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as f:
            out += [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    return out


def by_load_file(files: list[Path], device: str) -> list[torch.Tensor]:
    return [t for file in files for t in load_file(str(file), device=device).values()]


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(route, *args, drop_caches: bool = False) -> tuple[float, int]:
    if drop_caches:
        drop_page_cache()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    result = route(*args)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    nbytes = sum(t.numel() * t.element_size() for t in result) if isinstance(result, list) else 0
    del result
    torch.cuda.empty_cache()
    return seconds, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default=None, help="write the checkpoint here (a disk)")
    parser.add_argument("--drop-caches", action="store_true", help="read it from the disk")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.model_shape]
    routes = {"pinned": pinned, "safe_open": by_safe_open, "load_file": by_load_file}
    times: dict[str, list[float]] = {name: [] for name in [*routes, "load_model"]}
    root = args.root or model_root(shape, 0, False) or tempfile.gettempdir()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        model = init_tiny(
            Path(tmp) / "m",
            arch=shape.arch,
            dtype="bfloat16",
            overrides=FULL_SIZE[args.model_shape],
            device=args.device,
        )
        files = checkpoint_files(model)
        nbytes = 0
        for _ in range(args.rounds):
            for name, route in routes.items():
                seconds, nbytes = timed(route, files, args.device, drop_caches=args.drop_caches)
                times[name].append(seconds)
            seconds, _ = timed(load_model, model, args.device, drop_caches=args.drop_caches)
            times["load_model"].append(seconds)
            print({k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    gb = nbytes / 1e9
    lines = [
        f"# {args.model_shape} weights ({gb:.2f} GB, bf16) from {root}"
        f"{' (page cache dropped before each)' if args.drop_caches else ''} to "
        f"{torch.cuda.get_device_name(args.device)}, {args.rounds} rounds\n",
        "| route | median s | GB/s | each round s | ÷ pinned |",
        "|---|---|---|---|---|",
    ]
    base = statistics.median(times["pinned"])
    for name, values in times.items():
        median = statistics.median(values)
        rate = f"{gb / median:.1f}" if name != "load_model" else "–"
        each = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {median:.2f} | {rate} | {each} | {median / base:.2f}× |")
    text = "\n".join(lines) + "\n"
    (out / "load_speed.md").write_text(text)
    (out / "load_speed.json").write_text(json.dumps({"bytes": nbytes, "seconds": times}))
    print(text)


if __name__ == "__main__":
    main()
