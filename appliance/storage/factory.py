"""Pick the object store from the settings: S3 when an endpoint is set, else the local filesystem."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.storage.base import ObjectStore
from appliance.storage.breaker import BreakerStore
from appliance.storage.filesystem import FilesystemStore
from appliance.storage.s3 import S3Store

if TYPE_CHECKING:
    from appliance.settings import Settings


def build_store(settings: Settings, *, ensure_bucket: bool = True) -> ObjectStore:
    """The configured store. With S3 and `ensure_bucket`, the bucket is checked (created if missing) now,
    so a wrong endpoint or key fails here with StorageUnavailable; pass False to defer that to `check()`.

    S3 comes wrapped in a BreakerStore (circuit breaker, see `appliance.storage.breaker`): once the
    server has failed several calls in a row, calls fail fast with StorageUnavailable for a while.
    """
    if settings.s3_endpoint:
        s3 = S3Store(
            settings.s3_endpoint,
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            settings.s3_bucket,
            region=settings.s3_region,
            secure=settings.s3_secure,
            ensure_bucket=ensure_bucket,
        )
        return BreakerStore(s3)
    # The local filesystem needs no breaker: no network, and its failures (disk full, an unwritable
    # root) are not transient outages that waiting out would fix.
    return FilesystemStore(settings.objects_dir)
