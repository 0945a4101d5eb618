"""Signed download URLs: HMAC (itsdangerous) over tenant, document, version and expiry."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeSerializer

from appliance.errors import AppError

SALT = "appliance-download-url-v1"


class InvalidDownloadUrl(AppError):
    status = 403
    code = "download_url_invalid"
    title = "Invalid download URL"


@dataclass(frozen=True)
class DownloadGrant:
    tenant_id: uuid.UUID
    document_id: uuid.UUID
    version_id: uuid.UUID
    expires_at: int


class UrlSigner:
    def __init__(self, key: bytes) -> None:
        self._serializer = URLSafeSerializer(key, salt=SALT)

    @classmethod
    def from_file(cls, path: Path) -> UrlSigner:
        return cls(path.read_bytes())

    def sign(self, grant: DownloadGrant) -> str:
        return str(
            self._serializer.dumps(
                {
                    "t": str(grant.tenant_id),
                    "d": str(grant.document_id),
                    "v": str(grant.version_id),
                    "e": grant.expires_at,
                }
            )
        )

    def verify(self, token: str, *, now: float | None = None) -> DownloadGrant:
        try:
            data = self._serializer.loads(token)
            grant = DownloadGrant(
                uuid.UUID(data["t"]), uuid.UUID(data["d"]), uuid.UUID(data["v"]), int(data["e"])
            )
        except (BadSignature, KeyError, TypeError, ValueError) as exc:
            raise InvalidDownloadUrl("This download URL is not valid.") from exc
        if (now or time.time()) >= grant.expires_at:
            raise InvalidDownloadUrl("This download URL has expired.", code="download_url_expired")
        return grant
