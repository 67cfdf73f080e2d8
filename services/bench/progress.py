"""Progress of a run: a tqdm bar on a terminal when tqdm is installed, else one status line
on stderr every interval_s, which keeps logs and CI output readable."""

from __future__ import annotations

import asyncio
import sys
import time
from types import TracebackType
from typing import Any

from alignedserve.bench.records import RequestRecord

STATUS_INTERVAL_S = 10.0


def _bar(label: str, total: int) -> Any | None:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)


class Progress:
    """Counts finished requests; use as `async with` around the run."""

    def __init__(self, label: str, total: int, interval_s: float = STATUS_INTERVAL_S):
        self._label = label
        self._total = total
        self._interval_s = interval_s
        self._num_done = 0
        self._num_failed = 0
        self._start_s = time.perf_counter()
        self._bar = _bar(label, total)
        self._ticker: asyncio.Task[None] | None = None

    def advance(self, record: RequestRecord) -> None:
        self._num_done += 1
        self._num_failed += not record.is_ok
        if self._bar is not None:
            self._bar.update()
            self._bar.set_postfix(failed=self._num_failed, refresh=False)

    def status(self) -> str:
        elapsed_s = time.perf_counter() - self._start_s
        return (
            f"bench {self._label}: {self._num_done}/{self._total} done, "
            f"{self._num_failed} failed, {elapsed_s:.0f} s"
        )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            print(self.status(), file=sys.stderr, flush=True)

    async def __aenter__(self) -> Progress:
        if self._bar is None:
            self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._bar is not None:
            self._bar.close()
        print(self.status(), file=sys.stderr, flush=True)
