"""When the periodic stats lines are written: one setting for every component.

Each service logs one stats line per interval (STYLE.md: tokens/s, queue, KV use, where the
time went). The interval is `ALIGNEDSERVE_STATS_INTERVAL_S` in the environment (seconds,
default 10), as vLLM's VLLM_LOG_STATS_INTERVAL: `alignedserve serve`'s children and a
benchmark's servers inherit it, so a benchmark asks for finer lines in one place.
"""

from __future__ import annotations

import os
import time

from alignedserve.common.errors import ConfigError

ENV = "ALIGNEDSERVE_STATS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0


def interval_s() -> float:
    raw = os.environ.get(ENV, "")
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{ENV}={raw!r} must be > 0")
    return value


class Window:
    """The current stats window: due once `interval_s()` has passed since it opened."""

    def __init__(self) -> None:
        self.interval_s = interval_s()
        self.opened = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.opened

    def is_due(self, num_steps: int, force: bool = False) -> bool:
        """Write the line now? Once the interval has passed, or when forced (a service
        stopping: its last, partial window) if the window saw a step."""
        return self.elapsed_s >= self.interval_s or (force and num_steps > 0)

    def ms_per(self, num_steps: int) -> float:
        """The window's length per step, in ms."""
        return ms_each(self.elapsed_s, num_steps)

    def reopen(self) -> None:
        self.opened = time.monotonic()


def ms_each(total_s: float, num_steps: int) -> float:
    """`total_s` seconds spread over the steps: ms per step (0 steps: the total)."""
    return 1e3 * total_s / max(num_steps, 1)
