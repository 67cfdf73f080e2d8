"""Where a CUDA-graph decode step's time goes, and whether attention could hide behind the GEMMs.

    python3 benchmarks/step_profile.py --out "$OUT"        # nvidia-h200 (or any one GPU)

1. For each cell (batch x KV length) of the issue-5 grid that misses 75 % of the roofline:
   the graph step's median wall time, and from torch.profiler over a few replays the device
   time per step of each kernel class (GEMM, attention, norm, RoPE + KV append, activation,
   other). Wall minus the kernels' sum is the time the GPU sat between kernels; the pairs of
   kernels with the most idle time between them are listed.
2. Overlap probe, one step's 32 layers at B x L = 512 x 512 cut into two halves: the
   half-batch GEMMs of a layer (qkv, o, gate/up, down at M = 256) 32 times, the half-batch
   attention 32 times, and both at once on two streams, each captured as one CUDA graph.
   If "both" takes about the longer of the two, two half-batches whose attention and GEMMs
   alternate on two streams would bring those cells to max(memory, compute); if it takes
   about the sum, the GEMMs hold every SM and nothing overlaps. Where torch has cuBLASLt's SM
   carveout, the same with the GEMMs kept off 16, 33 or 66 SMs.
Results go to stdout and OUT/step_profile.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import gpu_bench  # noqa: F401  (puts alignedserve on the path)
import torch
from gpu_bench import build_model, cuda_time

from alignedserve.worker.cuda_graph import DecodeGraph, GraphInputs
from alignedserve.worker.kernels import decode_attention

CELLS = [(64, 512), (128, 512), (256, 512), (256, 1024), (512, 512), (512, 1024), (64, 4096)]
CLASSES = [  # (class, substrings of a kernel's name), first match wins
    ("attention", ("decode_attention", "decode_plan")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk", "matmul")),
    ("norm", ("rms",)),
    ("rope+append", ("rope",)),
    ("activation", ("silu",)),
]


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, keys in CLASSES:
        if any(k in lowered for k in keys):
            return label
    return "other"


def profile_cell(model, config, kv, batch: int, length: int, replays: int = 5) -> dict:
    per = kv.layout.blocks_for(length)
    tables = torch.arange(batch * per, device="cuda").view(batch, per)
    ctx = torch.full((batch,), length, dtype=torch.long, device="cuda")
    ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
    graph = DecodeGraph(model, kv, GraphInputs(batch, per, kv.num_blocks - 1, "cuda"))
    wall_s = cuda_time(lambda: graph.replay(ids, tables, ctx))
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            graph.replay(ids, tables, ctx)
        torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = event.cuda_time_total
        if device_us <= 0:
            continue
        label = kernel_class(event.key)
        by_class[label] = by_class.get(label, 0.0) + device_us / 1e3 / replays
        kernels[event.key[:90]] = (device_us / 1e3 / replays, event.count // replays)
    graph = None  # its memory pool, before the next capture
    busy_ms = sum(by_class.values())
    idle = idle_between_kernels(prof, replays)
    row = dict(
        batch=batch,
        kv_len=length,
        wall_ms=wall_s * 1e3,
        kernel_ms=busy_ms,
        gap_ms=wall_s * 1e3 - busy_ms,
        by_class_ms=by_class,
        top_kernels=sorted(kernels.items(), key=lambda kv_: -kv_[1][0])[:12],
        idle_between=idle,
    )
    parts = "  ".join(f"{k} {v:.2f}" for k, v in sorted(by_class.items(), key=lambda x: -x[1]))
    print(
        f"  B={batch:4d} L={length:5d}: wall {row['wall_ms']:6.2f} ms, kernels "
        f"{busy_ms:6.2f} ms, gaps {row['gap_ms']:5.2f} ms | {parts}",
        flush=True,
    )
    for name, (ms, count) in row["top_kernels"]:
        print(f"      {ms:7.3f} ms  x{count:4d}  {name}")
    print("    idle device time between consecutive kernels, per step (largest first):")
    for (before, after), (ms, count) in idle[:8]:
        print(f"      {ms:7.3f} ms  x{count:4d}  {before} -> {after}")
    return row


def idle_between_kernels(prof, replays: int) -> list:
    """Where the "gaps" are: for each pair of kernels that run one after the other, the
    device time between the first's end and the second's start (none if they overlap), per
    step, summed by the pair's names (first 40 characters), largest first."""
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    idle: dict[tuple[str, str], list[float]] = {}
    for before, after in itertools.pairwise(kernels):
        gap_us = max(0.0, after.time_range.start - before.time_range.end)
        pair = idle.setdefault((before.name[:40], after.name[:40]), [0.0, 0])
        pair[0] += gap_us / 1e3 / replays
        pair[1] += 1
    ranked = sorted(idle.items(), key=lambda kv_: -kv_[1][0])
    return [(pair, (ms, count // replays)) for pair, (ms, count) in ranked]


def graph_of(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up: compiles, cuBLAS heuristics
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return graph


def overlap_probe(model, config, kv, layers: int = 32) -> dict:
    half, length = 256, 512
    layer = model.model.layers[0]
    weights = [
        layer.self_attn.qkv_proj.weight,  # [6144, 4096]
        layer.self_attn.o_proj.weight,  # [4096, 4096]
        layer.mlp.gate_up_proj.weight,  # [28672, 4096]
        layer.mlp.down_proj.weight,  # [4096, 14336]
    ]
    inputs = [torch.randn(half, w.shape[1], dtype=w.dtype, device="cuda") for w in weights]
    per = kv.layout.blocks_for(length)
    tables = torch.arange(half * per, device="cuda").view(half, per)
    ctx = torch.full((half,), length, dtype=torch.long, device="cuda")
    q = torch.randn(half, config.num_heads, config.head_dim, dtype=torch.bfloat16, device="cuda")
    k_blocks, v_blocks = kv.layer(0)
    scale = config.head_dim**-0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def gemms():
        for _ in range(layers):
            for x, w in zip(inputs, weights, strict=True):
                torch.matmul(x, w.t())

    def attention(programs=None):
        for _ in range(layers):
            decode_attention(q, k_blocks, v_blocks, tables, ctx, scale, num_programs=programs)

    def both(programs=None):
        main = torch.cuda.current_stream()
        other = torch.cuda.Stream()
        other.wait_stream(main)
        with torch.cuda.stream(other):
            attention(programs)
        gemms()
        main.wait_stream(other)

    out = {}
    variants = {"gemms": gemms}  # attention at 4/SM is the kernel's default
    for per_sm in (4, 2, 1):
        variants[f"attention, {per_sm}/SM"] = lambda p=per_sm * sms: attention(p)
        variants[f"both, attention {per_sm}/SM"] = lambda p=per_sm * sms: both(p)
    for name, fn in variants.items():
        graph = graph_of(fn)
        out[name] = cuda_time(graph.replay) * 1e3
        print(f"  {name:28s} {out[name]:7.2f} ms", flush=True)
    carveout = getattr(torch._C, "_set_sm_carveout_experimental", None)
    out["sm_carveout_api"] = carveout is not None
    if carveout is not None:  # GEMMs left off some SMs (cuBLASLt's SM-count target)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        for free in (16, 33, 66):
            carveout(free)
            for name, fn in (
                (f"gemms, {free} SMs left free", gemms),
                (f"both, {free} SMs left free, attention 2/SM", lambda f=free: both(2 * f)),
                (f"both, {free} SMs left free, attention 4/SM", lambda f=free: both(4 * f)),
            ):
                out[name] = cuda_time(graph_of(fn).replay) * 1e3
                print(f"  {name:44s} {out[name]:7.2f} ms", flush=True)
        # (left set: the probe is the script's last section)
    else:
        print("  no SM carveout in this torch (torch._C._set_sm_carveout_experimental)")
    for per_sm in (4, 2, 1):
        g, a = out["gemms"], out[f"attention, {per_sm}/SM"]
        b = out[f"both, attention {per_sm}/SM"]
        hidden = (g + a - b) / min(g, a)
        out[f"hidden share, {per_sm}/SM"] = hidden
        print(
            f"  {per_sm}/SM: sum {g + a:.2f} ms, max {max(g, a):.2f} ms, both {b:.2f} ms: "
            f"{100 * hidden:.0f} % of the shorter side hidden"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip", nargs="*", default=[], help="sections: profile overlap")
    args = parser.parse_args()
    model, config, kv = build_model()
    result = {"gpu": torch.cuda.get_device_name()}
    if "profile" not in args.skip:
        print("decode step by kernel class (ms per step):")
        result["cells"] = [profile_cell(model, config, kv, b, n) for b, n in CELLS]
    if "overlap" not in args.skip:
        print("overlap probe, 32 layers of a 256-request half batch at 512 keys:")
        result["overlap"] = overlap_probe(model, config, kv)
    out = Path(args.out) / "step_profile.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
