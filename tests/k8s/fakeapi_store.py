"""The fake API server's object store: the API machinery's semantics without HTTP.

Everything here runs on the server's event loop thread, so it needs no locks; each method is
synchronous, which also makes a list's snapshot and a watch's subscription atomic (no event can
fall between them). Stored objects are snapshots: never mutated once stored, so the watch log
and the live objects can share them.
"""

from __future__ import annotations

import copy
import datetime
import secrets
import uuid
from collections.abc import Callable, Iterator

from k8s.fakeapi_errors import ApiError, conflict, invalid, not_found
from k8s.fakeapi_patch import PatchError, apply_defaults, apply_merge, json_patch, merge_patch
from k8s.fakeapi_patch import strategic_merge as strategic_merge_patch
from k8s.fakeapi_resources import BUILTINS, Resource, crd_status, resources_from_crd
from k8s.fakeapi_select import label_selector_string
from k8s.fakeapi_watch import Event, ResumeTooOld, Watcher, WatchHub

Key = tuple[str, str]  # (namespace or "", name)
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")

# Metadata that clients cannot change with an update or patch.
SERVER_OWNED_METADATA = (
    "uid",
    "creationTimestamp",
    "name",
    "namespace",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec(obj: dict) -> dict:
    """What bumps generation: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _path(dotted: str) -> list[str]:
    return [p for p in dotted.split(".") if p]


def _dig(obj: dict, dotted: str) -> object:
    for part in _path(dotted):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _put(obj: dict, dotted: str, value: object) -> None:
    *parents, last = _path(dotted)
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


class Store:
    def __init__(self) -> None:
        self.rv = 0
        self._objects: dict[tuple[str, str], dict[Key, dict]] = {}
        self._uids: dict[str, tuple[tuple[str, str], Key]] = {}
        self._crd_resources: dict[str, list[Resource]] = {}
        self._resources: dict[tuple[str, str, str], Resource] = {}
        self.hub = WatchHub()
        self._applied: dict[tuple[str, str], dict] = {}  # (uid, field manager) -> last applied
        self._next_cluster_ip = 10
        self._refresh_resources()
        namespaces = self.resource("", "v1", "namespaces")
        for name in INITIAL_NAMESPACES:
            self.create(namespaces, None, {"metadata": {"name": name}})

    # --- resources -----------------------------------------------------------------------------

    def _refresh_resources(self) -> None:
        served = {(r.group, r.version, r.plural): r for r in BUILTINS}
        for resources in self._crd_resources.values():
            served |= {(r.group, r.version, r.plural): r for r in resources}
        self._resources = served

    def served(self) -> list[Resource]:
        return list(self._resources.values())

    def resource(self, group: str, version: str, plural: str) -> Resource | None:
        return self._resources.get((group, version, plural))

    def find(self, api_version: str, kind_or_plural: str) -> Resource | None:
        """By plural, kind, singular or short name (case-insensitive for names)."""
        group, _, version = api_version.rpartition("/")
        wanted = kind_or_plural.lower()
        for res in self._resources.values():
            names = {res.plural, res.kind.lower(), res.singular, *res.short_names}
            if (res.group, res.version) == (group, version) and wanted in names:
                return res
        return None

    # --- reads ---------------------------------------------------------------------------------

    def _bucket(self, res: Resource) -> dict[Key, dict]:
        return self._objects.setdefault(res.storage_key, {})

    def _key(self, res: Resource, namespace: str | None, name: str) -> Key:
        return (namespace or "" if res.is_namespaced else "", name)

    def get(self, res: Resource, namespace: str | None, name: str) -> dict:
        obj = self._bucket(res).get(self._key(res, namespace, name))
        if obj is None:
            raise not_found(res, name)
        return obj

    def list(
        self, res: Resource, namespace: str | None, matches: Callable[[dict], bool]
    ) -> list[dict]:
        items = [
            obj
            for (ns, _), obj in sorted(self._bucket(res).items())
            if (namespace is None or ns == namespace) and matches(obj)
        ]
        return items

    def get_scale(self, res: Resource, namespace: str | None, name: str) -> dict:
        obj = self.get(res, namespace, name)
        if res.scale is None:
            raise not_found(res, name)
        selector = _dig(obj, res.scale.label_selector) if res.scale.label_selector else None
        meta = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _dig(obj, res.scale.spec_replicas) or 0},
            "status": {
                "replicas": _dig(obj, res.scale.status_replicas) or 0,
                "selector": label_selector_string(selector)
                if isinstance(selector, dict)
                else (selector or ""),
            },
        }

    # --- writes --------------------------------------------------------------------------------

    def create(
        self, res: Resource, namespace: str | None, body: dict, *, dry_run: bool = False
    ) -> dict:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.is_namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on"
                    " the request",
                )
            meta["namespace"] = namespace
            self._check_namespace_open(namespace or "")
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(
                    res, "", "metadata.name: Required value: name or generateName is required"
                )
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta["name"]
        if self._key(res, namespace, name) in self._bucket(res):
            details = {"name": name, "group": res.group, "kind": res.plural}
            message = f'{res.group_plural} "{name}" already exists'
            raise ApiError(409, "AlreadyExists", message, details)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta |= {"uid": str(uuid.uuid4()), "creationTimestamp": now(), "generation": 1}
        for transient in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(transient, None)
        if res.has_status:
            obj.pop("status", None)
        self._fill_server_side(res, None, obj)
        if dry_run:
            return obj
        return self._commit(res, "ADDED", obj, None)

    def update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        body: dict,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict:
        """PUT (and the last step of every PATCH): optimistic concurrency on resourceVersion."""
        old = self.get(res, namespace, name)
        body_meta = body.get("metadata") or {}
        if body_meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        if body_meta.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
            raise conflict(res, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            new.pop("status", None)
            if body.get("status") is not None:
                new["status"] = copy.deepcopy(body["status"])
        elif subresource == "scale":
            if res.scale is None:
                raise not_found(res, name)
            new = copy.deepcopy(old)
            _put(new, res.scale.spec_replicas, (body.get("spec") or {}).get("replicas", 0))
        else:
            new = copy.deepcopy(body)
            if res.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        return self._write(res, old, new, dry_run=dry_run)

    def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: object,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_manager: str = "",
    ) -> tuple[dict, bool]:
        """Returns (object, created): server-side apply creates a missing object."""
        applied = patch if content_type == APPLY_PATCH and isinstance(patch, dict) else None
        if self._key(res, namespace, name) not in self._bucket(res):
            if applied is not None and subresource is None:
                body = {**applied, "metadata": {**(applied.get("metadata") or {}), "name": name}}
                obj = self.create(res, namespace, body, dry_run=dry_run)
                self._remember_applied(obj, field_manager, applied, dry_run)
                return obj, True
            raise not_found(res, name)
        if subresource == "scale":
            view = self.get_scale(res, namespace, name)
        else:
            view = self.get(res, namespace, name)
        try:
            if content_type == MERGE_PATCH:
                new_view = merge_patch(view, patch)
            elif content_type == JSON_PATCH:
                if not isinstance(patch, list):
                    raise PatchError("a JSON patch must be a list of operations")
                new_view = json_patch(view, patch)
            elif content_type == STRATEGIC_PATCH and not res.is_custom:
                new_view = strategic_merge_patch(view, patch)
            elif applied is not None:
                last = self._applied.get((view["metadata"]["uid"], field_manager))
                new_view = apply_merge(view, applied, last, is_custom=res.is_custom)
            else:
                accepted = [MERGE_PATCH, JSON_PATCH, APPLY_PATCH]
                accepted += [] if res.is_custom else [STRATEGIC_PATCH]
                message = f"{content_type} is not supported here; accepted: {', '.join(accepted)}"
                raise ApiError(415, "UnsupportedMediaType", message)
        except PatchError as exc:
            raise invalid(res, name, str(exc)) from None
        if not isinstance(new_view, dict):
            raise invalid(res, name, "the patch did not produce an object")
        updated = self.update(
            res, namespace, name, new_view, subresource=subresource, dry_run=dry_run
        )
        if applied is not None:
            self._remember_applied(updated, field_manager, applied, dry_run)
        return updated, False

    def _remember_applied(self, obj: dict, manager: str, applied: dict, dry_run: bool) -> None:
        if not dry_run:
            self._applied[(obj["metadata"]["uid"], manager)] = copy.deepcopy(applied)

    def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: dict | None = None,
        dry_run: bool = False,
    ) -> dict:
        """Returns the object: marked (deletionTimestamp) while finalizers remain, else removed."""
        old = self.get(res, namespace, name)
        meta = old["metadata"]
        for field_name, value in (preconditions or {}).items():
            if value is not None and meta.get(field_name) != value:
                raise conflict(res, name)
        if dry_run:
            return old
        if propagation == "Orphan":
            self._orphan_children(meta["uid"])
        if res.storage_key == ("", "namespaces"):
            return self._delete_namespace(res, old)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"] |= {
                "deletionTimestamp": now(),
                "deletionGracePeriodSeconds": 0,
                "generation": meta.get("generation", 1) + 1,
            }
            return self._commit(res, "MODIFIED", new, old)
        return self._commit(res, "DELETED", copy.deepcopy(old), old)

    # --- internals -----------------------------------------------------------------------------

    def _write(self, res: Resource, old: dict, new: dict, *, dry_run: bool) -> dict:
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for fixed in SERVER_OWNED_METADATA:
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        self._fill_server_side(res, old, new)
        if _spec(new) != _spec(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        if new == old or dry_run:
            return new  # a no-op write: no new resourceVersion, no event (as the real server)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(res, "DELETED", new, old)
        return self._commit(res, "MODIFIED", new, old)

    def _fill_server_side(self, res: Resource, old: dict | None, obj: dict) -> None:
        """What the real server's strategies and defaulting add."""
        if res.schema:
            apply_defaults(res.schema, obj)
        if res.storage_key == ("", "namespaces"):
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            if old is None:
                obj["status"] = {"phase": "Active"}
        elif res.storage_key == ("", "services"):
            spec = obj.setdefault("spec", {})
            old_ip = (old or {}).get("spec", {}).get("clusterIP")
            if not spec.get("clusterIP") and spec.get("type") != "ExternalName":
                spec["clusterIP"] = old_ip or self._allocate_cluster_ip()
                spec["clusterIPs"] = [spec["clusterIP"]]
        elif res.storage_key == CRD_KEY:
            obj["status"] = crd_status(obj, (old or {}).get("status"), now())

    def _allocate_cluster_ip(self) -> str:
        self._next_cluster_ip += 1
        return f"10.96.{self._next_cluster_ip // 250}.{self._next_cluster_ip % 250 + 1}"

    def _commit(self, res: Resource, kind: str, obj: dict, old: dict | None) -> dict:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        key = self._key(res, meta.get("namespace"), meta["name"])
        bucket = self._bucket(res)
        if kind == "DELETED":
            bucket.pop(key, None)
            self._uids.pop(meta["uid"], None)
            for applied in [k for k in self._applied if k[0] == meta["uid"]]:
                del self._applied[applied]
        else:
            bucket[key] = obj
            self._uids[meta["uid"]] = (res.storage_key, key)
        self.hub.record(Event(self.rv, kind, res.storage_key, obj, old))
        if res.storage_key == CRD_KEY:
            self._serve_crd(meta["name"], None if kind == "DELETED" else obj)
        if kind == "DELETED":
            self._collect_garbage(meta["uid"])
            self._finish_namespace(meta.get("namespace") or "")
        return obj

    def _serve_crd(self, name: str, crd: dict | None) -> None:
        before = self._crd_resources.pop(name, [])
        if crd is not None:
            self._crd_resources[name] = resources_from_crd(crd)
        self._refresh_resources()
        if crd is None and before:
            # Deleting a CRD deletes its objects and ends the watches on them.
            res = before[0]
            for obj in list(self._bucket(res).values()):
                self._commit(res, "DELETED", copy.deepcopy(obj), obj)
            self.hub.end(res.storage_key)

    def _owned_by(self, uid: str) -> Iterator[tuple[Resource, dict]]:
        by_key = {r.storage_key: r for r in self._resources.values()}
        for storage_key, bucket in list(self._objects.items()):
            res = by_key.get(storage_key)
            for obj in list(bucket.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if res is not None and any(ref.get("uid") == uid for ref in refs):
                    yield res, obj

    def _collect_garbage(self, uid: str) -> None:
        """Background cascading deletion: a dependent goes once none of its owners exist."""
        for res, child in list(self._owned_by(uid)):
            refs = child["metadata"].get("ownerReferences") or []
            if all(ref.get("uid") not in self._uids for ref in refs):
                meta = child["metadata"]
                current = self._bucket(res).get(self._key(res, meta.get("namespace"), meta["name"]))
                if current is not None and not current["metadata"].get("deletionTimestamp"):
                    self.delete(res, meta.get("namespace"), meta["name"])

    def _orphan_children(self, uid: str) -> None:
        for res, child in list(self._owned_by(uid)):
            new = copy.deepcopy(child)
            refs = new["metadata"]["ownerReferences"]
            new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
            self._write(res, child, new, dry_run=False)

    def _check_namespace_open(self, namespace: str) -> None:
        ns = self._objects.get(("", "namespaces"), {}).get(("", namespace))
        if ns is None:
            details = {"name": namespace, "kind": "namespaces"}
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found', details)
        if ns["metadata"].get("deletionTimestamp"):
            message = (
                f"unable to create new content in namespace {namespace} because it is being"
                " terminated"
            )
            raise ApiError(403, "Forbidden", message)

    def _delete_namespace(self, res: Resource, ns: dict) -> dict:
        """Namespace deletion: mark Terminating, delete its contents, remove it once empty."""
        name = ns["metadata"]["name"]
        if not ns["metadata"].get("deletionTimestamp"):
            marked = copy.deepcopy(ns)
            marked["metadata"]["deletionTimestamp"] = now()
            marked["status"] = {"phase": "Terminating"}
            ns = self._commit(res, "MODIFIED", marked, ns)
        by_key = {r.storage_key: r for r in self._resources.values()}
        for storage_key, bucket in list(self._objects.items()):
            for (obj_ns, obj_name), obj in list(bucket.items()):
                if obj_ns == name and not obj["metadata"].get("deletionTimestamp"):
                    self.delete(by_key[storage_key], obj_ns, obj_name)
        self._finish_namespace(name)
        return ns

    def _finish_namespace(self, name: str) -> None:
        ns = self._objects.get(("", "namespaces"), {}).get(("", name))
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if any(ns_name == name for bucket in self._objects.values() for ns_name, _ in bucket):
            return
        res = self.resource("", "v1", "namespaces")
        assert res is not None
        self._commit(res, "DELETED", copy.deepcopy(ns), ns)

    # --- watch ---------------------------------------------------------------------------------

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        matches: Callable[[dict], bool],
        resource_version: str | None,
        send_initial_events: bool,
    ) -> tuple[Watcher, list[tuple[str, dict]]]:
        """Subscribe and return the events due before live ones: synthetic ADDED for every object
        (no resourceVersion, "0", or sendInitialEvents) or the logged events after the given
        resourceVersion. Synchronous, so nothing can happen between snapshot and subscription."""
        watcher = Watcher(res.storage_key, namespace, matches)
        if send_initial_events or resource_version in (None, "", "0"):
            initial = [("ADDED", obj) for obj in self.list(res, namespace, matches)]
            return watcher, initial + self.hub.subscribe(watcher, None)
        try:
            return watcher, self.hub.subscribe(watcher, int(resource_version))
        except ValueError:
            message = f"invalid resource version {resource_version!r}"
            raise ApiError(400, "BadRequest", message) from None
        except ResumeTooOld:
            message = f"too old resource version: {resource_version} ({self.rv})"
            raise ApiError(410, "Expired", message) from None
