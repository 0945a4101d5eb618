"""The gunicorn worker class of the API: uvicorn with the appliance's edge limits at the HTTP layer.

gunicorn's own `--limit-request-line` / `--limit-request-field_size` apply to its sync parser only, not
to uvicorn workers, so the limits are set here:

- HTTP/1.1 is parsed by httptools (llhttp, in C), about 0.7 ms a search less than h11 (pure Python) on
  the 2-core reference machine. httptools puts no bound on a request's head (it buffers a header as
  long as the client sends it), so `BoundedHttpToolsProtocol` does: a head still incomplete after
  `max_header_bytes` (plus room for the request line) is answered 431 `headers_too_large` and the
  connection closed, so a worker never holds more than that plus one read (at most 256 KiB) of one
  client's head.
  appliance.edges checks the finished head's exact size again in the app.
- At most MAX_CONNECTIONS_PER_WORKER concurrent connections per worker, so idle or slow clients cannot
  exhaust file descriptors.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from appliance.errors import PROBLEM_MEDIA_TYPE, problem_body
from appliance.settings import get_settings

REQUEST_LINE_ROOM = 8 * 1024
MAX_CONNECTIONS_PER_WORKER = 1000


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head (request line and headers)."""

    head_limit: int | None = None  # bytes; None: the settings' max_header_bytes + REQUEST_LINE_ROOM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit: int = self.head_limit or get_settings().max_header_bytes + REQUEST_LINE_ROOM
        self._head_bytes = 0  # bytes of the current request's head received so far
        self._in_head = False  # between a request's first byte and the end of its headers
        self._began_in_read = False  # a request began in the read being parsed

    def data_received(self, data: bytes) -> None:
        self._began_in_read = False
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        if self._began_in_read:
            # This read began the head, after the end of an earlier request perhaps: only the part
            # of `data` past that belongs to the head, at most one read; counted from the next read on.
            return
        self._head_bytes += len(data)
        if self._head_bytes > self._limit:
            self._reject_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._began_in_read = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _reject_head(self) -> None:
        detail = f"The request head exceeds {self._limit} bytes."
        body = json.dumps(
            problem_body(
                status=431,
                code="headers_too_large",
                title="Request headers too large",
                detail=detail,
                instance=None,
                request_id=None,
            )
        ).encode()
        self.logger.warning("A request head over %d bytes: refused with 431.", self._limit)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + f"content-type: {PROBLEM_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n"
            + body
        )
        self.transport.close()


def config_kwargs() -> dict[str, Any]:
    return {
        **UvicornWorker.CONFIG_KWARGS,
        "http": BoundedHttpToolsProtocol,
        "limit_concurrency": MAX_CONNECTIONS_PER_WORKER,
    }


class ApplianceWorker(UvicornWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.CONFIG_KWARGS = config_kwargs()
        super().__init__(*args, **kwargs)
