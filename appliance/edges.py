"""Edge limits on every request, before any route runs (pure ASGI: streams pass through untouched).

- The header block (request target and headers) is at most `max_header_bytes`: 431 `headers_too_large`.
  The HTTP server bounds it first (appliance.runtime.uvicorn refuses a head still incomplete past
  the limit); this check is exact, and keeps the promise in-process whatever server runs the app.
- Request bodies other than uploads (JSON) are at most `max_json_body_bytes`: 413 `body_too_large`, at
  once from Content-Length, or as soon as a chunked body passes the limit. Uploads have their own
  streaming limit (`max_upload_bytes`, 413 `payload_too_large`).
- A client that stops sending its body for `request_body_timeout_s` gets 408 `request_timeout`
  (slow-body clients cannot pin a request forever). The wait applies only while the body is
  incomplete, never to the disconnect listening of a streamed response.
"""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.context import request_id_var
from appliance.errors import PROBLEM_MEDIA_TYPE, problem_body
from appliance.ratelimit import UPLOAD_PATH_RE


class EdgeLimitExceeded(HTTPException):
    """Raised from the body reader (so routes and FastAPI pass it on unchanged); carries its code."""

    def __init__(self, status_code: int, code: str, detail: str) -> None:
        super().__init__(status_code, detail)
        self.code = code


def _is_upload(scope: Scope) -> bool:
    return scope.get("method") == "POST" and bool(UPLOAD_PATH_RE.match(scope.get("path", "")))


def header_bytes(scope: Scope) -> int:
    headers = scope.get("headers") or []
    target = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(
        scope.get("query_string", b"")
    )
    return target + sum(len(k) + len(v) + 4 for k, v in headers)


class EdgeLimitsMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_json_body_bytes: int, max_header_bytes: int, body_timeout_s: float
    ) -> None:
        self.app = app
        self.max_body = max_json_body_bytes
        self.max_headers = max_header_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if header_bytes(scope) > self.max_headers:
            await _reject(
                scope, send, 431, "headers_too_large", f"The request headers exceed {self.max_headers} bytes."
            )
            return
        limit = None if _is_upload(scope) else self.max_body
        length = _content_length(scope)
        if limit is not None and length is not None and length > limit:
            await _reject(scope, send, 413, "body_too_large", f"The request body exceeds {limit} bytes.")
            return

        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # a streamed response listening for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):  # a timer, not a task as wait_for makes
                    message = await receive()
            except TimeoutError:
                raise EdgeLimitExceeded(
                    408,
                    "request_timeout",
                    f"No part of the request body arrived for {self.body_timeout_s:g} s.",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if limit is not None and received > limit:
                    raise EdgeLimitExceeded(413, "body_too_large", f"The request body exceeds {limit} bytes.")
            else:
                body_done = True
            return message

        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except EdgeLimitExceeded as exc:  # raised where no route's handler caught it
            if started:
                raise
            await _reject(scope, send, exc.status_code, exc.code, str(exc.detail))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    titles = {408: "Request timeout", 413: "Request body too large", 431: "Request headers too large"}
    body = problem_body(
        status=status,
        code=code,
        title=titles.get(status, "Bad request"),
        detail=detail,
        instance=scope.get("path"),
        request_id=request_id_var.get(),
    )
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
