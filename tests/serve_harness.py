"""`alignedserve serve` as tests run it: serve_all in a background thread of the test process,
its children real processes, reached over real HTTP."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx

from alignedserve.serve import ServeConfig, serve_all


class Stack:
    """serve_all in a background thread with its own event loop."""

    def __init__(self, config: ServeConfig):
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        started = self.loop.create_future()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete,
            args=(serve_all(config, started=started, stop=self.stop),),
            daemon=True,
        )
        self.thread.start()
        deadline = time.monotonic() + 120
        while not started.done():
            assert time.monotonic() < deadline and self.thread.is_alive(), "stack did not start"
            time.sleep(0.05)
        self.ports = started.result()
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        while httpx.get(f"{self.url}/ready").status_code != 200:  # the worker is attached
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)

    def local_series(self) -> set[tuple[str, str]]:
        """(name, model_name) of this process's own samples, without the batcher's."""
        from alignedserve.common.merged_metrics import alignedserve_metrics

        return {
            (sample.name, sample.labels.get("model_name", ""))
            for metric in alignedserve_metrics()
            for family in metric.collect()
            for sample in family.samples
        }

    def metric(self, name: str, model: str | None = None) -> float:
        """The sum of the samples of `name` on /metrics, of one model_name if given (this
        process's registry also holds series of other tests' in-process engines)."""
        text = httpx.get(f"{self.url}/metrics").text
        label = re.escape(f'model_name="{model}"') if model else ""
        values = re.findall(rf"^{re.escape(name)}{{[^}}]*{label}[^}}]*}} (\S+)$", text, re.M)
        return sum(float(v) for v in values)
