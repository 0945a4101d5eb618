"""Small process and filesystem helpers shared by the embedded runtime.

Every expected failure is a `RuntimeFailure` whose message is one readable line (the CLI prints it
as is); progress goes to the `appliance.runtime` logger.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from appliance.runtime.identity import ServiceIdentity

log = logging.getLogger("appliance.runtime")

# Environment markers every child carries, so that a child left behind by a killed supervisor
# can be found again (see `find_stale_children`).
ENV_HOME = "APPLIANCE_HOME"
ENV_COMPONENT = "APPLIANCE_COMPONENT"


class RuntimeFailure(Exception):
    """An expected failure of the embedded runtime: one line for the operator (plus, for a server that
    exited, the last lines of its log)."""


# Ports ---------------------------------------------------------------------------------------------
def check_port_free(component: str, host: str, port: int) -> None:
    """Fail naming the component when `host:port` cannot be bound (the way the server would bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR, so a port in TIME_WAIT is not "taken" for them either.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = "is already in use"
            elif exc.errno == errno.EACCES:
                reason = "needs privileges to bind"
            else:
                reason = f"cannot be bound ({os.strerror(exc.errno or 0) or exc})"
            raise RuntimeFailure(
                f"{component}: port {port} on {host} {reason}; stop whatever holds it or set "
                f"APPLIANCE_{_port_setting(component)} to a free port"
            ) from None


def _port_setting(component: str) -> str:
    return {"postgres": "PG_PORT", "redis": "REDIS_PORT", "api": "API_PORT"}.get(component, "PORT")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Files ---------------------------------------------------------------------------------------------
def make_private_dir(path: Path, ident: ServiceIdentity, mode: int = 0o700) -> Path:
    """Create `path` (and missing parents) owned by the service user with `mode`; fix an existing one."""
    path.mkdir(parents=True, exist_ok=True)
    ident.chown(path)
    if (path.stat().st_mode & 0o7777) != mode:
        path.chmod(mode)
    return path


def write_private(path: Path, data: str | bytes, ident: ServiceIdentity, mode: int = 0o600) -> None:
    """Write a file atomically, created with `mode` and owned by the service user."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    ident.chown(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any, ident: ServiceIdentity, mode: int = 0o600) -> None:
    write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n", ident, mode)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def open_log(path: Path, ident: ServiceIdentity) -> int:
    """An append-only fd on a component log (owned by the service user); the caller closes it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    ident.chown(path)
    return fd


def log_tail(path: Path, lines: int = 15, since: int = 0) -> str:
    """The last `lines` lines of a log written after byte offset `since` (whole file if it shrank)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = since if 0 <= since <= size else 0
            fh.seek(max(start, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# Processes -----------------------------------------------------------------------------------------
def spawn(
    component: str,
    argv: list[str],
    *,
    ident: ServiceIdentity,
    log_path: Path,
    env: dict[str, str],
    cwd: Path,
) -> subprocess.Popen[bytes]:
    """Start a server as the service user, in its own process group, stdout+stderr to its log.

    Its own process group keeps a terminal's Ctrl-C away from it: the supervisor stops the
    components itself, in order.
    """
    fd = open_log(log_path, ident)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"--- appliance: starting {component} at {stamp} ---\n".encode())
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
                cwd=str(cwd),
                close_fds=True,
                process_group=0,
                **ident.popen_kwargs(),
            )
        except OSError as exc:
            raise RuntimeFailure(f"{component}: cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True when `pid` runs (and, given `create_time`, is still the same process, not a reused pid)."""
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not process_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_process(
    component: str,
    pid: int,
    sig: int,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    escalate: Iterable[tuple[int, float]] = (),
) -> float:
    """Send `sig`, wait up to `timeout`, then the `escalate` signals, then SIGKILL the process group.

    Returns the seconds it took.
    """
    started = time.monotonic()
    if not _signal(pid, sig):
        if proc is not None:
            proc.poll()
        return 0.0
    if _wait_gone(pid, timeout, proc):
        return time.monotonic() - started
    for next_sig, next_timeout in escalate:
        log.warning(
            "%s (pid %d) did not stop in time; sending %s", component, pid, signal.Signals(next_sig).name
        )
        _signal(pid, next_sig)
        if _wait_gone(pid, next_timeout, proc):
            return time.monotonic() - started
    log.warning("%s (pid %d) did not stop; killing its process group", component, pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _signal(pid, signal.SIGKILL)
    _wait_gone(pid, 10, proc)
    return time.monotonic() - started


def wait_until(
    component: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    log_offset: int = 0,
    interval: float = 0.05,
    what: str = "ready",
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """Poll `check` until it is true; fail when `proc` exits first or after `timeout`. Returns seconds."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeFailure(exit_message(component, proc.returncode, log_path, log_offset))
        try:
            if check():
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - any error just means "not yet"
            pass
        if should_stop is not None and should_stop():
            raise RuntimeFailure(f"{component}: start interrupted")
        if time.monotonic() >= deadline:
            tail = log_tail(log_path, 8, log_offset) if log_path else ""
            where = f"; last lines of {log_path}:\n{tail}" if tail else ""
            raise RuntimeFailure(f"{component}: not {what} after {timeout:.0f} s{where}")
        time.sleep(interval)


def exit_message(component: str, returncode: int | None, log_path: Path | None, log_offset: int = 0) -> str:
    how = (
        f"was killed by {signal.Signals(-returncode).name}"
        if returncode is not None and returncode < 0
        else f"exited with code {returncode}"
    )
    tail = log_tail(log_path, 12, log_offset) if log_path else ""
    where = f"; last lines of {log_path}:\n{tail}" if tail else f"; see {log_path}" if log_path else ""
    return f"{component} {how} during start{where}"


# Stale children --------------------------------------------------------------------------------------
def find_stale_children(home: Path, exclude: Iterable[int] = ()) -> dict[str, list[psutil.Process]]:
    """Processes started for this home (by their environment markers), topmost of each component.

    A child's own children (postgres backends, gunicorn and dramatiq workers) carry the same markers;
    only the process whose parent is not of the same component is returned, since that is the one to
    signal.
    """
    home_s = str(home)
    skip = set(exclude) | {os.getpid()}
    found: dict[int, tuple[str, int]] = {}
    for proc in psutil.process_iter(["pid", "ppid"]):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if env.get(ENV_HOME) == home_s and env.get(ENV_COMPONENT):
            found[proc.pid] = (env[ENV_COMPONENT], proc.info["ppid"])
    tops: dict[str, set[int]] = {}
    for pid, (component, ppid) in found.items():
        top = pid
        while ppid in found and found[ppid][0] == component:
            top, ppid = ppid, found[ppid][1]
        if top in skip or ppid in skip:
            continue  # one of ours (a live child, or its own children)
        tops.setdefault(component, set()).add(top)
    result: dict[str, list[psutil.Process]] = {}
    for component, pids in tops.items():
        for pid in sorted(pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                result.setdefault(component, []).append(psutil.Process(pid))
    return result
