"""Run a parser on a hostile file in a separate, resource-limited process.

Parent side (`run_kreuzberg`, called in the worker): a child in a new session (its own process group),
with an empty environment apart from what it needs (no database password, no master key), in a
throw-away working directory that is also its HOME and TMPDIR. The child is forked from the worker's
zygote (appliance/extract/zygote.py: a process started the same way that has kreuzberg loaded, which
saves a Python start and an import, ~60 ms of CPU, a document), or, if the zygote cannot be used,
started as `python -m appliance.extract.sandbox`. The
request goes in on stdin as JSON; the result comes back as JSON on stdout, read with a size cap while
a wall-clock deadline runs (`timeout_s`; a child that starts OCR says so first, and the deadline moves by
`ocr_page_timeout_s` per page). On the deadline, on an oversized result, or on any error in the parent,
the whole process group gets SIGKILL; the child is always reaped and the directory removed.

Child side (`main`): sets RLIMIT_AS (memory), RLIMIT_CPU and RLIMIT_CORE=0, asks the kernel to kill it if
the parent dies (PR_SET_PDEATHSIG), moves fd 1 aside so stray native output cannot corrupt the result,
then extracts (importing kreuzberg first unless the zygote had).

Outcomes: a JSON error from the child keeps its code; the deadline → "timeout"; SIGXCPU (CPU limit) →
"timeout"; MemoryError, or a native abort that reports a failed allocation → "memory_limit"; any other
signal or an unreadable result → "extractor_crashed"; a result over the cap → "too_large".
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import appliance
from appliance.extract.base import (
    ERROR_CODES,
    FORMATS,
    ExtractionError,
    FormatSpec,
    Limits,
    RawResult,
    has_memory_marker,
    ocr_available,
)
from appliance.extract.zygote import ZYGOTE, ZygoteChild, ZygoteUnavailable
from appliance.logs import get_logger

log = get_logger("appliance.extract.sandbox")

MAX_REQUEST_BYTES = 1 << 20
STDERR_TAIL_BYTES = 16 * 1024
_MARKER_OVERLAP = 64
SANDBOX_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads kreuzberg may use in the child. RLIMIT_CPU is `timeout_s × SANDBOX_THREADS` (+1 s), raised by
the OCR budget when OCR starts: the CPU the child could burn in its wall-clock budget. It is the
backstop should the parent be unable to kill it; PR_SET_PDEATHSIG covers a parent that died."""

_PR_SET_PDEATHSIG = 1
_HOOKS = ("sleep", "allocate", "segfault", "spin", "flood")
_result_fd = 1  # in the child: the descriptor that carries the result (fd 1 is moved to stderr)


def output_cap(limits: Limits) -> int:
    """Largest result the parent reads: JSON of max_chars characters (≤ 6 bytes each, escapes
    included), per-page overhead and metadata."""
    return 6 * limits.max_chars + 64 * limits.max_pages + (1 << 20)


# ---------------------------------------- parent


def run_kreuzberg(
    path: Path,
    spec: FormatSpec,
    *,
    limits: Limits,
    ocr: bool | None,
    _test_hook: str | None = None,
) -> RawResult:
    """Extract `path` with kreuzberg in a sandbox child. `_test_hook` makes the child misbehave on
    purpose ("sleep[:pidfile]", "allocate", "segfault", "spin", "flood"); tests only."""
    request = {
        "path": str(path),
        "mime": spec.mime,
        "limits": asdict(limits),
        "ocr": {None: "auto", True: "on", False: "off"}[ocr],
        "ocr_available": ocr_available(),
        "hook": _test_hook,  # run_child adds "parent_pid": the child's parent, the zygote or this process
    }
    reply = run_child(request, limits)
    return RawResult(
        pages=[(None if n is None else int(n), str(t)) for n, t in reply["pages"]],
        metadata={str(key): str(value) for key, value in reply.get("metadata", {}).items()},
        ocr_used=bool(reply.get("ocr_used")),
        backend=str(reply.get("backend", "kreuzberg")),
    )


def _child_env(workdir: str) -> dict[str, str]:
    package_root = str(Path(appliance.__file__).resolve().parent.parent)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "XDG_CACHE_HOME": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": package_root,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena: keep RLIMIT_AS honest
        "OMP_THREAD_LIMIT": "1",  # tesseract's OpenMP threads fight over cores for no gain
    }
    if os.environ.get("TESSDATA_PREFIX"):
        env["TESSDATA_PREFIX"] = os.environ["TESSDATA_PREFIX"]
    return env


def _use_zygote() -> bool:
    """Fork children from the worker's zygote (appliance.extract.zygote) rather than start each one
    (setting `extract_zygote`); the zygote unavailable, a child is started directly."""
    from appliance.settings import get_settings

    return get_settings().extract_zygote


Child = subprocess.Popen[bytes] | ZygoteChild


