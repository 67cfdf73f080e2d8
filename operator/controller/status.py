"""The AlignedServe's status from its children's, as a pure function.

Conditions (each with reason, message, lastTransitionTime kept while the status holds):
- Ready: a router is ready and a worker pod is ready (or none is wanted: scaled to zero,
  when routers hold requests until one starts).
- Progressing: some pool has fewer ready replicas than desired, or its Deployment has not yet
  seen its latest spec (a rollout or a scale in flight).
- Degraded: a child Deployment reports a failure (ReplicaFailure, or progress deadline
  exceeded), or a pool that was ready lost every ready replica while some are wanted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PoolStatus:
    desired: int
    ready: int
    failure: str  # "" when healthy; else the Deployment's failure message
    is_current: bool  # the Deployment has observed its latest spec and updated every replica

    @classmethod
    def of(cls, deployment: Mapping[str, Any] | None, desired: int) -> PoolStatus:
        if deployment is None:
            return cls(desired, 0, "", is_current=False)
        status = deployment.get("status") or {}
        generation = deployment.get("metadata", {}).get("generation", 0)
        updated = status.get("updatedReplicas", 0)
        is_current = status.get("observedGeneration", 0) >= generation and updated >= desired
        failure = ""
        for c in status.get("conditions") or []:
            if (c.get("type"), c.get("status")) == ("ReplicaFailure", "True") or (
                c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
            ):
                failure = c.get("message") or c.get("reason") or c["type"]
        return cls(desired, int(status.get("readyReplicas") or 0), failure, is_current)

    @property
    def summary(self) -> str:
        return f"{self.ready}/{self.desired}"


def _condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }


def conditions(routers: PoolStatus, workers: PoolStatus) -> list[dict[str, Any]]:
    pools = {"routers": routers, "workers": workers}
    serving = routers.ready >= 1 and (workers.ready >= 1 or workers.desired == 0)
    if serving:
        ready = _condition("Ready", True, "Serving", "routers and worker pods are ready")
    else:
        missing = [name for name, p in pools.items() if p.ready == 0 and p.desired > 0]
        ready = _condition(
            "Ready", False, "NotReady", f"no ready {' or '.join(missing) or 'routers'}"
        )
    moving = {n: p for n, p in pools.items() if p.ready != p.desired or not p.is_current}
    progressing = _condition(
        "Progressing",
        bool(moving),
        "RollingOutOrScaling" if moving else "Complete",
        "; ".join(f"{n} {p.summary} ready" for n, p in moving.items()) or "every pool is current",
    )
    failed = {n: p.failure for n, p in pools.items() if p.failure}
    degraded = _condition(
        "Degraded",
        bool(failed),
        "DeploymentFailed" if failed else "AsExpected",
        "; ".join(f"{n}: {msg}" for n, msg in failed.items()) or "no failures",
    )
    return [ready, progressing, degraded]


def merge_conditions(
    old: list[Mapping[str, Any]] | None, new: list[dict[str, Any]], now: str, generation: int
) -> list[dict[str, Any]]:
    """`new`, with lastTransitionTime kept from `old` where the status did not change."""
    before = {c.get("type"): c for c in old or []}
    merged = []
    for c in new:
        prev = before.get(c["type"])
        changed = prev is None or prev.get("status") != c["status"]
        since = now if changed else prev.get("lastTransitionTime", now)
        merged.append({**c, "lastTransitionTime": since, "observedGeneration": generation})
    return merged
