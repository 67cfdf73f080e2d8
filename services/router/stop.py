"""Stop strings, matched on detokenized text as it streams."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Holds back the last (longest stop - 1) characters of the text seen so far, since they may
    begin a stop string that the next tokens complete: no text after a stop string, nor a
    prefix of one that turns out to be one, is ever released."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was hit). On a hit the released text
        ends just before the earliest stop string, and nothing more may be fed."""
        self._pending += text
        hits = [i for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            released, self._pending = self._pending[: min(hits)], ""
            return released, True
        cut = max(len(self._pending) - self._hold, 0)
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def flush(self) -> str:
        """The held-back text, once the sequence has ended without a stop string."""
        released, self._pending = self._pending, ""
        return released
