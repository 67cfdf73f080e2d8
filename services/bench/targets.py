"""Targets: what a benchmark request is sent to. A target sends one request, times its stream
and returns a RequestRecord; it never raises for a failed request, the record says so.

Today: any OpenAI-compatible server over HTTP. The seam (`Target`) is there so that an
in-process engine, with no HTTP in the way, can be measured by the same runner and metrics.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import httpx
import openai

from alignedserve.bench.records import Chunk, RequestRecord
from alignedserve.bench.workload import BenchRequest


class Target(Protocol):
    async def run(self, request: BenchRequest) -> RequestRecord: ...


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
    async with _client(base_url, max_connections=1) as client:
        models = await client.models.list()
        if not models.data:
            raise openai.NotFoundError  # unreachable on a well-behaved server
        return models.data[0].id
