"""Torch-free code shared by every service: config, errors, model config, tokenizer, KV layout."""
