"""benchmarks/kernel_variants.py's loading of earlier decode attention kernels (the sweep's and the
probe's --previous), in each layout they come in: a folder of a checkout's attention and plan
files (since the twenty-fifth session), one file with its own plan, and one from before the
per-step plan. Each must run on its own plan and split, and leave the current ones alone."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

import triton_cpu  # noqa: F401  (the interpreter, before any kernel module is defined)
from factories import benchmark_module

KERNELS = Path(__file__).resolve().parents[1] / "services" / "worker" / "kernels"
PLAN = "alignedserve.worker.kernels.decode_plan"


@pytest.fixture(scope="module")
def variants():
    return benchmark_module("kernel_variants")


def test_a_folder_loads_its_attention_file_on_its_own_plan_file(variants, tmp_path):
    package = importlib.import_module("alignedserve.worker.kernels")
    # (the package re-exports the function decode_attention under the module's name)
    decode_attention = importlib.import_module("alignedserve.worker.kernels.decode_attention")
    decode_plan = importlib.import_module(PLAN)

    folder = tmp_path / "s25"
    folder.mkdir()
    shutil.copy(KERNELS / "decode_attention.py", folder)
    text = (KERNELS / "decode_plan.py").read_text()
    assert "PROGRAMS_PER_SM = 8\n" in text
    (folder / "decode_plan.py").write_text(
        text.replace("PROGRAMS_PER_SM = 8\n", "PROGRAMS_PER_SM = 3\n")
    )

    previous = variants.previous_kernels([str(folder)])["s25"]
    plan = variants.plan_module(previous)
    assert plan.__name__ == "previous_s25_plan" and plan.PROGRAMS_PER_SM == 3
    # the attention file's own calls (a call without a plan plans) take its plan file's
    assert previous.decode_attention.__globals__["plan_decode"] is plan.plan_decode
    assert variants.previous_kernel(previous) == (previous.decode_attention, plan.plan_decode)
    # the current modules are back in place, and a split set on the earlier one stays there
    assert sys.modules[PLAN] is decode_plan and package.decode_plan is decode_plan
    assert variants.plan_module(decode_attention) is decode_plan
    variants.set_split(previous, (5, 2.0, 1, False))
    assert variants.current_split(previous) == (5, 2.0, 1, False)
    assert variants.current_split(decode_attention) == (
        decode_plan.PROGRAMS_PER_SM,
        decode_plan.ITEMS_PER_PROGRAM,
        decode_plan.MIN_CHUNK_TILES,
        decode_plan.LONGEST_FIRST,
    )
    assert decode_plan.PROGRAMS_PER_SM == 8


def test_one_file_kernels_hold_their_split_themselves(variants, tmp_path):
    """Up to the twenty-fourth session the plan lived in decode_attention.py (a file with
    plan_decode); before the twenty-third there was no plan: the options went to each call."""
    with_plan = tmp_path / "decode_attention_s24.py"
    shutil.copy(KERNELS / "decode_plan.py", with_plan)  # plan_decode and the split, one file
    without = tmp_path / "decode_attention_s22.py"
    without.write_text(
        "PROGRAMS_PER_SM, ITEMS_PER_PROGRAM, MIN_CHUNK_TILES, LONGEST_FIRST = 4, 2, 1, False\n"
        "def decode_attention(*args, **options):\n"
        "    return args, options\n"
    )
    loaded = variants.previous_kernels([str(with_plan), str(without)])
    s24, s22 = loaded["decode_attention_s24"], loaded["decode_attention_s22"]
    assert variants.plan_module(s24) is s24 and variants.plan_module(s22) is s22
    assert variants.split_setting("6x0.25", s22) == (6, 0.25, 1, False)
    assert variants.split_setting("6x0.25", s24)[2:] == (s24.MIN_CHUNK_TILES, s24.LONGEST_FIRST)
    attend, plan_decode = variants.previous_kernel(s22)
    plan = plan_decode("q", "k", num_programs=7)  # the "plan" is the call's options
    assert attend("q", plan=plan) == (("q",), {"num_programs": 7})
