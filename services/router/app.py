"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models[/{id}], and
/health, /ready, /metrics for Kubernetes and Prometheus."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from alignedserve.common.errors import UnavailableError
from alignedserve.common.merged_metrics import is_multiprocess, router_registry
from alignedserve.common.metrics import NUM_REQUESTS_HELD
from alignedserve.common.model_config import ModelConfig
from alignedserve.common.tokenizer import Tokenizer
from alignedserve.router.client import BatcherClient
from alignedserve.router.config import RouterConfig
from alignedserve.router.formats import ChatFormat, CompletionFormat, ResponseFormat
from alignedserve.router.generation import generate_choices
from alignedserve.router.guard import RequestGuard, RouterState
from alignedserve.router.http_errors import ErrorReplies, ModelNotFoundError
from alignedserve.router.preprocess import Generations, Limits, chat_inputs, completion_inputs
from alignedserve.router.request_stats import RequestStats, init_series
from alignedserve.router.schemas import ChatCompletionRequest, CompletionRequest
from alignedserve.router.serving import respond


def create_app(config: RouterConfig, client: BatcherClient) -> FastAPI:
    """The app starts and closes `client` with its lifespan. `app.state.router` is the
    RouterState a server drains with, `app.state.client` the client it stops holding."""
    model_name = config.served_model_name
    tokenizer = Tokenizer.from_dir(config.model_dir)
    model = ModelConfig.from_dir(config.model_dir)
    limits = Limits(model.max_position_embeddings, model.vocab_size, config.default_max_tokens)
    state = RouterState()
    errors = ErrorReplies(model_name, config.retry_after_s)
    created = int(time.time())
    init_series(model_name)
    registry = router_registry(config.merge_metrics_url)
    # The operator scales a pool from zero by it.
    held = NUM_REQUESTS_HELD.labels(model_name)
    if is_multiprocess():  # a scrape reads every router's file, not this process: write it
        client.on_num_held = held.set
    else:  # read at each scrape
        held.set_function(lambda: client.num_held)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="AlignedServe", lifespan=lifespan)
    app.state.router = state
    app.state.client = client
    app.add_middleware(RequestGuard, state=state, errors=errors)
    errors.install(app)

    @app.exception_handler(ClientDisconnect)  # while reading the body, or from respond()
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    def admit(model_field: str) -> None:
        if state.is_draining:
            raise UnavailableError("the router is shutting down; retry on another replica")
        if model_field != model_name:
            raise ModelNotFoundError(model_field)

    async def run(
        request: Request, arrival_s: float, gens: Generations, fmt: ResponseFormat
    ) -> Response:
        stats = [RequestStats(model_name, arrival_s, len(g.prompt_ids)) for g in gens.inputs]
        deltas = generate_choices(client, tokenizer, gens.inputs, stats)
        return await respond(request, deltas, fmt, gens, errors)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival_s = time.monotonic()
        admit(body.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        gens = completion_inputs(body, tokenizer, limits, request_id)
        fmt = CompletionFormat(
            request_id, model_name, int(time.time()), tokenizer, gens.first.params.logprobs
        )
        return await run(request, arrival_s, gens, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival_s = time.monotonic()
        admit(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        gens = chat_inputs(body, tokenizer, limits, request_id)
        fmt = ChatFormat(
            request_id, model_name, int(time.time()), tokenizer, gens.first.params.logprobs
        )
        return await run(request, arrival_s, gens, fmt)

    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "alignedserve",
        "max_model_len": limits.max_model_len,
    }

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card]})

    # `path`: a served name may hold slashes (meta-llama/Meta-Llama-3-8B), as the client's
    # models.retrieve sends it
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != model_name:
            raise ModelNotFoundError(model_id)
        return JSONResponse(card)

    @app.get("/health")
    async def health() -> JSONResponse:
        # The process answers: nothing more is claimed. Its pid tells which of several
        # routers on one port answered (`alignedserve serve --num-routers` waits for each).
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        if state.is_draining:
            return errors.response(request, UnavailableError("shutting down"))
        if not client.is_ready():
            why = f"no batcher reported a ready worker in the last {config.ready_window_s} s"
            return errors.response(request, UnavailableError(why))
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        # off the event loop: under `alignedserve serve` a scrape also reads the batcher's
        # /metrics over HTTP (common/merged_metrics.py), which must not pause every token stream
        text = await asyncio.to_thread(prometheus_client.generate_latest, registry)
        return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    return app
