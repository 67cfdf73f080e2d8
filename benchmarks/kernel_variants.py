"""Earlier decode attention kernels beside the current one, and the work split as a setting:
the tooling of the side-by-side scripts (decode_kernel_sweep.py, kernel_probe.py).

An earlier kernel comes as a file or a folder (--previous): a checkout's
decode_attention.py alone (up to the twenty-fourth session, when the plan lived in it), or a
folder of its decode_attention.py and decode_plan.py. The split, "PxI[xM[xO]]" on the
command line, is (programs per SM, chunks per program, shortest chunk in key tiles,
longest item first), set as the defaults of the kernel's plan module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from device_env import import_alignedserve, load_file

import_alignedserve()

PLAN_MODULE = "alignedserve.worker.kernels.decode_plan"


def add_previous_argument(parser: argparse.ArgumentParser) -> None:
    """The scripts' --previous (repeatable), which `previous_kernels` loads."""
    parser.add_argument(
        "--previous",
        action="append",
        default=[],
        help="an earlier decode_attention.py, or a folder of it and its decode_plan.py",
    )


def previous_kernels(paths: list[str]) -> dict[str, ModuleType]:
    """Earlier decode attention kernels (the scripts' --previous), loaded by path, each named
    by its path's last part: a decode_attention.py of one file (up to the twenty-fourth
    session), or a folder holding that checkout's decode_attention.py and decode_plan.py
    (its attention file then imports its own plan file, not the current one)."""
    modules = {}
    for path in map(Path, paths):
        name = path.stem
        if not path.is_dir():
            modules[name] = load_file(f"previous_{name}", path)
            continue
        plan = load_file(f"previous_{name}_plan", path / "decode_plan.py")
        current = importlib.import_module(PLAN_MODULE)
        package = sys.modules[PLAN_MODULE.rpartition(".")[0]]
        sys.modules[PLAN_MODULE] = package.decode_plan = plan
        try:
            modules[name] = load_file(f"previous_{name}", path / "decode_attention.py")
        finally:
            sys.modules[PLAN_MODULE] = package.decode_plan = current
    return modules


def previous_kernel(kernel: ModuleType) -> tuple[Callable, Callable]:
    """(decode_attention, plan_decode) of a kernel file, called as the current ones are. A
    file from before the per-step plan (twenty-third session) plans in every call: its
    "plan" is the options it is called with."""
    if hasattr(kernel, "plan_decode"):
        return kernel.decode_attention, kernel.plan_decode

    def attend(*args, plan: dict):
        return kernel.decode_attention(*args, **plan)

    return attend, lambda *args, **options: options


def plan_module(kernel: ModuleType) -> ModuleType:
    """The module that holds a decode attention kernel's work split and tile length: its plan
    module (kernels/decode_plan.py since the twenty-fifth session), or the kernel file itself
    (earlier ones)."""
    plan_decode = getattr(kernel, "plan_decode", None)
    return sys.modules[plan_decode.__module__] if plan_decode else kernel


def split_setting(text: str, kernel: ModuleType) -> tuple[int, float, int, bool]:
    """The scripts' 'PxI[xM[xO]]' -> the attention work split (programs per SM, chunks per
    program, shortest chunk in key tiles, longest item first); M and O default to the
    kernel's."""
    fields = text.split("x")
    plan = plan_module(kernel)
    defaults = [None, None, plan.MIN_CHUNK_TILES, int(plan.LONGEST_FIRST)]
    per_sm, items, shortest, longest_first = fields + defaults[len(fields) :]
    return int(per_sm), float(items), int(shortest), bool(int(longest_first))


# the plan module's defaults that make a split, in `split_setting`'s order
SPLIT_FIELDS = ("PROGRAMS_PER_SM", "ITEMS_PER_PROGRAM", "MIN_CHUNK_TILES", "LONGEST_FIRST")


def current_split(kernel: ModuleType) -> tuple[int, float, int, bool]:
    """The kernel's attention work split, as `split_setting` gives one."""
    plan = plan_module(kernel)
    return tuple(getattr(plan, field) for field in SPLIT_FIELDS)


def set_split(kernel: ModuleType, split: tuple[int, float, int, bool]) -> None:
    """Make `split` (as `split_setting` gives it) the kernel's default."""
    plan = plan_module(kernel)
    for field, value in zip(SPLIT_FIELDS, split, strict=True):
        setattr(plan, field, value)


def split_label(split: tuple[int, float, int, bool]) -> str:
    per_sm, items, shortest, longest_first = split
    order = ", longest first" if longest_first else ""
    return f"{per_sm}x SMs, {items:g} per program, >= {shortest}{order}"
