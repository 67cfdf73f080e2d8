"""`alignedserve serve --num-routers 2`: two router child processes on one port (SO_REUSEPORT),
their /metrics summed through prometheus_client's multiprocess mode and merged with the
batcher's. Real processes, real HTTP (the official `openai` client, httpx), one connection per
request so that the kernel deals them among the routers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from alignedserve.common.errors import ConfigError
from alignedserve.router.config import RouterConfig
from alignedserve.router.server import bind_reuse_port
from alignedserve.serve import ServeConfig, free_port
from alignedserve.serve_routers import RouterProcesses, claim_port

from factories import metric_samples
from serve_harness import Stack

SUCCESS = "alignedserve:request_success_total"


def test_a_second_serve_on_the_port_is_refused_even_while_the_first_still_loads(model_dir):
    """The first serve holds its port bound but not listening until its routers start (the
    model loads meanwhile): a second serve asking for that port is refused with a clear
    error, not let in beside it; so is one asking for a port where something listens."""
    config = RouterConfig(model_dir=model_dir, batcher_addresses=("127.0.0.1:1",), port=0)
    url = "http://127.0.0.1:1/metrics"
    with RouterProcesses(config, 2, url) as first:
        again = dataclasses.replace(config, port=first.port)
        with pytest.raises(ConfigError, match=f"port {first.port}.*another alignedserve serve"):
            RouterProcesses(again, 2, url)
        with pytest.raises(ConfigError, match=f"port {first.port}"):
            RouterProcesses(dataclasses.replace(again, host="0.0.0.0"), 2, url)
    with RouterProcesses(again, 2, url) as later:  # freed with the first
        assert later.port == first.port
    listening = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(ConfigError, match="in use"):
        RouterProcesses(dataclasses.replace(config, port=listening.getsockname()[1]), 2, url)
    listening.close()


@pytest.mark.parametrize("num_routers", ["1", "2"])
def test_serve_on_a_claimed_port_fails_at_once_with_a_clear_error(model_dir, num_routers):
    """One router binds its port only once the batcher and worker are up: a serve asking
    for a port another serve holds must fail at start, not after loading its model."""
    port = free_port()
    claim = claim_port("127.0.0.1", port)  # as a first serve, still loading, holds it
    cmd = [sys.executable, "-m", "alignedserve", "serve", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--num-routers", num_routers]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    claim.close()
    assert done.returncode == 1, done.stderr
    assert f"port {port} on '127.0.0.1': another alignedserve serve holds it" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def stack(model_dir):
    s = Stack(ServeConfig(model=model_dir, port=0, pool_gib=0.1, drain_s=5, num_routers=2))
    yield s
    s.close()


def test_serve_takes_its_port_alone_then_lets_its_routers_share_it():
    """No processes: the sockets as serve (exclusive) and its routers bind them."""
    other = bind_reuse_port("127.0.0.1", 0)  # say, another serve's router
    other.listen()
    with pytest.raises(OSError):
        bind_reuse_port("127.0.0.1", other.getsockname()[1], exclusive=True)
    holder = bind_reuse_port("127.0.0.1", 0, exclusive=True)
    port = holder.getsockname()[1]
    routers = [bind_reuse_port("127.0.0.1", port) for _ in range(2)]
    for router in routers:
        router.listen()
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    for router in routers:
        router.setblocking(False)
    accepted = [0, 0]
    for i, router in enumerate(routers):
        with contextlib.suppress(BlockingIOError):
            while True:
                router.accept()[0].close()
                accepted[i] += 1
    assert sum(accepted) == 32 and min(accepted) > 0  # none for the bound, unlistening holder
    for s in (other, holder, *routers, *connections):
        s.close()


def fresh_connections(stack, **kw) -> openai.OpenAI:
    """Each request on a connection of its own: none is kept alive for the next."""
    no_keepalive = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)
    return openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, http_client=no_keepalive
    )


def complete(c: openai.OpenAI, stack, n: int) -> None:
    for i in range(n):
        done = c.completions.create(
            model=stack.model, prompt=f"hi {i}", max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert done.usage.completion_tokens == 2


def successes_by_pid(stack) -> dict[int, float]:
    """Each router process's own count of finished requests, from its file in the routers'
    multiprocess directory."""
    counts = {}
    for path in Path(stack.ports["router_metrics_dir"]).glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        counts[pid] = sum(
            s.value
            for family in MultiProcessCollector.merge([str(path)])
            for s in family.samples
            if s.name == SUCCESS
        )
    return counts


def scrape(url: str) -> dict[str, float]:
    """The sums of /metrics' samples by name, for this model (a new connection each time)."""
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):  # also: the exposition parses
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


def process_series(url: str) -> dict[str, dict[int, float]]:
    """/metrics' process_* samples: {name: {pid label: value}} (a new connection each time)."""
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
    series: dict[str, dict[int, float]] = {}
    for (name, labels), value in metric_samples(text).items():
        if name.startswith("process_"):
            series.setdefault(name, {})[int(dict(labels)["pid"])] = value
    return series


