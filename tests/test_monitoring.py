"""Monitoring, checked with the real tools: the chart's PrometheusRule through `promtool check
rules` and `promtool test rules` (every alert fires when it should and not when it should not,
and each threshold comes from values), then a real Prometheus scraping a real `alignedserve
serve` driven by the official openai client: every dashboard panel's query and every alert's
expression runs against its HTTP API and finds data; `promtool check metrics` reads /metrics.
What only a cluster shows (the prometheus-operator turning these objects into configuration,
Grafana drawing the panels) is out of reach here."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from alignedserve.common import metrics
from alignedserve.serve import free_ports

from k8s import binary, system_binary

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "alignedserve"
DASHBOARD_FILE = CHART / "files" / "dashboard.json"
DOCS = ROOT / "docs" / "monitoring.md"
TEMPLATES = {
    "PrometheusRule": "templates/monitoring-prometheusrule.yaml",
    "ServiceMonitor": "templates/monitoring-servicemonitor.yaml",
    "ConfigMap": "templates/monitoring-dashboard.yaml",
}
MONITORING_ON = tuple(
    f"monitoring.{part}.enabled=true" for part in ("serviceMonitor", "prometheusRule", "dashboard")
)
ALERTS = (
    "AlignedServeTPOTAboveTarget",
    "AlignedServeQueueGrowing",
    "AlignedServeCPUPoolNearFull",
    "AlignedServeWorkerNotReady",
    "AlignedServeBatcherDown",
)


@cache
def helm_template(*sets: str) -> str:
    """`helm template` of the monitoring templates; each of `sets` is `path=<JSON value>`
    (--set-json: helm's --set would pass 0.5 on as a string)."""
    args = [str(binary("helm4")), "template", "rel", str(CHART), "--namespace", "ops"]
    for s in (*MONITORING_ON, *sets):
        args += ["--set-json", s]
    for template in TEMPLATES.values():
        args += ["--show-only", template]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*sets: str) -> dict[str, dict]:
    """The monitoring objects `helm template` (helm 4) renders, by kind (fresh each call)."""
    docs = [d for d in yaml.safe_load_all(helm_template(*sets)) if d]
    return {d["kind"]: d for d in docs}


def write_rules(path: Path, *sets: str) -> Path:
    """The PrometheusRule's spec as a Prometheus rule file."""
    path.write_text(yaml.safe_dump(render(*sets)["PrometheusRule"]["spec"], sort_keys=False))
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(system_binary("promtool")), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the chart's objects ----------------------------------------------------------------------


