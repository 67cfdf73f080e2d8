"""The operator's rendered children: golden files, strict Kubernetes schemas, and the
properties the design depends on (one node per GPU pair, a sized /dev/shm, pinning allowed,
drain on termination, owner references, readiness that means "can serve")."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from alignedserve.batcher.service import BatcherConfig
from alignedserve.cli import build_parser
from alignedserve.common import flags
from alignedserve.operator.render import Owner, render
from alignedserve.operator.spec import Batching, Workers, camel, parse
from alignedserve.router.config import RouterConfig
from alignedserve.worker.service import WorkerConfig

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
    assert args[args.index("--max-steps-in-flight") + 1] == "2"
    assert args[args.index("--decode-prefill-share") + 1] == "0.25"
    assert args[args.index("--load-order") + 1] == "fit-groups"
    assert "--no-prefill-whole-prompts" in args
    assert "--overlap-steps" in worker["args"]
    assert worker["args"][worker["args"].index("--warm-up-batch") + 1] == "256"
    # drain: the worker outlives its batcher's drain, within the grace period
    grace = pod["terminationGracePeriodSeconds"]
    worker_wait = worker["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert batcher["lifecycle"]["preStop"]["sleep"]["seconds"] < worker_wait < grace
    assert batcher["readinessProbe"]["grpc"]["port"] == 50051
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_worker_compiles_its_kernels_into_a_writable_volume_that_outlives_it(example):
    """The image's user has no home, so Triton's default cache cannot be written: the worker's
    TRITON_CACHE_DIR lies in a writable volume that outlives the worker container: the pod's
    own on disk (not charged to memory), or the claim the spec names, whose files the pod's
    fsGroup gives the image's group."""
    pod = by_kind(children(example))[("Deployment", "worker")]["spec"]["template"]["spec"]
    worker = pod["containers"][1]
    (cache_dir,) = [e["value"] for e in worker["env"] if e["name"] == "TRITON_CACHE_DIR"]
    (mount,) = [m for m in worker["volumeMounts"] if cache_dir.startswith(m["mountPath"] + "/")]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if example == "full":  # kernelCachePvcName is set
        assert volume["persistentVolumeClaim"] == {"claimName": "alignedserve-kernels"}
        assert pod["securityContext"]["fsGroup"] == 10001
    else:
        assert "medium" not in volume["emptyDir"]  # node disk, not the pod's memory
        assert "securityContext" not in pod  # nothing to give the image's group


def test_only_an_aligned_pool_is_charged_to_the_pod():
    """aligned's CPU pool lives in /dev/shm and counts against the batcher's memory; fcfs's
    is a sparse mirror of the device's blocks that takes none (batcher/pool_attachment.py)."""
    obj = yaml.safe_load((ROOT / "helm/examples/full.yaml").read_text())
    owner = Owner("s", "default", "uid-s")

    def pool_charges(policy: str) -> tuple[str, str]:
        obj["spec"].setdefault("batching", {})["policy"] = policy
        spec = parse(obj["spec"], "s")
        pod = by_kind(render(owner, spec, IMAGE, 1, 1))[("Deployment", "worker")]
        pod = pod["spec"]["template"]["spec"]
        (shm,) = [v for v in pod["volumes"] if v["name"] == "kv-pool"]
        return shm["emptyDir"]["sizeLimit"], pod["containers"][0]["resources"]["limits"]["memory"]

    assert pool_charges("aligned") == (f"{128 * 1024 + 1024}Mi", f"{128 * 1024 + 2048}Mi")
    assert pool_charges("fcfs") == ("1024Mi", "2048Mi")


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


# --- every spec.batching and spec.workers field reaches its service's flag --------------------

