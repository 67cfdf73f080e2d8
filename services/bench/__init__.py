"""`alignedserve bench`: drive an OpenAI-compatible server with a named workload and report
throughput and latency by the community's definitions (vLLM `bench serve`, SGLang
`bench_serving`). No torch: it runs wherever a client does.

workload (what to send) → shapes + runner (when to send it) → targets (send one request,
time its stream) → records → metrics (pure) → report + plots.
"""
