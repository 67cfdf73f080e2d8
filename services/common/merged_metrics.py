"""One /metrics for `alignedserve serve`, whose batcher runs in a child process: the router
process's AlignedServe series merged with those the batcher child serves on its own loopback
metrics port, so a scrape of the router sees every series as it did when both shared a
registry. Only `alignedserve:*` families come from the child (its process_* and python_*
would clash with the router's own).

With several router processes (`serve --num-routers`), each runs in prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR set in its environment): its series are the sum
over every router's files in that directory, merged with the batcher's the same way, and the
process_* series of every router process, labelled with its pid (common/process_metrics.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from alignedserve.common import metrics
from alignedserve.common.process_metrics import RouterProcessCollector, add_pid

log = logging.getLogger(__name__)


def fetch(url: str, timeout_s: float = 2.0) -> Callable[[], str]:
    """A reader of the exposition text at `url`; "" when it does not answer (the batcher is
    restarting: its series are missing from that scrape, as they would be from its own)."""

    def read() -> str:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read().decode()
        except OSError as e:
            log.debug("no metrics from %s: %s", url, e)
            return ""

    return read


def parse(text: str) -> dict[str, Metric]:
    """The text's AlignedServe families by name. The parser turns a counter's or histogram's
    `_created` samples into a gauge family of their own: they go back into their family."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in [n for n in families if n.endswith("_created")]:
        owner = families.get(name.removesuffix("_created"))
        if owner is not None and owner.type in ("counter", "histogram", "summary"):
            owner.samples.extend(families.pop(name).samples)
    return {n: f for n, f in families.items() if n.startswith(metrics.PREFIX)}


class MergedCollector(Collector):
    """`local`'s families, each with the same family's samples from `read()` added (those
    whose name and labels the local side has already are left out), then the read families
    the local side does not have."""

    def __init__(self, local: Iterable[Collector], read: Callable[[], str]):
        self.local = list(local)
        self.read = read

    def describe(self) -> Iterator[Metric]:  # what registering checks, without a fetch
        for collector in self.local:
            describe = getattr(collector, "describe", None)  # a registry has none
            if describe is not None:
                yield from describe()

    def collect(self) -> Iterator[Metric]:
        remote = parse(self.read())
        for collector in self.local:
            for family in collector.collect():
                other = remote.pop(family.name, None)
                if other is not None:
                    seen = {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples}
                    family.samples.extend(
                        s
                        for s in other.samples
                        if (s.name, tuple(sorted(s.labels.items()))) not in seen
                    )
                yield family
        yield from remote.values()


def alignedserve_metrics() -> list[MetricWrapperBase]:
    return [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]


@contextlib.contextmanager
def merged_into(url: str, registry: CollectorRegistry = REGISTRY) -> Iterator[MergedCollector]:
    """While open, `registry` (the one the router's /metrics serves) shows the series at `url`
    too: our metrics are taken out of it and put back behind one MergedCollector."""
    ours = alignedserve_metrics()
    for metric in ours:
        registry.unregister(metric)
    merged = MergedCollector(ours, fetch(url))
    registry.register(merged)
    try:
        yield merged
    finally:
        registry.unregister(merged)
        for metric in ours:
            registry.register(metric)


MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def is_multiprocess() -> bool:
    """This process's metrics live in PROMETHEUS_MULTIPROC_DIR's files (prometheus_client
    picks the mode from the environment when it is imported)."""
    return MULTIPROC_DIR_ENV in os.environ


def router_registry(merge_url: str) -> CollectorRegistry:
    """What a router's /metrics serves: this process's registry, or in multiprocess mode the
    sum over all router processes' files and each one's process_* series (this process is
    listed among them here); with `merge_url`, the alignedserve:* series served there merged
    in (MergedCollector). Without either: REGISTRY itself."""
    if not merge_url and not is_multiprocess():
        return REGISTRY
    local = MultiProcessCollector(None) if is_multiprocess() else REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector([local], fetch(merge_url) if merge_url else lambda: ""))
    if is_multiprocess():
        directory = os.environ[MULTIPROC_DIR_ENV]
        add_pid(directory)
        registry.register(RouterProcessCollector(directory))
    return registry
