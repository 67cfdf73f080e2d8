"""The child objects of one AlignedServe, as pure functions of its spec (golden-file tested).

For an AlignedServe N in namespace NS:
- Deployment + Service `N-router`: the OpenAI-compatible front door. The router finds the
  batchers by re-resolving the worker pods' headless Service name (one batcher per address).
- Deployment `N-worker` + headless Service `N-worker`: each pod is one batcher container
  beside one model-worker container. They share a memory-backed volume at /dev/shm that holds
  the CPU KV pool (sized to the pool, so /dev/shm is never the 64 MiB default); the worker pins
  it, so it gets CAP_IPC_LOCK (pinning is bounded by RLIMIT_MEMLOCK otherwise). The worker
  compiles its Triton kernels into a kernel-cache volume (TRITON_CACHE_DIR): the pod's own,
  which a restarted worker container finds full, or a claim the pool's pods share, so a new
  pod starts without compiling. One pod asks for both GPUs of its pair, so the decode and
  prefetch GPUs land on one node.
- PodDisruptionBudget `N-worker` (one worker pod down at a time), and optionally a
  ServiceMonitor `N`.
Every pod drains: preStop waits for endpoints to forget it, SIGTERM then lets in-flight
requests finish for drainSeconds (the worker's own preStop keeps it alive until its batcher
has drained). Readiness means "can serve": the router's /ready needs a ready batcher, and the
batcher's gRPC health is SERVING only while its worker answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alignedserve.common.policy import reserves_pool, worker_prefill_decode_blocks
from alignedserve.operator.spec import GROUP, KIND, VERSION, AlignedServeSpec

BATCHER_PORT = 50051
METRICS_PORT = 9090
WORKER_PORT = 50061  # the model worker, reached by its batcher over the pod's loopback
FIELD_MANAGER = "alignedserve-operator"
PRESTOP_S = 5  # endpoints controllers and routers stop sending before SIGTERM
KV_POOL_VOLUME = "kv-pool"
MODEL_VOLUME = "model"
# Triton compiles the worker's GPU kernels into this volume (the image's user has no home):
# it outlives the worker container, so a restarted worker reads them instead of compiling
KERNEL_CACHE_VOLUME = "kernel-cache"
KERNEL_CACHE_PATH = "/var/cache/alignedserve"
IMAGE_GID = 10001  # the image's user's group (Dockerfile)


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        **selector(owner, component),
        "app.kubernetes.io/part-of": "alignedserve",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
    }


def selector(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "alignedserve",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }


def selector_string(owner: Owner, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(owner, component).items())


def worker_service_host(owner: Owner) -> str:
    return f"{owner.name}-worker.{owner.namespace}.svc.cluster.local"


def endpoint(owner: Owner, spec: AlignedServeSpec) -> str:
    return f"http://{owner.name}-router.{owner.namespace}.svc.cluster.local:{spec.router.port}/v1"


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _image(spec: AlignedServeSpec, default_image: str) -> str:
    if not spec.image.repository:
        return default_image
    return f"{spec.image.repository}:{spec.image.tag}" if spec.image.tag else spec.image.repository


def _model_volume(spec: AlignedServeSpec) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) that put the model directory at spec.model.path."""
    model = spec.model
    if model.source == "image":
        return [], []
    if model.source == "pvc":
        source = {"persistentVolumeClaim": {"claimName": model.pvc_name, "readOnly": True}}
    else:
        source = {"hostPath": {"path": model.host_path, "type": "Directory"}}
    mount = {"name": MODEL_VOLUME, "mountPath": model.path, "readOnly": True}
    return [{"name": MODEL_VOLUME, **source}], [mount]


