"""What the serving loop costs per step with no model at all: the real batcher service
against a worker that answers every step instantly (or after --step-ms, standing for the
GPU's step), N concurrent streaming requests from a gRPC client in the same process. The
ceiling this sets on tokens/s is what the services can deliver, whatever the GPU does. The
client is the router's (BatcherClient: every request on one multiplexed Stream call), or with
--client generate one Generate call per request. Each --steps-in-flight value (the batcher's
max_steps_in_flight) runs in turn, side by side in one call.

With --client http the whole front end is measured as deployed: the batcher and the router
run as `alignedserve serve batcher` and `serve router` processes (the router on a tiny
model's tokenizer and config), and `alignedserve bench`'s own HTTP client streams
/v1/completions: in this process, or dealt among --http-clients processes (bench/clients.py).
It prints each process's CPU use over the run (seconds of CPU per second; one near 1.0 is
the ceiling's cause) and the routers' CPU microseconds per token. With --num-routers N > 1,
N router processes share the port as `alignedserve serve --num-routers N` runs them
(SO_REUSEPORT, prometheus_client's multiprocess mode). With --profile, the routers run under
cProfile and their top functions are printed.

    .venv/bin/python benchmarks/serving_overhead.py [--requests 400] [--max-tokens 256]
        [--client router|generate|http] [--http-clients 1] [--num-routers 1] [--step-ms 0]
        [--steps-in-flight 1 2] [--profile] [--router-variants "FLAGS" ...]

--router-variants (http) runs the router with each string of extra flags in turn, e.g.
"--http-parser h11 --event-loop asyncio" against "" (the defaults: httptools and uvloop);
--batcher-variants likewise the batcher process ("--event-loop asyncio"), each with every
router variant.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import multiprocessing
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from alignedserve.batcher.service import BatcherConfig, serve_batcher
from alignedserve.bench.clients import run_load_in_processes
from alignedserve.bench.shapes import Offline
from alignedserve.bench.targets import OpenAITarget, first_model
from alignedserve.bench.workload import BenchRequest
from alignedserve.common import rpc, wire
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.merged_metrics import MULTIPROC_DIR_ENV
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc, worker_pb2, worker_pb2_grpc
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router.client import BatcherClient
from alignedserve.router.server import bind_reuse_port
from alignedserve.serve import free_port
from alignedserve.serve_routers import health_pid

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=16, dtype="float32")


class InstantWorker(worker_pb2_grpc.WorkerServicer):
    """Follows the protocol, computes nothing: one token (id 5) per sampled request per step,
    after `step_s` (the event loop serves meanwhile, as the real worker's does). It runs in a
    process of its own, as the real worker does: `steps` is shared with the parent."""

    def __init__(self, step_s: float, steps) -> None:
        self.steps = steps
        self.step_s = step_s

    async def Describe(self, request, context):
        return worker_pb2.ModelInfo(
            model_name="instant",
            max_model_len=16384,
            vocab_size=32000,
            eos_token_ids=[2],
            kv_layout=wire.layout_to_proto(LAYOUT),
            num_device_blocks=200_000,
            device="none",
        )

    async def Attach(self, request, context):
        return worker_pb2.AttachResponse()

    async def Session(self, request_iterator, context):
        async for step in request_iterator:
            self.steps.value += 1
            ids = [p.request_id for p in step.prefill if p.sample]
            ids += [d.request_id for d in step.decode]
            tokens = [worker_pb2.SampledToken(request_id=i, token_id=5) for i in ids]
            if self.step_s:
                await asyncio.sleep(self.step_s)
            yield worker_pb2.StepResponse(step=step.step, tokens=tokens)


def serve_instant_worker(step_s: float, steps, ports) -> None:
    """The worker process: serves until it is terminated."""

    async def serve() -> None:
        server, _ = rpc.aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(InstantWorker(step_s, steps), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def main(args: argparse.Namespace) -> None:
    for router, batcher in itertools.product(args.router_variants, args.batcher_variants):
        rates = {depth: await run(args, depth, router, batcher) for depth in args.steps_in_flight}
        if len(rates) > 1:
            base = rates[args.steps_in_flight[0]]
            print(", ".join(f"{d} in flight: {r / base:.2f}x" for d, r in rates.items()))


async def run(
    args: argparse.Namespace, steps_in_flight: int, router_flags: str = "", batcher_flags: str = ""
) -> float:
    """One run; returns its tokens/s."""
    spawn = multiprocessing.get_context("spawn")
    steps, ports = spawn.Value("q", 0), spawn.Queue()
    worker = spawn.Process(target=serve_instant_worker, args=(args.step_ms / 1e3, steps, ports))
    worker.start()
    port = await asyncio.to_thread(ports.get, timeout=60)
    if args.client == "http":
        try:
            return await run_http(
                args, steps_in_flight, port, steps, worker.pid,
                router_flags=router_flags, batcher_flags=batcher_flags,
            )  # fmt: skip
        finally:
            worker.terminate()
            worker.join()
    started, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
    config = BatcherConfig(
        worker=f"127.0.0.1:{port}",
        port=0,
        pool_gib=0.5,
        max_waiting=10_000,
        max_steps_in_flight=steps_in_flight,
    )
    batcher = asyncio.create_task(serve_batcher(config, started=started, stop=stop))
    address = f"127.0.0.1:{await started}"
    channel = grpc.aio.insecure_channel(address)
    stub = batcher_pb2_grpc.BatcherStub(channel)
    client = BatcherClient([address])
    await client.start()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        prompt = [7] * (100 + i % 900)
        if args.client == "router":
            return sum([len(c.token_ids) async for c in client.generate(f"r{i}", prompt, params)])
        request = batcher_pb2.GenerateRequest(
            request_id=f"r{i}", prompt_token_ids=prompt, params=wire.sampling_to_proto(params)
        )
        return sum([len(m.token_ids) async for m in stub.Generate(request)])

    profile = cProfile.Profile() if args.profile else None
    start, steps_before = time.perf_counter(), steps.value
    if profile:
        profile.enable()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(args.requests))))
    if profile:
        profile.disable()
    seconds, num_steps = time.perf_counter() - start, steps.value - steps_before
    print(
        f"{steps_in_flight} in flight, {args.requests} streams x {args.max_tokens} tokens, "
        f"worker step {args.step_ms:g} ms: {num_steps} steps in {seconds:.1f} s, "
        f"{1e3 * seconds / num_steps:.2f} ms per step, {tokens / seconds:.0f} tokens/s"
    )
    assert tokens == args.requests * args.max_tokens, tokens
    stop.set()
    await client.close()
    await batcher
    await channel.close()
    worker.terminate()
    worker.join()
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    return tokens / seconds


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


async def run_http(
    args,
    steps_in_flight: int,
    worker_port: int,
    steps,
    worker_pid: int,
    *,
    router_flags: str,
    batcher_flags: str,
) -> float:
    """The batcher and router as processes of their own, this process the bench's client."""
    from alignedserve.worker.tiny import init_tiny  # the router's tokenizer and config

    model = init_tiny(Path(tempfile.mkdtemp(prefix="overhead-")), arch="llama")
    batcher_port = free_port()
    serve = [sys.executable, "-m", "alignedserve", "serve"]
    batcher = subprocess.Popen([
        *serve, "batcher", "--worker", f"127.0.0.1:{worker_port}", "--host", "127.0.0.1",
        "--port", str(batcher_port), "--metrics-port", "0", "--pool-gib", "0.5",
        "--max-waiting", "10000", "--max-steps-in-flight", str(steps_in_flight),
        *batcher_flags.split(),
    ])  # fmt: skip
    shared = args.num_routers > 1  # as serve_routers.RouterProcesses runs them
    holder = bind_reuse_port("127.0.0.1", 0, exclusive=True) if shared else None  # unheard
    http_port = holder.getsockname()[1] if holder else free_port()
    metrics_dir = tempfile.mkdtemp(prefix="overhead-metrics-")
    env = {**os.environ, MULTIPROC_DIR_ENV: metrics_dir} if shared else None
    profile_dir = Path(tempfile.mkdtemp(prefix="router-prof-"))
    routers = []
    for i in range(args.num_routers):
        profile_out = profile_dir / f"router{i}.prof"
        profiled = ["-m", "cProfile", "-o", str(profile_out)] if args.profile else []
        routers.append(subprocess.Popen([
            sys.executable, *profiled, "-m", "alignedserve", "serve", "router",
            "--model-dir", str(model), "--host", "127.0.0.1", "--port", str(http_port),
            "--batcher-addresses", f"127.0.0.1:{batcher_port}", *(["--reuse-port"] * shared),
            *router_flags.split(),
        ], env=env))  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(f"{base_url}/ready"):
            if time.monotonic() > deadline or batcher.poll() or any(r.poll() for r in routers):
                raise RuntimeError("a router or the batcher did not become ready")
            await asyncio.sleep(0.2)
        answered = set()
        while shared and not {r.pid for r in routers} <= answered:  # every router is up
            answered.add(health_pid(f"{base_url}/health"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"routers {answered} of {[r.pid for r in routers]} answered")
            await asyncio.sleep(0.05)
        requests = [
            BenchRequest(f"r{i}", 0.0, (7,) * (100 + i % 900), args.max_tokens)
            for i in range(args.requests)
        ]
        pids = {f"router{i}": r.pid for i, r in enumerate(routers)}
        pids |= {"batcher": batcher.pid, "worker": worker_pid}
        model = await first_model(base_url)
        async with OpenAITarget(base_url, model, args.requests) as target:
            cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
            client_before = time.process_time()
            start, steps_before = time.perf_counter(), steps.value
            if args.http_clients > 1:  # (their own CPU is not counted: "client" is this one's)
                run = await run_load_in_processes(
                    base_url, model, requests, Offline(args.requests), 600, args.http_clients
                )
                records = run.records
            else:
                records = await asyncio.gather(*(target.run(r) for r in requests))
            seconds, num_steps = time.perf_counter() - start, steps.value - steps_before
            cpu = {name: (_cpu_s(pid) - cpu_before[name]) / seconds for name, pid in pids.items()}
            cpu["client"] = (time.process_time() - client_before) / seconds
        router_cpu_s = seconds * sum(cpu[f"router{i}"] for i in range(args.num_routers))
        failed = [r.error for r in records if r.error]
        assert not failed, failed[:3]
        tokens = sum(r.completion_tokens for r in records)
        assert tokens == args.requests * args.max_tokens, tokens
        print(
            f"http ({args.http_clients} client processes, {args.num_routers} routers"
            f"{', router ' + router_flags if router_flags else ''}"
            f"{', batcher ' + batcher_flags if batcher_flags else ''}), "
            f"{steps_in_flight} in flight, "
            f"{args.requests} streams x {args.max_tokens} "
            f"tokens, worker step {args.step_ms:g} ms: {num_steps} steps in {seconds:.1f} s, "
            f"{1e3 * seconds / num_steps:.2f} ms per step, {tokens / seconds:.0f} tokens/s; "
            "CPU s per s: "
            + ", ".join(f"{name} {value:.2f}" for name, value in cpu.items())
            + f"; routers {1e6 * router_cpu_s / tokens:.1f} us of CPU per token"
        )
        return tokens / seconds
    finally:
        for proc in (*routers, batcher):
            proc.terminate()
            proc.wait(30)
        if holder is not None:
            holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        profiles = [str(p) for p in sorted(profile_dir.glob("*.prof"))]
        if args.profile and profiles:
            pstats.Stats(*profiles).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--client", choices=("router", "generate", "http"), default="router")
    parser.add_argument("--http-clients", type=int, default=1, help="http: bench client processes")
    parser.add_argument(
        "--num-routers", type=int, default=1, help="http: router processes sharing the port"
    )
    parser.add_argument("--step-ms", type=float, default=0.0, help="the worker's step time")
    parser.add_argument("--steps-in-flight", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--router-variants",
        nargs="+",
        default=[""],
        help='http: router flags of each variant, run in turn, e.g. "--event-loop asyncio"',
    )
    parser.add_argument(
        "--batcher-variants",
        nargs="+",
        default=[""],
        help="http: batcher flags of each variant (every router variant with each)",
    )
    asyncio.run(main(parser.parse_args()))
