"""Keep blobs a running backup still has to copy: deletions wait (retry) while it copies objects.

A backup takes a consistent Postgres snapshot and then copies every blob that snapshot references.
A document purged after the snapshot would otherwise lose its blob before the copy, and the archive
would restore a document without its bytes. So:

- the backup holds `BLOB_GUARD_LOCK` exclusively (a session advisory lock) from just before its
  snapshot until its last blob is copied;
- every code path that deletes committed blobs first takes the same lock *shared* for its
  transaction (`allow_blob_deletion`). While a backup holds it, that fails at once with
  `BackupInProgress` (503, retryable): the purge job retries with backoff, the CLI says so.

Deleters never wait on the lock, so no request or worker thread is held for a backup's duration;
the backup, which waits for deletions in flight to commit, sees them in its snapshot.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from appliance.errors import AppError

# Advisory lock keys (bigint), fixed for the product: one guards blob deletion, one lets only one
# backup run at a time.
BLOB_GUARD_LOCK = 0x6170_6C62_6C6F_6201  # "aplblob" + 1
BACKUP_RUNNING_LOCK = 0x6170_6C62_6B75_7001  # "aplbkup" + 1


class BackupInProgress(AppError):
    def __init__(self) -> None:
        super().__init__(
            "A backup is copying objects; blobs are deleted once it has copied them. Retry later.",
            code="backup_in_progress",
            status=503,
        )


async def allow_blob_deletion(session: AsyncSession) -> None:
    """Raise BackupInProgress unless no backup is copying blobs; held until the transaction ends."""
    ok = (
        await session.execute(text("SELECT pg_try_advisory_xact_lock_shared(:k)"), {"k": BLOB_GUARD_LOCK})
    ).scalar_one()
    if not ok:
        raise BackupInProgress()
