"""Shared by the GPU scripts: the project importable on a machine where it is not installed.

The GPU images have no network, so the project cannot be pip-installed there; a symlink named
`alignedserve` pointing at services/ stands in for the installed package.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def project_path() -> str:
    """A directory whose `alignedserve` is this checkout's services/ (made once)."""
    shim = Path(tempfile.mkdtemp())
    (shim / "alignedserve").symlink_to(ROOT / "services")
    return str(shim)


def import_alignedserve() -> None:
    """Make `import alignedserve` work in this process, installed or not."""
    try:
        import alignedserve  # noqa: F401
    except ImportError:
        sys.path.insert(0, project_path())
