"""Targets: what a benchmark request is sent to. A target sends one request, times its stream
and returns a RequestRecord; it never raises for a failed request, the record says so.

Here: any OpenAI-compatible server over HTTP. `engine_target` holds the other: our batcher
engine in this process, with no HTTP in the way, measured by the same runner and metrics.

The client is httpx with the standard library's json, as vLLM's and SGLang's benchmark
clients use a bare HTTP client: every request of a run is built and every chunk parsed on
one event loop, whose time is the measurement's error. The openai client validates and
transforms each argument element by element: a 240-request paper-90 run (270k prompt token
ids) took 2.66 s of that loop to send, so the last request left seconds after the first, and
56 us to parse each streamed chunk, against 0.06 s and 4 us here (benchmarks/client_cost.py).
"""

from __future__ import annotations

import json
import os
import time
from types import TracebackType
from typing import Any

import httpx

from alignedserve.bench.records import Chunk, RequestRecord
from alignedserve.bench.workload import BenchRequest
from alignedserve.common.errors import ConfigError, UnavailableError

SSE_DATA = "data: "
SSE_DONE = "[DONE]"


def api_url(base_url: str) -> str:
    """The server's address with or without /v1: the client wants it with."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _client(base_url: str, max_connections: int) -> httpx.AsyncClient:
    # No retries and no client timeout: a retry would hide a failure inside a latency, and
    # the runner's --timeout-s bounds every request.
    key = os.environ.get("OPENAI_API_KEY", "unused")
    return httpx.AsyncClient(
        base_url=api_url(base_url),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None),
        timeout=None,
    )


def _error_message(status: int, body: bytes) -> str:
    """An error answer's message: OpenAI's error body's, else the body itself."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    return f"HTTP {status}: {message}"


async def first_model(base_url: str) -> str:
    """The first model the server lists at /v1/models."""
    try:
        async with _client(base_url, max_connections=1) as client:
            response = await client.get("/models")
            if response.status_code != 200:
                raise UnavailableError(
                    f"{api_url(base_url)}/models: "
                    f"{_error_message(response.status_code, response.content)}"
                )
            models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise UnavailableError(f"cannot list the models at {api_url(base_url)}: {e}") from e
    if not models:
        raise ConfigError(f"{api_url(base_url)}/models lists no model: pass --model")
    return models[0]["id"]


def _chunk_tokens(chunk: dict[str, Any], num_counted: int) -> int:
    """The output tokens a streamed chunk carries. Exact when the server puts usage on every
    chunk; otherwise 1 for a chunk with text or a finish reason, which undercounts a server
    that holds back half a character and sends two tokens' text in one chunk (TPOT, from the
    final usage, stays exact)."""
    choices = chunk.get("choices") or []
    if not choices:
        return 0  # the usage-only chunk at the end
    usage = chunk.get("usage")
    if usage is not None:
        return usage["completion_tokens"] - num_counted
    choice = choices[0]
    return 1 if choice.get("text") or choice.get("finish_reason") else 0


def completion_body(model: str, request: BenchRequest) -> dict[str, Any]:
    """The /v1/completions body for a request: its token ids as the prompt, greedy,
    streamed, EOS ignored."""
    return dict(
        model=model,
        prompt=list(request.prompt_token_ids),
        max_tokens=request.max_tokens,
        temperature=0.0,
        stream=True,
        # continuous_usage_stats (a vLLM and SGLang extension) puts usage on every chunk,
        # which gives each chunk's exact token count; others ignore it.
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        ignore_eos=True,
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
        await self._client.aclose()

    async def run(self, request: BenchRequest) -> RequestRecord:
        chunks: list[Chunk] = []
        num_counted = 0
        usage = None
        error = None
        send_s = time.perf_counter()
        body = json.dumps(completion_body(self.model, request)).encode()
        try:
            async with self._client.stream("POST", "/completions", content=body) as response:
                if response.status_code != 200:
                    error = _error_message(response.status_code, await response.aread())
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith(SSE_DATA) or line == SSE_DATA + SSE_DONE:
                            continue
                        now_s = time.perf_counter()
                        chunk = json.loads(line[len(SSE_DATA) :])
                        if "error" in chunk:  # the server failed the request mid-stream
                            error = f"stream error: {chunk['error'].get('message')}"
                            break
                        num_tokens = _chunk_tokens(chunk, num_counted)
                        usage = chunk.get("usage") or usage
                        if num_tokens > 0:
                            chunks.append(Chunk(now_s, num_tokens))
                            num_counted += num_tokens
        except (httpx.HTTPError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        return RequestRecord(
            request_id=request.request_id,
            send_s=send_s,
            end_s=time.perf_counter(),
            chunks=tuple(chunks),
            prompt_tokens=usage["prompt_tokens"] if usage else len(request.prompt_token_ids),
            completion_tokens=usage["completion_tokens"] if usage else num_counted,
            error=error,
        )
