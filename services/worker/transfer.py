"""Host <-> device copies that never make the host wait for the device.

A plain copy from pageable host memory to a GPU waits, on the host, for everything queued on
the stream before it. The worker queues step N+1 while step N still runs (worker/service.py),
so one such copy would serialise the two steps. From pinned memory with non_blocking=True the
copy is queued behind step N instead.

The pinned memory is not allocated per copy: each thread stages its copies in a ring of
pinned memory of its own per device, as serving engines keep persistent pinned input
buffers, so a step's inputs cost no host allocation. A region is written again only once the
copy that read it is done (a CUDA event; in practice long done, the ring holds many steps).
(In a served fcfs worker, `pin_memory()` once took 0.72 ms a call; the ring alone did not
shorten its steps, as the cause was a CPU-starved thread: worker/server.py, limit_cpu_threads.)

A kernel, not a copy engine, moves the staged bytes onto the GPU: it reads the ring where
it is (pinned memory is mapped into every GPU's address space under unified addressing).
A GPU runs copies of one direction in the order they were queued, whatever their streams:
an upload of a few KiB queued after a load of a batch's KV (hundreds of MiB, on another
stream) waited for all of it (benchmarks/copy_engines.py: 77.5 ms behind 4 GiB, 0.26 alone).
A step's results come back the same way, a kernel storing them into pinned memory
(`to_host`): a copy to the host would queue behind the copies out to the pool (a prefill
batch's KV, a decode batch's write-back) queued before it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Sequence

import torch

RING_BYTES = 16 << 20
_ALIGN = 256  # bytes: every region starts aligned for any dtype
_local = threading.local()


class _HostBytes:
    """__cuda_array_interface__ over pinned host bytes: under unified addressing their host
    address is their device address, so torch sees a CUDA tensor, without a copy."""

    def __init__(self, host: torch.Tensor):
        self.host = host  # torch keeps this object alive with the tensor it makes from it
        self.__cuda_array_interface__ = {
            "data": (host.data_ptr(), False),
            "shape": (host.numel(),),
            "typestr": "|u1",
            "version": 3,
        }


def mapped(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host bytes (uint8) as a tensor on `device`: the same memory, which the device's
    kernels read and write over PCIe."""
    with torch.cuda.device(device):
        on_device = torch.as_tensor(_HostBytes(host), device=device)
    if on_device.data_ptr() != host.data_ptr():
        # (a torch before 2.9 may copy the bytes to the GPU instead: every later upload
        # would read that stale copy, and results would never reach the host)
        raise RuntimeError(f"this torch ({torch.__version__}) copied pinned memory")
    return on_device


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _kernel_copy(src: torch.Tensor, out: torch.Tensor) -> None:
    """out = src (bytes, one of them pinned memory mapped on the device) by an elementwise
    kernel (x | 0): a plain copy would go to a copy engine, in queue order behind the bulk
    copies of its direction."""
    torch.bitwise_or(src, 0, out=out)


class PinnedRing:
    """Pinned host memory handed out in order, each region reused once its copy is done."""

    def __init__(self, device: torch.device, num_bytes: int = RING_BYTES):
        self.buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        self.on_device = mapped(self.buffer, device)  # the same bytes, as `device` reads them
        self.head = 0
        self.in_use: collections.deque = collections.deque()  # (start, end, event), oldest first

    def __del__(self) -> None:
        # kernels may still read the ring, and freed pinned memory is handed out again at
        # once (at interpreter exit CUDA may be gone already: nothing is left to read it)
        if getattr(self, "in_use", None):
            with contextlib.suppress(RuntimeError):
                self.in_use[-1][2].synchronize()

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        if size > len(self.buffer) // 4:
            # rare and large: a pinned copy of its own, a DMA copy (it may queue behind loads)
            return t.pin_memory().to(device, non_blocking=True)
        start = 0 if self.head + size > len(self.buffer) else self.head
        end = start + size
        # regions are handed out in ring order, so only the oldest can overlap the next one
        while self.in_use and self.in_use[0][0] < end and start < self.in_use[0][1]:
            self.in_use.popleft()[2].synchronize()
        while self.in_use and self.in_use[0][2].query():  # keep the queue short
            self.in_use.popleft()
        self.buffer[start : start + nbytes].view(t.dtype).view(t.shape).copy_(t)
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _kernel_copy(self.on_device[start : start + nbytes], out)
        out = out.view(t.dtype).view(t.shape)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self.in_use.append((start, end, done))
        self.head = end
        return out


