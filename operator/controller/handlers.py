"""kopf handlers: one reconcile (create / update / resume) and one periodic observe.

reconcile = parse the spec -> render the children (pure) -> apply them (server-side apply,
idempotent) -> write the status. observe (a timer) re-reads the children for the status and,
when autoscaling is on, asks the batchers and routers for their load, decides each pool's size
(operator/controller/autoscale.py) and re-applies with it; each change is an Event and a
metric. Children are owned through ownerReferences, so deleting the AlignedServe deletes them
(the garbage collector's job): there is no finalizer to block a deletion.

Handlers are registered at import; `alignedserve.operator.main` sets CONFIG first.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes

from alignedserve.operator import apply, load, metrics
from alignedserve.operator.autoscale import (
    AutoscaleState,
    PoolObservation,
    PoolPolicy,
    decide,
)
from alignedserve.operator.render import (
    BATCHER_PORT,
    Owner,
    endpoint,
    optional_children,
    render,
    selector_string,
)
from alignedserve.operator.spec import (
    DEFAULT_IMAGE,
    DEFAULT_INTERVAL_S,
    GROUP,
    PLURAL,
    VERSION,
    AlignedServeSpec,
    SpecError,
    parse,
)
from alignedserve.operator.status import PoolStatus, conditions, merge_conditions

log = logging.getLogger(__name__)

# One router process streams a few hundred requests before its event loop is the bottleneck
# (benchmarks/serving_overhead.py: ~10 ms per step at 400 streams): the routers' pool is
# sized on live requests at this many per router.
ROUTER_STREAMS_PER_REPLICA = 256


@dataclass(frozen=True)
class OperatorConfig:
    default_image: str = DEFAULT_IMAGE
    interval_s: float = DEFAULT_INTERVAL_S
    prometheus_url: str = ""  # p99 TPOT for autoscaling comes from here when set
    load_timeout_s: float = 2.0


CONFIG = OperatorConfig(
    default_image=os.environ.get("ALIGNEDSERVE_DEFAULT_IMAGE", OperatorConfig.default_image),
    interval_s=float(os.environ.get("ALIGNEDSERVE_OPERATOR_INTERVAL_S", OperatorConfig.interval_s)),
    prometheus_url=os.environ.get("ALIGNEDSERVE_PROMETHEUS_URL", ""),
)
_api: kubernetes.client.ApiClient | None = None


def api() -> kubernetes.client.ApiClient:
    global _api
    if _api is None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        _api = kubernetes.client.ApiClient()
    return _api


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and the last-handled spec live in annotations: the CRD's structural schema has
    # no room for kopf's status fields (a real API server would prune them).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO


def _spec(spec: Any, name: str) -> AlignedServeSpec:
    try:
        return parse(spec, name)
    except SpecError as e:
        metrics.RECONCILES_TOTAL.labels("invalid").inc()
        raise kopf.PermanentError(f"invalid spec: {e}") from e


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def replicas(spec: AlignedServeSpec, status: Any) -> tuple[int, int]:
    """(worker pods, routers) to render: the spec's, or the autoscaler's within its bounds."""
    if not spec.autoscaling.enabled:
        return spec.workers.replicas, spec.router.replicas
    scaled = (status or {}).get("autoscaler") or {}
    auto = spec.autoscaling
    workers = (scaled.get("workers") or {}).get("desiredReplicas", spec.workers.replicas)
    routers = (scaled.get("routers") or {}).get("desiredReplicas", spec.router.replicas)
    return (
        _clamp(workers, auto.workers.min_replicas, auto.workers.max_replicas),
        _clamp(routers, auto.routers.min_replicas, auto.routers.max_replicas),
    )


Deployments = tuple[dict | None, dict | None]  # (router, worker) as stored, None if missing


def _apply_all(owner: Owner, spec: AlignedServeSpec, workers: int, routers: int) -> Deployments:
    """Apply every child, delete optional ones switched off; the two Deployments as the
    API server stored them (its apply answers carry them: no second read)."""
    client = api()
    children = render(owner, spec, CONFIG.default_image, workers, routers)
    stored = {(c["kind"], c["metadata"]["name"]): apply.apply(client, c) for c in children}
    rendered = {(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children}
    for api_version, kind, name in optional_children(owner):
        if (api_version, kind, name) not in rendered:
            apply.delete(client, api_version, kind, owner.namespace, name)
    return (
        stored.get(("Deployment", f"{owner.name}-router")),
        stored.get(("Deployment", f"{owner.name}-worker")),
    )


def _deployments(owner: Owner) -> Deployments:
    client, get = api(), apply.get
    router_dep = get(client, "apps/v1", "Deployment", owner.namespace, f"{owner.name}-router")
    worker_dep = get(client, "apps/v1", "Deployment", owner.namespace, f"{owner.name}-worker")
    return router_dep, worker_dep


def _pools(deployments: Deployments, workers: int, routers: int) -> tuple[PoolStatus, PoolStatus]:
    router_dep, worker_dep = deployments
    return PoolStatus.of(router_dep, routers), PoolStatus.of(worker_dep, workers)


def _status_patch(
    owner: Owner,
    spec: AlignedServeSpec,
    generation: int,
    old: Any,
    pools: tuple[PoolStatus, PoolStatus],
) -> dict[str, Any]:
    """The status fields that differ from `old` (an empty dict: nothing to write)."""
    old = dict(old or {})
    routers, workers = pools
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    new = {
        "observedGeneration": generation,
        "servedModelName": spec.served_name,
        "endpoint": endpoint(owner, spec),
        "routers": {
            "replicas": routers.desired,
            "readyReplicas": routers.ready,
            "summary": routers.summary,
        },
        "workers": {
            "replicas": workers.desired,
            "readyReplicas": workers.ready,
            "selector": selector_string(owner, "worker"),
            "summary": workers.summary,
        },
        "conditions": merge_conditions(
            old.get("conditions"), conditions(routers, workers), now, generation
        ),
    }
    return {key: value for key, value in new.items() if old.get(key) != value}


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile(
    name: str, namespace: str, uid: str, spec: Any, status: Any, meta: Any, patch: Any, **_: Any
) -> None:
    parsed = _spec(spec, name)
    owner = Owner(name, namespace, uid)
    workers, routers = replicas(parsed, status)
    try:
        deployments = _apply_all(owner, parsed, workers, routers)
    except kopf.TemporaryError:
        metrics.RECONCILES_TOTAL.labels("error").inc()
        raise
    metrics.RECONCILES_TOTAL.labels("applied").inc()
    pools = _pools(deployments, workers, routers)
    patch.status.update(_status_patch(owner, parsed, meta["generation"], status, pools))


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.interval_s, initial_delay=CONFIG.interval_s)
async def observe(
    name: str,
    namespace: str,
    uid: str,
    spec: Any,
    status: Any,
    meta: Any,
    body: Any,
    patch: Any,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    try:
        parsed = parse(spec, name)
    except SpecError:
        return  # reconcile has reported it; nothing to observe
    owner = Owner(name, namespace, uid)
    workers, routers = replicas(parsed, status)
    deployments = await asyncio.to_thread(_deployments, owner)  # read once per observation
    if parsed.autoscaling.enabled:
        # the autoscaler's windows live in kopf's per-resource memo: gone with the resource
        states = memo.setdefault("autoscale_states", {})
        ready = _pools(deployments, workers, routers)
        scaled = await _autoscale(owner, parsed, workers, routers, ready, body, states)
        if scaled != (workers, routers):
            workers, routers = scaled
            await asyncio.to_thread(_apply_all, owner, parsed, workers, routers)
        patch.status.update(_autoscaler_patch(status, workers, routers))
    pools = _pools(deployments, workers, routers)
    patch.status.update(_status_patch(owner, parsed, meta["generation"], status, pools))


def _autoscaler_patch(status: Any, workers: int, routers: int) -> dict[str, Any]:
    old = (status or {}).get("autoscaler") or {}
    new = {
        "workers": {"desiredReplicas": workers},
        "routers": {"desiredReplicas": routers},
    }
    return {} if old == new else {"autoscaler": new}


async def _addresses(owner: Owner, component: str, port: int) -> list[str]:
    pods = await asyncio.to_thread(
        apply.list_pods, api(), owner.namespace, selector_string(owner, component)
    )
    return [
        f"{pod['status']['podIP']}:{port}"
        for pod in pods
        if (pod.get("status") or {}).get("podIP") and not pod["metadata"].get("deletionTimestamp")
    ]


async def _autoscale(
    owner: Owner,
    spec: AlignedServeSpec,
    workers: int,
    routers: int,
    pools: tuple[PoolStatus, PoolStatus],
    body: Any,
    states: dict[str, AutoscaleState],
) -> tuple[int, int]:
    """(worker pods, routers) the autoscaler wants now."""
    auto = spec.autoscaling
    batchers = await _addresses(owner, "worker", BATCHER_PORT)
    router_pods = await _addresses(owner, "router", spec.router.port)
    loads, held = await asyncio.gather(
        load.batcher_loads(batchers, CONFIG.load_timeout_s),
        load.router_held(router_pods, CONFIG.load_timeout_s),
    )
    tpot = None
    if CONFIG.prometheus_url and auto.target_p99_tpot_seconds > 0:
        tpot = await load.prometheus_p99_tpot(CONFIG.prometheus_url, owner.namespace, owner.name)
    router_pool, worker_pool = pools
    now = time.monotonic()
    seen = load.pool_observation(now, workers, worker_pool.ready, loads, held, tpot)
    metrics.AUTOSCALER_QUEUE.labels(owner.namespace, owner.name).set(seen.queue)
    worker_policy = PoolPolicy(
        min_replicas=auto.workers.min_replicas,
        max_replicas=auto.workers.max_replicas,
        target_queue_per_replica=auto.target_queue_per_replica,
        target_p99_tpot_s=auto.target_p99_tpot_seconds or None,
        scale_down_stabilization_s=auto.scale_down_stabilization_seconds,
        scale_to_zero=auto.scale_to_zero,
    )
    router_policy = PoolPolicy(
        min_replicas=auto.routers.min_replicas,
        max_replicas=auto.routers.max_replicas,
        target_queue_per_replica=ROUTER_STREAMS_PER_REPLICA,
        target_p99_tpot_s=None,
        scale_down_stabilization_s=auto.scale_down_stabilization_seconds,
        scale_to_zero=False,
    )
    live = seen.queue + seen.running + seen.pooled
    router_seen = PoolObservation(now, routers, router_pool.ready, live, 0, 0, None, 0.0)
    return (
        _decide(owner, "workers", worker_policy, seen, body, states),
        _decide(owner, "routers", router_policy, router_seen, body, states),
    )


def _decide(
    owner: Owner,
    pool: str,
    policy: PoolPolicy,
    seen: PoolObservation,
    body: Any,
    states: dict[str, AutoscaleState],
) -> int:
    state = states.get(pool) or AutoscaleState.initial(seen.now_s, seen.current_replicas)
    decision, states[pool] = decide(policy, state, seen)
    metrics.AUTOSCALER_DESIRED_REPLICAS.labels(owner.namespace, owner.name, pool).set(
        decision.desired_replicas
    )
    if decision.direction != "none":
        metrics.AUTOSCALER_DECISIONS_TOTAL.labels(
            owner.namespace, owner.name, pool, decision.direction
        ).inc()
        message = (
            f"{pool} {seen.current_replicas} -> {decision.desired_replicas}: {decision.reason}"
        )
        reason = "ScaledUp" if decision.direction == "up" else "ScaledDown"
        kopf.event(body, type="Normal", reason=reason, message=message)
        log.info("%s/%s: %s", owner.namespace, owner.name, message)
    return decision.desired_replicas
