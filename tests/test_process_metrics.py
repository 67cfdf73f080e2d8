"""The process_* series of every router process under `serve --num-routers`: each router lists
its pid in the multiprocess directory, and any router's /metrics reads each listed process's
/proc through prometheus_client's ProcessCollector, labelled pid="<its pid>". Real processes
(this one and a sleeping child), no server; the end-to-end scrape is in test_serve_routers.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from alignedserve.common.merged_metrics import MULTIPROC_DIR_ENV, router_registry
from alignedserve.common.process_metrics import (
    RouterProcessCollector,
    add_pid,
    listed_pids,
    pid_file,
    remove_pid,
)
from alignedserve.router.config import RouterConfig
from alignedserve.serve_routers import RouterProcesses

from factories import metric_samples
from k8s import system_binary

PROCESS_SERIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
)


@contextlib.contextmanager
def sleeper() -> Iterator[subprocess.Popen]:
    """A bare interpreter that has used some CPU time (0.1 s) and sleeps, once it is there."""
    code = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.1: pass\n"
    code += "print('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        yield child
    finally:
        child.kill()
        child.wait()


def exposition(directory: str) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterProcessCollector(directory))
    return generate_latest(registry).decode()


def by_pid(got: dict[tuple[str, tuple], float], name: str) -> dict[str, float]:
    return {dict(labels)["pid"]: v for (n, labels), v in got.items() if n == name}


def test_each_listed_process_has_its_own_series_labelled_with_its_pid(tmp_path):
    directory = str(tmp_path)
    with sleeper() as child:
        add_pid(directory)
        add_pid(directory, child.pid)
        assert listed_pids(directory) == sorted([os.getpid(), child.pid])
        text = exposition(directory)
    got = metric_samples(text)
    pids = {str(os.getpid()), str(child.pid)}
    for name in PROCESS_SERIES:
        assert set(by_pid(got, name)) == pids, name
        assert all(v > 0 for v in by_pid(got, name).values()), name
    for name in PROCESS_SERIES:  # one family each, however many processes
        assert text.count(f"# TYPE {name} ") == 1, name
    assert f'process_cpu_seconds_total{{pid="{child.pid}"}}' in text
    assert f'process_resident_memory_bytes{{pid="{os.getpid()}"}}' in text
    (info,) = [labels for name, labels in got if name == "python_info"]
    assert dict(info)["version"] == ".".join(map(str, sys.version_info[:3]))
    # this process has far more memory and fds than a bare sleeping interpreter
    rss = by_pid(got, "process_resident_memory_bytes")
    assert rss[str(os.getpid())] > rss[str(child.pid)]


def test_a_process_that_has_exited_yields_no_series(tmp_path):
    directory = str(tmp_path)
    with sleeper() as child:
        pass  # killed and reaped: its file is stale, as a router's whose serve was killed
    add_pid(directory, child.pid)
    add_pid(directory)
    (tmp_path / "router-junk.pid").touch()  # not a pid: ignored
    (tmp_path / "counter_1.db").touch()  # the multiprocess mode's own files: not ours
    assert listed_pids(directory) == sorted([child.pid, os.getpid()])
    got = metric_samples(exposition(directory))
    for name in PROCESS_SERIES:
        assert set(by_pid(got, name)) == {str(os.getpid())}, name
    remove_pid(directory, os.getpid())
    remove_pid(directory, os.getpid())  # twice: nothing to remove, no error
    got = metric_samples(exposition(directory))
    assert [name for name, _ in got] == ["python_info"]


def test_a_routers_registry_in_multiprocess_mode_lists_it_and_shows_its_series(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path))
    with sleeper() as sibling:
        add_pid(str(tmp_path), sibling.pid)  # another router, started before this one
        registry = router_registry("")
        assert pid_file(str(tmp_path), os.getpid()).exists()
        got = metric_samples(generate_latest(registry).decode())
    for name in PROCESS_SERIES:
        assert set(by_pid(got, name)) == {str(os.getpid()), str(sibling.pid)}, name
    assert sum(name == "python_info" for name, _ in got) == 1
    assert not any(name.startswith("python_gc_") for name, _ in got)


def test_a_router_marked_dead_leaves_the_list(model_dir):
    config = RouterConfig(model_dir=model_dir, batcher_addresses=("127.0.0.1:1",), port=0)
    with RouterProcesses(config, 2, "http://127.0.0.1:1/metrics") as routers, sleeper() as child:
        add_pid(routers.metrics_dir, child.pid)
        add_pid(routers.metrics_dir, os.getpid())
        routers._mark_dead(child.pid)  # what its supervisor calls once it has exited
        assert listed_pids(routers.metrics_dir) == [os.getpid()]


def test_the_process_series_pass_promtool_check_metrics(tmp_path):
    with sleeper() as child:
        add_pid(str(tmp_path))
        add_pid(str(tmp_path), child.pid)
        text = exposition(str(tmp_path))
    result = subprocess.run(
        [str(system_binary("promtool")), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result


def test_a_single_router_keeps_its_unlabelled_series(monkeypatch):
    """One router (no multiprocess mode) serves the default REGISTRY, whose ProcessCollector
    gives unlabelled series of this process: unchanged."""
    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    got = metric_samples(generate_latest(router_registry("")).decode())
    for name in PROCESS_SERIES:
        assert got[(name, ())] > 0, name
