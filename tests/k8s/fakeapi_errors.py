"""Errors of the fake API server, answered as the real server's `Status` objects."""

from __future__ import annotations

from k8s.fakeapi_resources import Resource


class ApiError(Exception):
    """Becomes a `Status` response: code, reason (NotFound, AlreadyExists, Conflict, ...)."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details or {},
            "code": self.code,
        }


def not_found(res: Resource, name: str) -> ApiError:
    details = {"name": name, "group": res.group, "kind": res.plural}
    return ApiError(404, "NotFound", f'{res.group_plural} "{name}" not found', details)


def conflict(res: Resource, name: str) -> ApiError:
    message = (
        f'Operation cannot be fulfilled on {res.group_plural} "{name}": the object has been'
        " modified; please apply your changes to the latest version and try again"
    )
    return ApiError(
        409, "Conflict", message, {"name": name, "group": res.group, "kind": res.plural}
    )


def invalid(res: Resource, name: str, why: str) -> ApiError:
    details = {"name": name, "group": res.group, "kind": res.kind}
    return ApiError(422, "Invalid", f'{res.kind}.{res.group} "{name}" is invalid: {why}', details)
