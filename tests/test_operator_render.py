"""The operator's rendered children: golden files, strict Kubernetes schemas, and the
properties the design depends on (one node per GPU pair, a sized /dev/shm, pinning allowed,
drain on termination, owner references, readiness that means "can serve")."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from alignedserve.operator.render import Owner, render
from alignedserve.operator.spec import parse

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "operator"
EXAMPLES = ["minimal", "full", "cpu-dev"]
IMAGE = "registry.example/alignedserve:test"


def children(example: str, workers: int | None = None) -> list[dict]:
    obj = yaml.safe_load((ROOT / "helm/examples" / f"{example}.yaml").read_text())
    name = obj["metadata"]["name"]
    owner = Owner(name, obj["metadata"].get("namespace", "default"), f"uid-{name}")
    spec = parse(obj["spec"], name)
    return render(owner, spec, IMAGE, workers or spec.workers.replicas, spec.router.replicas)


def by_kind(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[-1]): o for o in objs}


@pytest.mark.parametrize("example", EXAMPLES)
def test_golden(example):
    text = yaml.safe_dump_all(children(example), sort_keys=True)
    golden = GOLDEN / f"{example}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"render changed: UPDATE_GOLDEN=1 pytest {__file__}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_children_validate_strictly(example):
    for obj in children(example):
        if obj["kind"] == "ServiceMonitor":  # not a built-in kind: checked below
            continue
        kubernetes_validate.validate(obj, "1.33", strict=True)


def test_service_monitor_selects_both_metrics_ports():
    (monitor,) = [o for o in children("full") if o["kind"] == "ServiceMonitor"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert ports == {"http", "metrics"}
    assert all(o["kind"] != "ServiceMonitor" for o in children("minimal"))


def test_worker_pod_shape():
    objs = by_kind(children("full"))
    pod = objs[("Deployment", "worker")]["spec"]["template"]["spec"]
    batcher, worker = pod["containers"]
    # both GPUs of the pair in one pod: one node
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--prefetch-device" in worker["args"]
    # the pool's volume: memory-backed, mounted as /dev/shm in both, sized past the pool
    (shm,) = [v for v in pod["volumes"] if v["name"] == "kv-pool"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{128 * 1024 + 1024}Mi"}
    for c in (batcher, worker):
        assert {"name": "kv-pool", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "IPC_LOCK" in worker["securityContext"]["capabilities"]["add"]
    # flags from the spec
    args = batcher["args"]
    assert args[args.index("--pool-gib") + 1] == "128"
    assert args[args.index("--min-batch") + 1] == "32"
    assert args[args.index("--max-batch-kv-fraction") + 1] == "0.4"
    assert args[args.index("--starvation-s") + 1] == "2.5"
    # drain: the worker outlives its batcher's drain, within the grace period
    grace = pod["terminationGracePeriodSeconds"]
    worker_wait = worker["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert batcher["lifecycle"]["preStop"]["sleep"]["seconds"] < worker_wait < grace
    assert batcher["readinessProbe"]["grpc"]["port"] == 50051
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_cpu_dev_has_no_gpus_and_mounts_the_model():
    pod = by_kind(children("cpu-dev"))[("Deployment", "worker")]["spec"]["template"]["spec"]
    worker = pod["containers"][1]
    assert "nvidia.com/gpu" not in str(worker["resources"])
    assert worker["args"][worker["args"].index("--device") + 1] == "cpu"
    assert {"name": "model", "hostPath": {"path": "/data/tiny", "type": "Directory"}} in pod[
        "volumes"
    ]


def test_every_child_is_owned_and_labelled():
    for obj in children("full"):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "AlignedServe" and ref["uid"] == "uid-llama-70b"
        assert ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "llama-70b"


def test_router_finds_batchers_through_the_headless_service():
    objs = by_kind(children("full"))
    args = objs[("Deployment", "router")]["spec"]["template"]["spec"]["containers"][0]["args"]
    target = args[args.index("--batcher-addresses") + 1]
    assert target == "llama-70b-worker.llm.svc.cluster.local:50051"
    assert objs[("Service", "worker")]["spec"]["clusterIP"] == "None"


def test_replicas_come_from_the_caller():
    objs = by_kind(children("minimal", workers=7))
    assert objs[("Deployment", "worker")]["spec"]["replicas"] == 7


def test_router_readiness_follows_scale_to_zero():
    def probe(extra: dict) -> str:
        spec = parse({"model": {"path": "/m"}, **extra}, "x")
        (dep,) = [
            o
            for o in render(Owner("x", "d", "u"), spec, IMAGE, 0, 1)
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "x-router"
        ]
        return dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]

    assert probe({}) == "/ready"
    zero = {"enabled": True, "scaleToZero": True, "workers": {"minReplicas": 0}}
    assert probe({"autoscaling": zero}) == "/health"
