"""How busy each GPU was, from the worker's periodic stats lines (worker/service.py).

A worker's line gives, per window: its steps, how far apart they were, and the decode and
prefill devices' time per step. Over the windows in which it produced tokens, the busy share
of a device is its summed time over the windows' summed length. With 1 s windows
(ALIGNEDSERVE_STATS_INTERVAL_S=1) this says which GPU bounded a run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LINE = re.compile(
    r"([\d.]+) tokens/s, \d+ resident requests.*?; (\d+) steps ([\d.]+) ms apart .*?"
    r"decode device ([\d.]+) ms, prefill device ([\d.]+) ms"
)


def device_busy(lines: Iterable[str]) -> dict[str, float] | None:
    """{"window_s", "decode_busy", "prefill_busy"} over the windows with tokens; None if
    there were none."""
    window_ms = decode_ms = prefill_ms = 0.0
    for line in lines:
        m = LINE.search(line)
        if m is None or float(m.group(1)) == 0:
            continue
        steps = int(m.group(2))
        window_ms += steps * float(m.group(3))
        decode_ms += steps * float(m.group(4))
        prefill_ms += steps * float(m.group(5))
    if window_ms == 0:
        return None
    return {
        "window_s": window_ms / 1e3,
        "decode_busy": decode_ms / window_ms,
        "prefill_busy": prefill_ms / window_ms,
    }
