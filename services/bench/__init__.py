"""`alignedserve bench`: drive an OpenAI-compatible server, or our batcher engine in process
(`--target engine`), with a named workload and report throughput and latency by the
community's definitions (vLLM `bench serve`, SGLang `bench_serving`). No torch: it runs
wherever a client does (the engine target's worker is a child process).

workload (what to send) → shapes + runner (when to send it) → targets or engine_target (send
one request, time its stream) → records → metrics (pure) → report + plots.
"""
