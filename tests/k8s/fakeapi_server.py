"""The fake API server's HTTP side (aiohttp): URL routing, verbs, watch streams, the request log.

Paths: /api, /apis, /api/v1, /apis/<g>, /apis/<g>/<v> (discovery), /version, /healthz, /readyz,
/livez, and /api/v1/... and /apis/<g>/<v>/... [namespaces/<ns>/]<plural>[/<name>[/<subresource>]]
with subresources `status` and `scale`; /openapi/v3 (a probe answer, see fakeapi_resources).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml
from aiohttp import web

from k8s import fakeapi_proto
from k8s.fakeapi_errors import ApiError
from k8s.fakeapi_resources import (
    Resource,
    api_group,
    api_group_list,
    api_resource_list,
    openapi_v3_group_version,
    openapi_v3_root,
)
from k8s.fakeapi_resources import api_versions as core_api_versions
from k8s.fakeapi_select import SelectorError, field_selector, label_selector
from k8s.fakeapi_store import APPLY_PATCH, Store

logger = logging.getLogger(__name__)
VERSION = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
PROTOBUF = "application/vnd.kubernetes.protobuf"
NOT_FOUND = ApiError(404, "NotFound", "the server could not find the requested resource")


@dataclass(frozen=True)
class RequestRecord:
    """One API call as the fake saw it; `verb` is the RBAC verb."""

    method: str
    path: str
    query: str
    verb: (
        str | None
    )  # get list watch create update patch delete deletecollection; None: not a resource
    api_group: str | None  # "" for core
    api_version: str | None
    resource: str | None  # plural
    subresource: str | None
    namespace: str | None
    name: str | None
    user_agent: str
    content_type: str
    status: int
    time_s: float  # time.monotonic() when it arrived


@dataclass(frozen=True)
class Route:
    res: Resource
    namespace: str | None
    name: str | None
    subresource: str | None


def _route(store: Store, group: str, version: str, rest: list[str]) -> Route:
    if len(rest) >= 3 and rest[0] == "namespaces":
        res = store.resource(group, version, rest[2])
        if res is not None and res.is_namespaced and len(rest) <= 5:
            return Route(res, rest[1], _at(rest, 3), _at(rest, 4))
    res = store.resource(group, version, rest[0])
    if res is None or len(rest) > 3 or (res.is_namespaced and len(rest) > 1):
        raise NOT_FOUND
    return Route(res, None, _at(rest, 1), _at(rest, 2))


def _at(parts: list[str], index: int) -> str | None:
    return parts[index] if index < len(parts) else None


def _verb(method: str, route: Route, query: dict) -> str:
    if method == "GET":
        if route.name is not None:
            return "get"
        return "watch" if query.get("watch") in ("1", "true", "True") else "list"
    if method == "DELETE":
        return "delete" if route.name is not None else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _success(res: Resource, obj: dict) -> dict:
    """What a built-in kind's DELETE answers once the object is gone."""
    details = {"name": obj["metadata"]["name"], "group": res.group, "kind": res.plural}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details | {"uid": obj["metadata"]["uid"]},
    }


def _served(obj: dict, res: Resource) -> dict:
    """Objects of one group/plural are shared by its versions; each is served as its own."""
    return {**obj, "apiVersion": res.api_version}


