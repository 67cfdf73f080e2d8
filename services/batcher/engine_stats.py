"""The batcher's periodic stats line: tokens/s, requests by state, KV pool use, where the
engine loop's time went, and whether the prefill device was kept fed.

The loop's time splits into planning (schedule and build each step), sending, waiting for
the worker's answers and applying them (tokens to their streams). The prefill device is fed
when a batch is queued on it whenever requests wait for prefill; the line gives the share of
the time that requests waited with no batch queued there, and with fewer than the most it
may hold (scheduler.core.PREFILL_BATCHES_IN_FLIGHT), and the decode GPU's prefill turns
(scheduler/turns.py) with their share of the time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from alignedserve.common import stats_line

log = logging.getLogger("alignedserve.batcher.engine")


@dataclass
class LoopStats:
    """Sums over the current window."""

    steps: int = 0
    tokens: int = 0  # answered output tokens
    plan_s: float = 0.0
    send_s: float = 0.0
    wait_s: float = 0.0  # awaiting the worker's answers
    apply_s: float = 0.0
    unfed_s: float = 0.0  # requests waited for prefill, no batch queued on the prefill device
    underfed_s: float = 0.0  # ... fewer batches queued than it may hold
    turns: int = 0  # steps in which the decode GPU prefilled beside the prefill device
    turn_s: float = 0.0  # the decode device's seconds in them


class EngineStats:
    def __init__(self, max_prefill_batches: int) -> None:
        self.max_prefill_batches = max_prefill_batches
        self.window = stats_line.Window()
        self.sums = LoopStats()
        self._observed = time.perf_counter()
        self._unfed = self._underfed = False

    @contextlib.contextmanager
    def timer(self, field: str) -> Iterator[None]:
        """`with stats.timer("plan_s"): ...` adds the block's seconds to that sum."""
        began = time.perf_counter()
        try:
            yield
        finally:
            sums = self.sums
            setattr(sums, field, getattr(sums, field) + time.perf_counter() - began)

    def observe(self, num_unplanned: int, num_prefill_batches: int | None) -> None:
        """The prefill queue as it is now: requests waiting for prefill that no batch holds,
        and the batches queued on the prefill device (None: there is none)."""
        now = time.perf_counter()
        span = now - self._observed
        self.sums.unfed_s += span * self._unfed
        self.sums.underfed_s += span * self._underfed
        self._observed = now
        waits = num_prefill_batches is not None and num_unplanned > 0
        self._unfed = waits and num_prefill_batches == 0
        self._underfed = waits and num_prefill_batches < self.max_prefill_batches

    def answered(self, num_tokens: int, turn_s: float | None = None) -> None:
        """A step's answer was applied: it carried num_tokens sampled tokens; turn_s: it was
        a decode-GPU prefill turn that took the device this long."""
        self.sums.steps += 1
        self.sums.tokens += num_tokens
        if turn_s is not None:
            self.sums.turns += 1
            self.sums.turn_s += turn_s

    def log_if_due(self, load: Callable[[], dict[str, float]], force: bool = False) -> None:
        """The line, once the window is due (`load`: BatcherEngine.load, read only then)."""
        s = self.sums
        if not self.window.is_due(s.steps, force):
            return
        counts = load()
        elapsed = self.window.elapsed_s
        each = functools.partial(stats_line.ms_each, num_steps=s.steps)
        log.info(
            "%.1f tokens/s; %d steps %.1f ms apart: planning %.1f ms, sending %.1f ms, waiting "
            "for the worker %.1f ms, applying answers %.1f ms each; requests: %d waiting for "
            "prefill, %d pooled, %d on the device; KV pool %.1f%% used; prefill device: "
            "requests waited with no batch queued there %.0f%% of the time, with one slot "
            "free %.0f%%; decode GPU prefill turns: %d, %.0f%% of the time",
            s.tokens / elapsed,
            s.steps,
            self.window.ms_per(s.steps),
            each(s.plan_s),
            each(s.send_s),
            each(s.wait_s),
            each(s.apply_s),
            counts["num_waiting"],
            counts["num_pooled"],
            counts["num_running"],
            100 * counts["kv_pool_usage"],
            100 * s.unfed_s / elapsed,
            100 * (s.underfed_s - s.unfed_s) / elapsed,
            s.turns,
            100 * s.turn_s / elapsed,
        )
        self.sums = LoopStats()
        self.window.reopen()
