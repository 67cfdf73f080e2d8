"""The Helm chart (helm/alignedserve), the AlignedServe examples (helm/examples) and the
Dockerfile, checked with the real tools and no cluster: helm 3 and helm 4 (`lint --strict`,
`template`, the values schema, NOTES), kubernetes-validate's strict 1.33 schemas for every
built-in object, the CRD's own openAPIV3Schema for AlignedServes, and a wheel built from
exactly what the Dockerfile copies. What only a cluster or a Docker engine checks (admission,
CEL rules, RBAC enforcement, the image build itself) is said where it matters."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from alignedserve.cli import build_parser
from alignedserve.common import flags
from alignedserve.operator.main import OperatorArgs

from k8s import binary

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "alignedserve"
CRD_FILE = CHART / "crds" / "alignedserve.io_alignedserves.yaml"
EXAMPLES = ROOT / "helm" / "examples"
KUBERNETES_VERSION = "1.33"
RELEASE, NAMESPACE = "rel", "ops"
HELMS = ("helm3", "helm4")
# helm never reaches a cluster here: `template` and `install --dry-run=client` need none.
HELM_ENV = {**os.environ, "KUBECONFIG": os.devnull}

ALL_ON = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
    "sample.enabled=true",
)
VALUE_SETS = {"default": (), "all-on": ALL_ON}

# What the chart's own templates render, and what the monitoring templates add when present.
BASE_KINDS = [
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "Deployment",
    "Service",
    "ServiceAccount",
]
MONITORING_KINDS = {
    "monitoring-servicemonitor.yaml": "ServiceMonitor",
    "monitoring-prometheusrule.yaml": "PrometheusRule",
    "monitoring-dashboard.yaml": "ConfigMap",
}

# Every API call the operator makes, as (API group, resource, verb). The chart's ClusterRole
# must grant exactly these; the end-to-end test checks this list against the requests the
# operator really sends to the fake API server.
OPERATOR_PERMISSIONS = frozenset(
    (group, resource, verb)
    for group, resource, verbs in (
        ("alignedserve.io", "alignedserves", "list watch patch"),
        ("alignedserve.io", "alignedserves/status", "patch"),
        # server-side apply is a PATCH; one that creates the object also needs `create`
        ("apps", "deployments", "get create patch"),
        ("", "services", "create patch"),
        ("", "pods", "list"),
        ("", "events", "create"),
        ("policy", "poddisruptionbudgets", "create patch"),
        ("monitoring.coreos.com", "servicemonitors", "create patch delete"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list watch"),
    )
    for verb in verbs.split()
)


# --- helm -------------------------------------------------------------------------------------


def helm(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(binary(name)), *args], capture_output=True, text=True, timeout=120, env=HELM_ENV
    )
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result


def set_args(sets: tuple[str, ...]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@cache
def render(helm_name: str, *sets: str) -> tuple[dict, ...]:
    """Every object `helm template` renders (CRDs included) with these --set values."""
    out = helm(
        helm_name,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--include-crds",
        "--kube-version",
        KUBERNETES_VERSION,
        *set_args(sets),
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def one(docs: tuple[dict, ...], kind: str) -> dict:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def operator_container(docs: tuple[dict, ...]) -> dict:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def operator_cli(container: dict) -> tuple[argparse.Namespace, OperatorArgs]:
    """The container's command line as `alignedserve` itself parses it, and the operator's
    config built (and validated) from it: the chart and the CLI must agree on every flag."""
    assert container["command"] == ["alignedserve"]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "operator"
    return parsed, flags.from_args(OperatorArgs, parsed)


def granted_permissions(docs: tuple[dict, ...]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for every rule of the rendered ClusterRole."""
    return {
        (group, resource, verb)
        for rule in one(docs, "ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# --- the AlignedServe CRD's schema ------------------------------------------------------------


def _strict_fields(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever the API server rejects them under
    strict field validation (kubectl's default): objects that list their properties and do
    not preserve unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict_fields(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = _strict_fields(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict_fields(out["additionalProperties"])
    return out


@cache
def crd() -> dict:
    if not CRD_FILE.exists():
        pytest.skip(f"the AlignedServe CRD is not written yet ({CRD_FILE.relative_to(ROOT)})")
    return yaml.safe_load(CRD_FILE.read_text())


@cache
def alignedserve_validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas use draft 4's boolean exclusiveMinimum/exclusiveMaximum.
    (version,) = [v for v in crd()["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft4Validator(_strict_fields(version["schema"]["openAPIV3Schema"]))


def alignedserve_errors(doc: dict) -> dict[str, str]:
    """Where (dotted path) and why the API server would reject this AlignedServe, by the CRD's
    schema. CEL rules (x-kubernetes-validations) and defaulting are the server's alone."""
    spec = crd()["spec"]
    errors: dict[str, str] = {}
    if doc.get("apiVersion") != f"{spec['group']}/v1alpha1":
        errors["apiVersion"] = f"{doc.get('apiVersion')!r}"
    if doc.get("kind") != spec["names"]["kind"]:
        errors["kind"] = f"{doc.get('kind')!r}"
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name):
        errors["metadata.name"] = f"{name!r} is not a DNS subdomain"
    for error in alignedserve_validator().iter_errors(doc):
        errors[".".join(str(p) for p in error.absolute_path)] = error.message
    return errors


# --- custom kinds kubernetes-validate has no schema for: ServiceMonitor, PrometheusRule -------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
# The prometheus-operator v1 fields (structure only: its CRDs are not shipped here).
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _LABELS,
                        "matchExpressions": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "params": {"type": "object"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            "tlsConfig": {"type": "object"},
                            "authorization": {"type": "object"},
                            "bearerTokenSecret": {"type": "object"},
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                            "filterRunning": {"type": "boolean"},
                        },
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "targetLimit": {"type": "integer", "minimum": 0},
            },
        },
    },
}
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"], "minLength": 1},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer", "minimum": 0},
                            "labels": _LABELS,
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}
CUSTOM_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def validate_object(doc: dict) -> None:
    """Raise unless the API server of KUBERNETES_VERSION would take this object (by schema).
    An unknown kind raises too."""
    kind = doc.get("kind")
    if kind == "AlignedServe":
        errors = alignedserve_errors(doc)
        assert not errors, f"AlignedServe {doc['metadata'].get('name')}: {errors}"
    elif kind in CUSTOM_SCHEMAS:
        jsonschema.Draft7Validator(CUSTOM_SCHEMAS[kind]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- lint and strict validation of everything rendered ----------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
@pytest.mark.parametrize("helm_name", HELMS)
def test_lint_strict(helm_name: str, values: str) -> None:
    sets = set_args(VALUE_SETS[values])
    result = helm(
        helm_name, "lint", "--strict", "--kube-version", KUBERNETES_VERSION, str(CHART), *sets
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize("values", VALUE_SETS)
@pytest.mark.parametrize("helm_name", HELMS)
def test_rendered_objects_validate_strictly(helm_name: str, values: str) -> None:
    crd()  # the CRD is part of what is rendered
    docs = render(helm_name, *VALUE_SETS[values])
    expected = list(BASE_KINDS)
    if values == "all-on":
        expected.append("AlignedServe")
        templates = CHART / "templates"
        expected += [k for f, k in MONITORING_KINDS.items() if (templates / f).exists()]
    assert sorted(doc["kind"] for doc in docs) == sorted(expected)
    for doc in docs:
        validate_object(doc)
        if doc["kind"] != "CustomResourceDefinition":  # helm never templates crds/
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == RELEASE, doc["kind"]
            assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]
        if doc["kind"] == "ServiceMonitor":
            assert_selects_operator_metrics(doc, docs)


def assert_selects_operator_metrics(monitor: dict, docs: tuple[dict, ...]) -> None:
    """The ServiceMonitor scrapes the operator's metrics Service, by label and port name."""
    service = one(docs, "Service")
    match_labels = monitor["spec"]["selector"]["matchLabels"]
    assert match_labels.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports


def test_crd_validates_as_apiextensions_v1() -> None:
    doc = crd()
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert doc["spec"]["group"] == "alignedserve.io"
    assert {v["name"] for v in doc["spec"]["versions"] if v["served"]} == {"v1alpha1"}


def test_validation_rejects_unknown_kinds_and_fields() -> None:
    """The checks above can fail: an unknown kind, an unknown field, a bad custom object."""
    deployment = one(render("helm4"), "Deployment")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_object({**deployment, "kind": "Deploymnt"})
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(typo)
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "15s"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]},  # no expr
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_object(rule)


