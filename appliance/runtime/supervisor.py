"""The embedded run mode: one supervisor process starts and watches every server of one data dir.

Order: postgres → redis → model check (sha256) → llm (the chat model's server, unless `llm_url` names
an external one) → migrations (`upgrade_head`) → bootstrap key (`ensure_bootstrap`) → API (gunicorn +
uvicorn workers) → workers (dramatiq). Stop is the reverse. Every server runs as the
service user in its own process group, with its output in `$home/logs/<component>.log`.

`$home/run/supervisor.pid` is held with an exclusive flock while a supervisor (or a test session's
datastores) runs: that is what refuses a second `up` and what `down` and `status` look at;
`$home/run/state.json` lists the children.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.runtime import postgres as pg
from appliance.runtime import redis as rd
from appliance.runtime.common import (
    ENV_COMPONENT,
    ENV_HOME,
    RuntimeFailure,
    check_port_free,
    create_time_of,
    exit_message,
    file_size,
    find_stale_children,
    log,
    log_tail,
    make_private_dir,
    port_accepts,
    process_alive,
    read_json,
    spawn,
    stop_process,
    wait_until,
    write_json,
)
from appliance.runtime.home import check_reachable, prepare
from appliance.runtime.identity import ServiceIdentity
from appliance.settings import PROJECT_ROOT, Settings

COMPONENTS = ("postgres", "redis", "llm", "api", "workers")
DATASTORES = ("postgres", "redis")
API_READY_TIMEOUT = 90.0
WORKERS_READY_TIMEOUT = 30.0
LLM_READY_TIMEOUT = 600.0  # a 70B model takes minutes to map and offload
LLM_STOP_TIMEOUT = 15.0
API_STOP_TIMEOUT = 25.0  # gunicorn --graceful-timeout 10, plus its own shutdown
WORKERS_STOP_TIMEOUT = 30.0  # dramatiq --worker-shutdown-timeout 20 s
MAX_FAILURES = 5
FAILURE_WINDOW = 60.0
ENV_DETACHED = "APPLIANCE_SUPERVISOR_DETACHED"
# Non-secret settings handed to children explicitly, so code-level overrides (tests) reach them too.
_CHILD_SETTINGS = (
    "environment",
    "host",
    "api_port",
    "pg_host",
    "pg_port",
    "pg_database",
    "pg_superuser",
    "pg_owner_user",
    "pg_app_user",
    "redis_host",
    "redis_port",
    "redis_db",
    "service_user",
    "log_level",
    "models_dir",
    "master_key_file",
    "s3_endpoint",
    "llm_port",
    "llm_url",
    "chat_model",
    "embedding_model",
)


def pid_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.pid"


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "state.json"


def bootstrap_key_file(settings: Settings) -> Path:
    return settings.run_dir / "bootstrap.key"


def venv_bin(name: str) -> Path:
    """An executable of the same environment as this interpreter (not resolved: a venv's python is a link)."""
    return Path(sys.executable).parent / name


# Lock ----------------------------------------------------------------------------------------------
def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def running_supervisor(settings: Settings) -> int | None:
    """The pid holding this home's supervisor lock, or None when no supervisor runs."""
    path = pid_file(settings)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class _Lock:
    def __init__(self, settings: Settings, mode: str) -> None:
        self.path = pid_file(settings)
        # os.open fds are not inheritable: children never hold the lock.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            pid = _read_pid(self.path)
            raise RuntimeFailure(f"already running, pid {pid}" if pid else "already running") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n{mode}\n".encode())

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1


# Children ------------------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    port: int | None
    started_at: float = field(default_factory=time.time)
    create_time: float | None = None
    restarts: int = 0

    def __post_init__(self) -> None:
        self.create_time = create_time_of(self.proc.pid)


def _component_port(settings: Settings, name: str) -> int | None:
    ports = {
        "postgres": settings.pg_port,
        "redis": settings.redis_port,
        "llm": settings.llm_port,
        "api": settings.api_port,
    }
    return ports.get(name)


def _log_path(settings: Settings, name: str) -> Path:
    return settings.log_dir / {"api": "api.log", "workers": "worker.log"}.get(name, f"{name}.log")


def stop_component(name: str, pid: int, proc: subprocess.Popen[bytes] | None = None) -> float:
    if name == "postgres":
        return pg.stop_postgres(pid, proc)
    if name == "redis":
        return rd.stop_redis(pid, proc)
    timeout = {"api": API_STOP_TIMEOUT, "llm": LLM_STOP_TIMEOUT}.get(name, WORKERS_STOP_TIMEOUT)
    return stop_process(name, pid, signal.SIGTERM, timeout, proc=proc)


def stale_processes(settings: Settings, exclude: Iterable[int] = ()) -> dict[str, list[int]]:
    """Servers of this home whose supervisor is gone: by environment markers, the state file, pid files."""
    found: dict[str, list[int]] = {
        name: [p.pid for p in procs] for name, procs in find_stale_children(settings.home, exclude).items()
    }
    skip = set(exclude)
    state = read_json(state_file(settings)) or {}
    if state.get("supervisor_pid") != running_supervisor(settings):  # written by a supervisor now gone
        for name, rec in (state.get("components") or {}).items():
            pid = rec.get("pid") if isinstance(rec, dict) else None
            if pid and pid not in skip and process_alive(pid, rec.get("create_time")):
                found.setdefault(name, [])
                if pid not in found[name]:
                    found[name].append(pid)
    for name, pid in (("postgres", pg.postmaster_pid(settings)), ("redis", rd.running_pid(settings))):
        if pid and pid not in skip and pid not in found.get(name, []):
            found.setdefault(name, []).append(pid)
    return found


def stop_stale(settings: Settings, exclude: Iterable[int] = ()) -> list[str]:
    """Stop the servers a killed supervisor left running, in reverse order."""
    stale = stale_processes(settings, exclude)
    stopped: list[str] = []
    order = [c for c in reversed(COMPONENTS) if c in stale] + [c for c in stale if c not in COMPONENTS]
    for name in order:
        for pid in stale[name]:
            log.warning(
                "%s: a stale process (pid %d) from an earlier run is still running; stopping it",
                name,
                pid,
            )
            took = stop_component(name, pid)
            stopped.append(f"{name} (pid {pid}, {took:.1f} s)")
    return stopped


class Supervisor:
    """Starts the components of one data dir in order, watches them, and stops them in reverse."""

    def __init__(
        self,
        settings: Settings,
        components: Iterable[str] = COMPONENTS,
        *,
        mode: str = "supervisor",
        on_bootstrap_key: Callable[[str], None] | None = None,
    ) -> None:
        wanted = set(components)
        if settings.llm_url:  # an external LLM server: nothing to start here
            wanted.discard("llm")
        self.components = tuple(c for c in COMPONENTS if c in wanted)
        self._models_verified = False
        self.settings = settings
        self.mode = mode
        self.on_bootstrap_key = on_bootstrap_key
        self.ident: ServiceIdentity | None = None
        self.children: dict[str, Child] = {}
        self.timings: dict[str, float] = {}
        self.exit_code = 0
        self._lock: _Lock | None = None
        self._pg_install: pg.PgInstall | None = None
        self._stop = threading.Event()
        self._stopping = False
        self.signalled: int | None = None  # the signal that asked us to stop, if any
        self._failures: dict[str, deque[float]] = {c: deque() for c in self.components}

    # Environment of the children ---------------------------------------------------------------
    def child_env(self, component: str) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if k != ENV_DETACHED}
        for name in _CHILD_SETTINGS:
            if name in s.model_fields_set and getattr(s, name) is not None:
                env[f"APPLIANCE_{name.upper()}"] = str(getattr(s, name))
        env[ENV_HOME] = str(s.home)
        env[ENV_COMPONENT] = component
        env["PROMETHEUS_MULTIPROC_DIR"] = str(s.run_dir / "prometheus")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env.setdefault("LANG", "C.UTF-8")
        # llama.cpp's CPU build runs its threads under OpenMP; libgomp's default keeps an idle thread
        # spinning for 300,000 iterations after every passage, burning a core the pipeline's other
        # work (extraction, chunking, Postgres) needs. Measured on 2 cores: raw embedding speed the
        # same within noise (4,062 vs 4,180 tokens/s), pipeline +7.5% tokens/s (bench/ingest.py).
        env.setdefault("GOMP_SPINCOUNT", "1000")
        if self.ident is not None and self.ident.drop:
            env.update(HOME=str(s.home), USER=self.ident.user, LOGNAME=self.ident.user)
        return env

    # Start -------------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        """Prepare the data dir, take the lock, clear stale processes, start every component in order."""
        t0 = time.monotonic()
        settings, ident = prepare(self.settings)
        self.settings, self.ident = settings, ident
        if running := running_supervisor(settings):
            raise RuntimeFailure(f"already running, pid {running}")
        self._lock = _Lock(settings, self.mode)
        try:
            stop_stale(settings)
            if {"llm", "api", "workers"} & set(self.components):
                check_reachable(ident, Path(sys.executable).parent, "the Python environment")
                check_reachable(ident, PROJECT_ROOT / "appliance", "the application code")
                prom = settings.run_dir / "prometheus"
                shutil.rmtree(prom, ignore_errors=True)
                make_private_dir(prom, ident)
            for name in self.components:
                if self._stop.is_set():
                    raise RuntimeFailure("start interrupted")
                if name in ("llm", "api") and not self._models_verified:
                    self._verify_models()
                if name == "api":
                    self._migrate_and_bootstrap()
                self._start_component(name)
            self.timings["start"] = time.monotonic() - t0
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def _start_component(self, name: str) -> Child:
        assert self.ident is not None
        t0 = time.monotonic()
        env = self.child_env(name)
        if name == "postgres":
            if self._pg_install is None:
                initialized = pg.is_initialized(self.settings)
                self._pg_install = pg.prepare(self.settings, self.ident, env)
                if not initialized:
                    self.timings["initdb"] = time.monotonic() - t0
            proc = pg.start(self.settings, self.ident, self._pg_install, env, self._should_stop)
            try:
                pg.bootstrap_database(self.settings)
            except BaseException:
                pg.stop_postgres(proc.pid, proc)
                raise
        elif name == "redis":
            proc = rd.start(self.settings, self.ident, env, self._should_stop)
        elif name == "llm":
            proc = self._start_llm(env)
        elif name == "api":
            proc = self._start_api(env)
        elif name == "workers":
            proc = self._start_workers(env)
        else:  # pragma: no cover
            raise ValueError(name)
        child = Child(name, proc, _component_port(self.settings, name))
        self.children[name] = child
        self.timings[name] = time.monotonic() - t0
        self._write_state()
        return child

    def _verify_models(self) -> None:
        """Refuse to serve with a model file that is missing or does not match its sha256."""
        from appliance.inference.manifest import ManifestError, load_manifest, verify_model

        t0 = time.monotonic()
        try:
            specs = load_manifest(self.settings.models_dir)
        except (ManifestError, OSError) as exc:
            raise RuntimeFailure(f"models: {_one_line(exc)}") from exc
        for spec in specs:
            check = verify_model(spec, self.settings.models_dir, full=True)
            if not check.ok:
                raise RuntimeFailure(
                    f"models: {spec.name} ({check.path}): {check.reason}; run ./install.sh to rebuild it"
                )
        self.timings["models"] = time.monotonic() - t0
        self._models_verified = True
        log.info("models: %d verified by sha256 (%.2f s)", len(specs), self.timings["models"])

    def _migrate_and_bootstrap(self) -> None:
        t0 = time.monotonic()
        try:
            from appliance.db import migrations

            migrations.upgrade_head(self.settings)
        except Exception as exc:
            raise RuntimeFailure(f"migrations: upgrade to head failed: {_one_line(exc)}") from exc
        self.timings["migrations"] = time.monotonic() - t0
        log.info("migrations: database at head (%.2f s)", self.timings["migrations"])
        try:
            from appliance import bootstrap

            key = bootstrap.ensure_bootstrap(self.settings)
        except Exception as exc:
            raise RuntimeFailure(
                f"bootstrap: creating the system-admin key failed: {_one_line(exc)}"
            ) from exc
        if key and self.on_bootstrap_key is not None:
            self.on_bootstrap_key(key)

    def _start_llm(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.ident is not None
        s = self.settings
        check_port_free("llm", "127.0.0.1", s.llm_port)
        log_path = _log_path(s, "llm")
        offset = file_size(log_path)
        argv = [str(venv_bin("python")), "-m", "appliance.inference.llm_server"]
        proc = spawn("llm", argv, ident=self.ident, log_path=log_path, env=env, cwd=s.home)
        try:
            took = wait_until(
                "llm",
                lambda: _http_status(f"{s.llm_base_url}/v1/models") == 200,
                timeout=LLM_READY_TIMEOUT,
                proc=proc,
                log_path=log_path,
                log_offset=offset,
                interval=0.1,
                what="serving the chat model",
                should_stop=self._should_stop,
            )
        except BaseException:
            stop_component("llm", proc.pid, proc)
            raise
        log.info("llm: chat model served on %s (pid %d, %.2f s)", s.llm_base_url, proc.pid, took)
        return proc

    def _start_api(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.ident is not None
        s = self.settings
        check_port_free("api", s.host, s.api_port)
        log_path = _log_path(s, "api")
        offset = file_size(log_path)
        bind = f"[{s.host}]:{s.api_port}" if ":" in s.host else f"{s.host}:{s.api_port}"
        argv = [
            str(venv_bin("gunicorn")),
            "appliance.api:create_app()",
            "-k",
            # uvicorn with bounded headers and connections (appliance/runtime/uvicorn.py)
            "appliance.runtime.uvicorn.ApplianceWorker",
            "-w",
            str(s.api_workers),
            "-b",
            bind,
            "--graceful-timeout",
            "10",
            # Longer than clients' idle pools (httpx keeps 5 s), so a reused connection is never closed
            # by the server in the instant the client sends on it.
            "--keep-alive",
            "75",
            "--error-logfile",
            "-",
        ]
        proc = spawn("api", argv, ident=self.ident, log_path=log_path, env=env, cwd=s.home)
        try:
            took = wait_until(
                "api",
                lambda: _http_status(f"{s.api_url}/healthz") == 200,
                timeout=API_READY_TIMEOUT,
                proc=proc,
                log_path=log_path,
                log_offset=offset,
                interval=0.1,
                what="answering /healthz",
                should_stop=self._should_stop,
            )
        except BaseException:
            stop_component("api", proc.pid, proc)
            raise
        log.info("api: listening on %s (pid %d, %.2f s)", s.api_url, proc.pid, took)
        return proc

    def _start_workers(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.ident is not None
        s = self.settings
        log_path = _log_path(s, "workers")
        offset = file_size(log_path)
        argv = [
            str(venv_bin("dramatiq")),
            "appliance.workers",
            "-p",
            str(s.worker_processes),
            "-t",
            str(s.worker_threads),
            "--worker-shutdown-timeout",
            "20000",
        ]
        proc = spawn("workers", argv, ident=self.ident, log_path=log_path, env=env, cwd=s.home)
        wanted = max(1, s.worker_processes)

        def ready() -> bool:
            return _count_since(log_path, offset, "ready for action") >= wanted

        try:
            took = wait_until(
                "workers",
                ready,
                timeout=WORKERS_READY_TIMEOUT,
                proc=proc,
                log_path=log_path,
                log_offset=offset,
                interval=0.1,
                should_stop=self._should_stop,
            )
            log.info("workers: %d process(es) consuming (pid %d, %.2f s)", wanted, proc.pid, took)
        except RuntimeFailure as exc:
            if proc.poll() is not None or self._stop.is_set():
                stop_component("workers", proc.pid, proc)
                raise
            log.warning(
                "workers: running (pid %d) but no 'ready' line in %s yet: %s", proc.pid, log_path, exc
            )
        except BaseException:
            stop_component("workers", proc.pid, proc)
            raise
        return proc

    # Run (foreground) --------------------------------------------------------------------------
    def run(self, on_ready: Callable[[Supervisor], None] | None = None) -> int:
        """Start, call `on_ready`, watch and restart children until a signal; stop. Returns the exit code."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in handled}

        def request_stop(signum: int, _frame: Any) -> None:
            if not self._stop.is_set():
                log.info("received %s; stopping", signal.Signals(signum).name)
            self.signalled = self.signalled or signum
            self._stop.set()

        for sig in handled:
            signal.signal(sig, request_stop)
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            self._watch()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for name in self.components:
                child = self.children.get(name)
                if child is not None and child.proc.poll() is not None:
                    self._recover(child)
                    if self._stop.is_set():
                        return

    def _recover(self, child: Child) -> None:
        """Restart a child that died, with backoff; give up after MAX_FAILURES within FAILURE_WINDOW."""
        name = child.name
        log_path = _log_path(self.settings, name)
        del self.children[name]
        # Whatever the dead leader left in its process group (backends, worker processes) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        message = exit_message(name, child.proc.returncode, None).replace(" during start", "")
        tail = log_tail(log_path, 5)
        log.warning("%s unexpectedly; restarting it. Last lines of %s:\n%s", message, log_path, tail)
        failures = self._failures[name]
        while not self._stop.is_set():
            now = time.monotonic()
            failures.append(now)
            while failures and now - failures[0] > FAILURE_WINDOW:
                failures.popleft()
            if len(failures) >= MAX_FAILURES:
                log.error(
                    "%s: giving up after %d failures within %.0f s; stopping everything",
                    name,
                    len(failures),
                    FAILURE_WINDOW,
                )
                self.exit_code = 1
                self._stop.set()
                return
            delay = min(2.0 ** (len(failures) - 1), 30.0)
            if self._stop.wait(delay):
                return
            try:
                new = self._start_component(name)
                new.restarts = child.restarts + 1
                self._write_state()
                log.info("%s: restarted (restart #%d)", name, new.restarts)
                return
            except RuntimeFailure as exc:
                log.warning("%s: restart failed: %s", name, exc)

    # Stop --------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Stop the children in reverse order and wait for them; release the lock. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        t0 = time.monotonic()
        try:
            for name in reversed(self.components):
                child = self.children.get(name)
                if child is None:
                    continue
                took = stop_component(name, child.proc.pid, child.proc)
                log.info("%s: stopped (%.2f s)", name, took)
                del self.children[name]
                self._write_state()
        finally:
            self.timings["stop"] = time.monotonic() - t0
            if self._lock is not None:
                with contextlib.suppress(OSError):
                    state_file(self.settings).unlink()
                self._lock.release()
                self._lock = None

    # State -------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        if self.ident is None or self._lock is None:
            return
        s = self.settings
        state = {
            "supervisor_pid": os.getpid(),
            "mode": self.mode,
            "home": str(s.home),
            "api_url": s.api_url,
            "components": {
                name: {
                    "pid": c.proc.pid,
                    "create_time": c.create_time,
                    "port": c.port,
                    "started_at": c.started_at,
                    "restarts": c.restarts,
                }
                for name, c in self.children.items()
            },
        }
        with contextlib.suppress(OSError):
            write_json(state_file(s), state, self.ident)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def _count_since(path: Path, offset: int, needle: str) -> int:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace").count(needle)
    except OSError:
        return 0


# Status and down (for the CLI) ---------------------------------------------------------------------
def component_status(settings: Settings) -> dict[str, Any]:
    """`{"api_url", "supervisor": {...}, "components": {name: {"state", "pid", "port"}}}`."""
    state = read_json(state_file(settings)) or {}
    recorded: dict[str, Any] = state.get("components") or {}
    sup_pid = running_supervisor(settings)
    stale: dict[str, list[int]] | None = None

    def pid_of(name: str) -> int | None:
        nonlocal stale
        rec = recorded.get(name) or {}
        pid = rec.get("pid")
        if sup_pid and pid and process_alive(pid, rec.get("create_time")):
            return int(pid)
        if stale is None:
            try:
                stale = stale_processes(settings)
            except Exception:  # noqa: BLE001
                stale = {}
        found = stale.get(name) or []
        return found[0] if found else None

    checks: dict[str, Callable[[], bool]] = {
        "postgres": lambda: pg.postmaster_ready(settings) and port_accepts("127.0.0.1", settings.pg_port),
        "redis": lambda: rd.ping(settings),
        "llm": lambda: _http_status(f"{settings.llm_base_url}/v1/models") == 200,
        "api": lambda: _http_status(f"{settings.api_url}/readyz") == 200,
        "workers": lambda: True,
    }
    components: dict[str, Any] = {}
    for name in COMPONENTS:
        if name == "llm" and settings.llm_url:  # external server: report whether it answers
            st = "external" if checks["llm"]() else "unhealthy"
            components[name] = {"state": st, "pid": None, "port": None, "url": settings.llm_url}
            continue
        pid = pid_of(name)
        if pid is None:
            st = "stopped"
        else:
            try:
                st = "running" if checks[name]() else "unhealthy"
            except Exception:  # noqa: BLE001
                st = "unhealthy"
        components[name] = {"state": st, "pid": pid, "port": _component_port(settings, name)}
    return {
        "api_url": settings.api_url,
        "home": str(settings.home),
        "supervisor": {"pid": sup_pid, "mode": state.get("mode") if sup_pid else None},
        "components": components,
    }


def stop_running(settings: Settings, timeout: float = 90.0) -> str:
    """Stop the supervisor of this home (SIGTERM, then SIGKILL after `timeout`) or its stale children."""
    pid = running_supervisor(settings)
    if pid:
        mode = (read_json(state_file(settings)) or {}).get("mode")
        if mode == "datastores" or _read_mode(settings) == "datastores":
            raise RuntimeFailure(f"the datastores of {settings.home} are held by a test session, pid {pid}")
        if pid < 0:
            raise RuntimeFailure(f"a supervisor holds {pid_file(settings)} but its pid is unreadable")
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while running_supervisor(settings) and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
        if running_supervisor(settings):
            log.warning("the supervisor (pid %d) did not stop in %.0f s; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while process_alive(pid) and time.monotonic() - t0 < timeout + 10:
                time.sleep(0.05)
            extra = stop_stale(settings)
            return f"killed the supervisor (pid {pid}); stopped {', '.join(extra) or 'no leftover process'}"
        return f"stopped (supervisor pid {pid}, {time.monotonic() - t0:.1f} s)"
    stopped = stop_stale(settings)
    if stopped:
        return f"no supervisor was running; stopped stale {', '.join(stopped)}"
    return "not running"


def _read_mode(settings: Settings) -> str | None:
    try:
        parts = pid_file(settings).read_text().split()
    except OSError:
        return None
    return parts[1] if len(parts) > 1 else None


# Datastores only (the test suite) ------------------------------------------------------------------
class Datastores:
    """Postgres and Redis of one data dir, started through the same code as `appliance up`."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self.settings: Settings = supervisor.settings  # complete: holds the generated secrets
        self.timings = supervisor.timings
        atexit.register(self.stop)

    @property
    def postgres_pid(self) -> int | None:
        child = self._supervisor.children.get("postgres")
        return child.proc.pid if child else None

    @property
    def redis_pid(self) -> int | None:
        child = self._supervisor.children.get("redis")
        return child.proc.pid if child else None

    def stop(self) -> None:
        self._supervisor.stop()
        atexit.unregister(self.stop)

    def __enter__(self) -> Datastores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_datastores(settings: Settings) -> Datastores:
    """Start Postgres (bootstrapped: roles, database, extensions) and Redis; `.stop()` stops both."""
    sup = Supervisor(settings, DATASTORES, mode="datastores")
    sup.start()
    return Datastores(sup)
