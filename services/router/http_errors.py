"""Every error answer has OpenAI's body, {"error": {"message", "type", "param", "code"}}, so
OpenAI clients raise their usual exceptions; one table maps HTTP statuses to its types."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from alignedserve.common.errors import AlignedServeError, InvalidRequestError
from alignedserve.router.request_stats import record_rejected

log = logging.getLogger(__name__)

# HTTP status -> (OpenAI error type, reason label in requests_rejected_total)
KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable_error", "unavailable"),
    504: ("timeout_error", "timeout"),
}
RETRY_AFTER_STATUSES = (429, 503)


class ModelNotFoundError(AlignedServeError):
    http_status = 404

    def __init__(self, model: str):
        super().__init__(f"the model {model!r} does not exist")


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def kind(self) -> tuple[str, str]:
        fallback = KINDS[400] if self.status < 500 else KINDS[500]
        return KINDS.get(self.status, fallback)

    @property
    def reason(self) -> str:
        return self.code or self.kind[1]

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind[0]}
        return {"error": {**error, "param": self.param, "code": self.code}}


def api_error(exc: Exception) -> ApiError:
    """What to answer for `exc`. Anything unexpected is logged here, with its traceback, and
    answered with a 500 that reveals nothing of it."""
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, str(exc), "model", "model_not_found")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, AlignedServeError):
        return ApiError(exc.http_status, str(exc))
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, str(exc.detail))
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, "internal server error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}")
    loc = tuple(first["loc"])
    path = loc[1:] if loc[:1] == ("body",) else loc
    if not path:
        return ApiError(
            400, "the request body must be a JSON object (Content-Type: application/json)"
        )
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    message = f"{param}: {first['msg']}"
    if first["type"] != "missing":
        given = repr(first.get("input"))
        message += f" (got {given[:60]}{'...' if len(given) > 60 else ''})"
    return ApiError(400, message, param)


class ErrorReplies:
    """Turns exceptions into answers, and counts those to API requests as rejected."""

    def __init__(self, model_name: str, retry_after_s: int):
        self._model_name = model_name
        self._retry_after_s = retry_after_s

    def response(self, request: Request, exc: Exception) -> JSONResponse:
        error = self._record(exc, is_api=request.url.path.startswith("/v1/"))
        headers = {}
        if error.status in RETRY_AFTER_STATUSES:
            headers["Retry-After"] = str(self._retry_after_s)
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def event(self, exc: Exception) -> dict[str, Any]:
        """The error as a streamed event, once a stream's 200 has gone out."""
        return self._record(exc, is_api=True).body()

    def _record(self, exc: Exception, is_api: bool) -> ApiError:
        error = api_error(exc)
        if is_api:
            record_rejected(self._model_name, error.reason)
        return error

    def install(self, app: FastAPI) -> None:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return self.response(request, exc)

        for cls in (RequestValidationError, AlignedServeError, HTTPException):
            app.add_exception_handler(cls, handler)