def _kernel_cache(spec: AlignedServeSpec) -> dict:
    """The worker's kernel-cache volume: the pool's shared claim (Triton writes each file
    aside and renames it in, so pods compiling at once do not tear an entry; the key of an
    entry covers the GPU's architecture and Triton's version), or the pod's own directory."""
    if spec.workers.kernel_cache_pvc_name:
        claim = {"claimName": spec.workers.kernel_cache_pvc_name}
        return {"name": KERNEL_CACHE_VOLUME, "persistentVolumeClaim": claim}
    return {"name": KERNEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": "2Gi"}}


def _flag_args(flags: Mapping[str, Any]) -> list[str]:
    args = []
    for flag, value in flags.items():
        if isinstance(value, bool):  # the services' bool flags are --name / --no-name
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def _container(name: str, image: str, spec: AlignedServeSpec, args: list[str]) -> dict:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["alignedserve", "serve", name],
        "args": args,
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def _pod_spec(spec: AlignedServeSpec, containers: list[dict], volumes: list[dict]) -> dict:
    return {
        "containers": containers,
        "volumes": volumes,
        # SIGTERM comes after preStop; then drain_seconds to finish, plus a margin
        "terminationGracePeriodSeconds": PRESTOP_S + spec.drain_seconds + 10,
        "enableServiceLinks": False,
    }


def _deployment(
    owner: Owner, component: str, replicas: int, pod_spec: dict, strategy: dict
) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, f"{owner.name}-{component}", component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(owner, component)},
            "strategy": strategy,
            "template": {"metadata": {"labels": labels(owner, component)}, "spec": pod_spec},
        },
    }


def router_deployment(
    owner: Owner, spec: AlignedServeSpec, default_image: str, replicas: int
) -> dict:
    volumes, mounts = _model_volume(spec)
    args = [
        "--model-dir",
        spec.model.path,
        "--served-model-name",
        spec.served_name,
        "--batcher-addresses",
        f"{worker_service_host(owner)}:{BATCHER_PORT}",
        *_flag_args(
            {"host": "0.0.0.0", "port": spec.router.port, "drain-timeout-s": spec.drain_seconds}
        ),
    ]
    container = _container("router", _image(spec, default_image), spec, args)
    http = {"port": "http"}
    # /ready needs a ready batcher. Scaled to zero there is none, and the router must stay in
    # its Service to hold requests while a worker pod starts: then ready means alive.
    auto = spec.autoscaling
    ready_path = "/health" if auto.enabled and auto.scale_to_zero else "/ready"
    container |= {
        "ports": [{"name": "http", "containerPort": spec.router.port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "resources": dict(spec.router.resources),
        "readinessProbe": {"httpGet": {"path": ready_path, **http}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", **http}, "periodSeconds": 10},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
    }
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    return _deployment(owner, "router", replicas, _pod_spec(spec, [container], volumes), rolling)


def router_service(owner: Owner, spec: AlignedServeSpec) -> dict:
    port = {"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, f"{owner.name}-router", "router"),
        "spec": {"type": "ClusterIP", "selector": selector(owner, "router"), "ports": [port]},
    }


def kv_pool_mib(spec: AlignedServeSpec) -> int:
    """The memory the batcher's CPU KV pool takes in /dev/shm: none under fcfs, whose pool
    is a sparse mirror of the device's blocks (common/policy.reserves_pool)."""
    if not reserves_pool(spec.batching.policy):
        return 0
    return math.ceil(spec.workers.kv_pool_gib * 1024)


def kv_pool_size_limit(spec: AlignedServeSpec) -> str:
    # the pool, plus room for the pinned-memory and gRPC scratch the processes keep in /dev/shm
    return f"{kv_pool_mib(spec) + 1024}Mi"


def worker_deployment(
    owner: Owner, spec: AlignedServeSpec, default_image: str, replicas: int
) -> dict:
    image = _image(spec, default_image)
    volumes, mounts = _model_volume(spec)
    shm = {"name": KV_POOL_VOLUME, "mountPath": "/dev/shm"}
    pool_volume = {
        "name": KV_POOL_VOLUME,
        "emptyDir": {"medium": "Memory", "sizeLimit": kv_pool_size_limit(spec)},
    }
    batching = spec.batching
    batcher = _container(
        "batcher",
        image,
        spec,
        _flag_args(
            {
                "worker": f"127.0.0.1:{WORKER_PORT}",
                "host": "0.0.0.0",
                "port": BATCHER_PORT,
                "metrics-port": METRICS_PORT,
                "pool-gib": spec.workers.kv_pool_gib,
                "policy": batching.policy,
                "min-batch": batching.min_batch,
                "max-batch-kv-fraction": batching.max_batch_kv_fraction,
                "starvation-s": batching.starvation_seconds,
                "max-waiting": batching.max_waiting,
                "max-steps-in-flight": batching.max_steps_in_flight,
                "decode-prefill-share": batching.decode_prefill_share,
                "load-order": batching.load_order,
                "prefill-whole-prompts": batching.prefill_whole_prompts,
                "drain-s": spec.drain_seconds,
            }
        ),
    )
    grpc_port = {"port": BATCHER_PORT}
    # The pool lives in /dev/shm, charged to the pod's memory: request it, with a margin.
    pool_memory = f"{kv_pool_mib(spec) + 2048}Mi"
    batcher |= {
        "ports": [
            {"name": "grpc", "containerPort": BATCHER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": [dict(shm)],
        "resources": {"requests": {"memory": pool_memory}, "limits": {"memory": pool_memory}},
        # ready = a worker is attached and answering; alive = the process serves gRPC
        "readinessProbe": {"grpc": dict(grpc_port), "periodSeconds": 2},
        "livenessProbe": {"tcpSocket": dict(grpc_port), "periodSeconds": 10},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
    }
    gpus = spec.workers.gpus_per_pod
    worker_flags: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": WORKER_PORT,
        "device": "cuda:0" if gpus else "cpu",
        "num-device-blocks": spec.workers.num_device_blocks,
        "overlap-steps": spec.workers.overlap_steps,
        "warm-up-batch": spec.workers.warm_up_batch,
    }
    if gpus == 2:
        worker_flags["prefetch-device"] = "cuda:1"
        worker_flags["prefill-decode-blocks"] = worker_prefill_decode_blocks(
            batching.policy, spec.workers.prefill_decode_blocks
        )
    worker_args = ["--model", spec.model.path, *_flag_args(worker_flags)]
    if spec.model.dtype != "auto":
        worker_args += ["--dtype", spec.model.dtype]
    worker = _container("worker", image, spec, worker_args)
    resources = {k: dict(v) for k, v in spec.workers.resources.items()}
    if gpus:
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})["nvidia.com/gpu"] = gpus
    kernel_cache = {"name": KERNEL_CACHE_VOLUME, "mountPath": KERNEL_CACHE_PATH}
    worker |= {
        "env": [{"name": "TRITON_CACHE_DIR", "value": f"{KERNEL_CACHE_PATH}/triton"}],
        "volumeMounts": [shm, kernel_cache, *mounts],
        "resources": resources,
        # pinning the shared pool needs locked memory beyond the default RLIMIT_MEMLOCK
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["IPC_LOCK"]},
        },
        # stays up while its batcher drains in-flight requests through it
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S + spec.drain_seconds}}},
    }
    pod = _pod_spec(spec, [batcher, worker], [pool_volume, _kernel_cache(spec), *volumes])
    if spec.workers.kernel_cache_pvc_name:  # the claim's files become the image group's
        pod["securityContext"] = {"fsGroup": IMAGE_GID, "fsGroupChangePolicy": "OnRootMismatch"}
    if spec.workers.node_selector:
        pod["nodeSelector"] = dict(spec.workers.node_selector)
    if spec.workers.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.workers.tolerations]
    # GPUs are the scarce resource: a surge pod could wait for GPUs forever on a full node
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    return _deployment(owner, "worker", replicas, pod, rolling)