def test_monitoring_objects_render_with_values_and_labels() -> None:
    sets = (
        'monitoring.prometheusRule.labels.release="kube-prometheus"',
        'monitoring.serviceMonitor.labels.release="kube-prometheus"',
        'monitoring.serviceMonitor.interval="30s"',
    )
    docs = render(*sets)
    assert set(docs) == set(TEMPLATES)
    for doc in docs.values():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/name"] == "alignedserve"
        assert doc["metadata"]["namespace"] == "ops"
    assert docs["PrometheusRule"]["metadata"]["labels"]["release"] == "kube-prometheus"
    monitor = docs["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    dashboard = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["alignedserve.json"]) == dashboard_json()
    (group,) = docs["PrometheusRule"]["spec"]["groups"]
    assert group["name"] == "alignedserve"
    assert [r["alert"] for r in group["rules"]] == list(ALERTS)
    for rule in group["rules"]:
        assert rule["for"] == "5m"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_monitoring_objects_are_off_by_default() -> None:
    args = [str(binary("helm4")), "template", "rel", str(CHART)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(out) if d}
    assert not kinds & {"PrometheusRule", "ServiceMonitor"}
    assert "alignedserve.json" not in out


# --- the alerts under promtool ----------------------------------------------------------------


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_check_rules_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    spec = render()["PrometheusRule"]["spec"]
    spec["groups"][0]["rules"][0]["expr"] = "histogram_quantile(0.99, rate(x[5m])"  # unclosed
    broken.write_text(yaml.safe_dump(spec))
    assert promtool("check", "rules", str(broken)).returncode != 0


def _series(name: str, values: str, **labels: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(severity: str, summary: str, description: str, **labels: str) -> dict:
    return {
        "exp_labels": {"severity": severity, **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }


def _no_alerts_yet_then(alertname: str, firing: list[dict]) -> list[dict]:
    """At 3 minutes every condition has held for less than `for` (5m): nothing fires yet;
    at 12 minutes exactly `firing` does."""
    return [
        {"eval_time": "3m", "alertname": alertname, "exp_alerts": []},
        {"eval_time": "12m", "alertname": alertname, "exp_alerts": firing},
    ]


def _tpot_case() -> dict:
    """Three routers, one sample a minute for 30 minutes: r1's tokens all take 0.2-0.5 s (p99
    0.497 s), r2's all under 0.2 s (p99 0.198 s: just under the target), r3 is idle."""
    itl = "alignedserve:inter_token_latency_seconds_bucket"
    slow = dict(namespace="team-a", instance="r1:8000", model_name="llama", job="llama-router")
    fast = {**slow, "instance": "r2:8000"}
    idle = {**slow, "instance": "r3:8000"}
    series = [
        _series(itl, "0x30", le="0.2", **slow),
        _series(itl, "0+600x30", le="0.5", **slow),
        _series(itl, "0+600x30", le="+Inf", **slow),
        *(_series(itl, "0+600x30", le=le, **fast) for le in ("0.2", "0.5", "+Inf")),
        *(_series(itl, "5x30", le=le, **idle) for le in ("0.2", "0.5", "+Inf")),
    ]
    firing = _alert(
        "warning",
        "p99 time per output token above 0.2 s",
        "llama at team-a/r1:8000: p99 time per output token is 497ms over the last 5 minutes "
        "(target 0.2 s).",
        namespace="team-a",
        instance="r1:8000",
        model_name="llama",
    )
    return {
        "input_series": series,
        "alert_rule_test": _no_alerts_yet_then("AlignedServeTPOTAboveTarget", [firing]),
    }


def _queue_case() -> dict:
    """b1 grows past 64 (130 at 12m); b2 sits at 100 without growing; b3 grows but is at 60."""
    name = "alignedserve:num_requests_waiting"
    base = dict(namespace="team-a", model_name="llama", job="llama-worker")
    series = [
        _series(name, "10+10x30", instance="b1:9090", **base),
        _series(name, "100x30", instance="b2:9090", **base),
        _series(name, "0+5x30", instance="b3:9090", **base),
    ]
    firing = _alert(
        "warning",
        "More than 64 requests waiting for prefill, and growing",
        "llama at team-a/b1:9090: 130 requests wait for prefill and the queue has grown over "
        "the last 5 minutes.",
        instance="b1:9090",
        **base,
    )
    return {
        "input_series": series,
        "alert_rule_test": _no_alerts_yet_then("AlignedServeQueueGrowing", [firing]),
    }


def _pool_case() -> dict:
    """b1 at 95 % throughout, b2 at 50 %, b3 at 95 % only since minute 9 (pending at 12m)."""
    name = "alignedserve:cpu_pool_usage_perc"
    base = dict(namespace="team-a", model_name="llama", job="llama-worker")
    series = [
        _series(name, "0.95x30", instance="b1:9090", **base),
        _series(name, "0.5x30", instance="b2:9090", **base),
        _series(name, "0.5x8 0.95x21", instance="b3:9090", **base),
    ]
    firing = _alert(
        "warning",
        "CPU KV pool above 0.9 of its blocks in use",
        "llama at team-a/b1:9090: the batcher's CPU KV pool is 95% full; new prompts wait "
        "for room.",
        instance="b1:9090",
        **base,
    )
    return {
        "input_series": series,
        "alert_rule_test": _no_alerts_yet_then("AlignedServeCPUPoolNearFull", [firing]),
    }


def _worker_case() -> dict:
    """b1's worker never attaches, b2's is ready, b3's was lost at minute 9 (pending at 12m)."""
    name = "alignedserve:worker_ready"
    base = dict(namespace="team-a", model_name="llama", job="llama-worker")
    series = [
        _series(name, "0x30", instance="b1:9090", **base),
        _series(name, "1x30", instance="b2:9090", **base),
        _series(name, "1x8 0x21", instance="b3:9090", **base),
    ]
    firing = _alert(
        "critical",
        "A batcher has no ready worker",
        "llama at team-a/b1:9090: the batcher's worker is not attached; its requests wait for "
        "it to return.",
        instance="b1:9090",
        **base,
    )
    return {
        "input_series": series,
        "alert_rule_test": _no_alerts_yet_then("AlignedServeWorkerNotReady", [firing]),
    }


def _batcher_down_case() -> dict:
    """b1 exported worker_ready, then stopped answering scrapes at minute 3; b2 is up; an
    unrelated target (never an AlignedServe batcher) is down too and must not alert."""
    base = dict(namespace="team-a", job="llama-worker")
    other = dict(namespace="team-b", job="other-app", instance="x:8080")
    series = [
        _series("up", "1x2 0x27", instance="b1:9090", **base),
        _series("alignedserve:worker_ready", "1x2", instance="b1:9090", model_name="llama", **base),
        _series("up", "1x30", instance="b2:9090", **base),
        _series(
            "alignedserve:worker_ready", "1x30", instance="b2:9090", model_name="llama", **base
        ),
        _series("up", "0x30", **other),
    ]
    firing = _alert(
        "critical",
        "A batcher target is down",
        "llama-worker target b1:9090 in team-a exported AlignedServe metrics within the last "
        "hour and now fails its scrapes.",
        instance="b1:9090",
        **base,
    )
    cases = _no_alerts_yet_then("AlignedServeBatcherDown", [firing])
    cases[0]["eval_time"] = "2m"  # b1 is still up at minute 2
    return {"input_series": series, "alert_rule_test": cases}


def unit_tests(rules: Path) -> dict:
    cases = (_tpot_case(), _queue_case(), _pool_case(), _worker_case(), _batcher_down_case())
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in cases],
    }


def run_unit_tests(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    rules = write_rules(tmp_path / "rules.yaml", *sets)
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(yaml.safe_dump(unit_tests(rules), sort_keys=False))
    return promtool("test", "rules", str(tests))


def test_every_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    tested = {c["alertname"] for t in unit_tests(Path("r"))["tests"] for c in t["alert_rule_test"]}
    assert tested == set(ALERTS)
    result = run_unit_tests(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Each value, changed, breaks the unit tests of exactly the alerts that read it: the thresholds
# and the duration come from values, and the unit tests are sharp enough to notice.
CHANGED_VALUES = {
    "tpot target": ("tpotP99TargetSeconds=0.5", {"AlignedServeTPOTAboveTarget"}),
    "queue threshold": ("queueWaitingThreshold=200", {"AlignedServeQueueGrowing"}),
    "pool threshold": ("poolUsageThreshold=0.99", {"AlignedServeCPUPoolNearFull"}),
    "for": ('for="20m"', set(ALERTS)),
}


@pytest.mark.parametrize("case", CHANGED_VALUES)
def test_alerts_read_their_values(tmp_path: Path, case: str) -> None:
    value, broken = CHANGED_VALUES[case]
    result = run_unit_tests(tmp_path, f"monitoring.prometheusRule.{value}")
    assert result.returncode != 0
    failed = set(re.findall(r"alertname: (\w+)", result.stdout + result.stderr))
    assert failed == broken, result.stdout + result.stderr


# --- the dashboard ----------------------------------------------------------------------------


@cache
def dashboard_json() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard_json()["panels"] if p["type"] != "row"]


def exposed_names(metric: MetricWrapperBase) -> list[str]:
    """The sample names a metric exposes (a Counter's gains _total)."""
    name = metric._name
    if isinstance(metric, Counter):
        return [f"{name}_total"]
    if isinstance(metric, Histogram):
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]


def all_metrics() -> list[MetricWrapperBase]:
    found = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(found) > 10  # the discovery works
    return found


def test_dashboard_shape() -> None:
    board = dashboard_json()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model_name"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'model_name=~"$model_name"' in target["expr"], panel["title"]


def test_dashboard_shows_every_metric_and_only_real_ones() -> None:
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    used = set(re.findall(r"alignedserve:\w+", exprs))
    known = {n for m in all_metrics() for n in exposed_names(m)}
    assert used <= known, used - known
    missing = [m._name for m in all_metrics() if not set(exposed_names(m)) & used]
    assert missing == []


def test_docs_list_every_metric_and_alert() -> None:
    text = DOCS.read_text()
    names = [f"{m._name}_total" if isinstance(m, Counter) else m._name for m in all_metrics()]
    missing = [n for n in names if f"`{n}`" not in text]
    assert missing == []
    assert [a for a in ALERTS if a not in text] == []


# --- the new gauge ------------------------------------------------------------------------------


def test_engine_sets_worker_ready_where_readiness_changes() -> None:
    from alignedserve.batcher.engine import BatcherEngine
    from alignedserve.batcher.engine_config import EngineConfig
    from alignedserve.batcher.scheduler import SchedulerConfig
    from alignedserve.common.proto import worker_pb2

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("alignedserve:worker_ready", {"model_name": "m-unit"})

    engine = BatcherEngine(EngineConfig("127.0.0.1:1", pool_bytes=1, scheduler=SchedulerConfig()))
    engine.worker_ready = True  # no model known yet: no series with an empty model_name
    assert gauge() is None
    engine.info = worker_pb2.ModelInfo(model_name="m-unit")
    engine.worker_ready = True
    assert (engine.worker_ready, gauge()) == (True, 1.0)
    engine.worker_ready = False
    assert (engine.worker_ready, gauge()) == (False, 0.0)


# --- a real Prometheus scraping a real server ---------------------------------------------------

NAMESPACE = "monitoring-test"  # the label the prometheus-operator would add; set statically here
RATE_WINDOW = "1m"  # what Grafana's $__rate_interval stands for in these queries
# Thresholds so low that the rules evaluate against the little traffic of the test, and a
# duration short enough to see them fire.
EVALUATING = (
    "monitoring.prometheusRule.tpotP99TargetSeconds=0.000001",
    "monitoring.prometheusRule.queueWaitingThreshold=0",
    "monitoring.prometheusRule.poolUsageThreshold=0.000001",
    'monitoring.prometheusRule.for="1s"',
)
# Panels whose metric the code defines but does not record yet (see docs/monitoring.md);
# none now: the batcher creates its series at zero once the worker attaches (a switch-free
# run rates 0 switches/s) and observes prefetch_seconds from the worker's load_s. Checked to
# parse and to be empty, so a metric that stops being recorded shows up here.
NOT_RECORDED_YET: set[str] = set()


class Prometheus:
    def __init__(self, workdir: Path, port: int, targets: dict[str, str], rules: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = [
            {
                "job_name": job,
                "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
            }
            for job, target in targets.items()
        ]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": jobs,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                str(system_binary("prometheus")),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self._ready(), 30, "prometheus never became ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, "prometheus exited"
        try:
            return httpx.get(f"{self.url}/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params) -> dict | list:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def query_range(self, expr: str, start: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=time.time(), step="1s")[
            "result"
        ]

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


class Server:
    """`alignedserve serve` as a user runs it, on a free port."""

    def __init__(self, model_dir: Path, port: int, log: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "alignedserve"), "serve"]
        command += ["--model", str(model_dir), "--port", str(self.port), "--pool-gib", "0.1"]
        command += ["--max-waiting", "4", "--drain-s", "2"]  # a burst of 24 meets 429s
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, 90, "alignedserve serve never became ready")
        except BaseException:  # the caller has no server to stop: do not leave it running
            self.stop()
            raise
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def _ready(self) -> bool:
        assert self.process.poll() is None, "alignedserve serve exited"
        try:
            return httpx.get(f"{self.url}/ready").status_code == 200  # the worker is attached
        except httpx.TransportError:
            return False

    def worker_process(self) -> psutil.Process:
        (worker,) = [
            p
            for p in psutil.Process(self.process.pid).children(recursive=True)
            if "worker" in p.cmdline()
        ]
        return worker

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def wait_until(condition, timeout_s: float, message: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(interval_s)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def drive(url: str, model: str) -> dict[str, int]:
    """Completions and chat, streamed and not, four at a time; then a burst past the admission
    queue (429s) and a bad request (400). Returns how the requests ended."""
    outcomes = {"ok": 0, "rate_limited": 0, "bad_request": 0}
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        slots = asyncio.Semaphore(4)  # at most 4 waiting: under --max-waiting, no 429 here

        async def one(i: int) -> None:
            kind = dict(max_tokens=16 + 4 * (i % 5), extra_body={"ignore_eos": True})
            async with slots:
                if i % 4 == 0:
                    await c.completions.create(model=model, prompt=f"monitor {i}", **kind)
                elif i % 4 == 1:
                    stream = await c.completions.create(
                        model=model, prompt=f"stream {i} " * (1 + i), stream=True, **kind
                    )
                    async for _ in stream:
                        pass
                else:
                    stream = await c.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": f"chat {i}"}],
                        stream=i % 4 == 2,
                        **kind,
                    )
                    if i % 4 == 2:
                        async for _ in stream:
                            pass
            outcomes["ok"] += 1

        await asyncio.gather(*(one(i) for i in range(16)))
        burst = await asyncio.gather(
            *(c.completions.create(model=model, prompt=f"b{i}", max_tokens=1) for i in range(24)),
            return_exceptions=True,
        )
        for result in burst:
            if isinstance(result, openai.RateLimitError):
                outcomes["rate_limited"] += 1
            elif isinstance(result, BaseException):
                raise result
            else:
                outcomes["ok"] += 1
        try:
            await c.completions.create(model=model, prompt="x", max_tokens=-1)
        except openai.BadRequestError:
            outcomes["bad_request"] += 1
    return outcomes


