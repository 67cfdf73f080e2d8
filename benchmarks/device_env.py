"""Shared by the GPU scripts: the project importable on a machine where it is not installed,
and the time between two CUDA events.

The GPU images have no network, so the project cannot be pip-installed there; a directory of
symlinks laid out as the installed package stands in for it (pyproject's package-dir:
services/ is `alignedserve`, operator/controller/ is `alignedserve.operator`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def event_ms(begin, end) -> float:
    """The ms between two CUDA events, once the end has come (waits for it)."""
    end.synchronize()
    return begin.elapsed_time(end)


@functools.cache
def project_path() -> str:
    """A directory whose `alignedserve` package is laid out as installed: each entry of
    services/, and operator/controller/ as its `operator` (the CLI imports it to build its
    parser). Made once per process."""
    package = Path(tempfile.mkdtemp(prefix="alignedserve-shim-")) / "alignedserve"
    package.mkdir()
    for entry in (ROOT / "services").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "operator").symlink_to(ROOT / "operator" / "controller")
    return str(package.parent)


def import_alignedserve() -> None:
    """Make `import alignedserve` work in this process, installed or not."""
    try:
        import alignedserve  # noqa: F401
    except ImportError:
        sys.path.insert(0, project_path())


def load_file(name: str, path: Path) -> ModuleType:
    """The Python file at `path` as a module named `name` (an earlier checkout's copy of one
    of ours, timed beside the current one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def child_pythonpath(environ: Mapping[str, str] = os.environ) -> str:
    """PYTHONPATH for child processes (`python -m alignedserve ...`): the shim first, so they
    run this checkout whether or not a copy is installed."""
    return os.pathsep.join(p for p in (project_path(), environ.get("PYTHONPATH", "")) if p)
