"""Backup and restore throughput against a plain `tar` of the same blobs, in the same run.

    .venv/bin/python bench/backup.py [--gib 1.0] [--doc-mib 16] [--keep]

Starts a throw-away appliance (its own Postgres and Redis, the filesystem object store) in
/var/tmp, uploads `--gib` of random documents through the real API (encrypted as in production;
random bytes are not ingested, so the dump is small and the blobs are the data set), then times:

- `tar cf` of the object directory, then `backup create` (dump + every blob + manifest, age);
- `tar xf` of that tar into a new directory, then `restore` into a new data directory (decrypt,
  check, stage, start Postgres, pg_restore, place the blobs, audit).

Throughput is the data set's blob bytes per second of wall time. Each figure is printed with the
phase times. Run as root after ./install.sh (the servers drop to the `appliance` user).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest import free_port  # noqa: E402

MiB = 1024 * 1024


def settings_for(home: Path, ports: tuple[int, int]):  # type: ignore[no-untyped-def]
    from appliance.settings import load_settings

    return load_settings(
        home=home, pg_port=ports[0], redis_port=ports[1], log_json=False, log_level="WARNING"
    )


async def fill(settings, total: int, doc_size: int) -> int:  # type: ignore[no-untyped-def]
    from appliance.api import create_app
    from appliance.auth import service as auth
    from appliance.db.engine import Database
    from appliance.tenants import service as tenants

    db = Database(settings.app_database_url, pool_size=1)
    async with db.transaction() as session:
        tenant = await tenants.create_tenant(session, name="bench-backup")
        _, key = await auth.create_key(session, tenant_id=tenant.id, name="bench", role="editor")
    await db.dispose()
    app = create_app(settings)
    uploaded = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            i = 0
            while uploaded < total:
                body = os.urandom(doc_size)
                r = await client.post(
                    "/api/v1/documents",
                    content=body,
                    headers={
                        "Authorization": f"Bearer {key}",
                        "Content-Type": "application/octet-stream",
                        "X-Filename": f"doc{i}.bin",
                    },
                )
                r.raise_for_status()
                uploaded += doc_size
                i += 1
    return i


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--doc-mib", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="Keep the directories for inspection.")
    args = parser.parse_args()

    from appliance.backup.create import create_backup
    from appliance.backup.restore import restore_backup
    from appliance.db.migrations import upgrade_head
    from appliance.runtime import start_datastores

    work = Path(tempfile.mkdtemp(prefix="bench-backup-", dir="/var/tmp"))
    work.chmod(0o755)
    src_home, dst_home = work / "src", work / "dst"
    try:
        src = settings_for(src_home, (free_port(), free_port()))
        datastores = start_datastores(src)
        try:
            src = datastores.settings
            upgrade_head(src)
            t0 = time.monotonic()
            docs = asyncio.run(fill(src, int(args.gib * 1024**3), args.doc_mib * MiB))
            fill_s = time.monotonic() - t0
            blob_bytes = sum(p.stat().st_size for p in src.objects_dir.rglob("*") if p.is_file())
            print(f"data set: {docs} documents, {blob_bytes / 1e6:.0f} MB of blobs (upload {fill_s:.1f} s)")

            # Each timed run starts with no dirty pages left by the one before (`sync`), and the blobs
            # in the page cache (the upload just wrote them): tar and the backup read alike.
            subprocess.run(["sync"], check=True)
            tar_path = work / "objects.tar"
            tar_c = timed(["tar", "cf", str(tar_path), "-C", str(src.home), "objects"])
            tar_c_sync = tar_c + timed(["sync", "-f", str(tar_path)])  # the backup fsyncs its archive
            subprocess.run(["sync"], check=True)
            archive = work / "backup.tar.age"
            result = create_backup(src, archive)
            master = work / "master.key"
            shutil.copy(src.master_key_path, master)
            master.chmod(0o600)
            identity = work / "backup.key"
            shutil.copy(src.backup_identity_path, identity)
        finally:
            datastores.stop()

        untar_dir = work / "untar"
        untar_dir.mkdir()
        subprocess.run(["sync"], check=True)
        tar_x = timed(["tar", "xf", str(tar_path), "-C", str(untar_dir)])
        tar_x_sync = tar_x + timed(["sync", "-f", str(untar_dir)])  # the restore fsyncs every blob
        dst_home.mkdir(mode=0o755)
        dst = settings_for(dst_home, (free_port(), free_port()))
        restored = restore_backup(dst, archive, identity_path=identity, master_keys=[master])

        mb = blob_bytes / 1e6
        print(
            f"tar cf (objects dir): {tar_c:7.2f} s  {mb / tar_c:7.1f} MB/s "
            f"(with sync of the tar: {tar_c_sync:.2f} s, {mb / tar_c_sync:.1f} MB/s)\n"
            f"backup create:        {result.seconds:7.2f} s  {mb / result.seconds:7.1f} MB/s  "
            f"({result.size / 1e6:.0f} MB archive, dump {result.dump_bytes / 1e6:.1f} MB, "
            f"{result.objects} objects)  "
            f"ratio {tar_c / result.seconds:.2f} of tar, {tar_c_sync / result.seconds:.2f} of tar+sync\n"
            f"tar xf:               {tar_x:7.2f} s  {mb / tar_x:7.1f} MB/s "
            f"(with sync: {tar_x_sync:.2f} s, {mb / tar_x_sync:.1f} MB/s)\n"
            f"restore:              {restored.seconds:7.2f} s  {mb / restored.seconds:7.1f} MB/s  "
            f"phases {', '.join(f'{k} {v:.2f} s' for k, v in restored.phases.items())}  "
            f"ratio {tar_x / restored.seconds:.2f} of tar, {tar_x_sync / restored.seconds:.2f} of tar+sync"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