class Live:
    """Prometheus scraping serve through one session of traffic and a worker restart."""

    def __init__(self, workdir: Path):
        from alignedserve.worker.tiny import init_tiny  # torch: only for this fixture

        model_dir = init_tiny(workdir / "tiny", arch="llama")
        self.started = time.time()
        port, dead_port, prometheus_port = free_ports(3)
        dead = f"127.0.0.1:{dead_port}"  # a target that is down and was never a batcher
        rules = write_rules(workdir / "rules.yaml", *EVALUATING)
        targets = {"alignedserve": f"127.0.0.1:{port}", "unrelated": dead}
        # Prometheus first: it starts scraping some seconds after it is ready, meanwhile
        # the server starts; the traffic waits for a first scrape, so rates see all of it.
        self.prometheus = Prometheus(workdir, prometheus_port, targets, rules)
        self.server: Server | None = None
        try:
            self.server = Server(model_dir, port, workdir / "serve.log")
            first_scrape = 'up{job="alignedserve"} == 1'
            wait_until(lambda: self.prometheus.query(first_scrape), 30, "never scraped", 0.2)
            self.outcomes = asyncio.run(drive(self.server.url, self.server.model))
            self.saw_worker_not_ready = self._restart_worker()
            self.metrics_text = httpx.get(f"{self.server.url}/metrics").text
            self._wait_for_a_scrape_of_the_latest()
        except BaseException:
            self.close()
            raise

    def _restart_worker(self) -> bool:
        """SIGKILL the worker and send a request: the batcher recovers it (the supervisor
        restarts the process) and the request completes. True if Prometheus saw
        worker_ready at 0 meanwhile."""
        self.server.worker_process().kill()
        answer: list = []

        def request() -> None:
            c = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", timeout=60)
            answer.append(
                c.completions.create(  # EOS ignored: the random model may sample it early
                    model=self.server.model,
                    prompt="x",
                    max_tokens=4,
                    extra_body={"ignore_eos": True},
                )
            )

        thread = threading.Thread(target=request)
        thread.start()
        deadline = time.monotonic() + 30
        seen = False
        while thread.is_alive() or not seen:
            seen = seen or bool(self.prometheus.query("alignedserve:worker_ready == 0"))
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        thread.join(30)
        assert answer and answer[0].usage.completion_tokens == 4, "request lost in the restart"
        return seen

    def _wait_for_a_scrape_of_the_latest(self) -> None:
        """Until Prometheus holds the token count /metrics shows now (and the worker is back)."""
        total = sum(
            float(v)
            for v in re.findall(
                r"^alignedserve:generation_tokens_total\{[^}]*\} (\S+)$", self.metrics_text, re.M
            )
        )

        def scraped() -> bool:
            got = self.prometheus.query("sum(alignedserve:generation_tokens_total)")
            ready = self.prometheus.query("alignedserve:worker_ready == 1")
            return bool(got) and float(got[0]["value"][1]) == total and bool(ready)

        wait_until(scraped, 20, "prometheus never scraped the final counts", 0.2)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.prometheus.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    system_binary("prometheus")
    system_binary("promtool")
    binary("helm4")
    session = Live(tmp_path_factory.mktemp("live"))
    yield session
    session.close()


