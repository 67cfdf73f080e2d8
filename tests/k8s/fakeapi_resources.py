"""The fake API server's resource catalogue: built-in kinds, resources served from CRDs, and the
discovery documents (/api, /apis, /api/v1, /apis/<group>/<version>) built from them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ScalePaths:
    """Where `/scale` reads and writes its numbers (JSON paths like `.spec.replicas`)."""

    spec_replicas: str
    status_replicas: str
    label_selector: str | None


DEPLOYMENT_SCALE = ScalePaths(".spec.replicas", ".status.replicas", ".spec.selector")


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    is_namespaced: bool
    short_names: tuple[str, ...] = ()
    has_status: bool = False  # a status subresource: .status is written only through /status
    scale: ScalePaths | None = None
    categories: tuple[str, ...] = ()  # e.g. "all", for `kubectl get all`
    is_custom: bool = False  # defined by a CustomResourceDefinition (or pretending to be)
    schema: dict | None = None  # openAPIV3Schema of a CRD version, for server-side defaulting

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_plural(self) -> str:
        """`deployments.apps`, the name Kubernetes uses in messages (`pods` for core)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def storage_key(self) -> tuple[str, str]:
        """Versions of one group/plural share their objects (served without conversion)."""
        return (self.group, self.plural)


def _builtin(api_version: str, plural: str, kind: str, scope: str, *short: str, **kw) -> Resource:
    group, _, version = api_version.rpartition("/")
    return Resource(group, version, plural, kind, scope == "ns", tuple(short), **kw)


ALL = ("all",)
BUILTINS: tuple[Resource, ...] = (
    _builtin("v1", "namespaces", "Namespace", "cluster", "ns", has_status=True),
    _builtin("v1", "nodes", "Node", "cluster", "no", has_status=True),
    _builtin("v1", "services", "Service", "ns", "svc", has_status=True, categories=ALL),
    _builtin("v1", "endpoints", "Endpoints", "ns", "ep"),
    _builtin("v1", "pods", "Pod", "ns", "po", has_status=True, categories=ALL),
    _builtin("v1", "configmaps", "ConfigMap", "ns", "cm"),
    _builtin("v1", "secrets", "Secret", "ns"),
    _builtin("v1", "serviceaccounts", "ServiceAccount", "ns", "sa"),
    _builtin("v1", "persistentvolumeclaims", "PersistentVolumeClaim", "ns", "pvc", has_status=True),
    _builtin("v1", "events", "Event", "ns", "ev"),
    _builtin("events.k8s.io/v1", "events", "Event", "ns", "ev"),
    _builtin("apps/v1", "deployments", "Deployment", "ns", "deploy", has_status=True,
             categories=ALL, scale=DEPLOYMENT_SCALE),
    _builtin("apps/v1", "statefulsets", "StatefulSet", "ns", "sts", has_status=True,
             categories=ALL, scale=DEPLOYMENT_SCALE),
    _builtin("apps/v1", "replicasets", "ReplicaSet", "ns", "rs", has_status=True,
             categories=ALL, scale=DEPLOYMENT_SCALE),
    _builtin("apps/v1", "daemonsets", "DaemonSet", "ns", "ds", has_status=True, categories=ALL),
    _builtin("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", "ns", "pdb",
             has_status=True),
    _builtin("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "ns", "hpa",
             has_status=True),
    _builtin("rbac.authorization.k8s.io/v1", "roles", "Role", "ns"),
    _builtin("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", "ns"),
    _builtin("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", "cluster"),
    _builtin("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding",
             "cluster"),
    _builtin("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition",
             "cluster", "crd", "crds", has_status=True),
    _builtin("coordination.k8s.io/v1", "leases", "Lease", "ns"),
    _builtin("networking.k8s.io/v1", "ingresses", "Ingress", "ns", "ing", has_status=True),
    _builtin("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", "ns", "netpol"),
    _builtin("batch/v1", "jobs", "Job", "ns", has_status=True, categories=ALL),
    _builtin("batch/v1", "cronjobs", "CronJob", "ns", "cj", has_status=True, categories=ALL),
    # Prometheus operator kinds, as if their CRDs were installed.
    _builtin("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", "ns", "smon",
             is_custom=True),
    _builtin("monitoring.coreos.com/v1", "prometheusrules", "PrometheusRule", "ns", "promrule",
             is_custom=True),
    _builtin("monitoring.coreos.com/v1", "podmonitors", "PodMonitor", "ns", "pmon",
             is_custom=True),
)  # fmt: skip


