"""The operator's own metrics, in a registry of their own (the serving metrics of
alignedserve.common.metrics are registered by imports but never observed here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()
INSTANCE = ("namespace", "instance")

AUTOSCALER_DECISIONS_TOTAL = Counter(
    "alignedserve:autoscaler_decisions_total",
    "Scaling decisions that changed a pool's size, by pool (workers, routers) and direction.",
    (*INSTANCE, "pool", "direction"),
    registry=REGISTRY,
)
AUTOSCALER_DESIRED_REPLICAS = Gauge(
    "alignedserve:autoscaler_desired_replicas",
    "Replicas the autoscaler wants for a pool.",
    (*INSTANCE, "pool"),
    registry=REGISTRY,
)
AUTOSCALER_QUEUE = Gauge(
    "alignedserve:autoscaler_observed_queue",
    "Waiting plus router-held requests the autoscaler last observed for the worker pool.",
    INSTANCE,
    registry=REGISTRY,
)
RECONCILES_TOTAL = Counter(
    "alignedserve:operator_reconciles_total",
    "Reconciliations of AlignedServe resources, by result (applied, invalid, error).",
    ("result",),
    registry=REGISTRY,
)
