"""Watch machinery of the fake API server: the event log (for resuming from a resourceVersion)
and the subscribers, each with its filter and queue. Runs on the server's loop thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_LOG_EVENTS = 200_000  # then the older half is dropped; resuming before it answers 410


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    storage_key: tuple[str, str]
    obj: dict
    old: dict | None  # the previous state, for selector transitions


@dataclass(eq=False)
class Watcher:
    """One watch stream's filter and queue; `None` in the queue ends the stream."""

    storage_key: tuple[str, str]
    namespace: str | None
    matches: Callable[[dict], bool]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def _selects(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        in_ns = self.namespace is None or obj["metadata"].get("namespace") == self.namespace
        return in_ns and self.matches(obj)

    def translate(self, event: Event) -> tuple[str, dict] | None:
        """The event as this watcher sees it: an object leaving the selection is DELETED for it,
        one entering it is ADDED, as the API server's watch cache reports them."""
        if event.storage_key != self.storage_key:
            return None
        now_in, was_in = self._selects(event.obj), self._selects(event.old)
        if event.type == "ADDED":
            return ("ADDED", event.obj) if now_in else None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if now_in or was_in else None
        if now_in:
            return ("MODIFIED" if was_in else "ADDED", event.obj)
        return ("DELETED", event.obj) if was_in else None


class ResumeTooOld(Exception):
    """The requested resourceVersion is older than the log (the server answers 410 Expired)."""


class WatchHub:
    def __init__(self) -> None:
        self._log: list[Event] = []
        self._start_rv = 0
        self.watchers: set[Watcher] = set()

    def record(self, event: Event) -> None:
        self._log.append(event)
        if len(self._log) > MAX_LOG_EVENTS:
            self._start_rv = self._log[MAX_LOG_EVENTS // 2 - 1].rv
            self._log = self._log[MAX_LOG_EVENTS // 2 :]
        for watcher in list(self.watchers):
            seen = watcher.translate(event)
            if seen is not None:
                watcher.queue.put_nowait(seen)

    def subscribe(self, watcher: Watcher, since: int | None) -> list[tuple[str, dict]]:
        """Register watcher; return the logged events after `since` that it selects."""
        if since is not None and since < self._start_rv:
            raise ResumeTooOld(since)
        missed = []
        if since is not None:
            missed = [
                seen
                for event in self._log
                if event.rv > since and (seen := watcher.translate(event)) is not None
            ]
        self.watchers.add(watcher)
        return missed

    def unsubscribe(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def end(self, storage_key: tuple[str, str] | None = None) -> None:
        """End the streams of one resource (its CRD is gone), or all (shutdown)."""
        for watcher in list(self.watchers):
            if storage_key is None or watcher.storage_key == storage_key:
                watcher.queue.put_nowait(None)
