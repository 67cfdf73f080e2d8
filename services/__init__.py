"""AlignedServe: decode together only requests whose KV caches have about the same length.

Package map (the folder layout is the architecture):
  alignedserve.common    config, errors, model config, tokenizer, KV block layout (no torch)
  alignedserve.router    OpenAI-compatible front door (no torch)
  alignedserve.batcher   CPU KV pool, request store, prefix-aware batching, scheduler (no torch)
  alignedserve.worker    model execution on the GPU pair (torch)
  alignedserve.operator  kopf operator for the AlignedServe custom resource (no torch)
"""

__version__ = "0.1.0"
