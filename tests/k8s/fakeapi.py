"""A fake Kubernetes API server on loopback, for end-to-end tests of real clients: kubectl,
helm 3 and 4, kopf operators and the `kubernetes` Python client.

    with FakeKubernetes() as kube:
        subprocess.run([kubectl, "apply", "-f", path], env=kube.env(), check=True)
        kube.patch_status("apps/v1", "deployments", "default", "web", {"readyReplicas": 1})
        assert kube.get("v1", "Service", "default", "web") is not None
        assert ("apps", "deployments", "patch") in kube.rbac_usage("kopf/", "OpenAPI-Generator/")

Why not kmock 0.8 (decided after reading it, before writing this): its emulator is a DSL of
canned responses over a plain dict store. Each stateful handler (create, update, patch, delete,
list, watch, fetch), its URL parsing and its discovery had to be replaced to get resource
versions, selectors, watch resumption, the status split, server-side apply, CRD serving, scale
and garbage collection right -- which would have left nothing of kmock in use but its DSL
router. So this is the subset written on aiohttp directly, one job per module:
`fakeapi_resources` (kinds, discovery), `fakeapi_store` (the API machinery's semantics),
`fakeapi_watch` (event log, subscribers), `fakeapi_patch` (merge, JSON and strategic patches,
apply, CRD defaults), `fakeapi_select` (selectors), `fakeapi_proto` (the few protobuf bodies),
`fakeapi_errors` (Status objects), `fakeapi_server` (HTTP, watch streams, request log).

What clients need: no flags. KUBECONFIG (`env()`) for kubectl, kopf and the `kubernetes`
client; `helm_env()` for helm 3 and 4, whose release storage is its default (Secrets, sent as
protobuf and decoded here), so releases persist across helm processes. The OpenAPI v3 documents
served declare only that PATCH takes `fieldValidation`, which makes kubectl and helm leave
validation to the server (which accepts everything) instead of downloading schemas. Apply CRDs
before the custom resources that use them (as on a real cluster); helm's `--wait` needs a test
that plays the controllers (as for `kubectl rollout status`).

Known gaps (only a real cluster tests these): protobuf bodies other than Secret, ConfigMap,
Namespace and DeleteOptions answer 415 (so `kubectl create deployment` fails; apply works); no
OpenAPI schemas (`kubectl explain` fails; /openapi/v2 is 404); no admission, schema validation
or pruning, nor RBAC enforcement (every request is allowed; CRD `default`s are applied); no
controllers (no ReplicaSets or Pods: a test plays kubelet with `patch_status`); no Table output
(kubectl prints NAME and AGE only); server-side apply keeps no managedFields and never reports
a conflict between managers: per field manager it removes what that manager applied last time
and no longer applies, then merges; strategic
merge keys by field name, not Go type (`ports` by containerPort, else port); foreground deletion
acts as background; a child whose owners were already gone when it was created is not
collected; CRD versions are served without conversion; `limit` is ignored (never a `continue`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from aiohttp import web

from k8s.fakeapi_errors import ApiError
from k8s.fakeapi_select import label_selector as parse_label_selector
from k8s.fakeapi_server import ApiServer, RequestRecord
from k8s.fakeapi_store import MERGE_PATCH, Store

__all__ = ["FakeKubernetes", "RequestRecord", "wait_until"]

T = TypeVar("T")


class FakeKubernetes:
    """A context manager: the server runs on its own event loop thread on 127.0.0.1."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: Store | None = None
        self._server: ApiServer | None = None
        self._runner: web.AppRunner | None = None
        self._records: list[RequestRecord] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="fakeapi-")
        self.url = ""
        self.kubeconfig = Path(self._dir.name) / "kubeconfig"

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._serve, name="fake-kubernetes", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._failure is not None:
            raise RuntimeError("the fake API server did not start") from self._failure
        self._write_kubeconfig()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._dir.cleanup()

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._stop())
        loop.close()

    async def _start(self) -> None:
        self._store = Store()
        self._server = ApiServer(self._store, self._records.append)
        self._runner = web.AppRunner(
            self._server.app, handler_cancellation=True, access_log=None, shutdown_timeout=1
        )
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self._runner, sock).start()

    async def _stop(self) -> None:
        assert self._server is not None and self._runner is not None
        self._server.close_watches()
        await self._runner.cleanup()

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    # --- clients' environment ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing here, a private kubectl cache, no proxy."""
        return os.environ | {
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(Path(self._dir.name) / "kube-cache"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def helm_env(self) -> dict[str, str]:
        """env() plus helm's cache, config and data directories under the fake's temporary
        directory (no repositories or plugins from the user's home)."""
        home = Path(self._dir.name) / "helm"
        return self.env() | {
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    # --- the store, from the test's thread -----------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every API call so far, in arrival order (watches when their stream opened)."""
        return list(self._records)

    def rbac_usage(self, *user_agent_prefixes: str) -> set[tuple[str, str, str]]:
        """(API group, resource[/subresource], verb) of every resource request so far whose
        User-Agent starts with one of the prefixes (all requests when none is given): what a
        Role must grant that client. kopf sends `kopf/<version>`, the `kubernetes` client
        `OpenAPI-Generator/<version>/python` unless told otherwise, kubectl `kubectl/...`."""
        return {
            (r.api_group, f"{r.resource}/{r.subresource}" if r.subresource else r.resource, r.verb)
            for r in self.requests
            if r.resource is not None and r.api_group is not None and r.verb is not None
            if not user_agent_prefixes or r.user_agent.startswith(user_agent_prefixes)
        }

    def _call(self, fn: Callable[[], T]) -> T:
        """fn() on the server's loop thread (the store is single-threaded); a copy of its result."""
        assert self._loop is not None, "use FakeKubernetes as a context manager"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(copy.deepcopy(fn()))
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(30)

    def _resource(self, api_version: str, kind_or_plural: str):
        assert self._store is not None
        res = self._store.find(api_version, kind_or_plural)
        if res is None:
            raise KeyError(f"{api_version} {kind_or_plural} is not served")
        return res

    def get(
        self, api_version: str, kind_or_plural: str, namespace: str | None, name: str
    ) -> dict | None:
        """The object, or None if it does not exist; KeyError if the kind is not served."""

        def get() -> dict | None:
            res = self._resource(api_version, kind_or_plural)
            try:
                return {**self._store.get(res, namespace, name), "apiVersion": api_version}
            except ApiError:
                return None

        return self._call(get)

    def list(
        self,
        api_version: str,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict]:
        matches = parse_label_selector(label_selector)
        return self._call(
            lambda: self._store.list(self._resource(api_version, plural), namespace, matches)
        )

    def create(self, body: dict) -> dict:
        """Create as a client would (status is dropped for kinds with a status subresource), then
        write body's status, if any, through /status."""

        def create() -> dict:
            res = self._resource(body["apiVersion"], body["kind"])
            namespace = body.get("metadata", {}).get("namespace", "default")
            obj = self._store.create(res, namespace if res.is_namespaced else None, body)
            if res.has_status and "status" in body:
                name = obj["metadata"]["name"]
                patch = {"status": body["status"]}
                obj, _ = self._store.patch(
                    res, namespace, name, MERGE_PATCH, patch, subresource="status"
                )
            return obj

        return self._call(create)

    def patch_status(
        self, api_version: str, plural: str, namespace: str | None, name: str, status: dict
    ) -> dict:
        """Merge-patch status through /status (e.g. play kubelet: readyReplicas)."""
        return self._patch(api_version, plural, namespace, name, {"status": status}, "status")

    def patch(
        self, api_version: str, plural: str, namespace: str | None, name: str, patch: dict
    ) -> dict:
        """Merge-patch the main resource."""
        return self._patch(api_version, plural, namespace, name, patch, None)

    def _patch(self, api_version, plural, namespace, name, patch, subresource) -> dict:
        def run() -> dict:
            res = self._resource(api_version, plural)
            sub = subresource if res.has_status else None
            obj, _ = self._store.patch(res, namespace, name, MERGE_PATCH, patch, subresource=sub)
            return obj

        return self._call(run)

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict:
        return self._call(
            lambda: self._store.delete(self._resource(api_version, plural), namespace, name)
        )


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
