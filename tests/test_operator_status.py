"""The AlignedServe's conditions from its Deployments' status."""

from __future__ import annotations

from alignedserve.operator.status import PoolStatus, conditions, merge_conditions


def deployment(ready: int, updated: int, generation: int = 2, observed: int = 2, **cond) -> dict:
    status = {"readyReplicas": ready, "updatedReplicas": updated, "observedGeneration": observed}
    if cond:
        status["conditions"] = [cond]
    return {"metadata": {"generation": generation}, "status": status}


def by_type(routers: PoolStatus, workers: PoolStatus) -> dict[str, dict]:
    return {c["type"]: c for c in conditions(routers, workers)}


def test_ready_when_both_pools_serve():
    c = by_type(PoolStatus.of(deployment(1, 1), 1), PoolStatus.of(deployment(2, 2), 2))
    assert (c["Ready"]["status"], c["Progressing"]["status"], c["Degraded"]["status"]) == (
        "True",
        "False",
        "False",
    )


def test_not_ready_and_progressing_while_workers_start():
    c = by_type(PoolStatus.of(deployment(1, 1), 1), PoolStatus.of(deployment(0, 2), 2))
    assert c["Ready"]["status"] == "False" and "workers" in c["Ready"]["message"]
    assert c["Progressing"]["status"] == "True" and "workers 0/2" in c["Progressing"]["message"]


def test_a_missing_deployment_is_not_ready():
    c = by_type(PoolStatus.of(None, 1), PoolStatus.of(None, 1))
    assert c["Ready"]["status"] == "False" and c["Progressing"]["status"] == "True"


def test_stale_generation_is_progressing_even_when_counts_match():
    stale = deployment(1, 1, generation=3, observed=2)
    c = by_type(PoolStatus.of(deployment(1, 1), 1), PoolStatus.of(stale, 1))
    assert c["Ready"]["status"] == "True" and c["Progressing"]["status"] == "True"


def test_scaled_to_zero_is_ready():
    c = by_type(PoolStatus.of(deployment(1, 1), 1), PoolStatus.of(deployment(0, 0), 0))
    assert c["Ready"]["status"] == "True"


def test_degraded_on_deployment_failure():
    failed = deployment(
        0,
        1,
        type="Progressing",
        status="False",
        reason="ProgressDeadlineExceeded",
        message="ReplicaSet has timed out progressing",
    )
    c = by_type(PoolStatus.of(deployment(1, 1), 1), PoolStatus.of(failed, 1))
    assert c["Degraded"]["status"] == "True" and "timed out" in c["Degraded"]["message"]


def test_transition_time_kept_while_status_holds():
    first = merge_conditions(None, [{"type": "Ready", "status": "False"}], "t1", 1)
    same = merge_conditions(first, [{"type": "Ready", "status": "False"}], "t2", 2)
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True"}], "t3", 2)
    assert [c[0]["lastTransitionTime"] for c in (first, same, flipped)] == ["t1", "t1", "t3"]
    assert same[0]["observedGeneration"] == 2
