"""Around every HTTP request: the in-flight count that a drain waits on, and a last-resort
OpenAI-style 500 for an exception nothing else handled (the server keeps serving)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignedserve.router.http_errors import ErrorReplies


@dataclass
class RouterState:
    """Shared by the HTTP handlers and the server that drains them."""

    is_draining: bool = False  # SIGTERM received: /ready is 503, new generations are refused
    num_inflight: int = 0  # HTTP requests being answered, streams included


class RequestGuard:
    """Pure ASGI middleware: it sees a streamed response through to its last byte."""

    def __init__(self, app: ASGIApp, state: RouterState, errors: ErrorReplies):
        self.app = app
        self.state = state
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.state.num_inflight += 1
        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            response = self.errors.response(Request(scope), exc)  # logs it
            if not started:  # else the client sees the connection close mid-response
                await response(scope, receive, send)
        finally:
            self.state.num_inflight -= 1
