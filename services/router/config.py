"""The router's configuration, and its command-line flags generated from the same fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from alignedserve.common import event_loop, flags
from alignedserve.common.errors import ConfigError

HTTP_PARSERS = ("auto", "httptools", "h11")
BALANCE_BY = ("tokens", "requests")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RouterConfig:
    model_dir: str = field(metadata=_help("model directory: tokenizer, chat template, config"))
    batcher_addresses: tuple[str, ...] = field(
        metadata=_help(
            "host:port of each batcher, or a DNS name:port standing for every address it"
            " resolves to (a headless Service: one per ready pod); requests go to the least"
            " loaded"
        )
    )
    served_model_name: str = field(
        default="", metadata=_help("the model's name in the API (default: model_dir's name)")
    )
    host: str = field(default="0.0.0.0", metadata=_help("HTTP listen address"))
    port: int = field(default=8000, metadata=_help("HTTP port"))
    reuse_port: bool = field(
        default=False,
        metadata=_help(
            "bind the port with SO_REUSEPORT, beside other routers on it (alignedserve serve"
            " --num-routers): the kernel deals the connections among them"
        ),
    )
    merge_metrics_url: str = field(
        default="",
        metadata=_help(
            "/metrics also shows the alignedserve:* series served at this URL (the batcher's,"
            " under alignedserve serve)"
        ),
    )
    default_max_tokens: int = field(
        default=4096,
        metadata=_help("max_tokens of a request that sets none (never past the context)"),
    )
    request_timeout_s: float = field(
        default=600.0, metadata=_help("deadline of one generation at the batcher")
    )
    balance_by: str = field(
        default="tokens",
        metadata={
            "help": "what the least loaded batcher has least of: context tokens (prompts to"
            " prefill and live requests' KV, so a burst of long and short prompts is split by"
            " work) or live requests",
            "choices": BALANCE_BY,
        },
    )
    load_poll_interval_s: float = field(
        default=0.5, metadata=_help("how often each batcher's load is polled")
    )
    ready_window_s: float = field(
        default=5.0,
        metadata=_help("/ready is 200 while a batcher reported a ready worker this recently"),
    )
    drain_timeout_s: float = field(
        default=30.0, metadata=_help("on SIGTERM, how long in-flight requests may finish")
    )
    retry_after_s: int = field(
        default=1, metadata=_help("Retry-After of 429 and 503 answers, seconds")
    )
    resolve_interval_s: float = field(
        default=5.0, metadata=_help("how often the names in batcher_addresses are resolved")
    )
    max_held: int = field(
        default=1024,
        metadata=_help(
            "requests held while no batcher is ready (scale from zero); more are answered 429,"
            " and 0 answers 503 at once"
        ),
    )
    hold_timeout_s: float = field(
        default=60.0, metadata=_help("how long a request is held for a ready batcher, then 503")
    )
    http_parser: str = field(
        default="auto",
        metadata={
            "help": "uvicorn's HTTP/1.1 implementation (auto: httptools where installed)",
            "choices": HTTP_PARSERS,
        },
    )
    event_loop: str = field(default="auto", metadata=event_loop.FIELD_METADATA)

    def __post_init__(self) -> None:
        if not self.batcher_addresses:
            raise ConfigError("batcher_addresses is empty: give at least one host:port")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port} outside 0..65535")
        positive = ("default_max_tokens", "request_timeout_s", "load_poll_interval_s")
        positive += ("ready_window_s", "drain_timeout_s", "resolve_interval_s", "hold_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry_after_s={self.retry_after_s} must be >= 0")
        if self.max_held < 0:
            raise ConfigError(f"max_held={self.max_held} must be >= 0")
        if self.http_parser not in HTTP_PARSERS:
            raise ConfigError(f"http_parser={self.http_parser!r} not one of {HTTP_PARSERS}")
        if self.balance_by not in BALANCE_BY:
            raise ConfigError(f"balance_by={self.balance_by!r} not one of {BALANCE_BY}")
        event_loop.check(self.event_loop)
        if not self.served_model_name:
            # The directory's own name, as vLLM names a model served from a local path.
            name = Path(self.model_dir).resolve().name
            object.__setattr__(self, "served_model_name", name)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_arguments(parser, RouterConfig)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return flags.from_args(RouterConfig, args)
