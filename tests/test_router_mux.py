"""The router's requests to one batcher share one Stream call: tokens fan out to the right
request, a request ended early is aborted on the call, and a call that breaks fails only the
requests on it (the next request opens a new call)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from alignedserve.common.sampling_params import SamplingParams
from alignedserve.router.client import BatcherClient, BatcherError

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
