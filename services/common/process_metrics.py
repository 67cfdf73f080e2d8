"""The process_* series of every router process under `serve --num-routers`, for each router's
/metrics. prometheus_client's multiprocess mode sums the routers' own series from their files
but gives no process_* or python_* series. So each router leaves a file `router-<pid>.pid` in
the multiprocess directory, and a scrape of any router reads every listed process's
/proc/<pid> through prometheus_client's ProcessCollector, each sample labelled
pid="<router pid>" (as other multiprocess exporters do), plus one python_info (all routers run
the same interpreter). Per-process python_gc_* series are left out: only the router answering
a scrape could read its own. A router's file goes when it is marked dead
(serve_routers.py); a pid whose process is gone yields no series."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX, SUFFIX = "router-", ".pid"


def pid_file(directory: str, pid: int) -> Path:
    return Path(directory) / f"{PREFIX}{pid}{SUFFIX}"


def add_pid(directory: str, pid: int | None = None) -> None:
    """Lists `pid` (this process by default) among the routers of `directory`."""
    pid_file(directory, os.getpid() if pid is None else pid).touch()


def remove_pid(directory: str, pid: int) -> None:
    pid_file(directory, pid).unlink(missing_ok=True)


def listed_pids(directory: str) -> list[int]:
    pids = []
    for path in Path(directory).glob(f"{PREFIX}*{SUFFIX}"):
        pid = path.name.removeprefix(PREFIX).removesuffix(SUFFIX)
        if pid.isdigit():
            pids.append(int(pid))
    return sorted(pids)


class RouterProcessCollector(Collector):
    """ProcessCollector's families for each pid listed in `directory`, one family per name
    with a pid label on every sample; then python_info."""

    def __init__(self, directory: str):
        self.directory = directory
        self.platform = PlatformCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid in listed_pids(self.directory):
            # A gone process's /proc entry is missing: ProcessCollector gives nothing for it.
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                merged.samples.extend(
                    s._replace(labels={**s.labels, "pid": str(pid)}) for s in family.samples
                )
        yield from families.values()
        yield from self.platform.collect()
