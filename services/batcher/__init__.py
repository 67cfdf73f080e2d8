"""CPU-memory request store, KV pool, prefix-aware batching, batch scheduler. No torch."""
