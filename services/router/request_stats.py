"""Request-level metrics as the router sees them: latencies from the request's arrival, tokens
as they are delivered, and how each request ended."""

from __future__ import annotations

import time

from alignedserve.common import metrics


class RequestStats:
    """One request's timeline; records into the shared metrics as it goes. Its series are
    looked up once: a label lookup per token was a tenth of the router's time per token."""

    def __init__(self, model_name: str, arrival_s: float, num_prompt_tokens: int):
        self._model_name = model_name
        self._arrival_s = arrival_s  # time.monotonic() when the HTTP request arrived
        self._num_prompt_tokens = num_prompt_tokens
        self._last_token_s: float | None = None
        self._itl = metrics.INTER_TOKEN_LATENCY_SECONDS.labels(model_name)
        self._generated = metrics.GENERATION_TOKENS_TOTAL.labels(model_name)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self._last_token_s is None:
            m = self._model_name
            metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(m).observe(now - self._arrival_s)
            # Counted once the prompt is prefilled, as vLLM counts it.
            metrics.PROMPT_TOKENS_TOTAL.labels(m).inc(self._num_prompt_tokens)
        else:
            # A message carrying k tokens is k inter-token gaps of equal share.
            gap = (now - self._last_token_s) / num_tokens
            for _ in range(num_tokens):
                self._itl.observe(gap)
        self._generated.inc(num_tokens)
        self._last_token_s = now

    def on_finish(self, finish_reason: str) -> None:
        m = self._model_name
        metrics.E2E_REQUEST_LATENCY_SECONDS.labels(m).observe(time.monotonic() - self._arrival_s)
        metrics.REQUEST_SUCCESS_TOTAL.labels(m, finish_reason).inc()


def record_rejected(model_name: str, reason: str) -> None:
    metrics.REQUESTS_REJECTED_TOTAL.labels(model_name, reason).inc()


def init_series(model_name: str) -> None:
    """Creates the router's series at zero, so that dashboards and scalers find them before
    the first request."""
    for metric in (
        metrics.TIME_TO_FIRST_TOKEN_SECONDS,
        metrics.INTER_TOKEN_LATENCY_SECONDS,
        metrics.E2E_REQUEST_LATENCY_SECONDS,
        metrics.PROMPT_TOKENS_TOTAL,
        metrics.GENERATION_TOKENS_TOTAL,
    ):
        metric.labels(model_name)
    for finish_reason in ("stop", "length", "abort"):
        metrics.REQUEST_SUCCESS_TOTAL.labels(model_name, finish_reason)