def resources_from_crd(crd: dict) -> list[Resource]:
    """One Resource per served version of a CustomResourceDefinition."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    found = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        sub = version.get("subresources") or {}
        scale = sub.get("scale")
        found.append(
            Resource(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                is_namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", ())),
                categories=tuple(names.get("categories", ())),
                has_status="status" in sub,
                scale=ScalePaths(
                    scale["specReplicasPath"],
                    scale["statusReplicasPath"],
                    scale.get("labelSelectorPath"),
                )
                if scale is not None
                else None,
                is_custom=True,
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            )
        )
    return found


def crd_status(crd: dict, old_status: dict | None, now: str) -> dict:
    """What the API server's CRD controllers write: names accepted, established."""
    spec = crd.get("spec", {})
    names = dict(spec.get("names", {}))
    names.setdefault("singular", names.get("kind", "").lower())
    names.setdefault("listKind", names.get("kind", "") + "List")
    old_conditions = {c["type"]: c for c in (old_status or {}).get("conditions", [])}
    conditions = []
    for kind, reason, message in (
        ("NamesAccepted", "NoConflicts", "no conflicts found"),
        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
    ):
        since = old_conditions.get(kind, {}).get("lastTransitionTime") or now
        condition = {"type": kind, "status": "True", "reason": reason, "message": message}
        conditions.append(condition | {"lastTransitionTime": since})
    stored = [v["name"] for v in spec.get("versions", []) if v.get("storage")]
    return {"acceptedNames": names, "conditions": conditions, "storedVersions": stored}


# --- discovery documents -----------------------------------------------------------------------


def _groups(resources: Iterable[Resource]) -> dict[str, list[str]]:
    """group -> versions, in first-seen order (the first is the preferred one)."""
    groups: dict[str, list[str]] = {}
    for res in resources:
        versions = groups.setdefault(res.group, [])
        if res.version not in versions:
            versions.append(res.version)
    return groups


def api_versions(server_address: str) -> dict:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def api_group(name: str, versions: list[str]) -> dict:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list(resources: Iterable[Resource]) -> dict:
    groups = [api_group(g, vs) for g, vs in _groups(resources).items() if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_resource_list(group_version: str, resources: Iterable[Resource]) -> dict:
    entries = []
    for res in resources:
        if res.api_version != group_version:
            continue
        entries.append(
            {
                "name": res.plural,
                "singularName": res.singular,
                "namespaced": res.is_namespaced,
                "kind": res.kind,
                "verbs": list(ALL_VERBS),
                **({"shortNames": list(res.short_names)} if res.short_names else {}),
                **({"categories": list(res.categories)} if res.categories else {}),
            }
        )
        sub_verbs = ["get", "patch", "update"]
        if res.has_status:
            entries.append(_subresource(res, "status", res.kind, sub_verbs))
        if res.scale is not None:
            entries.append(_subresource(res, "scale", "Scale", sub_verbs, "autoscaling", "v1"))
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": entries,
    }


def _subresource(res: Resource, name: str, kind: str, verbs: list[str], group="", version=""):
    entry = {
        "name": f"{res.plural}/{name}",
        "singularName": "",
        "namespaced": res.is_namespaced,
        "kind": kind,
        "verbs": verbs,
    }
    if group:
        entry |= {"group": group, "version": version}
    return entry


# --- OpenAPI v3: only what clients probe -------------------------------------------------------
# kubectl and helm validate client-side only when the server's PATCH operations lack the
# `fieldValidation` query parameter (then they need the full schemas). Declaring it for every
# kind makes them leave validation to the server (which, here, accepts everything). No PATCH
# operation declares a request body, so kubectl's apply computes strategic merge patches from
# its compiled-in types, as it does with no OpenAPI at all.


def _api_path(group_version: str) -> str:
    return f"apis/{group_version}" if "/" in group_version else f"api/{group_version}"


def openapi_v3_root(resources: Iterable[Resource]) -> dict:
    group_versions = sorted({r.api_version for r in resources})
    version_tag = hashlib.sha256(" ".join(group_versions).encode()).hexdigest()[:16]
    paths = {
        _api_path(gv): {"serverRelativeURL": f"/openapi/v3/{_api_path(gv)}?hash={version_tag}"}
        for gv in group_versions
    }
    return {"paths": paths}


def openapi_v3_group_version(group_version: str, resources: Iterable[Resource]) -> dict | None:
    paths = {}
    for res in resources:
        if res.api_version != group_version:
            continue
        scope = "namespaces/{namespace}/" if res.is_namespaced else ""
        patch = {
            "x-kubernetes-group-version-kind": {
                "group": res.group,
                "version": res.version,
                "kind": res.kind,
            },
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
            ],
            "responses": {},
        }
        paths[f"/{_api_path(group_version)}/{scope}{res.plural}/{{name}}"] = {"patch": patch}
    if not paths:
        return None
    info = {"title": "fake Kubernetes", "version": "v1.35.0"}
    return {"openapi": "3.0.0", "info": info, "paths": paths, "components": {"schemas": {}}}
