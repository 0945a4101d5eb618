"""The private Redis instance of the embedded mode (Debian's redis-server, own config, own port)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

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


def write_config(settings: Settings, ident: ServiceIdentity) -> Path:
    if settings.redis_password is None:
        raise RuntimeFailure("redis: no password in settings (APPLIANCE_REDIS_PASSWORD)")
    password = settings.redis_password.get_secret_value()
    lines = [
        "# Managed by `appliance up`: rewritten at each start.",
        "bind 127.0.0.1",
        f"port {settings.redis_port}",
        "protected-mode yes",
        "daemonize no",
        "supervised no",
        f'dir "{settings.redis_dir}"',
        f'logfile "{settings.log_dir / "redis.log"}"',
        "appendonly yes",
        "appendfsync everysec",
        'appendfilename "appendonly.aof"',
        f'requirepass "{password}"',
        "",
    ]
    path = config_path(settings)
    write_private(path, "\n".join(lines), ident)
    return path


def client(settings: Settings, timeout: float = 2.0):  # type: ignore[no-untyped-def]
    import redis

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
