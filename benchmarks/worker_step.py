"""The worker's decode step as the batcher sees it, against the device's own time for it.

The real worker service, over gRPC on loopback, with a client playing the batcher: it loads
B requests of KV length L (all reading the same pool blocks: loads only read them), then
sends decode steps keeping --in-flight of them unanswered, as the batcher does
(max_steps_in_flight), each decode taking the token the worker sampled last. For each batch
size it runs the worker with and without `overlap_steps`, side by side, and prints the wall
time per step against the device time the worker reports for the same steps
(StepResponse.compute_s: the pass and its sampling, timed by CUDA events). Their gap is host
time the device waits for.

With --prefetch-device, it then measures the prefill device in the serving path: batches of
prompts (90 % of 100-1,000 tokens, 10 % of 1,000-8,000, up to --prefill-tokens a batch) sent
as on_prefill_device chunks, each batch once the last is reported done, first alone, then
beside decode steps of the largest batch size, then alone again, each cell with prompts of
new lengths: prompt tokens/s, and the decode step meanwhile.

    python3 benchmarks/worker_step.py --out "$OUT"                       # a GPU machine
    python3 benchmarks/worker_step.py --prefetch-device cuda:1 --out "$OUT"   # the pair
    .venv/bin/python benchmarks/worker_step.py --tiny --device cpu --batches 4 8 --steps 20
    # what a served fcfs batch's spread of lengths costs the step, against the same KV even:
    python3 benchmarks/worker_step.py --batches 40 112 --lengths served even --overlap on
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from device_env import import_alignedserve

import_alignedserve()
import grpc  # noqa: E402

from alignedserve.batcher.kv_pool import CpuKVPool  # noqa: E402
from alignedserve.common.kv_layout import KVLayout  # noqa: E402
from alignedserve.common.model_config import ModelConfig  # noqa: E402
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


async def end_session(call, step: int, request_ids: list[str]) -> None:
    """Release the requests, then end the session's stream."""
    await call.write(worker_pb2.StepRequest(step=step, release=request_ids))
    await call.read()
    await call.done_writing()
    await call.code()


def cell_lengths(batch: int, lengths: str, kv_len: int, max_start_len: int) -> list[int]:
    """Each request's KV length: all kv_len ("uniform"), a served fcfs batch's spread
    ("served": gpu_bench's 90 %-short mix, one long request at least, each cut to
    max_start_len), or that spread's total KV shared evenly ("even"): served against even
    says what the spread costs."""
    if lengths == "uniform":
        return [kv_len] * batch
    from gpu_bench import served_lengths

    served = [min(n, max_start_len) for n in served_lengths(batch)]
    return served if lengths == "served" else [sum(served) // batch] * batch


async def run_cell(
    stub, servicer: WorkerServicer, pool, batch: int, lengths: str, kv_lens: list[int], args
) -> dict:
    """One batch (its requests' KV lengths): load, warm up (graph capture), then time
    --steps decode steps."""
    layout = pool.layout
    ids = [f"b{batch}-{lengths}-{i}" for i in range(batch)]
    call = stub.Session()
    loads = [
        worker_pb2.LoadEntry(
            request_id=r,
            pool_blocks=range(request_blocks(layout.blocks_for, n, args)),
            num_kv_tokens=n,
        )
        for r, n in zip(ids, kv_lens, strict=True)
    ]
    await call.write(worker_pb2.StepRequest(step=1, load=loads))
    await call.read()
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
                    num_kv_tokens=n + step - 2,
                    params=GREEDY,
                )
                for r, n in zip(ids, kv_lens, strict=True)
            ]
            await call.write(worker_pb2.StepRequest(step=step, decode=decodes))
            in_flight += 1
        answered.append(await call.read())
        in_flight -= 1
        if len(answered) == args.warmup:
            timed_from = time.perf_counter()
    wall_s = time.perf_counter() - timed_from
    await end_session(call, step + 1, ids)
    timed = answered[args.warmup :]
    assert all(len(r.tokens) == batch for r in timed)
    step_ms = 1e3 * wall_s / len(timed)
    device_ms = 1e3 * statistics.mean(r.compute_s for r in timed)
    return {
        "batch": batch,
        "lengths": lengths,
        "kv_len": round(statistics.mean(kv_lens)) if kv_lens else 0,
        "max_kv_len": max(kv_lens, default=0),
        "overlap_steps": servicer.overlap_steps,
        "step_ms": step_ms,
        "device_ms": device_ms,
        "host_launch_ms": 1e3 * statistics.mean(r.launch_s for r in timed),
        "device_busy": device_ms / step_ms,
        "tokens_per_s": batch / (step_ms / 1e3),
    }


