"""The gunicorn worker class of the API: uvicorn with the appliance's edge limits at the HTTP layer.

gunicorn's own `--limit-request-line` / `--limit-request-field_size` apply to its sync parser only, not
to uvicorn workers, so the limits are set here: the h11 parser (httptools puts no bound on the header
block) with `max_header_bytes` (plus room for the request line) as its largest incomplete event, and a
cap on concurrent connections per worker so idle or slow clients cannot exhaust file descriptors.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from appliance.settings import get_settings

REQUEST_LINE_ROOM = 8 * 1024
MAX_CONNECTIONS_PER_WORKER = 1000


def config_kwargs() -> dict[str, Any]:
    settings = get_settings()
    return {
        **UvicornWorker.CONFIG_KWARGS,
        "http": "h11",
        "h11_max_incomplete_event_size": settings.max_header_bytes + REQUEST_LINE_ROOM,
        "limit_concurrency": MAX_CONNECTIONS_PER_WORKER,
    }


class ApplianceWorker(UvicornWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.CONFIG_KWARGS = config_kwargs()
        super().__init__(*args, **kwargs)
