"""benchmarks/cold_start.py on this CPU machine: a real worker started, timed to serving from
its log and stopped; a start that fails gives its error and exit status; the table."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from factories import benchmark_module


@pytest.fixture(scope="module")
def cold_start():
    return benchmark_module("cold_start")


def _args(device: str) -> argparse.Namespace:
    return argparse.Namespace(
        device=device, warm_up_batch=0, num_device_blocks=64, as_user=None, timeout_s=120
    )


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1")


def test_a_start_is_timed_to_serving_then_stopped(cold_start, model_dir, tmp_path):
    row = cold_start.start_worker(_args("cpu"), model_dir, _env(), tmp_path / "w.log")
    assert row["exit_code"] == 0 and "error" not in row and "timed_out" not in row
    assert 0 < row["loading"] <= row["serving"] < 120
    log = (tmp_path / "w.log").read_text()
    assert "worker serving" in log and "worker stopped" in log  # SIGTERM: a graceful stop


def test_a_start_that_fails_gives_its_error_and_status(cold_start, model_dir, tmp_path):
    env = _env() | {"TRITON_CACHE_DIR": str(tmp_path / "a-file" / "triton")}
    (tmp_path / "a-file").write_text("")
    row = cold_start.start_worker(_args("cuda"), model_dir, env, tmp_path / "w.log")
    assert row["exit_code"] == 1 and "serving" not in row
    assert row["error_text"].startswith(f"Triton's kernel cache {tmp_path}/a-file/triton is not")
    rows = [row | {"start": 0, "cache": "default", "cache_mib": 0.0}]
    rows.append({"start": 1, "cache": "cold", "cache_mib": 12.2, "exit_code": 0, "serving": 35.5})
    text = cold_start.markdown(rows, "tiny")
    table, errors = text.split("\n\n- ")[0], text.split("\n\n- ")[1:]
    assert table.splitlines()[-1] == "| 1 | cold | – | – | – | 35.5 | 12.2 | 0 |"
    assert len(errors) == 1 and errors[0].startswith("start 0: `Triton's kernel cache")
