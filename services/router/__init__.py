"""OpenAI-compatible front door (HTTP + gRPC). Never imports torch."""