class ApiServer:
    def __init__(self, store: Store, log: Callable[[RequestRecord], None]):
        self.store = store
        self._log = log
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        parts = [p for p in request.path.split("/") if p]
        route: Route | None = None
        verb: str | None = None
        group = version = None
        try:
            if parts[:1] == ["api"] and len(parts) > 2:
                group, version = "", parts[1]
            elif parts[:1] == ["apis"] and len(parts) > 3:
                group, version = parts[1], parts[2]
            if group is not None and version is not None:
                route = _route(self.store, group, version, parts[3 if group else 2 :])
                verb = _verb(request.method, route, dict(request.query))
                if verb == "watch":
                    self._record(request, started, 200, route, verb)
                    return await self._watch(request, route)
                response = await self._resource(request, route, verb)
            else:
                response = self._static(request, parts)
        except ApiError as exc:
            response = _json(exc.status(), exc.code)
        except (SelectorError, json.JSONDecodeError, yaml.YAMLError) as exc:
            response = _json(ApiError(400, "BadRequest", str(exc)).status(), 400)
        except Exception as exc:  # a bug in the fake: answer like the real server's 500
            logger.exception("fake API server failed on %s %s", request.method, request.path)
            response = _json(ApiError(500, "InternalError", repr(exc)).status(), 500)
        if verb != "watch":
            self._record(request, started, response.status, route, verb)
        return response

    def _record(self, request, started, status, route: Route | None, verb: str | None) -> None:
        res = route.res if route else None
        self._log(
            RequestRecord(
                method=request.method,
                path=request.path,
                query=request.query_string,
                verb=verb,
                api_group=res.group if res else None,
                api_version=res.version if res else None,
                resource=res.plural if res else None,
                subresource=route.subresource if route else None,
                namespace=route.namespace if route else None,
                name=route.name if route else None,
                user_agent=request.headers.get("User-Agent", ""),
                content_type=request.headers.get("Content-Type", ""),
                status=status,
                time_s=started,
            )
        )

    # --- discovery and health ------------------------------------------------------------------

    def _static(self, request: web.Request, parts: list[str]) -> web.Response:
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
        served = self.store.served()
        if parts == []:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
            paths += sorted({f"/apis/{r.group}/{r.version}" for r in served if r.group})
            return _json({"paths": paths})
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return _json(VERSION)
        if parts == ["api"]:
            return _json(core_api_versions(request.host))
        if parts == ["api", "v1"]:
            return _json(api_resource_list("v1", served))
        if parts == ["apis"]:
            return _json(api_group_list(served))
        if parts[:1] == ["apis"] and len(parts) == 2:
            versions = [r.version for r in served if r.group == parts[1]]
            if versions:
                group = api_group(parts[1], list(dict.fromkeys(versions)))
                return _json({"kind": "APIGroup", "apiVersion": "v1"} | group)
        if parts == ["openapi", "v3"]:
            return _json(openapi_v3_root(served))
        if parts[:2] == ["openapi", "v3"]:
            document = openapi_v3_group_version("/".join(parts[3:]), served)
            if document is not None:
                return _json(document)
        if parts[:1] == ["apis"] and len(parts) == 3:
            group_version = f"{parts[1]}/{parts[2]}"
            if any(r.api_version == group_version for r in served):
                return _json(api_resource_list(group_version, served))
        raise NOT_FOUND

    # --- resources -----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> object:
        content_type, raw = request.content_type, await request.read()
        try:
            if content_type == PROTOBUF:
                return fakeapi_proto.decode(raw)
            if "cbor" in content_type or "protobuf" in content_type:
                raise fakeapi_proto.UnsupportedProtobuf(content_type)
        except fakeapi_proto.UnsupportedProtobuf as exc:
            message = f"the fake API server cannot decode this body: {exc}"
            raise ApiError(415, "UnsupportedMediaType", message) from None
        if content_type == APPLY_PATCH or "yaml" in content_type:
            return yaml.safe_load(raw)
        return json.loads(raw) if raw else None

    async def _resource(self, request: web.Request, route: Route, verb: str) -> web.Response:
        store, res, query = self.store, route.res, request.query
        dry_run = query.get("dryRun") == "All"
        ns, name, sub = route.namespace, route.name, route.subresource
        if sub not in (None, "status", "scale") or (sub == "status" and not res.has_status):
            raise NOT_FOUND
        if verb == "get":
            if sub == "scale":
                return _json(store.get_scale(res, ns, name))
            return _json(_served(store.get(res, ns, name), res))
        if verb == "list":
            matches = self._selector(query)
            items = [_served(o, res) for o in store.list(res, ns, matches)]
            return _json(self._list(res, items))
        if verb == "create":
            if sub is not None or name is not None or (res.is_namespaced and ns is None):
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            body = await self._body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the request body must be an object")
            return _json(_served(store.create(res, ns, body, dry_run=dry_run), res), 201)
        if verb in ("update", "patch"):
            assert name is not None
            body = await self._body(request)
            if verb == "update":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "the request body must be an object")
                obj = store.update(res, ns, name, body, subresource=sub, dry_run=dry_run)
                created = False
            else:
                obj, created = store.patch(
                    res,
                    ns,
                    name,
                    request.content_type,
                    body,
                    subresource=sub,
                    dry_run=dry_run,
                    field_manager=query.get("fieldManager", ""),
                )
            if sub == "scale":
                return _json(store.get_scale(res, ns, name))
            return _json(_served(obj, res), 201 if created else 200)
        if verb == "delete":
            assert name is not None
            options = (await self._body(request)) or {}
            assert isinstance(options, dict)
            propagation = query.get("propagationPolicy") or options.get("propagationPolicy")
            if options.get("orphanDependents") is True:
                propagation = "Orphan"
            obj = store.delete(
                res,
                ns,
                name,
                propagation=propagation or "Background",
                preconditions=options.get("preconditions"),
                dry_run=dry_run or options.get("dryRun") == ["All"],
            )
            if res.is_custom or obj["metadata"].get("deletionTimestamp"):
                return _json(_served(obj, res))
            return _json(_success(res, obj))
        if verb == "deletecollection":
            matches = self._selector(query)
            deleted = [
                store.delete(res, o["metadata"].get("namespace"), o["metadata"]["name"])
                for o in store.list(res, ns, matches)
            ]
            return _json(self._list(res, [_served(o, res) for o in deleted]))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")

    def _list(self, res: Resource, items: list[dict]) -> dict:
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    @staticmethod
    def _selector(query) -> Callable[[dict], bool]:
        by_label = label_selector(query.get("labelSelector"))
        by_field = field_selector(query.get("fieldSelector"))
        return lambda obj: by_label(obj) and by_field(obj)

    # --- watch ---------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, route: Route) -> web.StreamResponse:
        query, res = request.query, route.res
        matches = self._selector(query)
        send_initial = query.get("sendInitialEvents") == "true"
        timeout_s = float(query.get("timeoutSeconds") or 0) or None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            watcher, initial = self.store.watch(
                res, route.namespace, matches, query.get("resourceVersion"), send_initial
            )
        except ApiError as exc:
            await self._send(response, "ERROR", exc.status())
            return response
        deadline = time.monotonic() + timeout_s if timeout_s else None
        try:
            for kind, obj in initial:
                await self._send(response, kind, _served(obj, res))
            if send_initial:
                await self._send(response, "BOOKMARK", self._bookmark(res))
            while True:
                left = deadline - time.monotonic() if deadline else None
                if left is not None and left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), left)
                except TimeoutError:
                    break
                if event is None:
                    break
                await self._send(response, event[0], _served(event[1], res))
        except ConnectionResetError:
            pass
        finally:
            self.store.hub.unsubscribe(watcher)
        return response

    def _bookmark(self, res: Resource) -> dict:
        return {
            "kind": res.kind,
            "apiVersion": res.api_version,
            "metadata": {
                "resourceVersion": str(self.store.rv),
                "annotations": {"k8s.io/initial-events-end": "true"},
            },
        }

    @staticmethod
    async def _send(response: web.StreamResponse, kind: str, obj: dict) -> None:
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def close_watches(self) -> None:
        self.store.hub.end()
