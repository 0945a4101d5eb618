"""The private Redis instance of the embedded mode (Debian's redis-server, own config, own port)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from appliance.runtime.common import (
    RuntimeFailure,
    check_port_free,
    file_size,
    log,
    spawn,
    stop_process,
    wait_until,
    write_private,
)
from appliance.runtime.identity import ServiceIdentity
from appliance.settings import Settings

NAME = "redis"
REDIS_SERVER = Path("/usr/bin/redis-server")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def redis_server_binary() -> Path:
    if REDIS_SERVER.exists():
        return REDIS_SERVER
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise RuntimeFailure("redis: redis-server not found; install it with `apt-get install redis-server`")


def config_path(settings: Settings) -> Path:
    return settings.redis_dir / "redis.conf"


def pid_path(settings: Settings) -> Path:
    return settings.run_dir / "redis.pid"


def running_pid(settings: Settings) -> int | None:
    """The pid of a redis-server of this home still running (per its pid file and the process table).

    Redis rewrites its process title over its environment, so the environment markers of the other
    children cannot find it: its pid file and working directory (`dir`) do.
    """
    try:
        pid = int(pid_path(settings).read_text().split()[0])
        proc = psutil.Process(pid)
        if "redis" not in proc.name() or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return pid if Path(proc.cwd()).resolve() == settings.redis_dir.resolve() else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def clear_stale(settings: Settings) -> None:
    pid = running_pid(settings)
    if pid is not None:
        log.warning(
            "redis: a stale redis-server (pid %d) of this home is still running; stopping it first", pid
        )
        took = stop_redis(pid)
        log.info("redis: stale redis-server stopped (%.1f s)", took)
    pid_path(settings).unlink(missing_ok=True)


def write_config(settings: Settings, ident: ServiceIdentity) -> Path:
    if settings.redis_password is None:
        raise RuntimeFailure("redis: no password in settings (APPLIANCE_REDIS_PASSWORD)")
    password = settings.redis_password.get_secret_value().replace("\\", "\\\\").replace('"', '\\"')
    lines = [
        "# Managed by `appliance up`: rewritten at each start.",
        "bind 127.0.0.1",
        f"port {settings.redis_port}",
        "protected-mode yes",
        "daemonize no",
        "supervised no",
        f'dir "{settings.redis_dir}"',
        f'logfile "{settings.log_dir / "redis.log"}"',
        f'pidfile "{pid_path(settings)}"',
        "appendonly yes",
        "appendfsync everysec",
        'appendfilename "appendonly.aof"',
        f'requirepass "{password}"',
        "",
    ]
    path = config_path(settings)
    write_private(path, "\n".join(lines), ident)
    return path


def client(settings: Settings, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=settings.redis_port,
        password=settings.redis_password.get_secret_value() if settings.redis_password else None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def ping(settings: Settings) -> bool:
    try:
        with client(settings) as r:
            return bool(r.ping())
    except Exception:  # noqa: BLE001
        return False


def start(
    settings: Settings,
    ident: ServiceIdentity,
    env: dict[str, str],
    should_stop: Callable[[], bool] | None = None,
) -> subprocess.Popen[bytes]:
    binary = redis_server_binary()
    clear_stale(settings)
    check_port_free(NAME, "127.0.0.1", settings.redis_port)
    conf = write_config(settings, ident)
    log_path = settings.log_dir / "redis.log"
    offset = file_size(log_path)
    proc = spawn(
        NAME, [str(binary), str(conf)], ident=ident, log_path=log_path, env=env, cwd=settings.redis_dir
    )
    try:
        took = wait_until(
            NAME,
            lambda: ping(settings),
            timeout=READY_TIMEOUT,
            proc=proc,
            log_path=log_path,
            log_offset=offset,
            should_stop=should_stop,
        )
    except BaseException:
        stop_redis(proc.pid, proc)
        raise
    log.info("redis: ready on 127.0.0.1:%d (pid %d, %.2f s)", settings.redis_port, proc.pid, took)
    return proc


def stop_redis(pid: int, proc: subprocess.Popen[bytes] | None = None) -> float:
    """SIGTERM: Redis syncs the AOF and exits."""
    return stop_process(NAME, pid, signal.SIGTERM, STOP_TIMEOUT, proc=proc)
