"""Host -> device copies that never make the host wait for the device.

A plain copy from pageable host memory to a GPU waits, on the host, for everything queued on
the stream before it. The worker queues step N+1 while step N still runs (worker/service.py),
so one such copy would serialise the two steps. From pinned memory with non_blocking=True the
copy is queued behind step N instead, and torch's pinned-memory cache keeps the source alive
until the copy is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the CPU) on `device`; queued, not waited for, when the device is a GPU."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), through `to_device`."""
    return to_device(torch.tensor(values, dtype=dtype), device)