def prompt_batches(args: argparse.Namespace, info, seed: int) -> list[list[list[int]]]:
    """Prompts of the paper's 90 %-short mix, packed into batches of up to --prefill-tokens:
    each seed its own shapes, as served prompts never repeat theirs."""
    rng = random.Random(seed)
    longest = min(8000, info.max_model_len - 1, args.prefill_tokens)
    batches: list[list[list[int]]] = [[]]
    used = 0
    for _ in range(args.prefill_prompts):
        n = rng.randint(100, 1000) if rng.random() < 0.9 else rng.randint(1000, longest)
        if used + n > args.prefill_tokens and batches[-1]:
            batches.append([])
            used = 0
        batches[-1].append([rng.randrange(info.vocab_size) for _ in range(n)])
        used += n
    return batches


async def run_prefill_cell(stub, pool, info, args, decode_batch: int, seed: int) -> dict:
    """Every prompt batch through the prefill device, each sent once the last is reported
    done; with decode_batch > 0, decode steps of that many requests run all along."""
    layout = layout_from_proto(info.kv_layout)
    batches = prompt_batches(args, info, seed)
    # reused batch by batch: each prompt rounds up to whole blocks (and one token more)
    blocks = list(range(layout.blocks_for(args.prefill_tokens) + args.prefill_prompts + 1))
    decode_blocks = blocks[-1:]  # only read (loads): any block does
    ids = [f"d{i}" for i in range(decode_batch)]
    call = stub.Session()
    step, num_kv = 1, args.kv_len
    kv_blocks = decode_blocks * layout.blocks_for(args.kv_len)
    loads = [
        worker_pb2.LoadEntry(request_id=r, pool_blocks=kv_blocks, num_kv_tokens=args.kv_len)
        for r in ids
    ]
    await call.write(worker_pb2.StepRequest(step=step, load=loads))
    await call.read()
    pending = list(enumerate(batches))
    busy = False
    decode_steps, decode_s, prompt_tokens = 0, 0.0, 0
    batch_s: list[float] = []  # the prefill device's seconds for each batch
    started = time.perf_counter()
    while pending or busy:
        step += 1
        msg = worker_pb2.StepRequest(step=step)
        if not busy and pending:
            b, prompts = pending.pop(0)
            used = 0
            for i, prompt in enumerate(prompts):
                n = layout.blocks_for(len(prompt) + 1)
                msg.prefill.append(
                    worker_pb2.PrefillChunk(
                        request_id=f"p{b}-{i}",
                        token_ids=prompt,
                        pool_blocks=blocks[used : used + n],
                        params=GREEDY,
                        sample=True,
                        on_prefill_device=True,
                    )
                )
                used += n
                prompt_tokens += len(prompt)
            busy = True
        for r in ids:
            msg.decode.append(
                worker_pb2.DecodeEntry(
                    request_id=r,
                    token_id=1,
                    last_sampled=num_kv > args.kv_len,
                    num_kv_tokens=num_kv,
                    params=GREEDY,
                )
            )
        num_kv += bool(ids)
        msg.wait_prefill = not ids
        await call.write(msg)
        response = await call.read()
        if response.prefilled:
            busy = False
            batch_s.append(response.prefill_s)
        if ids:
            decode_steps += 1
            decode_s += response.compute_s
    wall_s = time.perf_counter() - started
    await end_session(call, step + 1, ids)
    return {
        "decode_batch": decode_batch,
        "prompt_tokens": prompt_tokens,
        "num_batches": len(batches),
        "wall_s": wall_s,
        "prompt_tokens_per_s": prompt_tokens / wall_s,
        "prefill_device_s": sum(batch_s),
        "first_batch_s": batch_s[0],
        "median_batch_s": statistics.median(batch_s),
        "decode_steps": decode_steps,
        "decode_step_ms": 1e3 * wall_s / decode_steps if decode_steps else 0.0,
        "decode_device_ms": 1e3 * decode_s / decode_steps if decode_steps else 0.0,
    }


def request_blocks(blocks_for, kv_len: int, args: argparse.Namespace) -> int:
    """A request's blocks with room for every step's token (`blocks_for`: a KVLayout's)."""
    return blocks_for(kv_len + args.steps + 64)


def prefill_blocks(blocks_for, args: argparse.Namespace) -> int:
    """A prefill batch's blocks: its prompts each round up to whole blocks, one token more."""
    return blocks_for(args.prefill_tokens) + args.prefill_prompts + 2


def device_blocks_needed(args: argparse.Namespace, blocks_for) -> int:
    """The decode GPU's blocks for the largest cell (its lengths before the model's cap)
    and for a prefill batch beside it (`blocks_for`: tokens -> blocks)."""
    largest = max(
        sum(
            request_blocks(blocks_for, n, args) for n in cell_lengths(b, kind, args.kv_len, 1 << 30)
        )
        for b in args.batches
        for kind in args.lengths
    )
    return largest + prefill_blocks(blocks_for, args)