# --- values and their schema ------------------------------------------------------------------


@cache
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def values_schema() -> dict:
    return yaml.safe_load((CHART / "values.schema.json").read_text())


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["definitions"][ref.rsplit("/", 1)[1]] if ref else node


def test_values_schema_is_draft7_and_covers_every_value() -> None:
    schema = values_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values())

    def walk(vals: dict, node: dict, path: str) -> None:
        # Closed objects (additionalProperties: false) list exactly the keys values.yaml has.
        assert node.get("additionalProperties") is False, path or "<root>"
        properties = node["properties"]
        assert set(vals) == set(properties), path or "<root>"
        for key, value in vals.items():
            child = _resolve(schema, properties[key])
            if isinstance(value, dict) and child.get("additionalProperties") is False:
                walk(value, child, f"{path}.{key}".lstrip("."))

    walk(values(), schema, "")


def test_values_are_commented() -> None:
    """Every top-level value and every value one level down carries a comment (on its line or
    the line above), except inside `monitoring`, whose shape is fixed (next test)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    section = ""
    uncommented = []
    for i, line in enumerate(lines):
        match = re.match(r"^( {0,2})([A-Za-z][\w]*):", line)
        if not match:
            continue
        if not match.group(1):
            section = match.group(2)
        if section == "monitoring" and match.group(1):
            continue
        above = lines[i - 1].strip() if i else ""
        if "#" not in line and not above.startswith("#"):
            uncommented.append(line.strip())
    assert uncommented == []


def test_monitoring_values_keep_their_agreed_shape() -> None:
    """The monitoring templates read exactly these keys."""
    assert values()["monitoring"] == {
        "serviceMonitor": {"enabled": False, "interval": "15s", "labels": {}},
        "prometheusRule": {
            "enabled": False,
            "labels": {},
            "tpotP99TargetSeconds": 0.2,
            "queueWaitingThreshold": 64,
            "poolUsageThreshold": 0.9,
            "for": "5m",
        },
        "dashboard": {"enabled": False, "labels": {"grafana_dashboard": "1"}},
    }


# (--set, what the error must name): typos, wrong types, values out of their sets.
BAD_VALUES = {
    "top-level typo": ("imagee.tag=1.0.0", "imagee"),
    "nested typo": ("operator.metricPort=9000", "metricPort"),
    "port as text": ("operator.metricsPort=http", "metricsPort"),
    "port out of range": ("operator.healthPort=70000", "healthPort"),
    "tag as number": ("image.tag=2", "tag"),  # --set makes 2 an integer
    "pull policy": ("image.pullPolicy=Sometimes", "pullPolicy"),
    "log format": ("operator.logFormat=xml", "logFormat"),
    "namespace name": ("operator.watchNamespaces[0]=Bad_NS", "watchNamespaces"),
    "boolean as text": ("rbac.create=yes", "create"),
    "monitoring typo": ("monitoring.prometheusRule.tpotP99Target=0.1", "tpotP99Target"),
    "alert duration": ("monitoring.prometheusRule.for=5min", "for"),
    "fraction above 1": ("monitoring.prometheusRule.poolUsageThreshold=1.5", "poolUsageThreshold"),
    "sample without model": ("sample.spec.model=null", "model"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
@pytest.mark.parametrize("helm_name", HELMS)
def test_values_schema_rejects(helm_name: str, case: str) -> None:
    bad, named = BAD_VALUES[case]
    result = helm(helm_name, "template", RELEASE, str(CHART), "--set", bad, check=False)
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize("helm_name", HELMS)
def test_values_schema_accepts_valid_overrides(helm_name: str) -> None:
    """The same kinds of values as above, valid, pass (so the rejections are the schema's)."""
    good = (
        "image.tag=1.0.0",
        "operator.metricsPort=9000",
        "operator.healthPort=9001",
        "image.pullPolicy=Always",
        "operator.logFormat=json",
        "operator.watchNamespaces[0]=team-a",
        "rbac.create=false",
        "monitoring.prometheusRule.for=1h30m",
        "monitoring.prometheusRule.poolUsageThreshold=1",
        "imagePullSecrets[0].name=regcred",
    )
    container = operator_container(render(helm_name, *good))
    assert container["image"] == "ghcr.io/alignedserve/alignedserve:1.0.0"


def test_same_metrics_and_health_port_fails() -> None:
    result = helm(
        "helm4", "template", RELEASE, str(CHART), "--set", "operator.healthPort=8080", check=False
    )
    assert result.returncode != 0
    assert "operator.metricsPort and operator.healthPort must differ" in result.stderr


# --- the operator's objects -------------------------------------------------------------------


def test_cluster_role_grants_exactly_the_operators_calls() -> None:
    docs = render("helm4")
    assert granted_permissions(docs) == OPERATOR_PERMISSIONS
    role, binding = one(docs, "ClusterRole"), one(docs, "ClusterRoleBinding")
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    kinds = {doc["kind"] for doc in render("helm4", "rbac.create=false")}
    assert kinds.isdisjoint({"ClusterRole", "ClusterRoleBinding"})


def test_operator_deployment_runs_one_standalone_kopf() -> None:
    docs = render("helm4")
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    container = operator_container(docs)
    # The brief's command line, in order; then the real CLI's reading of all of it.
    assert container["command"] == ["alignedserve"]
    args = container["args"]
    start = args.index("operator")
    assert args[start : start + 7] == [
        "operator",
        "--standalone",
        "--all-namespaces",
        "--liveness",
        "http://0.0.0.0:8081/healthz",
        "--metrics-port",
        "8080",
    ]
    parsed, config = operator_cli(container)
    assert parsed.log_level == "INFO"
    assert (config.standalone, config.all_namespaces, config.namespace) == (True, True, ())
    assert (config.liveness, config.metrics_port) == ("http://0.0.0.0:8081/healthz", 8080)
    assert config.log_format == "full"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container["image"] == f"ghcr.io/alignedserve/alignedserve:{app_version}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    # only what the operator (main.py) or Python reads: no variable that nothing uses
    assert set(env) == {"ALIGNEDSERVE_DEFAULT_IMAGE", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert (
        env["ALIGNEDSERVE_DEFAULT_IMAGE"] == f"ghcr.io/alignedserve/alignedserve:{app_version}-gpu"
    )

    # Probes reach /healthz on the port the --liveness URL binds; metrics on --metrics-port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}

    # The pod template carries the selector's labels, which single out the operator.
    selector = spec["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "operator"
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()

    service = one(docs, "Service")
    assert service["spec"]["selector"] == selector
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 8080, "metrics")


def test_operator_pod_is_locked_down() -> None:
    docs = render("helm4")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # The one writable place is an emptyDir at /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    (volume,) = pod["volumes"]
    assert volume["name"] == "tmp" and "emptyDir" in volume


def test_operator_values_reach_the_pod() -> None:
    docs = render(
        "helm4",
        "operator.watchNamespaces={team-a,team-b}",
        "operator.logFormat=json",
        "operator.metricsPort=9100",
        "operator.healthPort=9101",
        "image.tag=2.0.0",
        "defaultWorkloadImage=registry.local/serve:cuda",
        "operator.nodeSelector.pool=system",
        "imagePullSecrets[0].name=regcred",
    )
    container = operator_container(docs)
    _, config = operator_cli(container)
    assert (config.all_namespaces, config.namespace) == (False, ("team-a", "team-b"))
    assert (config.liveness, config.metrics_port) == ("http://0.0.0.0:9101/healthz", 9100)
    assert config.log_format == "json"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9100,
        "health": 9101,
    }
    assert container["image"].endswith(":2.0.0")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ALIGNEDSERVE_DEFAULT_IMAGE"] == "registry.local/serve:cuda"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9100


def test_rbac_checksum_restarts_the_operator_when_its_permissions_change() -> None:
    def checksum(*sets: str) -> str:
        deployment = one(render("helm4", *sets), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/rbac"]

    # The binding names the service account: its RBAC output changes, so does the checksum;
    # a value outside the RBAC (the log format) leaves it.
    assert checksum("serviceAccount.name=other") != checksum()
    assert checksum("operator.logFormat=json") == checksum()


def test_sample_alignedserve_is_off_by_default_and_valid_when_on() -> None:
    assert "AlignedServe" not in {doc["kind"] for doc in render("helm4")}
    sample = one(render("helm4", "sample.enabled=true", "sample.name=demo"), "AlignedServe")
    assert (sample["metadata"]["name"], sample["metadata"]["namespace"]) == ("demo", NAMESPACE)
    assert sample["spec"] == values()["sample"]["spec"]
    assert alignedserve_errors(sample) == {}


@pytest.mark.parametrize(
    ("sets", "expected", "absent"),
    [
        (
            (),
            [
                "installed in namespace ops",
                "in all namespaces",
                "deployment/rel-alignedserve-operator",
                "Pods whose spec.image is empty run ghcr.io/alignedserve/alignedserve:0.1.0-gpu",
                "service/rel-alignedserve-operator:8080/metrics",
                "ServiceMonitor (operator): off; alerts (PrometheusRule): off; "
                "Grafana dashboard: off",
            ],
            ["RBAC is off", "The sample"],
        ),
        (
            (
                "operator.watchNamespaces={a,b}",
                "rbac.create=false",
                "sample.enabled=true",
                "monitoring.prometheusRule.enabled=true",
            ),
            [
                "in the namespaces a, b.",
                "RBAC is off",
                "The sample rel-alignedserve is installed",
                "alerts (PrometheusRule): on",
            ],
            ["in all namespaces"],
        ),
    ],
)
def test_notes(sets: tuple[str, ...], expected: list[str], absent: list[str]) -> None:
    # helm 3's install --dry-run needs a cluster even client-side; helm 4's does not.
    out = helm(
        "helm4",
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        *set_args(sets),
    ).stdout
    notes = out.split("NOTES:\n", 1)[1]
    for text in expected:
        assert text in notes
    for text in absent:
        assert text not in notes


# --- AlignedServe examples against the CRD's schema -------------------------------------------


GOOD_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))
BAD_EXAMPLES = sorted((EXAMPLES / "bad").glob("*.yaml"))


