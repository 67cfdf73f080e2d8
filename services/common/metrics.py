"""Every Prometheus metric of the project, defined once in the default registry.

Names mirror vLLM's (`vllm:num_requests_waiting` -> `alignedserve:num_requests_waiting`, ...)
so dashboards, gateways and autoscalers that read the model-server protocol map one to one;
renaming one breaks them downstream, so names are chosen here and nowhere else. Every metric
carries `model_name`. The batcher sets the gauges and the batch/prefetch metrics; the router
records the request-level ones (latencies, tokens, outcomes).

Several routers (`alignedserve serve --num-routers`) run in prometheus_client's multiprocess
mode, whose /metrics sums their counters and histograms over the processes; a gauge a router
sets says how to combine them with its `multiprocess_mode` (ignored in a single process).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "alignedserve:"
MODEL = ("model_name",)

# Latency buckets follow vLLM's, with finer low ends: an aligned batch decodes a token in a
# few milliseconds, and TTFT of short prompts is tens of milliseconds.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075),
    *(0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_BUCKETS = (
    *(0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0),
    *(40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
RATIO_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
PREFETCH_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# ---- gauges (batcher) ----------------------------------------------------------------------
NUM_REQUESTS_WAITING = Gauge(
    f"{PREFIX}num_requests_waiting", "Requests admitted and waiting for prefill.", MODEL
)
NUM_REQUESTS_RUNNING = Gauge(
    f"{PREFIX}num_requests_running", "Requests whose KV is on the decode device.", MODEL
)
NUM_REQUESTS_POOLED = Gauge(
    f"{PREFIX}num_requests_pooled", "Requests whose KV waits in the CPU pool for a batch.", MODEL
)
KV_CACHE_USAGE_PERC = Gauge(
    f"{PREFIX}kv_cache_usage_perc", "Fraction of the decode device's KV blocks in use, 0-1.", MODEL
)
CPU_POOL_USAGE_PERC = Gauge(
    f"{PREFIX}cpu_pool_usage_perc", "Fraction of the CPU KV pool's blocks in use, 0-1.", MODEL
)
WORKER_READY = Gauge(
    f"{PREFIX}worker_ready",
    "1 while the batcher's worker is attached and answering, else 0.",
    MODEL,
)
WORKER_START_SECONDS = Gauge(
    f"{PREFIX}worker_start_seconds",
    "The attached worker's start, by phase: load (weights, KV caches) and warm_up (kernels "
    "compiled, decode graphs captured).",
    (*MODEL, "phase"),
)
WORKER_KERNEL_CACHE_ENTRIES = Gauge(
    f"{PREFIX}worker_kernel_cache_entries",
    "Compiled kernels the attached worker found in its kernel cache at start (0: it compiled "
    "them all).",
    MODEL,
)

# ---- gauges (router) -----------------------------------------------------------------------
NUM_REQUESTS_HELD = Gauge(
    f"{PREFIX}num_requests_held",
    "Requests the router holds while no batcher is ready (scale from zero).",
    MODEL,
    multiprocess_mode="livesum",  # those of the routers alive
)

# ---- histograms ------------------------------------------------------------------------------
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    f"{PREFIX}time_to_first_token_seconds",
    "Request arrival at the router to its first generated token.",
    MODEL,
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY_SECONDS = Histogram(
    f"{PREFIX}inter_token_latency_seconds",
    "Gap between streamed token batches of a request, per token.",
    MODEL,
    buckets=ITL_BUCKETS,
)
E2E_REQUEST_LATENCY_SECONDS = Histogram(
    f"{PREFIX}e2e_request_latency_seconds",
    "Request arrival at the router to its last token.",
    MODEL,
    buckets=REQUEST_BUCKETS,
)
REQUEST_QUEUE_TIME_SECONDS = Histogram(
    f"{PREFIX}request_queue_time_seconds",
    "Admission at the batcher to the start of the request's prefill.",
    MODEL,
    buckets=REQUEST_BUCKETS,
)
BATCH_LENGTH_SPREAD = Histogram(
    f"{PREFIX}batch_length_spread",
    "(longest - shortest) / longest KV length of a decoded batch, 0-1: 0 is perfectly aligned.",
    MODEL,
    buckets=RATIO_BUCKETS,
)
PREFETCH_SECONDS = Histogram(
    f"{PREFIX}prefetch_seconds",
    "Time to bring a step's loaded KV from the CPU pool onto a device (per step answer: "
    "the longest load that landed since the one before).",
    MODEL,
    buckets=PREFETCH_BUCKETS,
)

# ---- counters (prometheus_client exposes a Counter named x as x_total) ----------------------
PROMPT_TOKENS_TOTAL = Counter(f"{PREFIX}prompt_tokens_total", "Prefilled prompt tokens.", MODEL)
GENERATION_TOKENS_TOTAL = Counter(
    f"{PREFIX}generation_tokens_total", "Generated tokens delivered to clients.", MODEL
)
REQUEST_SUCCESS_TOTAL = Counter(
    f"{PREFIX}request_success_total",
    "Finished requests by finish reason (stop, length, abort).",
    (*MODEL, "finished_reason"),
)
BATCH_SWITCHES_TOTAL = Counter(
    f"{PREFIX}batch_switches_total", "Times the decode device switched to another batch.", MODEL
)
PREFETCH_BYTES_TOTAL = Counter(
    f"{PREFIX}prefetch_bytes_total", "KV bytes copied from the CPU pool to a device.", MODEL
)
REQUESTS_REJECTED_TOTAL = Counter(
    f"{PREFIX}requests_rejected_total",
    "Requests answered with an error, by reason (invalid_request, queue_full, ...).",
    (*MODEL, "reason"),
)


def start_metrics_server(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Serve `registry` at /metrics in the classic text format, whatever the scraper asks for.

    prometheus_client's own server answers Prometheus' default Accept header with OpenMetrics
    1.0, whose sample names cannot carry ':' there, so `alignedserve:x` would be stored as
    `alignedserve_x` and miss every dashboard and rule. The router serves the same format.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
