"""An opt-in profile of the worker's threads, to find where a step's host time goes.

With ALIGNEDSERVE_WORKER_PROFILE=<path> in the environment, every step's launch and finish
(the host work the stats line counts as "queueing it on the host", and the answer) run under
cProfile, and so does every batch the prefill device's thread runs (it shares the GIL with
the step thread). Each session's stats are written when it ends, per thread, to
<path>.<thread>.<pid>.<n> (thread: step or prefill); read them with `python -m pstats`.
Off (the default), it adds nothing.
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
    """One session's profile of one thread; `wrap` a function that the thread runs."""

    def __init__(self, thread: str = "step") -> None:
        self.path = os.environ.get(ENV) or None
        self.thread = thread
        self._profile = cProfile.Profile() if self.path else None

    def wrap(self, fn: Callable) -> Callable:
        if self._profile is None:
            return fn
        return functools.partial(self._profile.runcall, fn)

    def dump(self) -> None:
        """Write the session's stats (call once its step thread has no call running)."""
        if self._profile is None:
            return
        path = f"{self.path}.{self.thread}.{os.getpid()}.{next(_sessions)}"
        self._profile.dump_stats(path)
        logger.info("step thread profile written to %s", path)
