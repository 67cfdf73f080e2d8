"""The AlignedServe resource's spec as typed, frozen values.

The CRD (helm/alignedserve/crds/) is the contract and the API server applies its defaults and
validation; `parse` applies the same defaults again (tests/test_operator_spec.py checks they
are equal field by field), so the operator also works on objects a fake or an old API server
did not default, and re-checks every cross-field rule, raising SpecError (a permanent error:
retrying cannot fix a spec) with the field's path.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alignedserve.common.errors import ConfigError
from alignedserve.common.policy import LOAD_ORDERS, POLICIES

# The operator's defaults, here because the CLI (main.py) must not import kopf (handlers.py)
DEFAULT_IMAGE = "ghcr.io/alignedserve/alignedserve:0.1.0"  # of pods whose spec names none
DEFAULT_INTERVAL_S = 10.0  # how often each AlignedServe's children and load are observed

GROUP = "alignedserve.io"
VERSION = "v1alpha1"
PLURAL = "alignedserves"
KIND = "AlignedServe"


class SpecError(ConfigError):
    """The AlignedServe's spec is invalid (the message names the field)."""


@dataclass(frozen=True)
class Image:
    repository: str = ""  # empty: the operator's default image
    tag: str = ""
    pull_policy: str = "IfNotPresent"


@dataclass(frozen=True)
class Model:
    path: str
    source: str = "image"  # image | pvc | hostPath
    pvc_name: str = ""
    host_path: str = ""
    served_name: str = ""
    dtype: str = "auto"


@dataclass(frozen=True)
class Router:
    replicas: int = 1
    port: int = 8000
    resources: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workers:
    replicas: int = 1
    gpus_per_pod: int = 2
    kv_pool_gib: float = 16.0
    num_device_blocks: int = 2048
    # with two GPUs and aligned: KV blocks the prefetch GPU decodes in while no prompt waits;
    # -1: as many as num_device_blocks, fewer if its free memory holds fewer; 0: none
    prefill_decode_blocks: int = -1
    # the worker queues a step on the GPU before answering the one before (back to back)
    overlap_steps: bool = True
    warm_up_batch: int = 512  # decode graphs captured before serving, up to this batch; 0: none
    # a PVC the pool's workers share for their compiled GPU kernels (a new pod then starts
    # without compiling); empty: each pod's own emptyDir
    kernel_cache_pvc_name: str = ""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batching:
    policy: str = "aligned"
    min_batch: int = 1
    max_batch_kv_fraction: float = 0.9
    starvation_seconds: float = 5.0
    max_waiting: int = 1024
    max_steps_in_flight: int = 2  # steps sent to the worker before the first is answered
    # aligned beside a prefill GPU: the most share of the decode GPU's time its prefill
    # turns take while a backlog waits (0: never)
    decode_prefill_share: float = 0.0
    # aligned: which pooled requests load first after the starving: shortest-first (by the
    # max_tokens clients set, then as fit-groups) or fit-groups (lengths inside a resident
    # group, then the oldest)
    load_order: str = "shortest-first"
    # aligned beside a prefill GPU: each prefill batch takes whole prompts (a prompt that
    # would pass the budget leads the next batch); false: cut at the budget
    prefill_whole_prompts: bool = True


@dataclass(frozen=True)
class PoolBounds:
    min_replicas: int = 1
    max_replicas: int = 4


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool = False
    workers: PoolBounds = PoolBounds()
    routers: PoolBounds = PoolBounds()
    target_queue_per_replica: float = 16.0
    target_p99_tpot_seconds: float = 0.2  # 0: latency does not scale the pool
    scale_down_stabilization_seconds: int = 300
    scale_to_zero: bool = False


@dataclass(frozen=True)
class Monitoring:
    service_monitor: bool = False


@dataclass(frozen=True)
class AlignedServeSpec:
    model: Model
    image: Image = Image()
    router: Router = Router()
    workers: Workers = Workers()
    batching: Batching = Batching()
    autoscaling: Autoscaling = Autoscaling()
    monitoring: Monitoring = Monitoring()
    drain_seconds: int = 30

    @property
    def served_name(self) -> str:
        return self.model.served_name


# The CRD's camelCase names that do not follow from the snake_case field name.
_RENAMES = {
    "kv_pool_gib": "kvPoolGiB",
    "max_batch_kv_fraction": "maxBatchKVFraction",
    "target_p99_tpot_seconds": "targetP99TPOTSeconds",
}
_ENUMS = {
    "model.source": ("image", "pvc", "hostPath"),
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "image.pullPolicy": ("Always", "IfNotPresent", "Never"),
    "workers.gpusPerPod": (0, 1, 2),
    "batching.policy": POLICIES,
    "batching.loadOrder": LOAD_ORDERS,
}