def worker_service(owner: Owner) -> dict:
    ports = [
        {"name": "grpc", "port": BATCHER_PORT, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, f"{owner.name}-worker", "worker"),
        # headless: one DNS address per ready pod, one batcher each for the routers
        "spec": {"clusterIP": "None", "selector": selector(owner, "worker"), "ports": ports},
    }


def worker_pdb(owner: Owner) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, f"{owner.name}-worker", "worker"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, "worker")}},
    }


def service_monitor(owner: Owner) -> dict:
    instance = {
        "app.kubernetes.io/name": "alignedserve",
        "app.kubernetes.io/instance": owner.name,
    }
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, owner.name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": instance},
            "endpoints": [
                {"port": "http", "path": "/metrics", "interval": "15s"},
                {"port": "metrics", "path": "/metrics", "interval": "15s"},
            ],
        },
    }


def render(
    owner: Owner,
    spec: AlignedServeSpec,
    default_image: str,
    worker_replicas: int,
    router_replicas: int,
) -> list[dict]:
    """Every child the AlignedServe should have now, in apply order."""
    children = [
        worker_service(owner),
        worker_pdb(owner),
        worker_deployment(owner, spec, default_image, worker_replicas),
        router_service(owner, spec),
        router_deployment(owner, spec, default_image, router_replicas),
    ]
    if spec.monitoring.service_monitor:
        children.append(service_monitor(owner))
    return children


def optional_children(owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of children that only some specs have: the operator deletes
    each one the present spec does not render."""
    return [("monitoring.coreos.com/v1", "ServiceMonitor", owner.name)]
