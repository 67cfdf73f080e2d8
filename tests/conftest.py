"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """One tiny random-weight Llama checkpoint for the whole run: the tests that serve a
    model only read it."""
    from alignedserve.worker.tiny import init_tiny  # torch, in the test process only

    return str(init_tiny(tmp_path_factory.mktemp("tiny"), arch="llama"))