async def main(args: argparse.Namespace) -> None:
    model = write_model(args)
    # the worker's own layout (server.py) decides the blocks it needs
    planned = KVLayout.for_model(ModelConfig.from_dir(model), WorkerConfig.block_tokens)
    config = WorkerConfig(
        model_dir=str(model),
        device=args.device,
        num_device_blocks=args.device_blocks or device_blocks_needed(args, planned.blocks_for),
        block_tokens=planned.block_tokens,
        prefetch_device=args.prefetch_device or None,
    )
    started: list[WorkerServicer] = []
    ready = asyncio.Event()
    serving = asyncio.create_task(serve_worker(config, ready, started.append))
    await ready.wait()
    servicer = started[0]
    rows, prefill_rows = [], []
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{servicer.port}", options=CHANNEL_OPTIONS
    ) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = await stub.Describe(worker_pb2.DescribeRequest())
        layout = layout_from_proto(info.kv_layout)
        # room for every step's token after the longest start
        max_start_len = info.max_model_len - args.warmup - args.steps - 2
        cells = {
            (b, n): cell_lengths(b, n, args.kv_len, max_start_len)
            for b in args.batches
            for n in args.lengths
        }
        longest = max(max(kv_lens, default=0) for kv_lens in cells.values())
        num_pool_blocks = max(
            request_blocks(layout.blocks_for, longest, args),
            prefill_blocks(layout.blocks_for, args),
        )
        with CpuKVPool.create(layout, num_pool_blocks) as pool:
            await stub.Attach(
                worker_pb2.AttachRequest(
                    pool_name=pool.name, num_pool_blocks=pool.num_blocks, kv_layout=info.kv_layout
                )
            )
            for batch in args.batches:
                for lengths in args.lengths:
                    for overlap in args.overlap:
                        servicer.overlap_steps = overlap == "on"
                        kv_lens = cells[batch, lengths]
                        row = await run_cell(stub, servicer, pool, batch, lengths, kv_lens, args)
                        rows.append(row)
                        print(
                            f"B={batch} {lengths} L={row['kv_len']} (max {row['max_kv_len']}) "
                            f"overlap={overlap}: {row['step_ms']:.2f} ms per step, device "
                            f"{row['device_ms']:.2f} ms ({100 * row['device_busy']:.0f}% busy), "
                            f"host {row['host_launch_ms']:.2f} ms to queue it, "
                            f"{row['tokens_per_s']:.0f} tok/s",
                            flush=True,
                        )
            if args.prefetch_device:
                # alone, beside decode, alone again, each with new prompt shapes: the first
                # cell also pays the warm-up
                for seed, decode_batch in enumerate((0, max(args.batches), 0)):
                    row = await run_prefill_cell(stub, pool, info, args, decode_batch, seed)
                    prefill_rows.append(row)
                    print(
                        f"prefill device, decode batch {decode_batch}: {row['prompt_tokens']} "
                        f"prompt tokens in {row['num_batches']} batches, {row['wall_s']:.1f} s: "
                        f"{row['prompt_tokens_per_s']:.0f} prompt tok/s; device busy "
                        f"{row['prefill_device_s']:.1f} s, first batch "
                        f"{row['first_batch_s']:.2f} s, median {row['median_batch_s']:.3f} s; "
                        f"decode {row['decode_step_ms']:.2f} ms per step, device "
                        f"{row['decode_device_ms']:.2f} ms",
                        flush=True,
                    )
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    shutil.rmtree(model, ignore_errors=True)
    print(
        "\n| batch | lengths | KV length mean / max | overlap | ms per step | device ms | "
        "host ms to queue | device busy | tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['lengths']} | {r['kv_len']} / {r['max_kv_len']} | "
            f"{'on' if r['overlap_steps'] else 'off'} | {r['step_ms']:.2f} | "
            f"{r['device_ms']:.2f} | {r['host_launch_ms']:.2f} | "
            f"{100 * r['device_busy']:.0f}% | {r['tokens_per_s']:.0f} |"
        )
    if args.overlap == ["off", "on"]:
        for off, on in zip(rows[::2], rows[1::2], strict=True):
            gain = on["tokens_per_s"] / off["tokens_per_s"]
            print(f"B={on['batch']} {on['lengths']}: overlap on ÷ off, tok/s: {gain:.2f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = {"decode": rows, "prefill": prefill_rows}
        (Path(args.out) / "worker_step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU dry run)")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[8, 32, 128],
        help="decode batch sizes; 0: steps with no device work (the round trip alone)",
    )  # fmt: skip
    parser.add_argument("--kv-len", type=int, default=1024)
    parser.add_argument(
        "--lengths",
        nargs="+",
        choices=("uniform", "served", "even"),
        default=["uniform"],
        help="each request's KV length: all --kv-len, a served fcfs batch's spread, or its "
        "total shared evenly",
    )
    parser.add_argument("--overlap", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--in-flight", type=int, default=2, help="the batcher's steps ahead")
    parser.add_argument(
        "--device-blocks", type=int, default=0,
        help="KV blocks on the decode GPU; 0: what the largest batch and a prefill batch need",
    )  # fmt: skip
    parser.add_argument("--prefetch-device", default="", help="the pair's GPU: prefill there")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="a prefill batch's")
    parser.add_argument("--prefill-prompts", type=int, default=120)
    parser.add_argument("--out", default="")
    asyncio.run(main(parser.parse_args()))
