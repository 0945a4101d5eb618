"""Per-request context (request id, client address, actor) carried in context variables.

Set by the API middleware and the auth dependency, read by logging and the audit writer, so a
service never has to thread them through every call.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    type: str  # "api_key" | "cli" | "system" | "anonymous"
    id: str | None = None  # key id (never the secret) or OS user name
    label: str | None = None  # key prefix, for logs


request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
client_addr_var: ContextVar[str | None] = ContextVar("client_addr", default=None)
actor_var: ContextVar[Actor | None] = ContextVar("actor", default=None)
