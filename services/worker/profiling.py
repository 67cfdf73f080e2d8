"""Where a worker step's host time goes: the phases of a slow step, always logged
(`Phases`), and an opt-in profile of the step thread (`StepProfile`).

A step whose host work takes longer than SLOW_STEP_S is logged with the time of each phase,
at most once a second (`Phases.log_if_slow`).

With ALIGNEDSERVE_WORKER_PROFILE=<path> in the environment, every step's launch and finish
(the host work the stats line counts as "queueing it on the host", and the answer) run under
cProfile, and each session's stats are written to <path>.<pid>.<session> when it ends; read
them with `python -m pstats`. Off (the default), it adds nothing to a step.
"""

from __future__ import annotations

import cProfile
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

ENV = "ALIGNEDSERVE_WORKER_PROFILE"
SLOW_STEP_S = 0.02
_sessions = itertools.count(1)


class Phases:
    """One step's host phases: `mark` ends one, named; `log_if_slow` logs them all."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._marks = [("", self.start)]

    def mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter()))

    def log_if_slow(
        self, elapsed_s: float, last_logged_s: float, describe: Callable[[], str]
    ) -> float:
        """Log the phases, after `describe()`, if `elapsed_s` passed SLOW_STEP_S and none
        was logged in the last second; returns when one was last logged."""
        if elapsed_s <= SLOW_STEP_S or self.start - last_logged_s <= 1.0:
            return last_logged_s
        phases = ", ".join(
            f"{name} {1e3 * (t - t0):.1f}" for (_, t0), (name, t) in itertools.pairwise(self._marks)
        )
        logger.info("%s took %.1f ms to queue: %s", describe(), 1e3 * elapsed_s, phases)
        return self.start


class StepProfile:
    """One session's profile; `wrap` a function that the step thread runs."""

    def __init__(self) -> None:
        self.path = os.environ.get(ENV) or None
        self._profile = cProfile.Profile() if self.path else None

    def wrap(self, fn: Callable) -> Callable:
        if self._profile is None:
            return fn
        return functools.partial(self._profile.runcall, fn)

    def dump(self) -> None:
        """Write the session's stats (call once its step thread has no call running)."""
        if self._profile is None:
            return
        path = f"{self.path}.{os.getpid()}.{next(_sessions)}"
        self._profile.dump_stats(path)
        logger.info("step thread profile written to %s", path)
