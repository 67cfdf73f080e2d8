"""The batcher's Prometheus series (names: common/metrics.py): created once the worker
attaches, updated with each step's plan."""

from __future__ import annotations

from alignedserve.batcher.scheduler import BatchPlan, Scheduler
from alignedserve.common import metrics
from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import worker_pb2


def create_series(model: str) -> None:
    """Every batcher series of this model exists from the start: a counter or histogram at
    zero scrapes as 0 (and rates as 0), not as a missing series, before its first event."""
    for histogram in (
        metrics.REQUEST_QUEUE_TIME_SECONDS,
        metrics.BATCH_LENGTH_SPREAD,
        metrics.PREFETCH_SECONDS,
    ):
        histogram.labels(model)
    for counter in (metrics.BATCH_SWITCHES_TOTAL, metrics.PREFETCH_BYTES_TOTAL):
        counter.labels(model)
    for gauge in (
        metrics.NUM_REQUESTS_WAITING,
        metrics.NUM_REQUESTS_RUNNING,
        metrics.NUM_REQUESTS_POOLED,
        metrics.KV_CACHE_USAGE_PERC,
        metrics.CPU_POOL_USAGE_PERC,
    ):
        gauge.labels(model).set(0)


def report_worker_start(info: worker_pb2.ModelInfo) -> None:
    """How long the attached worker took to start, by phase, and the kernels it found
    cached: on every attach, so a worker that restarted reports its new start."""
    for phase, seconds in (("load", info.load_seconds), ("warm_up", info.warm_up_seconds)):
        metrics.WORKER_START_SECONDS.labels(info.model_name, phase).set(seconds)
    metrics.WORKER_KERNEL_CACHE_ENTRIES.labels(info.model_name).set(info.kernel_cache_entries)


def report_plan(
    model: str, scheduler: Scheduler, load: dict[str, float], layout: KVLayout, plan: BatchPlan
) -> None:
    """The gauges as the step starts (`load`: BatcherEngine.load()), and the plan's batch."""
    metrics.NUM_REQUESTS_WAITING.labels(model).set(load["num_waiting"])
    metrics.NUM_REQUESTS_RUNNING.labels(model).set(load["num_running"])
    metrics.NUM_REQUESTS_POOLED.labels(model).set(load["num_pooled"])
    metrics.CPU_POOL_USAGE_PERC.labels(model).set(load["kv_pool_usage"])
    device_blocks = getattr(scheduler.policy, "held_blocks", None)
    kv_use = (
        device_blocks / scheduler.num_device_blocks
        if device_blocks is not None
        else scheduler.allocator.usage  # fcfs: the pool blocks stand for device ones
    )
    metrics.KV_CACHE_USAGE_PERC.labels(model).set(kv_use)
    if plan.decode:
        lengths = [scheduler.store.get(r).num_tokens for r in plan.decode]
        spread = (max(lengths) - min(lengths)) / max(lengths)
        metrics.BATCH_LENGTH_SPREAD.labels(model).observe(spread)
    if plan.is_switch:
        metrics.BATCH_SWITCHES_TOTAL.labels(model).inc()
    if plan.load:
        tokens = sum(scheduler.store.get(r).num_kv_tokens for r in plan.load)
        metrics.PREFETCH_BYTES_TOTAL.labels(model).inc(
            tokens * layout.block_bytes // layout.block_tokens
        )
