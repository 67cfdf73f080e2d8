"""The worker's decode step as the batcher sees it, against the device's own time for it.

The real worker service, over gRPC on loopback, with a client playing the batcher: it loads
B requests of KV length L (all reading the same pool blocks: loads only read them), then
sends decode steps keeping --in-flight of them unanswered, as the batcher does
(max_steps_in_flight), each decode taking the token the worker sampled last. For each batch
size it runs the worker with and without `overlap_steps`, side by side, and prints the wall
time per step against the device time the worker reports for the same steps
(StepResponse.compute_s: the pass and its sampling, timed by CUDA events). Their gap is host
time the device waits for.

    python3 benchmarks/worker_step.py --out "$OUT"                       # a GPU machine
    .venv/bin/python benchmarks/worker_step.py --tiny --device cpu --batches 4 8 --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from device_env import import_alignedserve

import_alignedserve()
import grpc  # noqa: E402

from alignedserve.batcher.kv_pool import CpuKVPool  # noqa: E402
from alignedserve.common.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from alignedserve.common.rpc import CHANNEL_OPTIONS  # noqa: E402
from alignedserve.common.sampling_params import SamplingParams  # noqa: E402
from alignedserve.common.wire import layout_from_proto, sampling_to_proto  # noqa: E402
from alignedserve.worker.server import serve_worker  # noqa: E402
from alignedserve.worker.service import WorkerConfig, WorkerServicer  # noqa: E402

GREEDY = sampling_to_proto(SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True))


def write_model(args: argparse.Namespace) -> Path:
    from alignedserve.worker.tiny import FULL_SIZE, init_tiny

    root = "/dev/shm" if not args.tiny and shutil.disk_usage("/dev/shm").free > 40e9 else None
    path = Path(tempfile.mkdtemp(prefix="worker-step-", dir=root))
    overrides = None if args.tiny else FULL_SIZE["llama3-8b"]
    dtype = "float32" if args.tiny else "bfloat16"
    draw_on = args.device if args.device.startswith("cuda") else "cpu"
    return init_tiny(path, arch="llama", dtype=dtype, overrides=overrides, device=draw_on)


async def run_cell(stub, servicer: WorkerServicer, pool, batch: int, args) -> dict:
    """One batch size: load, warm up (graph capture), then time --steps decode steps."""
    layout = pool.layout
    pool_blocks = list(range(layout.blocks_for(args.kv_len + args.steps + 64)))
    ids = [f"b{batch}-{i}" for i in range(batch)]
    call = stub.Session()
    loads = [
        worker_pb2.LoadEntry(request_id=r, pool_blocks=pool_blocks, num_kv_tokens=args.kv_len)
        for r in ids
    ]
    await call.write(worker_pb2.StepRequest(step=1, load=loads))
    await call.read()
    num_kv = args.kv_len
    step = 1
    answered: list[worker_pb2.StepResponse] = []
    in_flight = 0
    timed_from = None
    total = args.warmup + args.steps
    while len(answered) < total:
        while in_flight < args.in_flight and step - 1 < total:
            step += 1
            first = step == 2
            decodes = [
                worker_pb2.DecodeEntry(
                    request_id=r,
                    token_id=1 if first else 0,
                    last_sampled=not first,
                    num_kv_tokens=num_kv,
                    params=GREEDY,
                )
                for r in ids
            ]
            await call.write(worker_pb2.StepRequest(step=step, decode=decodes))
            num_kv += 1
            in_flight += 1
        answered.append(await call.read())
        in_flight -= 1
        if len(answered) == args.warmup:
            timed_from = time.perf_counter()
    wall_s = time.perf_counter() - timed_from
    await call.write(worker_pb2.StepRequest(step=step + 1, release=ids))
    await call.read()
    await call.done_writing()
    await call.code()
    timed = answered[args.warmup :]
    assert all(len(r.tokens) == batch for r in timed)
    step_ms = 1e3 * wall_s / len(timed)
    device_ms = 1e3 * statistics.mean(r.compute_s for r in timed)
    return {
        "batch": batch,
        "kv_len": args.kv_len,
        "overlap_steps": servicer.overlap_steps,
        "step_ms": step_ms,
        "device_ms": device_ms,
        "device_busy": device_ms / step_ms,
        "tokens_per_s": batch / (step_ms / 1e3),
    }


async def main(args: argparse.Namespace) -> None:
    model = write_model(args)
    config = WorkerConfig(
        model_dir=str(model), device=args.device, num_device_blocks=args.device_blocks
    )
    started: list[WorkerServicer] = []
    ready = asyncio.Event()
    serving = asyncio.create_task(serve_worker(config, ready, started.append))
    await ready.wait()
    servicer = started[0]
    rows = []
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{servicer.port}", options=CHANNEL_OPTIONS
    ) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = await stub.Describe(worker_pb2.DescribeRequest())
        layout = layout_from_proto(info.kv_layout)
        num_pool_blocks = layout.blocks_for(args.kv_len + args.steps + 64) + 1
        with CpuKVPool.create(layout, num_pool_blocks) as pool:
            await stub.Attach(
                worker_pb2.AttachRequest(
                    pool_name=pool.name, num_pool_blocks=pool.num_blocks, kv_layout=info.kv_layout
                )
            )
            for batch in args.batches:
                for overlap in (False, True):
                    servicer.overlap_steps = overlap
                    row = await run_cell(stub, servicer, pool, batch, args)
                    rows.append(row)
                    print(
                        f"B={batch} L={args.kv_len} overlap={overlap}: {row['step_ms']:.2f} ms "
                        f"per step, device {row['device_ms']:.2f} ms "
                        f"({100 * row['device_busy']:.0f}% busy), {row['tokens_per_s']:.0f} tok/s",
                        flush=True,
                    )
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    shutil.rmtree(model, ignore_errors=True)
    print("\n| batch | KV length | overlap | ms per step | device ms | device busy | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['kv_len']} | {'on' if r['overlap_steps'] else 'off'} | "
            f"{r['step_ms']:.2f} | {r['device_ms']:.2f} | {100 * r['device_busy']:.0f}% | "
            f"{r['tokens_per_s']:.0f} |"
        )
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        gain = on["tokens_per_s"] / off["tokens_per_s"]
        print(f"B={on['batch']}: overlap on ÷ off, tok/s: {gain:.2f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "worker_step.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU dry run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--kv-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--in-flight", type=int, default=2, help="the batcher's steps ahead")
    parser.add_argument("--device-blocks", type=int, default=16384)
    parser.add_argument("--out", default="")
    asyncio.run(main(parser.parse_args()))
