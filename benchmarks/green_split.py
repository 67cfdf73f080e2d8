"""Two CUDA streams on disjoint sets of SMs, by green contexts (CUDA 12.4+ driver API).

The fortieth and forty-second sessions could not keep a decode step's GEMMs and its attention
on separate SMs: cuBLAS ignores torch's SM carveout, and a kernel's program count does not pin
it to SMs. A green context owns a partition of the SMs; work queued on a stream created in it
runs only there. `GreenSplit(first_sms)` cuts the device's SMs into a group of at least
`first_sms` (rounded up to the driver's granularity, 8 on Hopper) and the rest, makes a green
context and a stream on each, and hands the streams to torch as external streams, so that
cuBLAS, Triton and torch's own kernels can be queued on them with `torch.cuda.stream(...)`.

Only the GPU image has `cuda.bindings` (cuda-python); nothing served imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ok(result, what: str):
    """The values of a cuda.bindings call, or an error naming the call."""
    from cuda.bindings import driver as cu

    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err.name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass
class Part:
    sms: int
    context: object  # CUgreenCtx
    handle: object  # CUstream
    stream: torch.cuda.ExternalStream


class GreenSplit:
    """The current device's SMs in two green contexts: `first` (at least `first_sms` SMs) and
    `second` (the rest), each with one non-blocking stream."""

    def __init__(self, first_sms: int, device: int | None = None):
        from cuda.bindings import driver as cu

        index = torch.cuda.current_device() if device is None else device
        torch.cuda.init()
        torch.cuda.synchronize(index)  # the primary context is current: the driver retains it
        dev = _ok(cu.cuDeviceGet(index), "cuDeviceGet")
        resource_sm = cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        whole = _ok(cu.cuDeviceGetDevResource(dev, resource_sm), "cuDeviceGetDevResource")
        self.total_sms = whole.sm.smCount
        if not 0 < first_sms < self.total_sms:
            raise ValueError(f"first_sms {first_sms}: between 1 and {self.total_sms - 1}")
        groups, count, rest = _ok(
            cu.cuDevSmResourceSplitByCount(1, whole, 0, first_sms), "cuDevSmResourceSplitByCount"
        )
        if count != 1 or rest.sm.smCount == 0:
            raise RuntimeError(f"no split of {self.total_sms} SMs leaves {first_sms} and more")
        self.parts: list[Part] = []
        for resource in (groups[0], rest):
            desc = _ok(cu.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
            flags = cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
            ctx = _ok(cu.cuGreenCtxCreate(desc, dev, flags), "cuGreenCtxCreate")
            non_blocking = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
            handle = _ok(cu.cuGreenCtxStreamCreate(ctx, non_blocking, 0), "cuGreenCtxStreamCreate")
            stream = torch.cuda.ExternalStream(int(handle), device=index)
            self.parts.append(Part(resource.sm.smCount, ctx, handle, stream))
        self.first, self.second = self.parts

    def close(self) -> None:
        from cuda.bindings import driver as cu

        torch.cuda.synchronize()
        for part in self.parts:
            _ok(cu.cuStreamDestroy(part.handle), "cuStreamDestroy")
            _ok(cu.cuGreenCtxDestroy(part.context), "cuGreenCtxDestroy")
        self.parts = []

    def __enter__(self) -> GreenSplit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