# Each field of spec.batching and spec.workers: (container, field of that service's config its
# flag sets), or None for a field that shapes the pod instead of a flag. A new field fails
# test_every_batching_and_workers_field_is_classified until it is listed here.
SPEC_TO_CONFIG: dict[str, tuple[str, str] | None] = {
    "batching.policy": ("batcher", "policy"),
    "batching.minBatch": ("batcher", "min_batch"),
    "batching.maxBatchKVFraction": ("batcher", "max_batch_kv_fraction"),
    "batching.starvationSeconds": ("batcher", "starvation_s"),
    "batching.maxWaiting": ("batcher", "max_waiting"),
    "batching.maxStepsInFlight": ("batcher", "max_steps_in_flight"),
    "batching.decodePrefillShare": ("batcher", "decode_prefill_share"),
    "batching.loadOrder": ("batcher", "load_order"),
    "batching.prefillWholePrompts": ("batcher", "prefill_whole_prompts"),
    "workers.kvPoolGiB": ("batcher", "pool_gib"),
    "workers.numDeviceBlocks": ("worker", "num_device_blocks"),
    "workers.prefillDecodeBlocks": ("worker", "prefill_decode_blocks"),
    "workers.overlapSteps": ("worker", "overlap_steps"),
    "workers.warmUpBatch": ("worker", "warm_up_batch"),
    "workers.replicas": None,
    "workers.gpusPerPod": None,  # the GPU request, --device and --prefetch-device
    "workers.nodeSelector": None,
    "workers.kernelCachePvcName": None,  # the kernel-cache volume
    "workers.tolerations": None,
    "workers.resources": None,
}
CONFIGS = {"batcher": BatcherConfig, "worker": WorkerConfig, "router": RouterConfig}
# Where the operator's default is not the service's, and why.
OWN_DEFAULTS = {"workers.kvPoolGiB"}  # a GPU node's pool; the CLI's 1 GiB suits a laptop
# A value for every flag-carrying field that is neither the spec's default nor the service's.
NON_DEFAULT = {
    "batching.policy": "fcfs",
    "batching.minBatch": 3,
    "batching.maxBatchKVFraction": 0.5,
    "batching.starvationSeconds": 2.5,
    "batching.maxWaiting": 77,
    "batching.maxStepsInFlight": 1,
    "batching.decodePrefillShare": 0.25,
    "batching.loadOrder": "fit-groups",
    "batching.prefillWholePrompts": False,
    "workers.kvPoolGiB": 0.5,
    "workers.numDeviceBlocks": 99,
    "workers.prefillDecodeBlocks": 77,
    "workers.overlapSteps": False,
    "workers.warmUpBatch": 0,
}


def _service_default(container: str, name: str):
    (f,) = [f for f in dataclasses.fields(CONFIGS[container]) if f.name == name]
    return f.default


def _spec_default(path: str):
    section, key = path.split(".")
    cls = {"batching": Batching, "workers": Workers}[section]
    (f,) = [f for f in dataclasses.fields(cls) if camel(f.name) == key]
    return f.default


def service_configs(objs: list[dict]) -> dict[str, object]:
    """Each Deployment container's config, as the `alignedserve` CLI builds it (and
    validates it) from the container's command line."""
    configs = {}
    for obj in objs:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            command = container["command"]
            assert command[0] == "alignedserve"
            parsed = build_parser().parse_args([*command[1:], *container["args"]])
            assert parsed.role == container["name"]
            configs[container["name"]] = flags.from_args(CONFIGS[parsed.role], parsed)
    return configs


def test_every_batching_and_workers_field_is_classified():
    fields = {f"batching.{camel(f.name)}" for f in dataclasses.fields(Batching)}
    fields |= {f"workers.{camel(f.name)}" for f in dataclasses.fields(Workers)}
    assert set(SPEC_TO_CONFIG) == fields
    assert set(NON_DEFAULT) == {path for path, target in SPEC_TO_CONFIG.items() if target}


def test_spec_defaults_are_the_services_defaults():
    for path, target in SPEC_TO_CONFIG.items():
        if target is None or path in OWN_DEFAULTS:
            continue
        assert _spec_default(path) == _service_default(*target), path


# Fields only the aligned policy passes on; under fcfs their flag is this "off" value.
ALIGNED_ONLY = {"workers.prefillDecodeBlocks": 0}


def _configs_of(values: dict) -> dict[str, object]:
    raw: dict = {"model": {"path": "/m"}, "batching": {}, "workers": {}}
    for path, value in values.items():
        section, key = path.split(".")
        raw[section][key] = value
    return service_configs(render(Owner("x", "d", "u"), parse(raw, "x"), IMAGE, 1, 1))


def test_every_spec_field_reaches_its_flag():
    """Each field, set away from both defaults, comes back out of its container's command
    line as the service's own CLI parses it (so a field that stopped reaching its flag would
    parse back to the service's default). NON_DEFAULT's policy is fcfs: the aligned-only
    fields come out off, and come out as set once the policy is aligned."""
    configs = _configs_of(NON_DEFAULT)
    for path, value in NON_DEFAULT.items():
        container, name = SPEC_TO_CONFIG[path]
        assert value not in (_spec_default(path), _service_default(container, name)), path
        assert getattr(configs[container], name) == ALIGNED_ONLY.get(path, value), path
    aligned = _configs_of({**NON_DEFAULT, "batching.policy": "aligned"})
    for path in ALIGNED_ONLY:
        container, name = SPEC_TO_CONFIG[path]
        assert getattr(aligned[container], name) == NON_DEFAULT[path], path


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_render_command_lines_the_services_accept(example):
    configs = service_configs(children(example))
    assert set(configs) == {"batcher", "worker", "router"}
    configs["batcher"].engine_config()  # the engine's and scheduler's own checks
