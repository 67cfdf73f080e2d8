"""An opt-in profile of the worker's step thread, to find where a step's host time goes.

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
from collections.abc import Callable

logger = logging.getLogger(__name__)

ENV = "ALIGNEDSERVE_WORKER_PROFILE"
_sessions = itertools.count(1)


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
