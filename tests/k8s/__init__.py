"""Kubernetes test kit: pinned helm/kubectl/prometheus binaries, and a fake API server.

`make test` sets ALIGNEDSERVE_REQUIRE_TOOLS=1 after fetching the tools, so a missing binary
fails there; a bare `pytest` on a machine without them skips those tests instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from k8s.tools import BINARIES, TOOLS_DIR


def _missing(what: str) -> None:
    if os.environ.get("ALIGNEDSERVE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{what} is missing: run `make test-tools`")
    pytest.skip(f"{what} is missing (make test-tools)")


def binary(name: str) -> Path:
    """Path of a pinned binary (helm3, helm4, kubectl) under .tools/."""
    assert name in BINARIES, name
    path = TOOLS_DIR / name
    if not path.exists():
        _missing(str(path))
    return path


def system_binary(name: str) -> Path:
    """Path of a binary on PATH (prometheus, promtool)."""
    found = shutil.which(name)
    if found is None:
        _missing(name)
    return Path(found)
