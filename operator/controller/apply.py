"""Idempotent writes of rendered objects: server-side apply under one field manager.

Applying the same object twice changes nothing (the API server compares the manager's fields),
a field the operator stops rendering is removed, and fields other managers own (a user's
annotations, kubectl scale on a Deployment the operator does not scale) are left alone unless
the operator renders them too (force=True: the operator owns what it renders).

API errors map to kopf's retry semantics: 4xx for a bad object is permanent, the rest
(conflicts, throttling, server errors, connection failures) are temporary.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kopf
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from alignedserve.operator.render import FIELD_MANAGER

log = logging.getLogger(__name__)

# kind -> plural; only the kinds the operator renders or reads (all namespaced)
RESOURCES = {
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceMonitor": "servicemonitors",
    "Pod": "pods",
}
PERMANENT = {400, 403, 404, 405, 415, 422}


def path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    plural = RESOURCES[kind]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    tail = f"/{name}" if name else ""
    return f"{prefix}/namespaces/{namespace}/{plural}{tail}"


def _request(
    api: client.ApiClient,
    method: str,
    url: str,
    query: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> Any:
    """One API call; the decoded JSON body, or ApiException for a non-2xx answer."""
    request = api.param_serialize(
        method,
        url,
        query_params=query or [],
        header_params={"Accept": "application/json", **(headers or {})},
        body=body,
        auth_settings=["BearerToken"],
    )
    try:
        response = api.call_api(*request)
        data = response.read()
    except (OSError, urllib3.exceptions.HTTPError) as e:  # refused, reset, DNS, timeouts
        raise kopf.TemporaryError(f"{method} {url}: {e}", delay=5) from e
    if not 200 <= response.status < 300:
        raise ApiException(status=response.status, reason=response.reason, body=data)
    return json.loads(data) if data else None


def _call(api: client.ApiClient, method: str, url: str, **kwargs: Any) -> Any:
    try:
        return _request(api, method, url, **kwargs)
    except ApiException as e:
        if e.status in PERMANENT and method != "GET":
            raise kopf.PermanentError(f"{method} {url}: {e.status} {e.reason}: {e.body}") from e
        raise kopf.TemporaryError(f"{method} {url}: {e.status} {e.reason}", delay=5) from e


def apply(api: client.ApiClient, obj: dict) -> dict:
    """Server-side apply of `obj` (create or update); returns the object as stored."""
    meta = obj["metadata"]
    url = path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    return _call(
        api,
        "PATCH",
        url,
        query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        headers={"Content-Type": "application/apply-patch+yaml"},
        body=obj,  # sent as JSON, which is YAML
    )


def get(api: client.ApiClient, api_version: str, kind: str, namespace: str, name: str):
    """The object, or None when it does not exist."""
    try:
        return _request(api, "GET", path(api_version, kind, namespace, name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise kopf.TemporaryError(f"GET {kind} {namespace}/{name}: {e.status}", delay=5) from e


def delete(api: client.ApiClient, api_version: str, kind: str, namespace: str, name: str) -> bool:
    """Delete if present; True when something was deleted."""
    try:
        _request(api, "DELETE", path(api_version, kind, namespace, name))
    except ApiException as e:
        if e.status == 404:
            return False
        raise kopf.TemporaryError(f"DELETE {kind} {namespace}/{name}: {e.status}", delay=5) from e
    return True


def list_pods(api: client.ApiClient, namespace: str, label_selector: str) -> list[dict]:
    data = _call(
        api,
        "GET",
        path("v1", "Pod", namespace),
        query=[("labelSelector", label_selector)],
    )
    return list(data.get("items") or [])