class PinnedUpload:
    """Host tensors to one GPU through two pinned buffers of `chunk_bytes`, in turn: the host
    copies the next piece into one buffer while a copy stream moves the other's to the
    device. A tensor comes back ready to use on the current stream. For bulk uploads before
    any step runs (a model's weights: loader.py), so copy engines are the right road here."""

    def __init__(self, device: str | torch.device, chunk_bytes: int = 256 << 20) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
        ]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # each buffer free again
        self.turn = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        if tensor.numel() == 0:
            return out
        src, dst = _bytes(tensor), _bytes(out)
        # the copy stream writes `out`, allocated on the current stream: it waits for that
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        chunk = self.buffers[0].numel()
        for start in range(0, src.numel(), chunk):
            end = min(start + chunk, src.numel())
            buffer, done = self.buffers[self.turn], self.copied[self.turn]
            if done is not None:
                done.synchronize()  # its last piece has left for the device
            buffer[: end - start].copy_(src[start:end])
            with torch.cuda.stream(self.stream):
                dst[start:end].copy_(buffer[: end - start], non_blocking=True)
                self.copied[self.turn] = torch.cuda.Event()
                self.copied[self.turn].record(self.stream)
            self.turn ^= 1
        out.record_stream(self.stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def finish(self) -> None:
        """Wait for the last copies, so the pinned buffers can go."""
        self.stream.synchronize()


def _ring(device: torch.device) -> PinnedRing:
    rings = getattr(_local, "rings", None)
    if rings is None:
        rings = _local.rings = {}
    ring = rings.get(device)
    if ring is None:
        ring = rings[device] = PinnedRing(device)
    return ring


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the CPU) on `device`; queued, not waited for, when the device is a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _ring(device).to_device(t.contiguous(), device)


def tensor_on(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), through `to_device`."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_host(src: torch.Tensor, host: torch.Tensor, on_device: torch.Tensor | None) -> None:
    """Queue `src`'s bytes into `host` (uint8, as many bytes), whose device mapping is
    `on_device` (None: `src` is on the CPU, a plain copy). On a GPU a kernel stores them
    (`_kernel_copy`). The caller keeps `host` until the kernel is done: torch's
    pinned allocator does not see a kernel write it, as it sees a copy."""
    nbytes = src.numel() * src.element_size()
    if host.numel() != nbytes or (on_device is not None and on_device.numel() != nbytes):
        raise ValueError(f"to_host: {nbytes} bytes into a buffer of {host.numel()}")
    if on_device is None:
        host.copy_(_bytes(src))
    else:
        _kernel_copy(_bytes(src), on_device)


class PinnedOutputs:
    """Pinned host buffers for a step's results (its sampled tokens), reused once read: taken
    by a step, given back after its host values are read. Each comes with its mapping on the
    device, where `to_host` writes (None on the CPU)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self._device = device  # None: plain host memory (tests on the CPU)
        self._free: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(host bytes, their device mapping), at least `num_bytes` long."""
        with self._lock:
            for i, (host, _) in enumerate(self._free):
                if len(host) >= num_bytes:
                    return self._free.pop(i)
        on_gpu = self._device is not None
        host = torch.empty(max(num_bytes, 4096), dtype=torch.uint8, pin_memory=on_gpu)
        return host, mapped(host, self._device) if on_gpu else None

    def give_back(self, buffer: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        with self._lock:
            self._free.append(buffer)