def camel(name: str) -> str:
    if name in _RENAMES:
        return _RENAMES[name]
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _build(cls: type, raw: Any, path: str) -> Any:
    """cls from the camelCase mapping `raw`, defaults for what it lacks, unknown keys refused."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path or 'spec'}: expected an object, got {type(raw).__name__}")
    fields_ = {camel(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields_))
    if unknown:
        raise SpecError(f"{path or 'spec'}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields_.items():
        where = f"{path}.{key}" if path else key
        if key in raw:
            values[f.name] = _value(hints[f.name], raw[key], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where} is required")
    return cls(**values)


def _value(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if where in _ENUMS and value not in _ENUMS[where]:
        raise SpecError(f"{where}={value!r} not one of {_ENUMS[where]}")
    origin = typing.get_origin(kind) or kind
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = {
        bool: isinstance(value, bool),
        int: is_number and isinstance(value, int),
        float: is_number and not math.isnan(value),
        str: isinstance(value, str),
        tuple: isinstance(value, list),
        Mapping: isinstance(value, Mapping),
    }[origin]
    if not ok:
        raise SpecError(f"{where}={value!r} must be of type {origin.__name__}")
    return float(value) if origin is float else tuple(value) if origin is tuple else value


def _check(spec: AlignedServeSpec) -> None:
    """The CRD's bounds and cross-field rules (its CEL validations), re-checked."""
    rules = [
        (spec.model.path.startswith("/"), "model.path must be an absolute path"),
        (
            spec.model.source != "pvc" or spec.model.pvc_name != "",
            "model.pvcName is required when model.source is pvc",
        ),
        (
            spec.model.source != "hostPath" or spec.model.host_path != "",
            "model.hostPath is required when model.source is hostPath",
        ),
        (0 <= spec.router.replicas <= 1000, "router.replicas must be in 0..1000"),
        (1 <= spec.router.port <= 65535, "router.port must be in 1..65535"),
        (0 <= spec.workers.replicas <= 1000, "workers.replicas must be in 0..1000"),
        (spec.workers.kv_pool_gib >= 0.0625, "workers.kvPoolGiB must be >= 0.0625"),
        (spec.workers.num_device_blocks >= 1, "workers.numDeviceBlocks must be >= 1"),
        (spec.workers.warm_up_batch >= 0, "workers.warmUpBatch must be >= 0"),
        (spec.workers.prefill_decode_blocks >= -1, "workers.prefillDecodeBlocks must be >= -1"),
        (1 <= spec.batching.min_batch <= 512, "batching.minBatch must be in 1..512"),
        (
            0.05 <= spec.batching.max_batch_kv_fraction <= 1,
            "batching.maxBatchKVFraction must be in 0.05..1",
        ),
        (
            0.1 <= spec.batching.starvation_seconds <= 3600,
            "batching.starvationSeconds must be in 0.1..3600",
        ),
        (spec.batching.max_waiting >= 1, "batching.maxWaiting must be >= 1"),
        (spec.batching.max_steps_in_flight >= 1, "batching.maxStepsInFlight must be >= 1"),
        (
            0 <= spec.batching.decode_prefill_share <= 0.9,
            "batching.decodePrefillShare must be in 0..0.9",
        ),
        (1 <= spec.drain_seconds <= 3600, "drainSeconds must be in 1..3600"),
    ]
    auto = spec.autoscaling
    for pool in ("workers", "routers"):
        bounds: PoolBounds = getattr(auto, pool)
        rules += [
            (
                bounds.min_replicas <= bounds.max_replicas,
                f"autoscaling.{pool}.minReplicas must not exceed maxReplicas",
            ),
            (bounds.max_replicas >= 1, f"autoscaling.{pool}.maxReplicas must be >= 1"),
        ]
    rules += [
        (auto.routers.min_replicas >= 1, "autoscaling.routers.minReplicas must be >= 1"),
        (
            auto.workers.min_replicas >= 1 or auto.scale_to_zero or not auto.enabled,
            "autoscaling.workers.minReplicas may be 0 only with autoscaling.scaleToZero",
        ),
        (auto.target_queue_per_replica > 0, "autoscaling.targetQueuePerReplica must be > 0"),
        (auto.target_p99_tpot_seconds >= 0, "autoscaling.targetP99TPOTSeconds must be >= 0"),
        (
            auto.scale_down_stabilization_seconds >= 0,
            "autoscaling.scaleDownStabilizationSeconds must be >= 0",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise SpecError(message)


def parse(spec: Mapping[str, Any], name: str) -> AlignedServeSpec:
    """The typed spec of the AlignedServe named `name` (the served model name defaults to it)."""
    parsed: AlignedServeSpec = _build(AlignedServeSpec, spec, "")
    _check(parsed)
    if not parsed.model.served_name:
        model = Model(**{**parsed.model.__dict__, "served_name": name})
        parsed = AlignedServeSpec(**{**parsed.__dict__, "model": model})
    return parsed
