"""Which asyncio event loop a service runs on: uvloop (libuv, in C) where it is installed,
as production uvicorn deployments run, else the standard library's; `asyncio` keeps the
standard loop, for comparison or debugging (docs/benchmarks.md, "the HTTP front end")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from alignedserve.common.errors import ConfigError

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# a service config's `event_loop` field: its flag's help and choices (common/flags.py)
FIELD_METADATA = {
    "help": "the asyncio event loop (auto: uvloop where installed)",
    "choices": EVENT_LOOPS,
}
T = TypeVar("T")


def check(name: str) -> None:
    """A config's `event_loop` field: one of EVENT_LOOPS, else a ConfigError."""
    if name not in EVENT_LOOPS:
        raise ConfigError(f"event_loop={name!r} not one of {EVENT_LOOPS}")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop `name` asks for (None: asyncio's default). `auto` is uvloop
    when it can be imported, `uvloop` insists on it."""
    check(name)
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError("event_loop=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str = "auto") -> T:
    """asyncio.run on the loop `name` asks for."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)
