"""Master-key rotation: rewrap every tenant DEK under a new KEK, atomically per row and resumably.

1. `master.key.next` is created (or reused, when a previous run was interrupted).
2. Each `tenant_keys` row not yet under the new KEK is rewrapped in its own transaction
   (`SELECT … FOR UPDATE`, unwrap with the KEK it names, wrap with the new one, UPDATE).
3. When none is left, the files are swapped: `master.key` → `master.key.retired-<id>`, then
   `master.key.next` → `master.key`.
At every point each row names a KEK whose file is still in the keys directory, so every DEK stays
readable; data is never re-encrypted. Runs as the owner role (it must see every tenant's row).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text

from appliance.keys.kek import FileKeyProvider
from appliance.keys.keyring import NEXT, RETIRED_PREFIX, Keyring
from appliance.keys.service import dek_aad
from appliance.storage.filesystem import fsync_dir


@dataclass
class RotationResult:
    old_kek_id: str
    new_kek_id: str
    rewrapped: int
    already_done: int


def rotate_master_key(
    conn_factory: Callable[[], Connection],
    keyring: Keyring,
    *,
    chown: Callable[[Path], None] = lambda p: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    batch_size: int = 100,
) -> RotationResult:
    directory = keyring.directory
    next_path = directory / NEXT
    if not next_path.exists():
        FileKeyProvider.create_key_file(next_path)
        chown(next_path)
        fsync_dir(directory)
    keyring.reload()
    new = FileKeyProvider.load(next_path)
    old = FileKeyProvider.load(keyring.current_path)
    with conn_factory() as conn:
        total = int(conn.execute(text("SELECT count(*) FROM tenant_keys")).scalar_one())
        already = int(
            conn.execute(
                text("SELECT count(*) FROM tenant_keys WHERE kek_id = :k"), {"k": new.key_id}
            ).scalar_one()
        )
    done = already
    progress(done, total)
    rewrapped = 0
    while True:
        with conn_factory() as conn, conn.begin():
            rows = conn.execute(
                text(
                    "SELECT tenant_id, wrapped_dek, kek_id FROM tenant_keys WHERE kek_id <> :k "
                    "ORDER BY tenant_id LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"k": new.key_id, "n": batch_size},
            ).all()
            for tenant_id, wrapped, kek_id in rows:
                dek = keyring.get(kek_id).unwrap(bytes(wrapped), aad=dek_aad(tenant_id))
                conn.execute(
                    text(
                        "UPDATE tenant_keys SET wrapped_dek = :w, kek_id = :k, updated_at = now() "
                        "WHERE tenant_id = :t"
                    ),
                    {"w": new.wrap(dek, aad=dek_aad(tenant_id)), "k": new.key_id, "t": tenant_id},
                )
        if not rows:
            break
        rewrapped += len(rows)
        done += len(rows)
        progress(done, total)
    with conn_factory() as conn:
        left = int(
            conn.execute(
                text("SELECT count(*) FROM tenant_keys WHERE kek_id <> :k"), {"k": new.key_id}
            ).scalar_one()
        )
    if left:
        raise RuntimeError(f"{left} data keys are still under an older master key; run the rotation again")
    current = keyring.current_path
    os.replace(current, directory / f"{RETIRED_PREFIX}{old.key_id}")
    os.replace(next_path, current)
    fsync_dir(directory)
    keyring.reload()
    return RotationResult(old.key_id, new.key_id, rewrapped, already)
