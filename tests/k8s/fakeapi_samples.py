"""Sample objects, a chart and a kopf operator that exercise the fake API server (used by
tests/test_fakeapi.py), and `run`, for running a client binary against the fake."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import yaml

from k8s.fakeapi import FakeKubernetes

# A namespaced kind with status and scale subresources and schema defaults.
WIDGET_CRD: dict = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget, shortNames: [wg]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources:
        status: {}
        scale:
          specReplicasPath: .spec.replicas
          statusReplicasPath: .status.replicas
          labelSelectorPath: .status.selector
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                replicas: {type: integer, default: 1}
                color: {type: string, default: red}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
""")


def widget(name: str, **spec: object) -> dict:
    meta = {"name": name, "namespace": "default"}
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": meta, "spec": spec}


def deployment(name: str, image: str = "nginx:1", replicas: int = 1) -> dict:
    labels = {"app": name}
    pod = {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "web", "image": image}]},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": pod},
    }


def config_map(name: str, namespace: str = "default", **data: str) -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "data": data}


def run(args: list, kube: FakeKubernetes, *, env: dict | None = None) -> str:
    """Run a client (kubectl, helm) against the fake; its stdout, or AssertionError with both
    streams when it fails."""
    done = subprocess.run(
        [str(a) for a in args], env=env or kube.env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def write_chart(root: Path) -> Path:
    """A chart with a CRD in crds/, a Deployment, a Service (port from values) and a
    ClusterRole."""
    chart = root / "demo"
    (chart / "crds").mkdir(parents=True)
    (chart / "templates").mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("port: 80\n")
    (chart / "crds" / "widgets.yaml").write_text(json.dumps(WIDGET_CRD))
    (chart / "templates" / "all.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: "{{ .Release.Name }}-web", labels: {app: web}}
        spec:
          replicas: 1
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: "{{ .Release.Name }}-web"}
        spec:
          selector: {app: web}
          ports: [{name: http, port: {{ .Values.port }}}]
        ---
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRole
        metadata: {name: "{{ .Release.Name }}-reader"}
        rules: [{apiGroups: [""], resources: [pods], verbs: [get]}]
        """)
    )
    return chart


# create/update/delete handlers for Widgets: a child ConfigMap (owned, so collected with its
# Widget), an Event, status from return values, one temporary failure (progress annotations).
KOPF_OPERATOR = """
import kopf
import kubernetes


@kopf.on.startup()
def startup(settings, **_):
    kubernetes.config.load_kube_config()
    settings.watching.server_timeout = 2  # reconnect often: resuming from a resourceVersion


def core():
    return kubernetes.client.CoreV1Api()


@kopf.on.create("example.com", "v1", "widgets")
def created(body, spec, name, namespace, **_):
    child = {"metadata": {"name": f"{name}-child"}, "data": {"color": spec["color"]}}
    kopf.adopt(child)
    core().create_namespaced_config_map(namespace, child)
    kopf.info(body, reason="ChildCreated", message=child["metadata"]["name"])
    return {"child": child["metadata"]["name"]}


@kopf.on.update("example.com", "v1", "widgets")
def updated(spec, name, namespace, retry, **_):
    if retry == 0:  # the retry count lives in kopf's progress annotations on the object
        raise kopf.TemporaryError("first attempt fails", delay=0.2)
    patch = {"data": {"color": spec["color"], "retry": str(retry)}}
    core().patch_namespaced_config_map(f"{name}-child", namespace, patch)
    return {"color": spec["color"]}


@kopf.on.delete("example.com", "v1", "widgets")
def deleted(name, namespace, **_):
    core().create_namespaced_config_map(namespace, {"metadata": {"name": f"{name}-deleted"}})
"""