def test_both_routers_serve_and_any_scrape_shows_the_sum_and_the_batchers_series(stack):
    routers = [s.process.pid for s in stack.ports["routers"]]
    assert len(set(routers)) == 2 and os.getpid() not in routers
    with pytest.raises(OSError):  # serve holds the port it picked while it serves
        socket.socket().bind(("127.0.0.1", stack.ports["http"]))
    complete(fresh_connections(stack), stack, 30)
    by_pid = successes_by_pid(stack)
    # one process taking all 30 connections would be a 2**-29 chance with the kernel's spread
    assert set(by_pid) == set(routers) and all(by_pid[pid] > 0 for pid in routers), by_pid
    assert sum(by_pid.values()) == 30
    for _ in range(6):  # scrapes land on either router: each shows the sum over both
        got = scrape(stack.url)
        assert got[SUCCESS] == 30
        assert got["alignedserve:generation_tokens_total"] == 60
        assert got["alignedserve:num_requests_held"] == 0  # one livesum sample, not per pid
        assert got["alignedserve:worker_ready"] == 1  # the batcher's series
        assert got["alignedserve:request_queue_time_seconds_count"] == 30  # the batcher's too
        assert got["python_info"] == 1  # one sample: the routers share their interpreter
        series = process_series(stack.url)  # each router's own, labelled with its pid
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
            assert set(series[name]) == set(routers), name
            assert all(v > 0 for v in series[name].values()), name
        assert set(series["process_open_fds"]) == set(series["process_start_time_seconds"])


def test_a_killed_router_is_restarted_and_the_port_keeps_serving(stack):
    supervisor, other = stack.ports["routers"]
    killed, restarts = supervisor.process.pid, supervisor.restarts
    before = scrape(stack.url)[SUCCESS]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while supervisor.restarts == restarts:  # reaped: its socket has left the port
        assert time.monotonic() < deadline, "the router was not restarted"
        time.sleep(0.02)
    c = fresh_connections(stack)
    made = 0
    while True:  # every request is served meanwhile: by the other router until the new one is up
        complete(c, stack, 2)
        made += 2
        restarted = supervisor.process.pid
        if restarted != killed and successes_by_pid(stack).get(restarted, 0) > 0:
            break
        assert time.monotonic() < deadline, "the restarted router never served"
    assert other.process.returncode is None
    assert scrape(stack.url)[SUCCESS] == before + made  # the dead one's count stays in the sum
    live_gauges = [p.name for p in Path(stack.ports["router_metrics_dir"]).glob("gauge_live*")]
    assert not [name for name in live_gauges if name.endswith(f"_{killed}.db")]
    pids = set(process_series(stack.url)["process_cpu_seconds_total"])
    assert pids == {supervisor.process.pid, other.process.pid}  # the killed one's are gone


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie: one that has exited, waiting for a reaper (its parent gone,
    whatever stands for init here)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclasses.dataclass
class Served:
    process: subprocess.Popen
    log: Path
    url: str  # without /v1
    children: list[psutil.Process]  # every process under serve once it served, theirs too


@contextlib.contextmanager
def serve_process(model_dir: str, tmp_path: Path, drain_s: int):
    """`alignedserve serve --num-routers 2` as a process, once it serves. On the way out,
    even from a failed test, nothing is left behind: serve is stopped (SIGTERM, then
    SIGKILL) and any of its processes still alive are killed."""
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "alignedserve", "serve", "--model", model_dir, "--port", "0"]
    cmd += ["--pool-gib", "0.1", "--drain-s", str(drain_s), "--num-routers", "2"]
    with log.open("w") as out:
        serve = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while "alignedserve.serve: serving" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        (line,) = [x for x in log.read_text().splitlines() if "alignedserve.serve: serving" in x]
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        children = psutil.Process(serve.pid).children(recursive=True)
        yield Served(serve, log, url, children)
    finally:
        if serve.poll() is None:
            serve.terminate()  # it drains and stops its children
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(30)
        if serve.poll() is None:
            serve.kill()
        for process in children:
            if alive(process):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while [p for p in processes if alive(p)]:
        assert time.monotonic() < deadline, [p.cmdline() for p in processes if alive(p)]
        time.sleep(0.1)


def test_sigterm_drains_an_inflight_stream_and_leaves_no_process(model_dir, tmp_path):
    with serve_process(model_dir, tmp_path, drain_s=20) as served:
        roles = [p.cmdline()[4] for p in psutil.Process(served.process.pid).children()]
        assert sorted(roles) == ["batcher", "router", "router", "worker"]
        c = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(
            model=Path(model_dir).name,
            prompt="hello",
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        served.process.send_signal(signal.SIGTERM)
        *_, last = chunks  # the stream runs to its end through the drain
        assert last.usage.completion_tokens == 200
        assert served.process.wait(60) == 0
        assert "draining: 1 requests in flight" in served.log.read_text()  # the router it was on
        wait_gone(served.children, 60)  # theirs too (the batcher's resource tracker may lag)


def test_children_drain_and_exit_when_serve_is_killed(model_dir, tmp_path):
    """SIGKILL (or the OOM killer) gives serve no chance to stop its children: each one
    follows it by itself (its parent-death signal is SIGTERM, its drain), so no batcher,
    worker or router is left holding ports and memory."""
    with serve_process(model_dir, tmp_path, drain_s=5) as served:
        children = psutil.Process(served.process.pid).children()
        assert sorted(p.cmdline()[4] for p in children) == ["batcher", "router", "router", "worker"]
        served.process.kill()
        served.process.wait(10)
        wait_gone(children, 60)
