"""The router process's /metrics with the batcher in a child process: its AlignedServe series
and those the batcher child serves, merged into one exposition that Prometheus' own parser
(promtool check metrics) and prometheus_client's parser read. No processes: the child's text is
produced by a separate registry here."""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from alignedserve.common import metrics
from alignedserve.common.merged_metrics import (
    MergedCollector,
    alignedserve_metrics,
    merged_into,
    router_registry,
)

from factories import metric_samples
from k8s import system_binary


def child_text() -> str:
    """What a batcher child serves: its own copies of some shared families, its process_*."""
    registry = CollectorRegistry()  # a fresh registry stands in for the child's REGISTRY
    waiting = Gauge(
        "alignedserve:num_requests_waiting", "waiting", ["model_name"], registry=registry
    )
    waiting.labels("m").set(7)
    switches = Counter("alignedserve:batch_switches", "switches", ["model_name"], registry=registry)
    switches.labels("m").inc(3)
    queue = Histogram(
        "alignedserve:request_queue_time_seconds", "q", ["model_name"], registry=registry
    )
    queue.labels("m").observe(0.2)
    Gauge("process_open_fds", "fds", registry=registry).set(99)
    return generate_latest(registry).decode()


def router_side() -> CollectorRegistry:
    registry = CollectorRegistry()
    tokens = Counter("alignedserve:generation_tokens", "tokens", ["model_name"], registry=registry)
    tokens.labels("m").inc(5)
    Gauge("alignedserve:num_requests_waiting", "waiting", ["model_name"], registry=registry)
    Counter("alignedserve:batch_switches", "switches", ["model_name"], registry=registry)
    Gauge("process_open_fds", "fds", registry=registry).set(12)
    return registry


def merged_text() -> str:
    local = router_side()
    ours = list(local._collector_to_names)  # the test registry's collectors
    for collector in ours:
        local.unregister(collector)
    local.register(MergedCollector(ours, child_text))
    return generate_latest(local).decode()


def test_the_childs_series_join_the_routers_and_nothing_is_doubled():
    text = merged_text()
    got = metric_samples(text)
    m = (("model_name", "m"),)
    assert got[("alignedserve:num_requests_waiting", m)] == 7
    assert got[("alignedserve:batch_switches_total", m)] == 3
    assert got[("alignedserve:generation_tokens_total", m)] == 5
    assert got[("alignedserve:request_queue_time_seconds_count", m)] == 1
    assert got[("process_open_fds", ())] == 12  # the router's own, not the child's 99
    for family in (
        "num_requests_waiting",
        "batch_switches_total",
        "batch_switches_created",
        "request_queue_time_seconds",
        "request_queue_time_seconds_created",
    ):
        assert text.count(f"# TYPE alignedserve:{family} ") == 1, family


def test_the_merged_text_passes_promtool_check_metrics():
    import subprocess

    result = subprocess.run(
        [str(system_binary("promtool")), "check", "metrics"],
        input=merged_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "should not contain ':'" not in line
    ]
    assert problems == [], problems


def test_a_child_that_does_not_answer_leaves_the_routers_series():
    local = router_side()
    ours = list(local._collector_to_names)
    for collector in ours:
        local.unregister(collector)
    local.register(MergedCollector(ours, lambda: ""))
    got = metric_samples(generate_latest(local).decode())
    assert got[("alignedserve:generation_tokens_total", (("model_name", "m"),))] == 5
    assert not any(name == "alignedserve:num_requests_waiting" for name, _ in got)


def test_merged_into_swaps_the_global_registry_and_puts_it_back():
    before = set(REGISTRY._collector_to_names)
    assert set(alignedserve_metrics()) <= before
    with merged_into("http://127.0.0.1:1/metrics") as merged:  # nothing listens: no series
        inside = set(REGISTRY._collector_to_names)
        assert merged in inside and not set(alignedserve_metrics()) & inside
        metrics.NUM_REQUESTS_HELD.labels("merge-test").set(2)
        got = metric_samples(generate_latest().decode())
        metrics.NUM_REQUESTS_HELD.remove("merge-test")  # others sum every model's series
        assert got[("alignedserve:num_requests_held", (("model_name", "merge-test"),))] == 2
    assert set(REGISTRY._collector_to_names) == before


def test_a_routers_merge_url_joins_its_registry_with_the_series_served_there():
    """A router of its own (no multiprocess mode) given --merge-metrics-url: its whole
    registry, process_* included, with the alignedserve:* series of the server at the URL."""
    assert router_registry("") is REGISTRY
    child = CollectorRegistry()
    Gauge("alignedserve:worker_ready", "ready", ["model_name"], registry=child).labels("c").set(1)
    Gauge("process_open_fds", "fds", registry=child).set(99)
    server = metrics.start_metrics_server(0, "127.0.0.1", registry=child)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        metrics.NUM_REQUESTS_HELD.labels("merge-url-test").set(3)
        got = metric_samples(generate_latest(router_registry(url)).decode())
    finally:
        server.shutdown()
        metrics.NUM_REQUESTS_HELD.remove("merge-url-test")  # others sum every model's series
    assert got[("alignedserve:worker_ready", (("model_name", "c"),))] == 1
    assert got[("alignedserve:num_requests_held", (("model_name", "merge-url-test"),))] == 3
    assert got[("process_open_fds", ())] != 99  # ours, not the child's
