"""What the serving loop costs per step with no model at all: the real batcher service
against a worker that answers every step instantly (or after --step-ms, standing for the
GPU's step), N concurrent streaming requests from a gRPC client in the same process. The
ceiling this sets on tokens/s is what the services can deliver, whatever the GPU does. The
client is the router's (BatcherClient: every request on one multiplexed Stream call), or with
--client generate one Generate call per request. Each --steps-in-flight value (the batcher's
max_steps_in_flight) runs in turn, side by side in one call.

    .venv/bin/python benchmarks/serving_overhead.py [--requests 400] [--max-tokens 256]
        [--client router|generate] [--step-ms 0] [--steps-in-flight 1 2] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import time

import grpc

from alignedserve.batcher.service import BatcherConfig, serve_batcher
from alignedserve.common import rpc, wire
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc, worker_pb2, worker_pb2_grpc
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router.client import BatcherClient

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
    rates = {depth: await run(args, depth) for depth in args.steps_in_flight}
    if len(rates) > 1:
        base = rates[args.steps_in_flight[0]]
        print(", ".join(f"{d} in flight: {r / base:.2f}x" for d, r in rates.items()))


async def run(args: argparse.Namespace, steps_in_flight: int) -> float:
    """One run; returns its tokens/s."""
    spawn = multiprocessing.get_context("spawn")
    steps, ports = spawn.Value("q", 0), spawn.Queue()
    worker = spawn.Process(target=serve_instant_worker, args=(args.step_ms / 1e3, steps, ports))
    worker.start()
    port = await asyncio.to_thread(ports.get, timeout=60)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--client", choices=("router", "generate"), default="router")
    parser.add_argument("--step-ms", type=float, default=0.0, help="the worker's step time")
    parser.add_argument("--steps-in-flight", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))
