"""The router's requests to one batcher share one Stream call: tokens fan out to the right
request, a request ended early is aborted on the call, and a call that breaks fails only the
requests on it (the next request opens a new call)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from alignedserve.common.proto import batcher_pb2
from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router.batcher_stream import BatcherError, coalesced
from alignedserve.router.client import BatcherClient
from alignedserve.router.wire import chunk_from_proto

from fake_batcher import FakeBatcherFactory


@pytest.fixture
def fakes() -> Iterator[FakeBatcherFactory]:
    factory = FakeBatcherFactory()
    yield factory
    factory.close()


async def tokens_of(client: BatcherClient, request_id: str, prompt: list[int], n: int) -> list:
    chunks = [c async for c in client.generate(request_id, prompt, SamplingParams(max_tokens=n))]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == n
    return [t for c in chunks for t in c.token_ids]


def test_concurrent_requests_share_one_call_and_get_their_own_tokens(fakes):
    fake = fakes(token_delay_s=0.002)

    async def scenario() -> list[list[int]]:
        client = BatcherClient([fake.address], poll_interval_s=0.05)
        await client.start()
        try:
            jobs = (tokens_of(client, f"r{i}", [10 + i, 100 + i], 7) for i in range(30))
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    results = asyncio.run(scenario())
    # the fake cycles each prompt's tokens: nothing of another request's stream crossed over
    assert results == [[10 + i, 100 + i] * 3 + [10 + i] for i in range(30)]
    assert fake.num_stream_calls == 1


def test_a_request_closed_early_is_aborted_on_the_shared_call(fakes):
    fake = fakes(token_delay_s=0.005)

    async def scenario() -> list[int]:
        client = BatcherClient([fake.address], poll_interval_s=0.05)
        await client.start()
        try:
            long = client.generate("long", [1, 2], SamplingParams(max_tokens=1000))
            await anext(long)
            await long.aclose()  # the HTTP client went away
            for _ in range(100):
                if "long" in fake.cancelled:
                    break
                await asyncio.sleep(0.02)
            return await tokens_of(client, "next", [3], 3)  # the call serves on
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [3, 3, 3]
    assert fake.cancelled == ["long"]
    assert fake.num_stream_calls == 1


def test_a_broken_call_fails_its_requests_and_the_next_request_opens_another(fakes):
    fake = fakes(token_delay_s=0.005)

    async def scenario() -> tuple[BatcherError, list[int]]:
        client = BatcherClient([fake.address], poll_interval_s=0.05)
        await client.start()
        try:
            long = client.generate("long", [1, 2], SamplingParams(max_tokens=1000))
            await anext(long)
            fake.break_streams_with = grpc.StatusCode.INTERNAL
            with pytest.raises(BatcherError) as e:
                async for _ in long:
                    pass
            fake.break_streams_with = None
            return e.value, await tokens_of(client, "next", [4, 5], 3)
        finally:
            await client.close()

    error, tokens = asyncio.run(scenario())
    assert error.grpc_code == grpc.StatusCode.INTERNAL and "stream broken" in str(error)
    assert tokens == [4, 5, 4]
    assert fake.num_stream_calls == 2


def test_a_slow_reader_gets_the_tokens_queued_for_it_in_one_chunk(fakes):
    """A reader that falls behind the batcher (a loaded router) takes what has queued for its
    request as one chunk, every token once and in order."""
    fake = fakes(token_delay_s=0.001)

    async def scenario() -> list:
        client = BatcherClient([fake.address], poll_interval_s=0.05)
        await client.start()
        try:
            chunks = []
            async for chunk in client.generate("slow", [5, 6, 7], SamplingParams(max_tokens=60)):
                chunks.append(chunk)
                await asyncio.sleep(0.02)  # ~20 tokens' time per chunk
            return chunks
        finally:
            await client.close()

    chunks = asyncio.run(scenario())
    assert [t for c in chunks for t in c.token_ids] == ([5, 6, 7] * 20)
    assert len(chunks) < 30 and max(len(c.token_ids) for c in chunks) > 3  # merged
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == 60


def test_deltas_queued_behind_a_chunk_merge_up_to_the_end_or_an_error():
    def delta(tokens, finish="", usage=None):
        msg = batcher_pb2.RequestDelta(
            request_id="r", token_ids=tokens, logprobs=[-0.5] * len(tokens)
        )
        msg.finish_reason = finish
        if usage:
            msg.usage.prompt_tokens, msg.usage.completion_tokens = usage
        return msg

    def queued(*msgs) -> asyncio.Queue:
        queue = asyncio.Queue()
        for msg in msgs:
            queue.put_nowait(msg)
        return queue

    first = chunk_from_proto(delta([1]))
    q = queued(delta([2, 3]), delta([4], "length", (9, 4)), delta([99]))
    chunk, error = coalesced(first, q)
    assert (chunk.token_ids, chunk.logprobs) == ((1, 2, 3, 4), (-0.5,) * 4)
    assert (chunk.finish_reason, chunk.usage.completion_tokens, error) == ("length", 4, None)
    assert q.qsize() == 1  # nothing is taken past the end
    failed = BatcherError("batcher gone", grpc.StatusCode.UNAVAILABLE)
    chunk, error = coalesced(first, queued(delta([2]), failed))
    assert (chunk.token_ids, chunk.finish_reason, error) == ((1, 2), None, failed)
    assert coalesced(first, queued()) == (first, None)