def test_examples_exist() -> None:
    assert {p.name for p in GOOD_EXAMPLES} >= {"minimal.yaml", "full.yaml", "cpu-dev.yaml"}
    assert len(BAD_EXAMPLES) >= 8


@pytest.mark.parametrize("path", GOOD_EXAMPLES, ids=lambda p: p.name)
def test_good_example_is_accepted(path: Path) -> None:
    (doc,) = yaml.safe_load_all(path.read_text())
    assert alignedserve_errors(doc) == {}


def test_full_example_sets_every_spec_field() -> None:
    """full.yaml is the reference: it sets every field the CRD's spec declares."""
    (version,) = crd()["spec"]["versions"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def missing(schema: dict, value: dict, path: str) -> list[str]:
        out = []
        for key, child in schema.get("properties", {}).items():
            if key not in value:
                out.append(f"{path}{key}")
            elif "properties" in child:
                out += missing(child, value[key], f"{path}{key}.")
        return out

    full = yaml.safe_load((EXAMPLES / "full.yaml").read_text())
    # hostPath only means something for model.source hostPath (cpu-dev.yaml has it).
    assert missing(spec_schema, full["spec"], "") == ["model.hostPath"]


@pytest.mark.parametrize("path", BAD_EXAMPLES, ids=lambda p: p.name)
def test_bad_example_is_rejected_for_its_stated_reason(path: Path) -> None:
    """Each bad example says why in a comment and where in `# rejected-at: <path>`; it must
    fail there and nowhere else (so it cannot pass by being broken some other way)."""
    text = path.read_text()
    assert re.match(r"# Rejected: \S", text), "starts with a '# Rejected: <why>' comment"
    (where,) = re.findall(r"^# rejected-at: (\S+)$", text, re.M)
    (doc,) = yaml.safe_load_all(text)
    errors = alignedserve_errors(doc)
    assert set(errors) == {where}, errors


# --- Dockerfile -------------------------------------------------------------------------------


DOCKERFILE = ROOT / "Dockerfile"


@cache
def dockerfile_stages() -> dict[str, dict]:
    """Stage name -> {"base": image (ARGs substituted), "steps": [(INSTRUCTION, args)]}."""
    logical, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    stage = None
    for instruction in logical:
        word, _, rest = instruction.partition(" ")
        word = word.upper()
        if word == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
            assert match, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stage = stages.setdefault(match.group(2), {"base": base, "steps": []})
        else:
            assert stage is not None, instruction
            stage["steps"].append((word, rest))
    return stages


def steps(stage: str, word: str) -> list[str]:
    return [rest for w, rest in dockerfile_stages()[stage]["steps"] if w == word]


def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins; `*` and
    `?` stay within one path segment, `**` crosses them."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerfile_has_runtime_and_gpu_targets() -> None:
    stages = dockerfile_stages()
    assert {"runtime", "gpu"} <= set(stages)
    assert stages["runtime"]["base"] == "python:3.12-slim"
    assert re.fullmatch(
        r"(pytorch/pytorch|nvcr\.io/nvidia/pytorch):\S*cuda\S*", stages["gpu"]["base"]
    )
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.12" in SpecifierSet(requires)


def test_dockerfile_entry_point_is_the_project_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["alignedserve"] == "alignedserve.cli:main"
    for target in ("runtime", "gpu"):
        assert steps(target, "ENTRYPOINT") == ['["alignedserve"]'], target


def test_dockerfile_targets_run_as_the_charts_non_root_user() -> None:
    security = values()["operator"]["podSecurityContext"]
    user = f"{security['runAsUser']}:{security['runAsGroup']}"
    for target in ("runtime", "gpu"):
        assert steps(target, "USER")[-1] == user, target
        created = " ".join(steps(target, "RUN"))
        assert f"--uid {security['runAsUser']}" in created, target


def test_dockerfile_installs_torch_only_in_the_gpu_target() -> None:
    runtime = " ".join(steps("runtime", "RUN"))
    assert "torch" not in runtime and "[worker]" not in runtime
    assert "[worker]" in " ".join(steps("gpu", "RUN"))


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context() -> None:
    stages = list(dockerfile_stages())
    for index, stage in enumerate(stages):
        for rest in steps(stage, "COPY"):
            words = shlex.split(rest)
            options = [w for w in words if w.startswith("--")]
            sources = [w for w in words if not w.startswith("--")][:-1]
            from_stage = [o.removeprefix("--from=") for o in options if o.startswith("--from=")]
            if from_stage:
                assert from_stage[0] in stages[:index], f"{stage}: COPY {rest}"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"{stage}: COPY {source}: no such file"
                assert not dockerignore_excludes(source), f".dockerignore drops {source}"
    for heavy in (".venv", ".git", ".tools", "tests", "services/common/__pycache__/x.pyc"):
        assert dockerignore_excludes(heavy), heavy


def test_dockerfile_build_context_makes_the_wheel(tmp_path: Path) -> None:
    """Run the build stage's `pip wheel` on exactly what its COPY lines would copy (after
    .dockerignore): the wheel holds every package, the `alignedserve` script, and needs torch
    only for the `worker` extra."""
    (workdir,) = steps("build", "WORKDIR")
    context = tmp_path / "image" / workdir.lstrip("/")
    for rest in steps("build", "COPY"):
        *sources, dest = shlex.split(rest)
        for source in sources:
            target = context / dest / Path(source).name if dest.endswith("/") else context / dest
            files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if not file.is_file() or dockerignore_excludes(relative):
                    continue
                inner = file.relative_to(ROOT / source) if (ROOT / source).is_dir() else ""
                out = target / inner if inner else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)
    (run,) = [r for r in steps("build", "RUN") if "pip wheel" in r]
    words = shlex.split(run)
    assert words[:2] == ["pip", "wheel"] and "--no-deps" in words
    wheels = tmp_path / "wheels"
    words = [str(wheels) if w == "/wheels" else w for w in words[2:]]
    # No build isolation: the venv's setuptools instead of a download.
    command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--quiet", *words]
    subprocess.run(command, cwd=context, check=True, timeout=300)

    (wheel,) = wheels.glob("alignedserve-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = whl.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in whl.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in packages["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "alignedserve = alignedserve.cli:main" in scripts
    torch = [r for r in requires if re.match(r"torch\b", r)]
    assert torch and all('extra == "worker"' in r for r in torch), torch