def _start_child(workdir: str) -> tuple[Child, int]:
    """A sandbox child in `workdir` with its stdio on pipes, and the pid of its parent."""
    if _use_zygote():
        try:
            child = ZYGOTE.spawn(workdir)
            return child, child.parent_pid
        except ZygoteUnavailable as exc:
            log.warning("extraction zygote unavailable, starting the sandbox directly", error=str(exc))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.extract.sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_child_env(workdir),
            start_new_session=True,  # own process group: one killpg reaches grandchildren too
            close_fds=True,
        )
    except OSError as exc:
        raise ExtractionError("extractor_crashed", f"could not start the sandbox: {exc}") from None
    return proc, os.getpid()


def run_child(request: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Start the child, feed it `request`, return its successful reply or raise ExtractionError."""
    workdir = tempfile.mkdtemp(prefix="appliance-extract-")
    deadline = time.monotonic() + limits.timeout_s
    proc: Child | None = None
    try:
        proc, parent_pid = _start_child(workdir)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a child that died at once is diagnosed below
            proc.stdin.write(json.dumps({**request, "parent_pid": parent_pid}).encode())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        out, err, outcome, deadline = _collect(proc, deadline, output_cap(limits), limits)
        if outcome == "eof":
            _wait_exited(proc, deadline)  # exited (not yet reaped) or deadline
        _kill_group(proc)
        returncode = proc.wait()
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_group(proc)
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if isinstance(proc, ZygoteChild):
                proc.close()  # the zygote reaps it now
        shutil.rmtree(workdir, ignore_errors=True)
    return _interpret(outcome, returncode, out, err, limits)


def _collect(proc: Child, deadline: float, cap: int, limits: Limits) -> tuple[bytes, bytes, str, float]:
    """Read stdout (capped) and the tail of stderr until both close, the deadline or the cap.

    stdout carries newline-terminated notices, then the result (one JSON document without raw
    newlines). The only notice is `{"ocr_pages": n}`: OCR is starting, the deadline moves by
    n × ocr_page_timeout_s. stderr is scanned for allocation failures as it streams (such a line may
    scroll out of the kept tail), and a hit is kept at the head of the returned stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    memory_line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        open_streams = 2
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), "timeout", deadline
            events = sel.select(timeout=min(remaining, 0.1))
            if not events and _exited(proc):
                # The child is gone but something (a grandchild) still holds a pipe: take what is
                # buffered and stop, rather than wait for the deadline.
                events = sel.select(timeout=0)
                if not events:
                    break
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "out":
                    out += chunk
                    while (newline := out.find(b"\n")) >= 0:
                        deadline += _notice_extension(bytes(out[:newline]), limits)
                        del out[: newline + 1]
                    if len(out) > cap:
                        return b"", bytes(err), "overflow", deadline
                else:
                    if not memory_line and has_memory_marker(bytes(err[-_MARKER_OVERLAP:]) + chunk):
                        memory_line = b"out of memory detected: " + chunk[-200:] + b"\n"
                    err += chunk
                    del err[:-STDERR_TAIL_BYTES]
    return bytes(out), memory_line + bytes(err), "eof", deadline


def _notice_extension(line: bytes, limits: Limits) -> float:
    try:
        notice = json.loads(line)
        pages = int(notice["ocr_pages"])
    except (ValueError, KeyError, TypeError):
        return 0.0
    return min(max(pages, 0), limits.max_pages) * limits.ocr_page_timeout_s


def _exited(proc: Child) -> bool:
    """Has the child exited? Asked without reaping it: while it is an unreaped zombie its pid (the
    process group id) cannot be reused, so a later killpg reaches only our processes (the zygote keeps
    its children unreaped the same way until the worker is done with them)."""
    if isinstance(proc, ZygoteChild):
        return proc.exited()
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exited(proc: Child, deadline: float) -> None:
    while time.monotonic() < deadline and not _exited(proc):
        time.sleep(0.002)


def _kill_group(proc: Child) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _interpret(outcome: str, returncode: int, out: bytes, err: bytes, limits: Limits) -> dict[str, Any]:
    if outcome == "timeout":
        raise ExtractionError("timeout", f"extraction took over {limits.timeout_s:g} s")
    if outcome == "overflow":
        raise ExtractionError("too_large", f"extractor output over {output_cap(limits)} bytes")
    reply = _parse_reply(out)
    if reply is not None:
        if reply.get("ok"):
            return reply
        code = str(reply.get("code"))
        message = str(reply.get("message"))
        if code not in ERROR_CODES:
            raise ExtractionError("extractor_crashed", f"{code}: {message}")
        raise ExtractionError(code, message)
    stderr_text = err.decode("utf-8", "replace")
    last_line = next((line for line in reversed(stderr_text.splitlines()) if line.strip()), "")
    if returncode < 0 and -returncode == signal.SIGXCPU:
        raise ExtractionError("timeout", "extractor hit its CPU time limit")
    if has_memory_marker(err):
        raise ExtractionError("memory_limit", f"extractor ran out of memory ({limits.memory_mb} MiB limit)")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        raise ExtractionError("extractor_crashed", f"extractor died from {name}: {last_line[:200]}")
    raise ExtractionError(
        "extractor_crashed", f"extractor exited {returncode} without result: {last_line[:200]}"
    )


