"""One request's token stream from a batcher -> text deltas: incremental detokenization (a
multi-byte character is never split across deltas), stop strings, usage, metrics; and the
choices of one API request (several prompts, n samples each), merged as they come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from alignedserve.common.tokenizer import Tokenizer
from alignedserve.router.client import BatcherClient
from alignedserve.router.preprocess import GenerationInput
from alignedserve.router.request_stats import RequestStats
from alignedserve.router.stop import StopMatcher
from alignedserve.router.wire import GenerateChunk, Usage


@dataclass(frozen=True)
class Delta:
    text: str  # may be "" while a character or a possible stop string is held back
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # one per token when requested, else empty
    finish_reason: str | None = None  # set on the last delta
    usage: Usage | None = None  # set on the last delta


class _TextStream:
    """Token ids -> text safe to release: incremental detokenization, then stop strings."""

    def __init__(self, tokenizer: Tokenizer, request: GenerationInput):
        self._detokenizer = tokenizer.detokenizer()
        self._stops = StopMatcher(request.stop)
        self._stop_ids = request.params.stop_token_ids

    def feed(self, chunk: GenerateChunk) -> tuple[str, int | None]:
        """(text, and if a stop string ended it, how many of the chunk's tokens it took: a
        chunk may carry several, and those after the one that completed the stop string
        are dropped); at the end, the text held back is added."""
        token_ids, is_last = chunk.token_ids, chunk.finish_reason is not None
        if chunk.finish_reason == "stop" and token_ids and token_ids[-1] in self._stop_ids:
            # A stop token's text is left out, as a stop string's is (as vLLM does).
            token_ids = token_ids[:-1]
        texts = []
        for n, token in enumerate(token_ids, 1):
            text, stopped = self._stops.feed(self._detokenizer.step(token))
            texts.append(text)
            if stopped:
                return "".join(texts), n
        if is_last:
            text, stopped = self._stops.feed(self._detokenizer.flush())
            texts.append(text)
            if stopped:
                return "".join(texts), len(chunk.token_ids)
            texts.append(self._stops.flush())
        return "".join(texts), None


async def generate_text(
    client: BatcherClient, tokenizer: Tokenizer, request: GenerationInput, stats: RequestStats
) -> AsyncGenerator[Delta, None]:
    """The request's deltas, the last with finish_reason and usage. Closing the iterator before
    the end (the client went away) cancels the batcher call and records an abort."""
    texts = _TextStream(tokenizer, request)
    num_generated = 0
    finished = False
    chunks = client.generate(request.request_id, request.prompt_ids, request.params)
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                text, num_to_stop = texts.feed(chunk)
                stopped = num_to_stop is not None
                if stopped and num_to_stop < len(chunk.token_ids):
                    chunk = replace(  # the tokens after the stop string's end are not output
                        chunk,
                        token_ids=chunk.token_ids[:num_to_stop],
                        logprobs=chunk.logprobs[:num_to_stop],
                    )
                stats.on_tokens(len(chunk.token_ids))
                num_generated += len(chunk.token_ids)
                if stopped:
                    # Abort before answering, so the request's KV blocks are free by the time
                    # the client sends its next turn. The unary Abort, not one on the shared
                    # Stream call: its reply says the batcher has freed the request, where a
                    # Stream abort is acknowledged by nothing but the request's last delta.
                    # The batcher having answered, closing `chunks` aborts nothing more.
                    await client.abort(request.request_id)
                finish_reason = "stop" if stopped else chunk.finish_reason
                if finish_reason is None:
                    yield Delta(text, chunk.token_ids, chunk.logprobs)
                    continue
                # Counted here rather than taken from the batcher's usage, which a request cut
                # short by a stop string never receives.
                usage = Usage(len(request.prompt_ids), num_generated)
                finished = True
                stats.on_finish(finish_reason)
                yield Delta(text, chunk.token_ids, chunk.logprobs, finish_reason, usage)
                return
    except (GeneratorExit, asyncio.CancelledError):
        if not finished:
            stats.on_finish("abort")
        raise


async def generate_choices(
    client: BatcherClient,
    tokenizer: Tokenizer,
    requests: Sequence[GenerationInput],
    stats: Sequence[RequestStats],
) -> AsyncGenerator[tuple[int, Delta], None]:
    """(choice index, delta) of every request, as each comes; it ends once each request has
    sent its last delta. A request's error ends them all, and closing the iterator early
    cancels every batcher call still running."""
    if len(requests) == 1:  # no task in between: a request's tokens go straight through
        async with aclosing(generate_text(client, tokenizer, requests[0], stats[0])) as deltas:
            async for delta in deltas:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        deltas = generate_text(client, tokenizer, requests[index], stats[index])
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    queue.put_nowait((index, delta, None))
                    if delta.finish_reason is not None:
                        return
            raise RuntimeError(f"choice {index}'s token stream ended before its last delta")
        except Exception as exc:  # to the consumer, which stops the others
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(requests))]
    try:
        running = len(requests)
        while running:
            index, delta, exc = await queue.get()
            if exc is not None:
                raise exc
            assert delta is not None
            running -= delta.finish_reason is not None
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
