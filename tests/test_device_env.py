"""benchmarks/device_env.py, the import shim of the GPU scripts, on a machine like the GPU
images: alignedserve not installed (the editable install's finder removed) and no kopf or
kubernetes. Every child process gets that machine through a sitecustomize on PYTHONPATH,
so the worker that `alignedserve bench --target engine` starts runs on it too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factories import benchmark_module

ROOT = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """
    import importlib.abc, sys

    # not installed: drop the editable install's finder (the shim alone must do)
    sys.meta_path[:] = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]

    class NotOnGpuImages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("kopf", "kubernetes"):
                raise ModuleNotFoundError(f"No module named {name!r} (not on GPU images)")
            return None

    sys.meta_path.insert(0, NotOnGpuImages())
"""


def load_device_env():
    return benchmark_module("device_env")


@pytest.fixture(scope="module")
def gpu_like(tmp_path_factory) -> tuple[dict[str, str], str]:
    """The environment of a GPU machine's child process, and the shim's directory."""
    device_env = load_device_env()
    site = tmp_path_factory.mktemp("gpu-image")
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = device_env.child_pythonpath(env)
    return {**os.environ, **env}, device_env.project_path()


def python(code: str, env: dict[str, str], cwd: Path, *args: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"


def test_the_shim_is_the_package_as_installed(gpu_like, tmp_path):
    env, shim = gpu_like
    proc = python(
        """
        import sys
        for name in ("kopf", "kubernetes"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise AssertionError(f"{name} imported: the machine is not like a GPU image")
        import alignedserve, alignedserve.cli, alignedserve.operator.main, alignedserve.serve
        import alignedserve.bench.engine_target
        assert not {"kopf", "kubernetes", "torch"} & set(sys.modules), sorted(sys.modules)
        print(alignedserve.__file__)
        print(alignedserve.operator.__file__)
        """,
        env,
        tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    package, operator = proc.stdout.split()
    assert package == f"{shim}/alignedserve/__init__.py"
    assert operator == f"{shim}/alignedserve/operator/__init__.py"
    assert Path(operator).resolve() == ROOT / "operator/controller/__init__.py"


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--help"], "{model,generate,serve,sim,bench,operator}"),
        (["serve", "--help"], "--max-batch-kv-fraction"),
        (["bench", "--help"], "--min-batch"),
        (["operator", "--help"], "--all-namespaces"),
    ],
    ids=["--help", "serve", "bench", "operator"],
)
def test_python_m_alignedserve_help_without_kopf(gpu_like, tmp_path, argv, expect):
    env, _ = gpu_like
    proc = subprocess.run(
        [sys.executable, "-m", "alignedserve", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("usage: alignedserve") and expect in proc.stdout


def test_running_the_operator_without_kopf_names_the_missing_package(gpu_like, tmp_path):
    env, _ = gpu_like
    argv = ["-m", "alignedserve", "operator", "--all-namespaces", "--metrics-port", "0"]
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode != 0
    assert "No module named 'kopf' (not on GPU images)" in proc.stderr, explain(proc)


@pytest.mark.slow
def test_bench_on_the_engine_runs_on_a_gpu_like_machine(gpu_like, tmp_path):
    """The whole command, its tiny model and its worker child process, without kopf and
    from the shim; --min-batch reaches the run's config."""
    env, _ = gpu_like
    argv = ["-m", "alignedserve", "bench", "--target", "engine", "--workload", "fixed-16-4"]
    argv += ["--num-requests", "4", "--pool-gib", "0.05", "--min-batch", "2"]
    argv += ["--max-batch-kv-fraction", "0.5", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, explain(proc)
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["config"]["engine"]["min_batch"] == 2
    assert report["config"]["engine"]["max_batch_kv_fraction"] == 0.5
    (run,) = report["runs"]
    assert run["summary"]["num_ok"] == 4 and run["summary"]["completion_tokens"] == 16
