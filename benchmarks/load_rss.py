"""Peak host memory (RSS) while loading a ~1 GB fp16 checkpoint onto the CPU.

Writes a random Llama-shaped fp16 checkpoint (~1.07 GB), then loads it in a fresh process per
loader and prints peak RSS against the checkpoint's size. Baseline side by side: transformers'
`from_pretrained` on the same directory. Target (issue 2): ours <= 1.3x the checkpoint size.

    .venv/bin/python benchmarks/load_rss.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
)

# Each loader runs in its own process so peaks do not mix. VmHWM (peak RSS of this address
# space; ru_maxrss would carry the parent's peak across exec) counts file-backed pages too,
# so a zero-copy mmap load is charged for every page it touches.
MEASURE = r"""
import json, sys
import torch
from alignedserve.worker.loader import load_model
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = rss_mib()
which, path = sys.argv[1], sys.argv[2]
if which == "alignedserve":
    model = load_model(path, device="cpu")
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
# Read every weight once, as the first forward pass would: a memory-mapped load only
# becomes resident here. max() reads every element with no full-size temporary (a
# sum(dtype=float32) on CPU makes an fp32 copy of the tensor first and would be charged).
checksum = sum(float(p.max()) for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"baseline_mib": base, "peak_mib": rss_mib(), "checksum": checksum,
                  "dtypes": dtypes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="reuse/keep the checkpoint here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or tmp)
        if not (path / "model.safetensors").exists():
            from alignedserve.worker.tiny import init_tiny

            init_tiny(path, arch="llama", dtype="float16", overrides=CONFIG)
        size_mib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {size_mib:.0f} MiB fp16 ({path})")
        print("peak RSS once every weight has been read (after import = minus the RSS of the")
        print("interpreter with torch imported)")
        print(f"{'loader':<14}{'peak RSS MiB':>14}{'x size':>8}{'after import':>14}{'x size':>8}")
        for which in ("alignedserve", "transformers"):
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, which, str(path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            extra = r["peak_mib"] - r["baseline_mib"]
            print(
                f"{which:<14}{r['peak_mib']:>14.0f}{r['peak_mib'] / size_mib:>8.2f}"
                f"{extra:>14.0f}{extra / size_mib:>8.2f}   {r['dtypes']}"
                f" checksum {r['checksum']:.3f}"
            )


if __name__ == "__main__":
    main()