def substitute(expr: str) -> str:
    values = {"namespace": NAMESPACE, "model_name": "tiny", "__rate_interval": RATE_WINDOW}
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


@pytest.mark.slow  # the `live` session: ~12 s, once for all of these
def test_the_server_saw_the_traffic(live) -> None:
    assert live.outcomes["ok"] >= 16 + 4
    assert live.outcomes["rate_limited"] >= 1
    assert live.outcomes["bad_request"] == 1


@pytest.mark.slow
def test_metrics_text_passes_promtool_check_metrics(live) -> None:
    """promtool's only complaint is the colon the names share with vLLM's (`vllm:...`), which
    it reserves for recording rules: the names are fixed by the model-server convention. Any
    other problem (a parse error, a counter without _total, missing help) fails."""
    result = promtool("check", "metrics", stdin=live.metrics_text)
    problems = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 3, result.stderr  # 3: lint problems; 1 would be a parse error
    colon = re.compile(r"^alignedserve:\w+ metric names should not contain ':'$")
    assert [p for p in problems if not colon.match(p)] == []
    assert "alignedserve:worker_ready metric names should not contain ':'" in problems


@pytest.mark.slow
def test_every_dashboard_panel_returns_data(live) -> None:
    empty, finite = [], []
    for panel in panels():
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            result = live.prometheus.query(expr)  # raises unless it parses and evaluates
            if not result:
                empty.append(expr)
            elif all(math.isfinite(float(s["value"][1])) for s in result):
                finite.append(expr)
    unexpected = [e for e in empty if not any(name in e for name in NOT_RECORDED_YET)]
    assert unexpected == []
    assert len(empty) == 0
    total = sum(len(p["targets"]) for p in panels())
    assert len(finite) == total - len(empty)


