"""What the kernels' launch plans ask of the GPU, looked up once per device."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device_index: int | None) -> int:
    """The device's SM count. Cached: at small batches a kernel takes ~20 us and the host's
    launch path shows (torch's property lookup is a few us a call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
