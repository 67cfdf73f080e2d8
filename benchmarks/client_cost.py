"""What the bench client itself costs on its event loop: the openai client against the bench's
httpx target (bench/targets.py), with no server in the way (httpx's mock transport answers).

1. Sending: the 240 requests of a paper-90 run (270k prompt token ids), each answered by a
   one-chunk stream. The bench sends a run's requests from one event loop, so this time
   delays the last request's departure.
2. Parsing: 40 requests of 2-token prompts, each answered by 265 streamed chunks; seconds
   per chunk.

    .venv/bin/python benchmarks/client_cost.py        # ~10 s on 2 cores
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
from device_env import import_alignedserve

import_alignedserve()
from alignedserve.bench.targets import OpenAITarget, api_url, completion_body  # noqa: E402
from alignedserve.bench.workload import make_requests  # noqa: E402

BASE_URL = "http://bench.invalid"
VOCAB = 128256  # Llama-3's
CHUNKS = 265  # about a paper-90 request's mean output


def sse(num_chunks: int) -> bytes:
    """A stream of num_chunks one-token chunks, usage on each (continuous_usage_stats)."""
    chunk = {"id": "x", "object": "text_completion", "created": 0, "model": "m"}
    choice = {"index": 0, "text": "a", "finish_reason": None, "logprobs": None}
    events = []
    for n in range(1, num_chunks + 1):
        usage = {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n}
        events.append(f"data: {json.dumps({**chunk, 'choices': [choice], 'usage': usage})}\n\n")
    return ("".join(events) + "data: [DONE]\n\n").encode()


def mock(num_chunks: int) -> httpx.MockTransport:
    body = sse(num_chunks)
    return httpx.MockTransport(
        lambda request: httpx.Response(
            200, content=body, headers={"content-type": "text/event-stream"}
        )
    )


async def with_openai(requests, num_chunks: int) -> tuple[float, int]:
    client = openai.AsyncOpenAI(
        base_url=api_url(BASE_URL),
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=mock(num_chunks)),
    )
    start, chunks = time.perf_counter(), 0
    for request in requests:
        body = completion_body("m", request)
        extra = {"ignore_eos": body.pop("ignore_eos")}  # not an argument of create()
        stream = await client.completions.create(**body, extra_body=extra)
        async for _ in stream:
            chunks += 1
    await client.close()
    return time.perf_counter() - start, chunks


async def with_target(requests, num_chunks: int) -> tuple[float, int]:
    async with OpenAITarget(BASE_URL, "m", max_connections=1) as target:
        await target._client.aclose()  # the real run(), against the mock transport
        target._client = httpx.AsyncClient(base_url=api_url(BASE_URL), transport=mock(num_chunks))
        start, chunks = time.perf_counter(), 0
        for request in requests:
            chunks += len((await target.run(request)).chunks)
        return time.perf_counter() - start, chunks


async def main() -> None:
    requests = make_requests("paper-90", 240, seed=0, rate_per_s=None, vocab_size=VOCAB)
    num_ids = sum(len(r.prompt_token_ids) for r in requests)
    print(f"1. sending {len(requests)} paper-90 requests ({num_ids} prompt token ids):")
    for name, run in (("openai client", with_openai), ("bench target (httpx)", with_target)):
        seconds, _ = await run(requests, 1)
        print(f"   {name}: {seconds:.2f} s", flush=True)
    short = make_requests(f"fixed-2-{CHUNKS}", 40, seed=0, rate_per_s=None, vocab_size=VOCAB)
    print(f"2. parsing streamed chunks ({CHUNKS} per request, {len(short)} requests):")
    for name, run in (("openai client", with_openai), ("bench target (httpx)", with_target)):
        seconds, chunks = await run(short, CHUNKS)
        print(f"   {name}: {1e6 * seconds / chunks:.1f} us per chunk", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