@pytest.mark.slow
def test_dashboard_variables_list_the_scraped_labels(live) -> None:
    for variable in dashboard_json()["templating"]["list"][1:]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        selector, label = match.groups()
        values = live.prometheus.api(f"label/{label}/values", **{"match[]": substitute(selector)})
        assert values == [{"namespace": NAMESPACE, "model_name": "tiny"}[label]]


@pytest.mark.slow
def test_every_alert_expression_evaluates_on_live_data(live) -> None:
    rules = {
        r["alert"]: r for r in render(*EVALUATING)["PrometheusRule"]["spec"]["groups"][0]["rules"]
    }
    with_data = {
        name
        for name, rule in rules.items()
        if live.prometheus.query_range(rule["expr"], live.started)
    }
    # The restart holds requests and pool blocks for seconds; whether a scrape sees the queue
    # grow in a burst is luck; the batcher is up (the last test stops it).
    assert with_data - {"AlignedServeQueueGrowing"} == {
        "AlignedServeTPOTAboveTarget",
        "AlignedServeCPUPoolNearFull",
        "AlignedServeWorkerNotReady",
    }
    loaded = live.prometheus.api("rules")["groups"]
    assert [r["name"] for g in loaded for r in g["rules"]] == list(ALERTS)
    assert all(r["health"] == "ok" for g in loaded for r in g["rules"]), loaded


@pytest.mark.slow
def test_worker_ready_dropped_while_the_worker_restarted(live) -> None:
    assert live.saw_worker_not_ready
    # the rule as Prometheus loaded it (for: 1s) went pending, at least, while the worker was away
    alerts = live.prometheus.query_range(
        'ALERTS{alertname="AlignedServeWorkerNotReady"}', live.started
    )
    assert {s["metric"]["model_name"] for s in alerts} == {"tiny"}


@pytest.mark.slow
def test_batcher_down_fires_for_the_stopped_server_only(live) -> None:
    """Last: it stops the server. The unrelated dead target never exported worker_ready."""
    rules = render(*EVALUATING)["PrometheusRule"]["spec"]["groups"][0]["rules"]
    (expr,) = [r["expr"] for r in rules if r["alert"] == "AlignedServeBatcherDown"]
    assert live.prometheus.query(expr) == []
    assert live.prometheus.query('up{job="unrelated"} == 0')  # down, yet no alert
    live.server.stop()
    wait_until(lambda: live.prometheus.query(expr), 15, "no alert for the stopped server", 0.2)
    (down,) = live.prometheus.query(expr)
    assert down["metric"]["job"] == "alignedserve"
    assert down["metric"]["namespace"] == NAMESPACE
