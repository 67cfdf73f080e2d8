"""Green contexts split the SMs (benchmarks/green_split.py, issue 5's green_overlap_probe).

GPU only: the split is the driver's. Each program of a Triton kernel records the SM it ran
on, so the tests see which SMs a stream's work reached without timing anything.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from factories import benchmark_module

pytestmark = pytest.mark.gpu


@triton.jit
def _sm_of_each_program(out_ptr, sink_ptr, spin):
    smid = tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )
    acc = smid
    for i in range(spin):  # keep each program busy a while, so that programs spread out
        acc = (acc * 1103515245 + i) & 0xFFFF
    tl.store(out_ptr + tl.program_id(0), smid)
    tl.store(sink_ptr + tl.program_id(0), acc)


def sms_reached(stream, programs: int = 4096) -> set[int]:
    out = torch.full((programs,), -1, dtype=torch.int32, device="cuda")
    sink = torch.empty_like(out)
    here = torch.cuda.current_stream()
    stream.wait_stream(here)
    with torch.cuda.stream(stream):
        _sm_of_each_program[(programs,)](out, sink, 2000)
    here.wait_stream(stream)
    torch.cuda.synchronize()
    assert int(out.min()) >= 0, "a program did not run"
    return set(out.tolist())


@pytest.fixture(scope="module")
def green_split():
    return benchmark_module("green_split")


@pytest.mark.parametrize("first_sms", [16, 80, 112])
def test_each_stream_runs_only_on_its_own_sms(green_split, first_sms):
    with green_split.GreenSplit(first_sms) as split:
        assert split.first.sms >= first_sms
        assert split.first.sms + split.second.sms == split.total_sms
        first = sms_reached(split.first.stream)
        second = sms_reached(split.second.stream)
    assert len(first) <= split.first.sms and len(second) <= split.second.sms
    assert not first & second
    everywhere = sms_reached(torch.cuda.current_stream())
    assert len(everywhere) > max(len(first), len(second))  # the primary context has them all


def test_work_on_either_stream_gives_what_the_primary_stream_gives(green_split):
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, w)
    with green_split.GreenSplit(64) as split:
        for part in (split.first, split.second):
            with torch.cuda.stream(part.stream):
                got = torch.nn.functional.linear(x, w)
            torch.cuda.current_stream().wait_stream(part.stream)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("first_sms", [0, 10_000])
def test_a_split_leaving_no_sms_to_either_side_is_refused(green_split, first_sms):
    with pytest.raises(ValueError, match="first_sms"):
        green_split.GreenSplit(first_sms)
