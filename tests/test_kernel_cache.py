"""The GPU worker's Triton kernel cache: checked writable before the weights load, with an
error that says what to set (the image's user has no home, so Triton's default cannot be
written)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignedserve.common.errors import ConfigError
from alignedserve.worker.kernel_cache import check_kernel_cache, kernel_cache_dir


def test_a_writable_cache_is_created_and_its_entries_counted(tmp_path):
    cache = tmp_path / "a" / "triton"
    assert check_kernel_cache(cache) == 0 and cache.is_dir()
    for key in ("k1", "k2"):
        (cache / key).mkdir()
    (cache / "stray-file").write_text("")
    assert check_kernel_cache(cache) == 2
    assert sorted(p.name for p in cache.iterdir()) == ["k1", "k2", "stray-file"]  # no leftovers


def test_an_unwritable_cache_is_refused_naming_it_and_the_variable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"a-file/triton is not writable.*TRITON_CACHE_DIR"):
        check_kernel_cache(blocker / "triton")


def test_the_cache_is_where_triton_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "here"))
    assert kernel_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))  # else the home at import
    assert kernel_cache_dir() == tmp_path / "home" / ".triton" / "cache"


def test_a_gpu_worker_with_an_unwritable_cache_stops_before_loading_its_weights(
    model_dir, tmp_path
):
    """On this CPU-only machine the worker would fail at the weights' first CUDA copy; it
    stops first, at the cache's check, with a clear error and exit status 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "TRITON_CACHE_DIR": str(blocker / "triton")}
    argv = ["serve", "worker", "--model", model_dir, "--device", "cuda", "--port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "alignedserve", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert f"error: Triton's kernel cache {blocker}/triton is not writable" in done.stderr
    assert "set TRITON_CACHE_DIR to a writable directory" in done.stderr
    assert "Traceback" not in done.stderr
