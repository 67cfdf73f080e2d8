"""The host's cost of loading a batch's KV (Prefetcher.start), this tree beside an earlier
one, on the same scripted block lists.

A worker queues step N+1 while step N runs; every load it lands in a step costs host time
before that step's pass can be queued. `Prefetcher.start` issues a host call per transfer,
so its cost depends on how many transfers a request's blocks need: one per run of
consecutive ids on both sides. Which runs exist depends on the block allocator. So each
variant brings both files: its `prefetch.py` and its `common/block_allocator.py`
(--previous DIR holds an earlier checkout's two files, e.g. from `git show
db2efed:services/worker/prefetch.py`).

The script, the same for every variant (seeded):
- the pool: requests prefilled one after another, each taking its prompt's blocks in one
  call, then growing a block at a time, interleaved with the others (a decode step's
  write-backs);
- the decode GPU: a previous batch's requests take their blocks, then leave in random
  order;
- then NUM_LOADS requests are loaded at once, as a step lands them.

Each is timed two ways: a `start` per request (the worker up to the twenty-sixth session)
and one `start` for the step's loads together (`residency.load_batch` since). Printed per
variant, block shape and way: transfers of the decode GPU's share, host ms for all `start`
calls, and the load's GB/s (device time from before the first copy to the last).

    PYTHONPATH=$S python3 benchmarks/prefetch_host.py --previous benchmarks/previous/s26 --out $OUT
    PYTHONPATH=$S python3 benchmarks/prefetch_host.py --chunk-mib 128 256 512 --out $OUT  # tuning
    PYTHONPATH=$S python3 benchmarks/prefetch_host.py --direct-share 0.5 0.55 --out $OUT  # split
    PYTHONPATH=$S python3 benchmarks/prefetch_host.py --previous benchmarks/previous/s28 \
        --beside-prefill --out $OUT                                        # the prefill's loss

--beside-prefill (two GPUs) also times what a step's loads cost the prefetch GPU's prefill,
which runs there while it gathers: a stream of prefill-sized GEMMs (8,192 tokens through an
OPT-13B MLP matrix) on its current stream, alone and with the step's loads queued beside
them. Printed: how much longer the GEMMs took, and the loads' GB/s beside them.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

from device_env import event_ms, import_alignedserve, load_file

import_alignedserve()

import torch  # noqa: E402

from alignedserve.worker.kv_cache import block_runs  # noqa: E402

SHAPES = {  # one block of 16 tokens: [layers, K/V, tokens, kv heads, head dim]
    "llama3-8b": (32, 2, 16, 8, 128),  # 2 MiB in bf16
    "opt-13b": (40, 2, 16, 40, 128),  # 12.5 MiB
}
NUM_LOADS = 20
STRIDE = 1 << 15  # elements between the marks checked in each block


def load_variant(name: str, folder: Path | None) -> tuple[ModuleType, type]:
    """(prefetch module, BlockAllocator class): this tree's, or a folder's earlier files."""
    if folder is None:
        from alignedserve.common.block_allocator import BlockAllocator
        from alignedserve.worker import prefetch

        return prefetch, BlockAllocator
    allocator = load_file(f"{name}_block_allocator", folder / "block_allocator.py")
    return load_file(f"{name}_prefetch", folder / "prefetch.py"), allocator.BlockAllocator


def block_lists(allocator: type, num_pool: int, num_device: int, prompts: list[int], seed: int):
    """The scripted (pool blocks, device blocks) of each loaded request."""
    rng = random.Random(seed)
    pool = allocator(num_pool)
    owned = [pool.allocate(n) for n in prompts]  # prefill, one request after another
    for _ in range(8):  # growth: a block each per round, interleaved
        for blocks in owned:
            blocks.extend(pool.allocate(1))
    device = allocator(num_device)
    previous = [device.allocate(rng.randint(4, 40)) for _ in range(NUM_LOADS)]
    rng.shuffle(previous)
    for blocks in previous:  # the previous batch leaves in random order
        device.free(blocks)
    return [(src, device.allocate(len(src))) for src in owned]


def time_loads(prefetcher, loads, repeats: int, profile: bool) -> tuple[float, float, dict]:
    """(host seconds for the `start` calls, device seconds, {side: device seconds until
    its last copy}), medians over repeats. The sides: the decode GPU's own copies
    ("direct") and, with a prefetch GPU, its pushes ("staged", timed on the decode GPU's
    push stream, which every push is ordered on)."""
    streams = {"direct": prefetcher.direct_stream}
    if getattr(prefetcher, "push_stream", None) is not None:
        streams["staged"] = prefetcher.push_stream
    host, device, sides = [], [], {side: [] for side in streams}
    profiler = cProfile.Profile()
    for repeat in range(repeats + 1):  # the first warms up (the ring, the streams)
        torch.cuda.synchronize()
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        if profile and repeat:
            profiler.enable()
        start = time.perf_counter()
        events = [prefetcher.start(src, dst) for src, dst in loads]
        host.append(time.perf_counter() - start)
        profiler.disable()
        ends = {
            side: stream.record_event(torch.cuda.Event(enable_timing=True))
            for side, stream in streams.items()
        }
        for e in events:
            prefetcher.wait_on(e)
        end.record()
        end.synchronize()
        device.append(begin.elapsed_time(end) / 1000)
        for side, event in ends.items():
            sides[side].append(begin.elapsed_time(event) / 1000)
    if profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    median = statistics.median
    return median(host[1:]), median(device[1:]), {k: median(v[1:]) for k, v in sides.items()}


def time_beside_prefill(prefetcher, loads, staging: str, repeats: int, load_s: float) -> dict:
    """Medians over repeats: the GEMMs' ms alone and beside the loads, and the loads' ms
    beside the GEMMs. Enough GEMMs are queued to outlast the loads (`load_s` alone)."""
    a = torch.randn(8192, 5120, dtype=torch.bfloat16, device=staging)
    b = torch.randn(5120, 20480, dtype=torch.bfloat16, device=staging)

    def queue_gemms(n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        with torch.cuda.device(staging):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(n):
                torch.mm(a, b)
            end.record()
        return begin, end

    event_ms(*queue_gemms(3))  # warm up
    one_ms = event_ms(*queue_gemms(10)) / 10
    n = max(4, round(1.5 * load_s * 1e3 / one_ms))
    alone, beside, loads_ms = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize(staging)
        alone.append(event_ms(*queue_gemms(n)))
        torch.cuda.synchronize(staging)
        gemms = queue_gemms(n)
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        for src, dst in loads:
            prefetcher.wait_on(prefetcher.start(src, dst))
        end.record()
        beside.append(event_ms(*gemms))
        end.synchronize()
        loads_ms.append(begin.elapsed_time(end))
    median = statistics.median
    return dict(
        gemms=n,
        gemm_tflops=2 * a.shape[0] * a.shape[1] * b.shape[1] / one_ms / 1e9,
        gemms_alone_ms=median(alone),
        gemms_beside_ms=median(beside),
        loads_beside_ms=median(loads_ms),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--previous", type=Path, help="a folder of earlier prefetch.py, block_allocator.py"
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile the current tree's")
    parser.add_argument(
        "--chunk-mib",
        type=int,
        nargs="*",
        default=[],
        help="time the current tree with these gather chunk sizes (default: its own)",
    )
    parser.add_argument(
        "--direct-share",
        type=float,
        nargs="*",
        default=[],
        help="... and these shares of the blocks the decode GPU copies itself (two links)",
    )
    parser.add_argument(
        "--prompt-blocks",
        type=int,
        nargs=2,
        default=(8, 60),
        metavar=("LO", "HI"),
        help="each request's prompt blocks, drawn from [LO, HI] (default: 128-960 tokens)",
    )
    parser.add_argument(
        "--beside-prefill",
        action="store_true",
        help="also time the loads beside GEMMs on the prefetch GPU (its prefill's loss)",
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    # name -> (prefetch module, allocator class, Prefetcher keyword arguments)
    current = load_variant("current", None)
    # the split held where it starts (the loads here time the host, at a known split)
    variants = {"current": (*current, {"balance": False})}
    if args.chunk_mib or args.direct_share:
        del variants["current"]
        for mib, share in itertools.product(args.chunk_mib or [None], args.direct_share or [None]):
            kwargs = {"balance": False}
            if mib is not None:
                kwargs["chunk_bytes"] = mib << 20
            if share is not None:
                kwargs["direct_share"] = share
            label = ", ".join(
                f"{v} {k}" for k, v in (("MiB chunks", mib), ("direct", share)) if v is not None
            )
            variants[f"current, {label}"] = (*current, kwargs)
    if args.previous:
        variants["previous"] = (*load_variant("previous", args.previous), {})
    links = [None] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    rng = random.Random(0)
    prompts = [rng.randint(*args.prompt_blocks) for _ in range(NUM_LOADS)]
    num_pool = sum(prompts) + 8 * NUM_LOADS + 64
    num_device = num_pool
    rows = []
    print(f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)")
    for shape in args.shapes:
        pool = torch.empty((num_pool, *SHAPES[shape]), dtype=torch.bfloat16)
        # each block marked with its id (through int16: bf16 is exact only to 256)
        marks = pool.view(torch.int16).view(num_pool, -1)[:, ::STRIDE]
        marks.copy_(torch.arange(num_pool)[:, None] + torch.arange(marks.shape[1]) % 7)
        cache = torch.empty((num_device, *SHAPES[shape]), dtype=torch.bfloat16, device="cuda:0")
        nbytes = pool[0].numel() * pool.element_size()
        # one registration serves every variant (an earlier one's, which may read the pool
        # with kernels, also maps it)
        any_prefetch = (variants.get("previous") or next(iter(variants.values())))[0]
        any_prefetch.pin(pool)
        for name, (prefetch, allocator, kwargs) in variants.items():
            per_request = block_lists(allocator, num_pool, num_device, prompts, seed=1)
            num_blocks = sum(len(src) for src, _ in per_request)
            # the same loads as one start, as residency.load_batch issues them
            per_step = [
                (
                    [b for src, _ in per_request for b in src],
                    [b for _, dst in per_request for b in dst],
                )
            ]
            for staging, (mode, loads) in itertools.product(
                links, (("per request", per_request), ("per step", per_step))
            ):
                prefetcher = prefetch.Prefetcher(pool, cache, staging_device=staging, **kwargs)
                split = [round(len(src) * prefetcher.direct_share) for src, _ in loads]
                direct = sum(
                    len(block_runs(list(zip(dst[:k], src[:k], strict=True))))
                    for (src, dst), k in zip(loads, split, strict=True)
                    if k
                )
                profile = args.profile and name.startswith("current")
                if profile:
                    print(f"--- profile: {shape}, {name}, {mode}, staging {staging}")
                host_s, device_s, sides = time_loads(prefetcher, loads, args.repeats, profile)
                landed = cache.view(torch.int16).view(num_device, -1)[:, ::STRIDE]
                for src, dst in loads:  # every block landed where asked
                    assert torch.equal(landed[dst].cpu(), marks[src]), (name, staging)
                cache.zero_()
                row = dict(
                    shape=shape,
                    variant=name,
                    mode=mode,
                    starts=len(loads),
                    links=1 if staging is None else 2,
                    blocks=num_blocks,
                    direct_blocks=sum(split),
                    direct_transfers=direct,
                    host_ms=1e3 * host_s,
                    device_ms=1e3 * device_s,
                    gb_per_s=num_blocks * nbytes / device_s / 1e9,
                    **{f"{side}_ms": 1e3 * t for side, t in sides.items()},
                )
                if args.beside_prefill and staging is not None and mode == "per step":
                    row.update(
                        time_beside_prefill(prefetcher, loads, staging, args.repeats, device_s)
                    )
                    cache.zero_()
                rows.append(row)
                print(
                    f"{shape:10s} {name:9s} {mode:11s} {row['links']} link(s): {num_blocks} "
                    f"blocks ({row['direct_blocks']} direct in {direct} transfers), host "
                    f"{row['host_ms']:7.2f} ms for {len(loads):2d} starts, device "
                    f"{row['device_ms']:7.2f} ms, {row['gb_per_s']:6.1f} GB/s ("
                    + ", ".join(f"{side} {1e3 * t:.2f}" for side, t in sides.items())
                    + " ms)",
                    flush=True,
                )
                if "gemms" in row:
                    print(
                        f"{'':10s} beside {row['gemms']} GEMMs on {staging} "
                        f"({row['gemm_tflops']:.0f} TFLOP/s alone): they took "
                        f"{row['gemms_beside_ms']:.2f} ms against {row['gemms_alone_ms']:.2f} "
                        f"alone (+{row['gemms_beside_ms'] - row['gemms_alone_ms']:.2f} ms); "
                        f"the loads {num_blocks * nbytes / row['loads_beside_ms'] / 1e6:.1f} "
                        "GB/s beside them"
                        + (
                            " (they outlasted the GEMMs: the GEMMs' loss is understated)"
                            if row["loads_beside_ms"] > row["gemms_beside_ms"]
                            else ""
                        ),
                        flush=True,
                    )
        any_prefetch.unpin(pool)
        del pool, cache
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefetch_host.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
