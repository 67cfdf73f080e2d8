"""The fake Kubernetes API server (tests/k8s/fakeapi.py), each behaviour checked with the real
client that depends on it: the `kubernetes` Python client, kubectl, helm 3 and 4, and kopf."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from k8s import binary
from k8s.fakeapi import FakeKubernetes, wait_until
from k8s.fakeapi_patch import json_patch, merge_patch, strategic_merge
from k8s.fakeapi_samples import (
    KOPF_OPERATOR,
    WIDGET_CRD,
    config_map,
    deployment,
    run,
    widget,
    write_chart,
)
from k8s.fakeapi_select import field_selector, label_selector

APPLY = "application/apply-patch+yaml"


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as fake:
        yield fake


@pytest.fixture
def client(kube: FakeKubernetes) -> Iterator[kubernetes.client.ApiClient]:
    api = kubernetes.config.new_client_from_config(config_file=str(kube.kubeconfig))
    yield api
    api.close()


def reason(exc: ApiException) -> str:
    return json.loads(exc.body)["reason"]


# --- discovery ----------------------------------------------------------------------------------


def test_discovery_serves_builtin_groups_kinds_and_subresources(client):
    assert kubernetes.client.CoreApi(client).get_api_versions().versions == ["v1"]
    groups = {g.name: g for g in kubernetes.client.ApisApi(client).get_api_versions().groups}
    for group in (
        "apps",
        "policy",
        "rbac.authorization.k8s.io",
        "apiextensions.k8s.io",
        "monitoring.coreos.com",
        "coordination.k8s.io",
        "events.k8s.io",
    ):
        assert group in groups, group
    assert groups["apps"].preferred_version.group_version == "apps/v1"

    core = kubernetes.client.CoreV1Api(client).get_api_resources()
    assert core.group_version == "v1"
    by_name = {r.name: r for r in core.resources}
    assert {
        "namespaces",
        "services",
        "pods",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "events",
    } <= by_name.keys()
    assert by_name["namespaces"].namespaced is False
    assert by_name["services"].short_names == ["svc"]
    assert "services/status" in by_name

    apps = kubernetes.client.AppsV1Api(client).get_api_resources()
    by_name = {r.name: r for r in apps.resources}
    assert apps.group_version == "apps/v1"
    assert by_name["deployments"].kind == "Deployment"
    assert by_name["deployments"].namespaced is True
    assert set(by_name["deployments"].verbs) >= {"create", "get", "list", "watch", "patch"}
    assert by_name["deployments/scale"].kind == "Scale"
    assert by_name["deployments/status"].kind == "Deployment"

    namespaces = kubernetes.client.CoreV1Api(client).list_namespace().items
    assert {"default", "kube-system"} <= {ns.metadata.name for ns in namespaces}


# --- objects ------------------------------------------------------------------------------------


def test_objects_get_server_metadata_and_generation_bumps_on_spec_change_only(client):
    apps = kubernetes.client.AppsV1Api(client)
    created = apps.create_namespaced_deployment("default", deployment("web"))
    meta = created.metadata
    assert meta.uid and meta.creation_timestamp and meta.generation == 1
    first_rv = int(meta.resource_version)

    labelled = apps.patch_namespaced_deployment(
        "web", "default", {"metadata": {"labels": {"x": "1"}}}
    )
    assert labelled.metadata.generation == 1
    assert int(labelled.metadata.resource_version) > first_rv
    resized = apps.patch_namespaced_deployment("web", "default", {"spec": {"replicas": 3}})
    assert resized.metadata.generation == 2
    assert resized.metadata.uid == meta.uid

    same = apps.patch_namespaced_deployment("web", "default", {"spec": {"replicas": 3}})
    assert same.metadata.resource_version == resized.metadata.resource_version  # no-op write

    listed = json.loads(apps.list_namespaced_deployment("default", _preload_content=False).data)
    assert listed["kind"] == "DeploymentList" and listed["apiVersion"] == "apps/v1"
    assert int(listed["metadata"]["resourceVersion"]) >= int(resized.metadata.resource_version)
    assert [d["metadata"]["name"] for d in listed["items"]] == ["web"]


def test_errors_are_status_objects_with_reasons(client):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map("default", config_map("a", color="red"))
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_config_map("default", config_map("a"))
    assert (exc.value.status, reason(exc.value)) == (409, "AlreadyExists")
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_config_map("missing", "default")
    assert (exc.value.status, reason(exc.value)) == (404, "NotFound")
    assert json.loads(exc.value.body)["details"]["name"] == "missing"
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_config_map("nowhere", config_map("b", namespace="nowhere"))
    assert (exc.value.status, reason(exc.value)) == (404, "NotFound")


def test_update_with_a_stale_resource_version_conflicts(client):
    core = kubernetes.client.CoreV1Api(client)
    stale = core.create_namespaced_config_map("default", config_map("a", color="red"))
    core.patch_namespaced_config_map("a", "default", {"data": {"color": "blue"}})
    stale.data = {"color": "green"}
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_config_map("a", "default", stale)
    assert (exc.value.status, reason(exc.value)) == (409, "Conflict")
    fresh = core.read_namespaced_config_map("a", "default")
    fresh.data = {"color": "green"}
    assert core.replace_namespaced_config_map("a", "default", fresh).data == {"color": "green"}


def test_status_is_written_only_through_the_status_subresource(kube, client):
    apps = kubernetes.client.AppsV1Api(client)
    body = deployment("web") | {"status": {"replicas": 9}}
    created = apps.create_namespaced_deployment("default", body)
    assert created.status is None or created.status.replicas is None

    main = apps.patch_namespaced_deployment("web", "default", {"status": {"readyReplicas": 5}})
    assert main.status is None or main.status.ready_replicas is None

    status = {"status": {"readyReplicas": 1}, "spec": {"replicas": 7}}
    written = apps.patch_namespaced_deployment_status("web", "default", status)
    assert written.status.ready_replicas == 1
    assert written.spec.replicas == 1  # spec is ignored on /status
    assert written.metadata.generation == 1

    # The history a watch replays is what each write produced (stored states are snapshots).
    before = int(created.metadata.resource_version) - 1
    path = f"/apis/apps/v1/namespaces/default/deployments?watch=1&resourceVersion={before}"
    added, modified = _raw_watch(kube, path, "MODIFIED")
    assert added["object"]["metadata"]["resourceVersion"] == created.metadata.resource_version
    assert "status" not in added["object"]
    assert modified["object"]["metadata"]["resourceVersion"] == written.metadata.resource_version
    assert modified["object"]["status"] == {"readyReplicas": 1}


def test_label_and_field_selectors_filter_lists(client):
    core = kubernetes.client.CoreV1Api(client)
    for name, tier in (("a", "web"), ("b", "db"), ("c", None)):
        labels = {"tier": tier} if tier else {}
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": labels}})

    def names(**selectors) -> list[str]:
        items = core.list_namespaced_config_map("default", **selectors).items
        return sorted(i.metadata.name for i in items)

    assert names(label_selector="tier=web") == ["a"]
    assert names(label_selector="tier!=web") == ["b", "c"]
    assert names(label_selector="tier in (web,db)") == ["a", "b"]
    assert names(label_selector="!tier") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace=default,metadata.name!=b") == ["a", "c"]
    everywhere = core.list_config_map_for_all_namespaces(field_selector="metadata.name=a")
    assert [i.metadata.name for i in everywhere.items] == ["a"]


# --- watch --------------------------------------------------------------------------------------


def test_watch_resumes_after_a_lists_resource_version_and_loses_nothing(kube, client):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map("default", config_map("before"))
    listed = core.list_namespaced_config_map("default")
    core.create_namespaced_config_map("default", config_map("between"))  # after list, before watch
    events: list[tuple[str, str]] = []

    def watch() -> None:
        stream = kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=4,
        )
        events.extend((e["type"], e["object"].metadata.name) for e in stream)

    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    wait_until(lambda: [r for r in kube.requests if r.verb == "watch"], 30, "the watch")
    core.patch_namespaced_config_map("before", "default", {"data": {"k": "v"}})  # live events
    core.delete_namespaced_config_map("between", "default")
    watcher.join(60)
    assert not watcher.is_alive()
    assert 4 <= time.monotonic() - started < 30  # timeoutSeconds ended the stream
    assert events == [("ADDED", "between"), ("MODIFIED", "before"), ("DELETED", "between")]


def _raw_watch(kube: FakeKubernetes, path: str, until: str) -> list[dict]:
    """Read a watch stream with http.client until an event of type `until`."""
    url = urlsplit(kube.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.getheader("Content-Type") == "application/json"
    events = []
    while not events or events[-1]["type"] != until:
        events.append(json.loads(response.readline()))
    conn.close()
    return events


def test_watch_list_ends_initial_events_with_a_bookmark(kube, client):
    core = kubernetes.client.CoreV1Api(client)
    for name in ("a", "b"):
        core.create_namespaced_config_map("default", config_map(name))
    query = (
        "watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        "&allowWatchBookmarks=true&labelSelector="
    )
    events = _raw_watch(kube, f"/api/v1/namespaces/default/configmaps?{query}", "BOOKMARK")
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    bookmark = events[-1]["object"]
    assert bookmark["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(bookmark["metadata"]["resourceVersion"]) >= max(
        int(e["object"]["metadata"]["resourceVersion"]) for e in events[:2]
    )


def test_watch_reports_objects_entering_and_leaving_a_label_selection(kube, client):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map("default", config_map("a"))
    rv = core.list_namespaced_config_map("default").metadata.resource_version
    core.patch_namespaced_config_map("a", "default", {"metadata": {"labels": {"on": "yes"}}})
    core.patch_namespaced_config_map("a", "default", {"metadata": {"labels": {"on": None}}})
    path = f"/api/v1/namespaces/default/configmaps?watch=1&labelSelector=on&resourceVersion={rv}"
    events = _raw_watch(kube, path, "DELETED")
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


# --- patches ------------------------------------------------------------------------------------


def test_patch_content_types(client):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map("default", config_map("a", x="1", y="2"))
    merged = core.patch_namespaced_config_map("a", "default", {"data": {"x": None, "z": "3"}})
    assert merged.data == {"y": "2", "z": "3"}

    ops = [{"op": "test", "path": "/data/y", "value": "2"}, {"op": "remove", "path": "/data/y"}]
    patched = core.patch_namespaced_config_map("a", "default", ops)  # json-patch+json
    assert patched.data == {"z": "3"}
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_config_map("a", "default", ops)  # the test op fails now
    assert (exc.value.status, reason(exc.value)) == (422, "Invalid")

    def apply(manager: str, **data: str) -> dict[str, str]:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new"}, "data": data}
        applied = core.patch_namespaced_config_map(
            "new", "default", body, field_manager=manager, _content_type=APPLY
        )
        return applied.data

    assert apply("a", k="v") == {"k": "v"}  # apply creates
    assert apply("b", k2="w") == {"k": "v", "k2": "w"}  # then merges
    assert apply("a", k3="x") == {"k2": "w", "k3": "x"}  # what "a" no longer applies goes


def test_strategic_merge_patch_merges_containers_and_ports_by_key():
    live = {
        "spec": {
            "containers": [
                {"name": "web", "image": "a:1", "ports": [{"containerPort": 80, "name": "http"}]},
                {"name": "side", "image": "s:1"},
            ],
            "finalizers": ["x"],
        }
    }
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "web"}],
            "containers": [
                {"name": "web", "image": "a:2", "ports": [{"containerPort": 9090}]},
                {"name": "gone", "$patch": "delete"},
            ],
            "finalizers": ["y"],
        }
    }
    merged = strategic_merge(live, patch)
    assert merged["spec"]["containers"] == [
        {"name": "side", "image": "s:1"},
        {
            "name": "web",
            "image": "a:2",
            "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 9090}],
        },
    ]
    assert merged["spec"]["finalizers"] == ["x", "y"]
    replaced = strategic_merge(
        live, {"spec": {"containers": [{"name": "only"}, {"$patch": "replace"}]}}
    )
    assert replaced["spec"]["containers"] == [{"name": "only"}]
    assert strategic_merge(live, {"spec": {"$retainKeys": ["finalizers"]}}) == {
        "spec": {"finalizers": ["x"]}
    }


def test_json_patch_and_merge_patch_follow_their_rfcs():
    doc = {"a": [1, 2], "b": {"c": 1}}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}])["a"] == [1, 2, 3]
    moved = json_patch(doc, [{"op": "move", "from": "/b/c", "path": "/d"}])
    assert moved == {"a": [1, 2], "b": {}, "d": 1}
    assert json_patch(doc, [{"op": "replace", "path": "/a/0", "value": 9}])["a"] == [9, 2]
    assert doc == {"a": [1, 2], "b": {"c": 1}}  # the input is not mutated
    assert merge_patch(doc, {"a": None, "b": {"e": 2}}) == {"b": {"c": 1, "e": 2}}


def test_selector_parsing():
    obj = {"metadata": {"name": "n", "labels": {"a": "1", "b": "x"}}, "status": {"ok": True}}
    assert label_selector("a=1,b in (x, y)")(obj)
    assert not label_selector("a notin (1)")(obj)
    assert label_selector("a,!c")(obj)
    assert field_selector("metadata.name==n,status.ok=true")(obj)
    assert not field_selector("metadata.name!=n")(obj)


# --- deletion -----------------------------------------------------------------------------------


def test_finalizers_hold_deletion_until_removed(client):
    core = kubernetes.client.CoreV1Api(client)
    body = config_map("a")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    core.create_namespaced_config_map("default", body)
    core.delete_namespaced_config_map("a", "default")
    held = core.read_namespaced_config_map("a", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("a", "default", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_config_map("a", "default")
    assert exc.value.status == 404


def _owned(name: str, *owners: dict) -> dict:
    refs = [
        {
            "apiVersion": o["apiVersion"],
            "kind": o["kind"],
            "name": o["metadata"]["name"],
            "uid": o["metadata"]["uid"],
        }
        for o in owners
    ]
    return {"metadata": {"name": name, "ownerReferences": refs}}


def test_garbage_collection_follows_owner_references(kube):
    kube.create(WIDGET_CRD)
    owner = kube.create(widget("w"))
    other = kube.create(widget("other"))
    child = kube.create({"apiVersion": "v1", "kind": "ConfigMap"} | _owned("child", owner))
    grandchild = kube.create({"apiVersion": "v1", "kind": "Secret"} | _owned("grandchild", child))
    kube.create({"apiVersion": "v1", "kind": "ConfigMap"} | _owned("shared", owner, other))
    kube.create({"apiVersion": "v1", "kind": "ConfigMap"} | _owned("unrelated", other))
    assert grandchild["metadata"]["uid"]

    kube.delete("example.com/v1", "widgets", "default", "w")
    assert kube.get("v1", "configmaps", "default", "child") is None
    assert kube.get("v1", "secrets", "default", "grandchild") is None
    assert kube.get("v1", "configmaps", "default", "shared") is not None  # one owner is left
    kube.delete("example.com/v1", "widgets", "default", "other")
    assert kube.list("v1", "configmaps", "default") == []


def test_orphan_propagation_keeps_dependents(kube, client):
    owner = kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o"}})
    kube.create({"apiVersion": "v1", "kind": "ConfigMap"} | _owned("child", owner))
    kubernetes.client.CoreV1Api(client).delete_namespaced_config_map(
        "o", "default", propagation_policy="Orphan"
    )
    child = kube.get("v1", "ConfigMap", "default", "child")
    assert child is not None and child["metadata"].get("ownerReferences") == []


def test_namespace_deletion_deletes_its_contents(kube, client):
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespace({"metadata": {"name": "team"}})
    core.create_namespaced_config_map("team", config_map("a", namespace="team"))
    core.create_namespaced_config_map("default", config_map("a"))
    core.delete_namespace("team")
    assert kube.get("v1", "namespaces", None, "team") is None
    assert kube.get("v1", "configmaps", "team", "a") is None
    assert kube.get("v1", "configmaps", "default", "a") is not None


# --- CRDs and scale -----------------------------------------------------------------------------


def test_a_crd_is_served_established_and_defaulted_until_deleted(kube, client):
    ext = kubernetes.client.ApiextensionsV1Api(client)
    ext.create_custom_resource_definition(WIDGET_CRD)
    crd = ext.read_custom_resource_definition("widgets.example.com")
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert crd.status.accepted_names.plural == "widgets"

    resources = kubernetes.client.CustomObjectsApi(client).get_api_resources("example.com", "v1")
    by_name = {r.name: r for r in resources.resources}
    assert by_name["widgets"].short_names == ["wg"] and by_name["widgets"].namespaced
    assert {"widgets/status", "widgets/scale"} <= by_name.keys()

    custom = kubernetes.client.CustomObjectsApi(client)
    made = custom.create_namespaced_custom_object(
        "example.com", "v1", "default", "widgets", widget("w", replicas=2)
    )
    assert made["spec"] == {"replicas": 2, "color": "red"}  # schema default

    ext.delete_custom_resource_definition("widgets.example.com")
    with pytest.raises(ApiException) as exc:
        custom.list_namespaced_custom_object("example.com", "v1", "default", "widgets")
    assert exc.value.status == 404
    groups = kubernetes.client.ApisApi(client).get_api_versions().groups
    assert "example.com" not in {g.name for g in groups}
    ext.create_custom_resource_definition(WIDGET_CRD)  # served again, its objects gone
    assert kube.list("example.com/v1", "widgets") == []


def test_scale_subresource_for_deployments_and_custom_resources(kube, client):
    apps = kubernetes.client.AppsV1Api(client)
    apps.create_namespaced_deployment("default", deployment("web", replicas=2))
    scale = apps.read_namespaced_deployment_scale("web", "default")
    assert (scale.spec.replicas, scale.status.selector) == (2, "app=web")
    apps.patch_namespaced_deployment_scale("web", "default", {"spec": {"replicas": 5}})
    assert apps.read_namespaced_deployment("web", "default").spec.replicas == 5

    kube.create(WIDGET_CRD)
    kube.create(widget("w", replicas=1) | {"status": {"replicas": 1, "selector": "app=w"}})
    custom = kubernetes.client.CustomObjectsApi(client)
    scale = custom.get_namespaced_custom_object_scale(
        "example.com", "v1", "default", "widgets", "w"
    )
    assert scale["spec"] == {"replicas": 1}
    assert scale["status"] == {"replicas": 1, "selector": "app=w"}
    custom.patch_namespaced_custom_object_scale(
        "example.com", "v1", "default", "widgets", "w", {"spec": {"replicas": 4}}
    )
    assert kube.get("example.com/v1", "Widget", "default", "w")["spec"]["replicas"] == 4


# --- kubectl ------------------------------------------------------------------------------------


def test_kubectl_apply_get_wait_scale_delete(kube, tmp_path):
    kubectl = binary("kubectl")

    def ctl(*args: str) -> str:
        return run([kubectl, *args], kube)

    (tmp_path / "crd.json").write_text(json.dumps(WIDGET_CRD))
    ctl("apply", "-f", str(tmp_path / "crd.json"))  # CRDs first, as in a cluster
    manifests = tmp_path / "app.yaml"
    docs = [widget("w", replicas=1), deployment("web")]
    manifests.write_text("\n---\n".join(json.dumps(d) for d in docs))
    ctl("apply", "-f", str(manifests))
    assert kube.get("apps/v1", "Deployment", "default", "web") is not None

    # A controller adds a field to the live container; the next apply must merge containers by
    # name (strategic merge patch), keeping it, and change only what the manifest changed.
    live = kube.get("apps/v1", "Deployment", "default", "web")
    containers = live["spec"]["template"]["spec"]["containers"]
    containers[0]["terminationMessagePath"] = "/dev/termination-log"
    kube.patch("apps/v1", "deployments", "default", "web", {"spec": live["spec"]})
    docs[1] = deployment("web", image="nginx:2")
    docs[1]["spec"]["template"]["spec"]["containers"].append({"name": "side", "image": "s:1"})
    manifests.write_text("\n---\n".join(json.dumps(d) for d in docs))
    ctl("apply", "-f", str(manifests))
    got = json.loads(ctl("get", "deployment", "web", "-o", "json"))
    assert got["spec"]["template"]["spec"]["containers"] == [
        {"name": "web", "image": "nginx:2", "terminationMessagePath": "/dev/termination-log"},
        {"name": "side", "image": "s:1"},
    ]
    assert got["metadata"]["generation"] == 3

    def become_ready() -> None:
        time.sleep(1)
        status = {"conditions": [{"type": "Ready", "status": "True"}], "phase": "Running"}
        kube.patch_status("example.com/v1", "widgets", "default", "w", status)

    threading.Thread(target=become_ready).start()
    ctl("wait", "--for=condition=Ready", "widget/w", "--timeout=60s")
    ctl("wait", "--for=jsonpath={.status.phase}=Running", "wg/w", "--timeout=60s")

    ctl("scale", "widget/w", "--replicas=3")
    assert json.loads(ctl("get", "widget", "w", "-o", "json"))["spec"]["replicas"] == 3

    ctl("delete", "widget", "w", "--timeout=60s")
    assert kube.get("example.com/v1", "Widget", "default", "w") is None
    verbs = {(r.resource, r.verb) for r in kube.requests if r.user_agent.startswith("kubectl")}
    assert {("deployments", "patch"), ("widgets", "watch"), ("widgets", "delete")} <= verbs


def test_kubectl_create_sends_protobuf_for_namespaces_configmaps_secrets(kube):
    kubectl = binary("kubectl")
    run([kubectl, "create", "namespace", "team"], kube)
    run([kubectl, "-n", "team", "create", "configmap", "c", "--from-literal=k=v"], kube)
    run([kubectl, "-n", "team", "create", "secret", "generic", "s", "--from-literal=k=v"], kube)
    assert kube.get("v1", "ConfigMap", "team", "c")["data"] == {"k": "v"}
    assert kube.get("v1", "Secret", "team", "s")["data"] == {"k": "dg=="}  # base64 of "v"
    assert {"application/vnd.kubernetes.protobuf"} == {
        r.content_type for r in kube.requests if r.verb == "create"
    }
    run([kubectl, "delete", "namespace", "team", "--timeout=60s"], kube)
    assert kube.get("v1", "ConfigMap", "team", "c") is None


def test_kubectl_rollout_status_with_the_test_playing_the_deployment_controller(kube, tmp_path):
    kubectl = binary("kubectl")
    (tmp_path / "web.json").write_text(json.dumps(deployment("web", replicas=2)))
    run([kubectl, "apply", "--server-side", "-f", tmp_path / "web.json"], kube)
    ready = {
        "observedGeneration": 1,
        "replicas": 2,
        "updatedReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    kube.patch_status("apps/v1", "deployments", "default", "web", ready)
    out = run([kubectl, "rollout", "status", "deployment/web", "--timeout=60s"], kube)
    assert "successfully rolled out" in out
    run([kubectl, "wait", "--for=condition=Available", "deployment/web", "--timeout=60s"], kube)


# --- helm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("helm_name", ["helm3", "helm4"])
def test_helm_installs_upgrades_and_uninstalls(kube, tmp_path, helm_name):
    helm, chart, env = binary(helm_name), write_chart(tmp_path), kube.helm_env()
    ns = ["--namespace", "apps"]
    run([helm, "install", "demo", chart, *ns, "--create-namespace"], kube, env=env)

    crd = kube.get("apiextensions.k8s.io/v1", "crds", None, "widgets.example.com")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"]
    assert established == "True"
    assert kube.get("apps/v1", "Deployment", "apps", "demo-web") is not None
    assert kube.get("rbac.authorization.k8s.io/v1", "ClusterRole", None, "demo-reader") is not None
    service = kube.get("v1", "Service", "apps", "demo-web")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80}]
    release = kube.list("v1", "secrets", "apps", label_selector="owner=helm,name=demo")
    assert [s["metadata"]["labels"]["status"] for s in release] == ["deployed"]

    # Release storage (helm's protobuf Secrets) must survive across helm processes.
    run([helm, "upgrade", "demo", chart, *ns, "--set", "port=8080"], kube, env=env)
    service = kube.get("v1", "Service", "apps", "demo-web")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080}]
    assert "demo" in run([helm, "list", *ns, "--deployed", "-q"], kube, env=env).split()
    run([helm, "uninstall", "demo", *ns], kube, env=env)
    assert kube.get("v1", "Service", "apps", "demo-web") is None
    assert kube.get("apps/v1", "Deployment", "apps", "demo-web") is None
    assert kube.get("rbac.authorization.k8s.io/v1", "ClusterRole", None, "demo-reader") is None
    assert kube.list("v1", "secrets", "apps", label_selector="owner=helm") == []
    assert kube.get("apiextensions.k8s.io/v1", "crds", None, "widgets.example.com") is not None


# --- kopf ---------------------------------------------------------------------------------------


def test_kopf_operator_handles_create_update_delete(kube, tmp_path):
    kubectl = binary("kubectl")
    (tmp_path / "operator.py").write_text(KOPF_OPERATOR)
    (tmp_path / "crd.json").write_text(json.dumps(WIDGET_CRD))
    run([kubectl, "apply", "-f", tmp_path / "crd.json"], kube)
    log = (tmp_path / "kopf.log").open("w")
    operator = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "-A", str(tmp_path / "operator.py")],
        env=kube.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def child(name: str = "w-child") -> dict | None:
        assert operator.poll() is None, (tmp_path / "kopf.log").read_text()
        return kube.get("v1", "ConfigMap", "default", name)

    def widget_body() -> dict:
        found = kube.get("example.com/v1", "Widget", "default", "w")
        assert found is not None
        return found

    try:
        (tmp_path / "w.json").write_text(json.dumps(widget("w", color="red")))
        run([kubectl, "apply", "-f", tmp_path / "w.json"], kube)
        made = wait_until(child, 60, "the child ConfigMap")
        assert made["data"] == {"color": "red"}
        owner = made["metadata"]["ownerReferences"][0]
        assert owner["uid"] == widget_body()["metadata"]["uid"]
        wait_until(lambda: widget_body().get("status", {}).get("created"), 60, "handler status")
        body = widget_body()
        assert body["status"]["created"] == {"child": "w-child"}
        assert "kopf.zalando.org/KopfFinalizerMarker" in body["metadata"]["finalizers"]
        events = wait_until(lambda: kube.list("v1", "events", "default"), 60, "a posted event")
        assert [(e["reason"], e["involvedObject"]["name"]) for e in events] == [
            ("ChildCreated", "w")
        ]
        handled = body["metadata"]["annotations"]["kopf.zalando.org/last-handled-configuration"]
        assert json.loads(handled)["spec"] == {"color": "red", "replicas": 1}

        (tmp_path / "w.json").write_text(json.dumps(widget("w", color="blue")))
        run([kubectl, "apply", "-f", tmp_path / "w.json"], kube)
        wait_until(lambda: child()["data"].get("color") == "blue", 60, "the update handler")
        assert child()["data"]["retry"] == "1"
        wait_until(lambda: widget_body().get("status", {}).get("updated"), 60, "update status")
        annotations = widget_body()["metadata"]["annotations"]
        assert not [a for a in annotations if a.startswith("kopf.zalando.org/updated")]

        # Settled: no patch storm from stale bodies.
        time.sleep(1)
        since = time.monotonic()
        time.sleep(2)
        writes = [r for r in kube.requests if r.time_s > since and r.verb in ("patch", "update")]
        assert len(writes) < 4, writes

        run([kubectl, "delete", "widget", "w", "--timeout=60s"], kube)
        wait_until(lambda: child("w-deleted"), 60, "the delete handler")
        assert child() is None  # garbage-collected with its owner
        assert kube.get("example.com/v1", "Widget", "default", "w") is None

        assert kube.rbac_usage("kopf/") >= {
            ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
            ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
            ("example.com", "widgets", "list"),
            ("example.com", "widgets", "watch"),
            ("example.com", "widgets", "patch"),
            ("example.com", "widgets/status", "patch"),
            ("", "events", "create"),
        }
        assert kube.rbac_usage("OpenAPI-Generator/") == {
            ("", "configmaps", "create"),
            ("", "configmaps", "patch"),
        }
    finally:
        operator.terminate()
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait(10)
        log.close()
