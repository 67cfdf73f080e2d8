"""Targets: what a benchmark request is sent to. A target sends one request, times its stream
and returns a RequestRecord; it never raises for a failed request, the record says so.

Here: any OpenAI-compatible server over HTTP. `engine_target` holds the other: our batcher
engine in this process, with no HTTP in the way, measured by the same runner and metrics.
"""

from __future__ import annotations

import os
import time
from types import TracebackType
from typing import Any

import httpx
import openai
from openai.types import Completion

from alignedserve.bench.records import Chunk, RequestRecord
from alignedserve.bench.workload import BenchRequest
from alignedserve.common.errors import ConfigError, UnavailableError


def api_url(base_url: str) -> str:
    """The server's address with or without /v1: the client wants it with."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _client(base_url: str, max_connections: int) -> openai.AsyncOpenAI:
    # No retries and no client timeout: a retry would hide a failure inside a latency, and
    # the runner's --timeout-s bounds every request.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    return openai.AsyncOpenAI(
        base_url=api_url(base_url),
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        max_retries=0,
        http_client=httpx.AsyncClient(limits=limits, timeout=None),
    )


async def first_model(base_url: str) -> str:
    """The first model the server lists at /v1/models."""
    try:
        async with _client(base_url, max_connections=1) as client:
            models = await client.models.list()
    except (openai.OpenAIError, httpx.HTTPError) as e:
        raise UnavailableError(f"cannot list the models at {api_url(base_url)}: {e}") from e
    if not models.data:
        raise ConfigError(f"{api_url(base_url)}/models lists no model: pass --model")
    return models.data[0].id


def _chunk_tokens(chunk: Completion, num_counted: int) -> int:
    """The output tokens a streamed chunk carries. Exact when the server puts usage on every
    chunk; otherwise 1 for a chunk with text or a finish reason, which undercounts a server
    that holds back half a character and sends two tokens' text in one chunk (TPOT, from the
    final usage, stays exact)."""
    if not chunk.choices:
        return 0  # the usage-only chunk at the end
    if chunk.usage is not None:
        return chunk.usage.completion_tokens - num_counted
    choice = chunk.choices[0]
    return 1 if choice.text or choice.finish_reason else 0


def completion_body(model: str, request: BenchRequest) -> dict[str, Any]:
    """The arguments of `completions.create` for a request: its token ids as the prompt,
    greedy, streamed, EOS ignored."""
    return dict(
        model=model,
        prompt=list(request.prompt_token_ids),
        max_tokens=request.max_tokens,
        temperature=0.0,
        stream=True,
        # continuous_usage_stats (a vLLM and SGLang extension) puts usage on every chunk,
        # which gives each chunk's exact token count; others ignore it.
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )


class OpenAITarget:
    """Streams /v1/completions with the request's token ids as the prompt, greedy, with EOS
    ignored so that every server emits exactly max_tokens tokens."""

    def __init__(self, base_url: str, model: str, max_connections: int):
        self.model = model
        self._client = _client(base_url, max_connections)

    async def __aenter__(self) -> OpenAITarget:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._client.close()

    async def run(self, request: BenchRequest) -> RequestRecord:
        chunks: list[Chunk] = []
        num_counted = 0
        usage = None
        error = None
        send_s = time.perf_counter()
        try:
            stream = await self._client.completions.create(**completion_body(self.model, request))
            async with stream:
                async for chunk in stream:
                    now_s = time.perf_counter()
                    num_tokens = _chunk_tokens(chunk, num_counted)
                    usage = chunk.usage or usage
                    if num_tokens > 0:
                        chunks.append(Chunk(now_s, num_tokens))
                        num_counted += num_tokens
        except (openai.OpenAIError, httpx.HTTPError) as e:
            error = f"{type(e).__name__}: {e}"
        return RequestRecord(
            request_id=request.request_id,
            send_s=send_s,
            end_s=time.perf_counter(),
            chunks=tuple(chunks),
            prompt_tokens=usage.prompt_tokens if usage else len(request.prompt_token_ids),
            completion_tokens=usage.completion_tokens if usage else num_counted,
            error=error,
        )
