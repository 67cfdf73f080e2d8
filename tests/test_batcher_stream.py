"""The Batcher's multiplexed Stream call (the router's): many requests on one call, each
engine step's deltas of all of them in one message, errors per request, aborts by message
and by ending the call, and refusals while draining."""

from __future__ import annotations

import asyncio

import grpc
from test_batcher_service import generate, greedy, stack

from alignedserve.batcher.service import BatcherConfig, serve_batcher
from alignedserve.common import wire
from alignedserve.common.proto import batcher_pb2, batcher_pb2_grpc
from alignedserve.serve import free_port
from alignedserve.worker.server import serve_worker
from alignedserve.worker.service import WorkerConfig

from factories import random_prompts


def generate_msg(request_id, prompt, params) -> batcher_pb2.StreamRequest:
    request = batcher_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt, params=wire.sampling_to_proto(params)
    )
    return batcher_pb2.StreamRequest(generate=request)


def abort_msg(request_id) -> batcher_pb2.StreamRequest:
    return batcher_pb2.StreamRequest(abort=batcher_pb2.AbortRequest(request_id=request_id))


async def idle_load(stub, tries: int = 100) -> batcher_pb2.LoadReport:
    for _ in range(tries):
        load = await stub.GetLoad(batcher_pb2.GetLoadRequest())
        if load.kv_pool_usage == 0 and load.num_running + load.num_waiting == 0:
            break
        await asyncio.sleep(0.05)
    return load


def test_one_call_carries_many_requests_with_the_tokens_of_generate(model_dir):
    prompts = random_prompts((9, 17, 30, 5, 12, 21), seed=3)

    async def main():
        async with stack(model_dir, free_port()) as (stub, _):
            expected = [await generate(stub, f"g{i}", p, greedy(12)) for i, p in enumerate(prompts)]
            call = stub.Stream()
            for i, p in enumerate(prompts):
                await call.write(generate_msg(f"s{i}", p, greedy(12)))
            # one bad request fails alone, with Generate's status, and the rest go on
            await call.write(generate_msg("bad", [1] * 100_000, greedy(4)))
            tokens = {f"s{i}": [] for i in range(len(prompts))}
            finals, errors, sizes = {}, {}, []
            while len(finals) + len(errors) < len(prompts) + 1:
                msg = await call.read()
                sizes.append(len(msg.deltas))
                for d in msg.deltas:
                    if d.error_code:
                        errors[d.request_id] = (grpc.StatusCode.INVALID_ARGUMENT, d.error_message)
                        assert d.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                        continue
                    tokens[d.request_id] += d.token_ids
                    if d.finish_reason:
                        finals[d.request_id] = (d.finish_reason, d.usage)
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF  # half-closed with nothing live: ends
            return expected, tokens, finals, errors, sizes, await idle_load(stub)

    expected, tokens, finals, errors, sizes, load = asyncio.run(main())
    for i, (want, finish, usage) in enumerate(expected):
        assert tokens[f"s{i}"] == want
        got_finish, got_usage = finals[f"s{i}"]
        assert got_finish == finish == "length"
        assert got_usage == usage
    assert list(errors) == ["bad"] and "prompt" in errors["bad"][1]
    assert max(sizes) >= 2  # a step's deltas of several requests travel together
    assert load.kv_pool_usage == 0.0


def test_abort_by_message_and_by_ending_the_call_free_everything(model_dir):
    prompts = random_prompts((12,) * 6, seed=5)

    async def main():
        async with stack(model_dir, free_port()) as (stub, _):
            call = stub.Stream()
            for i, p in enumerate(prompts):
                await call.write(generate_msg(f"a{i}", p, greedy(2000)))
            started: set[str] = set()
            while len(started) < len(prompts):
                started |= {d.request_id for d in (await call.read()).deltas}
            for i in range(3):
                await call.write(abort_msg(f"a{i}"))
            finals = {}
            while len(finals) < 3:
                for d in (await call.read()).deltas:
                    if d.finish_reason:
                        finals[d.request_id] = d.finish_reason
            busy = await stub.GetLoad(batcher_pb2.GetLoadRequest())
            call.cancel()  # the router went away: its other requests are aborted
            return finals, busy, await idle_load(stub, tries=20)  # long before 2000 tokens

    finals, busy, load = asyncio.run(main())
    assert finals == {"a0": "abort", "a1": "abort", "a2": "abort"}
    assert busy.num_running + busy.num_waiting + busy.num_pooled == 3
    # the three live requests' prompts (12 tokens each) and the tokens they have generated
    assert 3 * 12 < busy.num_context_tokens <= 3 * (12 + 2000)
    assert load.kv_pool_usage == 0.0 and load.num_running == load.num_pooled == 0
    assert load.num_context_tokens == 0


def test_a_draining_batcher_refuses_new_requests_and_finishes_live_ones(model_dir):
    async def main():
        worker_port = free_port()
        worker = asyncio.create_task(serve_worker(WorkerConfig(model_dir, port=worker_port)))
        started, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
        config = BatcherConfig(worker=f"127.0.0.1:{worker_port}", port=0, pool_gib=0.05)
        batcher = asyncio.create_task(serve_batcher(config, started=started, stop=stop))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{await asyncio.wait_for(started, 60)}")
        try:
            call = batcher_pb2_grpc.BatcherStub(channel).Stream()
            await call.write(generate_msg("live", [5, 6, 7], greedy(1000)))
            await call.read()  # it runs
            stop.set()  # SIGTERM
            await asyncio.sleep(0.2)
            await call.write(generate_msg("new", [5, 6, 7], greedy(3)))
            refused = None
            while refused is None:
                refused = next((d for d in (await call.read()).deltas if d.error_code), None)
            assert not batcher.done()  # still draining the live request
            await call.write(abort_msg("live"))
            final = None
            while final is None:
                msgs = (await call.read()).deltas
                final = next((d for d in msgs if d.request_id == "live" and d.finish_reason), None)
            await asyncio.wait_for(batcher, 10)  # drained: nothing live
            return refused, final
        finally:
            await channel.close()
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    refused, final = asyncio.run(main())
    assert refused.request_id == "new"
    assert refused.error_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "draining" in refused.error_message
    assert final.finish_reason == "abort"
