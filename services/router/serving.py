"""Answering one generation request, streamed (server-sent events) or whole, and stopping its
generations (one per choice) as soon as the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Send

from alignedserve.router.formats import ResponseFormat, usage_json
from alignedserve.router.generation import Delta
from alignedserve.router.http_errors import ErrorReplies
from alignedserve.router.preprocess import Generations
from alignedserve.router.wire import Usage

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


Choice = tuple[int, Delta]  # a delta of the choice with that index


async def respond(
    request: Request,
    deltas: AsyncGenerator[Choice, None],
    fmt: ResponseFormat,
    gens: Generations,
    errors: ErrorReplies,
) -> Response:
    if not gens.stream:
        choices = await until_disconnect(request, _collect(deltas, len(gens.inputs)))
        usage = Usage(gens.num_prompt_tokens, sum(len(d.token_ids) for c in choices for d in c))
        return JSONResponse(fmt.response(choices, usage))
    # Wait for the first delta before answering, so that admission errors (429 queue full,
    # 503 draining) get their own status instead of an error event inside a 200.
    first = await until_disconnect(request, anext(deltas))
    return EventStreamResponse(_events(first, deltas, fmt, gens, errors))


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """`await awaitable` in this task, cancelled if the client disconnects meanwhile (which
    cancels the batcher call inside it); then ClientDisconnect."""
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, scope))
        try:
            return await awaitable
        finally:
            watcher.cancel()
    raise ClientDisconnect()  # reached only when the scope was cancelled


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    # The body has been read, so the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _collect(deltas: AsyncIterator[Choice], num_choices: int) -> list[list[Delta]]:
    choices: list[list[Delta]] = [[] for _ in range(num_choices)]
    async for index, delta in deltas:
        choices[index].append(delta)
    return choices


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(
    first: Choice,
    deltas: AsyncGenerator[Choice, None],
    fmt: ResponseFormat,
    gens: Generations,
    errors: ErrorReplies,
) -> AsyncGenerator[str, None]:
    num_prompt = gens.num_prompt_tokens
    num_tokens = 0  # generated so far by every choice, the held-back deltas' included
    running = len(gens.inputs)  # choices without their last delta yet
    async with aclosing(deltas):
        for chunk in fmt.prelude(running):
            yield _event(chunk)
        index, delta = first
        try:
            while True:
                num_tokens += len(delta.token_ids)
                chunk = fmt.chunk(index, delta)
                if chunk is not None:
                    if gens.continuous_usage:
                        chunk["usage"] = usage_json(Usage(num_prompt, num_tokens))
                    yield _event(chunk)
                running -= delta.finish_reason is not None
                if not running:
                    break
                index, delta = await anext(deltas)
        except Exception as exc:
            # The 200 is out: the error travels as an event, as OpenAI's and vLLM's do.
            yield _event(errors.event(exc))
        else:
            if gens.include_usage:
                yield _event(fmt.usage_chunk(Usage(num_prompt, num_tokens)))
    yield DONE


class EventStreamResponse(StreamingResponse):
    """Closes its events however the response ends: when a client disconnects, Starlette
    cancels the sending task and would leave the generator (and its batcher call) to the
    garbage collector; closing it here cancels the call at once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def stream_response(self, send: Send) -> None:
        async with aclosing(self._events):
            await super().stream_response(send)