def _parse_reply(out: bytes) -> dict[str, Any] | None:
    if not out:
        return None
    try:
        reply = json.loads(out)
    except (ValueError, RecursionError):
        return None
    return reply if isinstance(reply, dict) else None


# ---------------------------------------- child


def _cpu_seconds(wall_seconds: float) -> int:
    return math.ceil(wall_seconds * SANDBOX_THREADS) + 1


def _apply_limits(limits: Limits) -> None:
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # soft: SIGXCPU; hard: SIGKILL, with room for the OCR extension (see _before_ocr)
    ocr_room = _cpu_seconds(limits.max_pages * limits.ocr_page_timeout_s)
    cpu = _cpu_seconds(limits.timeout_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + ocr_room + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _before_ocr(limits: Limits, pages: int) -> None:
    """OCR is about to start on `pages` pages: tell the parent (it moves the deadline) and raise the
    CPU soft limit by the same budget."""
    extra = min(max(pages, 0), limits.max_pages) * limits.ocr_page_timeout_s
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (min(hard, soft + _cpu_seconds(extra)), hard))
    _write_all(_result_fd, json.dumps({"ocr_pages": pages}).encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run_hook(hook: str, limits: Limits) -> None:
    name, _, arg = hook.partition(":")
    if name == "sleep":  # a stuck parser with a grandchild: both must die on the deadline
        grandchild = subprocess.Popen(["sleep", "600"])
        if arg:
            Path(arg).write_text(f"{os.getpid()} {grandchild.pid}\n")
        time.sleep(600)
    elif name == "allocate":  # grows until RLIMIT_AS refuses
        hoard = []
        while True:
            hoard.append(bytearray(64 * 1024 * 1024))
    elif name == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif name == "spin":  # burns CPU until RLIMIT_CPU (lowered to 1 s here) sends SIGXCPU
        resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
        while True:
            pass
    elif name == "flood":  # a result larger than the parent's cap
        os.write(_result_fd, b"x" * (output_cap(limits) + (1 << 20)))
        time.sleep(600)
    raise ValueError(f"unknown test hook {hook!r} (known: {', '.join(_HOOKS)})")


def _extract(request: dict[str, Any], limits: Limits) -> dict[str, Any]:
    if request.get("hook"):
        _run_hook(str(request["hook"]), limits)
    from appliance.extract import kreuzberg_backend  # loaded already in a child of the zygote

    raw = kreuzberg_backend.extract_document(
        Path(request["path"]),
        FORMATS[request["mime"]],
        limits=limits,
        ocr_mode=str(request["ocr"]),
        ocr_available=bool(request["ocr_available"]),
        threads=SANDBOX_THREADS,
        before_ocr=lambda pages: _before_ocr(limits, pages),
    )
    return {
        "ok": True,
        "pages": [[number, text.replace("\x00", "")] for number, text in raw.pages],
        "metadata": raw.metadata,
        "ocr_used": raw.ocr_used,
        "backend": raw.backend,
    }


def main() -> None:
    global _result_fd
    request = json.loads(sys.stdin.buffer.read(MAX_REQUEST_BYTES))
    limits = Limits(**request["limits"])
    _apply_limits(limits)
    _die_with_parent(int(request["parent_pid"]))
    result_fd = _result_fd = os.dup(1)
    os.dup2(2, 1)  # print() and native code now write to stderr; fd `result_fd` carries only the result
    sys.stdout = sys.stderr
    try:
        try:
            reply = _extract(request, limits)
        except ExtractionError as exc:
            reply = {"ok": False, "code": exc.code, "message": exc.message}
        except MemoryError:
            reply = {"ok": False, "code": "memory_limit", "message": f"over {limits.memory_mb} MiB"}
        except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException is a BaseException
            text = f"{type(exc).__name__}: {exc}"
            code = "memory_limit" if has_memory_marker(text.encode()) else "extractor_crashed"
            reply = {"ok": False, "code": code, "message": text}
        data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        del reply
    except MemoryError:
        data = json.dumps(
            {"ok": False, "code": "memory_limit", "message": "result too large for memory"}
        ).encode()
    _write_all(result_fd, data)
    os.close(result_fd)
    sys.stderr.flush()
    os._exit(0)  # skip interpreter and native teardown (tesseract prints leak warnings, nothing more)


if __name__ == "__main__":
    main()
