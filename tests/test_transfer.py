"""Copies between host and device (worker/transfer.py): values arrive intact
while the ring wraps many times behind a busy stream, an upload does not queue behind a
bulk copy on another stream, nor a download behind a bulk copy to the host, and the step
results' pinned buffers are reused only after they are read. CPU: the plain path."""

from __future__ import annotations

import pytest
import torch

from alignedserve.worker import transfer


def test_on_the_cpu_it_is_a_plain_copy():
    t = torch.arange(10)
    assert torch.equal(transfer.to_device(t, "cpu"), t)
    assert transfer.tensor_on([1.5, 2.5], torch.float32, "cpu").tolist() == [1.5, 2.5]


@pytest.mark.gpu
def test_the_ring_wraps_behind_a_busy_stream_and_every_copy_arrives_intact():
    ring = transfer.PinnedRing(torch.device("cuda"), num_bytes=64 << 10)  # wraps often
    gen = torch.Generator().manual_seed(0)
    sent, arrived = [], []
    for i in range(600):
        if i % 50 == 0:  # copies queue up behind device work, so regions are still in use
            torch.cuda._sleep(2_000_000)
        n = int(torch.randint(1, 3000, (), generator=gen))
        dtype = (torch.long, torch.float32, torch.bool)[i % 3]
        t = torch.randint(0, 1000, (n,), generator=gen).to(dtype)
        sent.append(t)
        arrived.append(ring.to_device(t, torch.device("cuda")))
    torch.cuda.synchronize()
    assert all(torch.equal(s, a.cpu()) for s, a in zip(sent, arrived, strict=True))
    big = torch.arange(64 << 10)  # larger than a quarter of the ring: a copy of its own
    assert torch.equal(ring.to_device(big, torch.device("cuda")).cpu(), big)


@pytest.mark.gpu
def test_an_upload_does_not_wait_for_a_bulk_copy_queued_before_it_on_another_stream():
    """A step's inputs arrive while a load's copies (a copy engine's queue) still run."""
    host = torch.ones(2 << 30, dtype=torch.uint8, pin_memory=True)  # ~40 ms over PCIe
    into = torch.empty_like(host, device="cuda")
    side = torch.cuda.Stream()
    # the thread's ring exists and the caching allocator holds memory for the step, as in a
    # worker after its first steps (pinning and cudaMalloc wait for the whole device)
    assert (transfer.tensor_on([0, 1, 2], torch.long, "cuda") * 2).sum().item() == 6
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        into.copy_(host, non_blocking=True)
        loaded = side.record_event()
    ids = transfer.tensor_on([7, 8, 9], torch.long, "cuda")
    used = (ids * 2).sum()  # a kernel that needs the upload
    arrived = torch.cuda.current_stream().record_event()
    arrived.synchronize()
    assert used.item() == 48
    assert not loaded.query(), "the upload waited for the bulk copy"
    loaded.synchronize()


@pytest.mark.gpu
def test_the_module_path_uses_one_ring_per_thread_and_device():
    a = transfer.tensor_on([3, 4], torch.long, "cuda")
    b = transfer.tensor_on([5], torch.long, "cuda:0")
    assert a.tolist() == [3, 4] and b.tolist() == [5]
    # "cuda" is the current device's ring, not one of its own
    assert transfer._ring(torch.device("cuda", 0)) is transfer._local.rings[torch.device("cuda:0")]
    assert torch.device("cuda") not in transfer._local.rings


def test_result_buffers_are_reused_only_once_given_back():
    outputs = transfer.PinnedOutputs()
    first = outputs.take(100)
    second = outputs.take(100)  # the first is still out: a new one
    assert second[0] is not first[0] and len(first[0]) >= 100
    assert first[1] is None  # on the CPU: no device mapping
    outputs.give_back(first)
    assert outputs.take(100) is first
    outputs.give_back(second)
    bigger = outputs.take(1 << 20)  # the one given back is too small for it
    assert bigger[0] is not second[0] and len(bigger[0]) >= 1 << 20


def test_to_host_on_the_cpu_copies_the_bytes():
    host = torch.zeros(12, dtype=torch.uint8)
    transfer.to_host(torch.tensor([1.5, -2.0, 3.25]), host, None)
    assert host.view(torch.float32).tolist() == [1.5, -2.0, 3.25]
    with pytest.raises(ValueError, match="4 bytes into a buffer of 12"):
        transfer.to_host(torch.tensor([1.5]), host, None)  # would broadcast, not copy


@pytest.mark.gpu
def test_a_download_does_not_wait_for_a_bulk_copy_to_the_host_queued_before_it():
    """A step's sampled tokens reach the host while a batch's copies out to the pool (a copy
    engine's queue, to the host) still run, and arrive intact."""
    dev = torch.device("cuda")
    outputs = transfer.PinnedOutputs(dev)
    host, on_device = outputs.take(4096)
    src = torch.arange(-5, 300, device=dev)  # int64
    transfer.to_host(src[:2], host[:16], on_device[:16])  # warm: the kernel's first launch
    torch.cuda.synchronize()
    bulk = torch.ones(1 << 30, dtype=torch.uint8, device=dev)  # ~20 ms over PCIe
    into = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        into.copy_(bulk, non_blocking=True)
        copied_out = side.record_event()
    nbytes = src.numel() * 8
    transfer.to_host(src * 3, host[:nbytes], on_device[:nbytes])
    arrived = torch.cuda.current_stream().record_event()
    arrived.synchronize()
    assert not copied_out.query(), "the download waited for the bulk copy"
    copied_out.synchronize()
    # (after the query: `.cpu()` is a copy to the host, which waits for the bulk copy)
    assert torch.equal(host[:nbytes].view(torch.int64), (src * 3).cpu())


# --- uploads to a GPU through pinned buffers ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pinned_upload_gives_each_tensor_byte_for_byte_across_pieces():
    """Pieces of 1,000 bytes, so tensors cross buffers at odd offsets and both buffers are
    reused many times; each result is read on the current stream at once."""
    upload = transfer.PinnedUpload("cuda:0", chunk_bytes=1000)
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 1001, generator=g).to(torch.bfloat16),  # 6,006 bytes
        torch.randn(7, generator=g),
        torch.randint(0, 2**40, (0, 5), generator=g),
        torch.randint(0, 255, (2000,), generator=g, dtype=torch.uint8),
        torch.randn(64, 64, generator=g).to(torch.float16).t(),  # not contiguous
    ]
    out = [upload(t) for t in tensors]
    for host, dev in zip(tensors, out, strict=True):
        assert dev.device.type == "cuda" and dev.dtype == host.dtype and dev.shape == host.shape
        assert torch.equal(dev.cpu(), host)
    upload.finish()
