"""Model execution: prefill and decode over the block-format KV cache (torch)."""
