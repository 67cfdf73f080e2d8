"""The test plays the cluster's controllers and kubelet for the fake API server: it runs the
real processes that Deployments' pods describe, as this machine's processes, and reports their
readiness back the way kubelet and the Deployment controller would.

Each pod gets its own loopback address (127.0.N.M: Linux routes all of 127/8 to lo), and
every "0.0.0.0" or "127.0.0.1" in its arguments becomes that address, so two pods' identical
ports never clash and a pod's containers still reach each other on "localhost". A hostPath
volume's mount path in the arguments becomes the host path (one filesystem here). Cluster DNS
is a table of each Service's ready pod addresses, kept current in a file that the pods'
Python processes resolve `*.svc.cluster.local` names from (tests/k8s/dns/sitecustomize.py).
Pods are Pod objects in the fake (labels, status.podIP), so the operator finds them as it
would on a cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from alignedserve.common.proto import health_pb2, health_pb2_grpc

from k8s.fakeapi import FakeKubernetes

BIN = Path(sys.executable).parent


@dataclass
class Pod:
    name: str
    ip: str
    containers: list[dict]
    labels: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def is_alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def is_ready(self) -> bool:
        if not self.is_alive():
            return False
        return all(_probe(self.ip, c) for c in self.containers)

    def stop(self, timeout_s: float = 30) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def _probe(ip: str, container: dict) -> bool:
    probe = container.get("readinessProbe")
    if not probe:
        return True
    if "grpc" in probe:
        address = f"{ip}:{_port(container, probe['grpc']['port'])}"
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    http = probe["httpGet"]
    url = f"http://{ip}:{_port(container, http['port'])}{http['path']}"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 200 <= reply.status < 400
    except OSError:
        return False


class Kubelet:
    """Runs the pods of Deployments matching `selector` and keeps their status current."""

    def __init__(
        self,
        kube: FakeKubernetes,
        selector: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        interval_s: float = 0.3,
    ):
        self.kube = kube
        self.selector = selector
        self.log_dir = log_dir
        self.dns_table = log_dir / "cluster-dns.json"
        self.dns_table.write_text("{}")
        base = env or dict(os.environ)
        dns = str(Path(__file__).parent / "dns")
        self.env = base | {
            "FAKE_CLUSTER_DNS": str(self.dns_table),
            "PYTHONPATH": os.pathsep.join(p for p in (dns, base.get("PYTHONPATH")) if p),
        }
        self.interval_s = interval_s
        self.pods: dict[tuple[str, str], list[Pod]] = {}  # (namespace, deployment) -> pods
        self._ips = (f"127.0.{a}.{b}" for a, b in itertools.product(range(1, 255), range(2, 255)))
        self._names = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(60)
        for pods in self.pods.values():
            for pod in pods:
                pod.stop(timeout_s=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # surfaced by the test through .errors
                self.errors.append(e)
            self._stop.wait(self.interval_s)

    # ---- one pass: what the Deployment controller and kubelet would do -------------------
    def sync(self) -> None:
        deployments = self.kube.list("apps/v1", "deployments", None, self.selector)
        seen = set()
        for dep in deployments:
            key = (dep["metadata"]["namespace"], dep["metadata"]["name"])
            seen.add(key)
            self._reconcile(dep, self.pods.setdefault(key, []))
        for key in set(self.pods) - seen:  # the Deployment is gone (deleted, or collected)
            for pod in self.pods.pop(key):
                self._delete_pod(key[0], pod)
        self._publish_dns()

    def _publish_dns(self) -> None:
        """Each Service's DNS name -> the addresses of its ready pods (headless Services)."""
        table = {}
        for service in self.kube.list("v1", "services", None):
            selector = (service.get("spec") or {}).get("selector")
            if not selector:
                continue
            meta = service["metadata"]
            name = f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
            table[name] = [
                pod.ip
                for (namespace, _), pods in self.pods.items()
                if namespace == meta["namespace"]
                for pod in pods
                if selector.items() <= pod.labels.items() and pod.is_ready()
            ]
        part = self.dns_table.with_suffix(".part")
        part.write_text(json.dumps(table))
        part.replace(self.dns_table)  # atomic: readers never see half a table

    def _reconcile(self, dep: dict, pods: list[Pod]) -> None:
        namespace = dep["metadata"]["namespace"]
        template = dep["spec"]["template"]
        generation = dep["metadata"].get("generation", 1)
        # a changed template (a rollout): replace every pod, one at a time is not needed here
        if pods and pods[0].containers != template["spec"]["containers"]:
            for pod in pods:
                self._delete_pod(namespace, pod)
            pods.clear()
        for pod in [p for p in pods if not p.is_alive()]:  # crashed: restart as kubelet would
            self._delete_pod(namespace, pod)
            pods.remove(pod)
        want = dep["spec"].get("replicas", 1)
        while len(pods) > want:
            self._delete_pod(namespace, pods.pop())
        while len(pods) < want:
            pods.append(self._start_pod(dep, template))
        ready = sum(pod.is_ready() for pod in pods)
        status = {
            "observedGeneration": generation,
            "replicas": len(pods),
            "updatedReplicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
        if {k: dep.get("status", {}).get(k) for k in status} != status:
            self.kube.patch_status(
                "apps/v1", "deployments", namespace, dep["metadata"]["name"], status
            )
        for pod in pods:
            self._report_pod(namespace, pod, template)

    def _start_pod(self, dep: dict, template: dict) -> Pod:
        namespace = dep["metadata"]["namespace"]
        name = f"{dep['metadata']['name']}-{next(self._names)}"
        pod = Pod(
            name, next(self._ips), template["spec"]["containers"], template["metadata"]["labels"]
        )
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in pod.containers:
            argv = self._argv(namespace, pod, container, volumes)
            log = self.log_dir / f"{name}-{container['name']}.log"
            pod.logs.append(log)
            with open(log, "wb") as out:
                pod.processes.append(
                    subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
                )
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": template["metadata"]["labels"],
            },
            "spec": {
                "containers": [{"name": c["name"], "image": c["image"]} for c in pod.containers]
            },
            "status": {"phase": "Running", "podIP": pod.ip},
        }
        self.kube.create(body)
        return pod

    def _argv(self, namespace: str, pod: Pod, container: dict, volumes: dict) -> list[str]:
        command = list(container.get("command", []))
        command[0] = (
            str(BIN / command[0]) if (BIN / command[0]).exists() else shutil.which(command[0])
        )
        args = []
        for arg in container.get("args", []):
            arg = arg.replace("0.0.0.0", pod.ip).replace("127.0.0.1", pod.ip)
            for mount in container.get("volumeMounts", []):
                host = volumes.get(mount["name"], {}).get("hostPath", {}).get("path")
                if host and arg.startswith(mount["mountPath"]):
                    arg = host + arg[len(mount["mountPath"]) :]
            args.append(arg)
        return command + args

    def _report_pod(self, namespace: str, pod: Pod, template: dict) -> None:
        ready = "True" if pod.is_ready() else "False"
        self.kube.patch_status(
            "v1",
            "pods",
            namespace,
            pod.name,
            {
                "phase": "Running",
                "podIP": pod.ip,
                "conditions": [{"type": "Ready", "status": ready}],
            },
        )

    def _delete_pod(self, namespace: str, pod: Pod) -> None:
        pod.stop()
        if self.kube.get("v1", "Pod", namespace, pod.name) is not None:
            self.kube.delete("v1", "pods", namespace, pod.name)

    def settled(self, namespace: str, deployment: str) -> list[Pod]:
        """The Deployment's pods when all of them run, are ready and are current (no restart
        pending), else an empty list: what a test waits for after a rollout."""
        dep = self.kube.get("apps/v1", "deployments", namespace, deployment)
        pods = list(self.pods.get((namespace, deployment), []))
        if dep is None or len(pods) != dep["spec"].get("replicas", 1):
            return []
        current = dep["spec"]["template"]["spec"]["containers"]
        if any(p.containers != current or not p.is_ready() for p in pods):
            return []
        return pods

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for pods in self.pods.values():
            for pod in pods:
                for log in pod.logs:
                    text = log.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)
