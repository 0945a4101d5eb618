"""A fork server for the extraction sandbox: sandbox children forked from a process that has loaded
kreuzberg already, instead of each starting Python and importing it (about 60 ms of CPU a document
here, most of a small document's extraction).

Worker side (`Zygote.spawn`, used by `sandbox.run_child`): one zygote per worker process, started on
first use exactly like a sandbox child (`python -m appliance.extract.zygote`, the same empty environment,
its own session and a throw-away directory), and started again if it has died. For each document the
worker connects to the zygote's Unix socket (in a 0700 directory) and passes the child's stdin, stdout
and stderr pipes (SCM_RIGHTS) and its working directory; the reply is the child's pid, and later its
exit status.

Zygote side (`serve`): watches its stdin, a pipe the worker never writes to, and when it reads EOF (the
worker process is gone, however it ended) or gets SIGTERM, kills every child's process group and exits;
imports kreuzberg, then forks one child per connection. The child starts a new session (own process
group, so the worker's killpg reaches it and its grandchildren) before the zygote answers with its pid,
moves the pipes onto fds 0-2, enters its working directory and runs `sandbox.main`: the same limits and
the same protocol as a child the worker starts itself; it dies with the zygote (its own PDEATHSIG). The
zygote reports a child's exit without reaping it (waitid WNOWAIT: its pid, the process group id, cannot
be reused while the worker may still killpg it) and reaps it when the worker closes the connection,
after SIGKILL to its group in case the worker did not send one. The zygote never reads a document.

Why not multiprocessing's forkserver: it starts its server with the caller's environment (the worker's
secrets would be in every child's /proc/self/environ), passes pickled callables, and reaps children
itself; the sandbox needs an empty environment, its stdio on the worker's pipes, a new session per
child and the exit status without reaping.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

START_TIMEOUT_S = 30.0
"""How long the worker waits for a new zygote's socket (it imports kreuzberg first)."""
REPLY_TIMEOUT_S = 10.0
"""How long the worker waits for a child's pid."""
_MAX_HEADER = 64 * 1024


class ZygoteUnavailable(Exception):
    """The zygote could not start or answer: the caller starts the child itself."""


# ---------------------------------------- worker side


class ZygoteChild:
    """A sandbox child forked by the zygote, with what run_child uses of subprocess.Popen: `pid`,
    `stdin`, `stdout`, `stderr`, `returncode`, `wait()`; `exited()` asks without blocking; `close()`
    lets the zygote reap it (after the caller's killpg). `parent_pid`: the zygote's."""

    def __init__(self, pid: int, parent_pid: int, conn: socket.socket, fds: list[int], buffered: bytes):
        self.pid = pid
        self.parent_pid = parent_pid
        self.stdin: IO[bytes] | None = open(fds[0], "wb", buffering=0)  # noqa: SIM115 - run_child closes
        self.stdout: IO[bytes] | None = open(fds[1], "rb", buffering=0)  # noqa: SIM115
        self.stderr: IO[bytes] | None = open(fds[2], "rb", buffering=0)  # noqa: SIM115
        self.returncode: int | None = None
        self._conn = conn
        self._buffer = buffered  # what came after the pid line

    def _read_status(self, timeout: float | None) -> bool:
        """Read the zygote's status line if it comes within `timeout` (None: wait for it)."""
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = self._conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:  # the zygote died: its children die with it (PR_SET_PDEATHSIG)
            self.returncode = -signal.SIGKILL
            return True
        self._buffer += chunk
        if b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            self.returncode = int(json.loads(line)["returncode"])
            return True
        return False

    def exited(self) -> bool:
        return self._read_status(0)

    def wait(self) -> int:
        """The exit status (run_child waits only after its killpg: it comes at once)."""
        while not self._read_status(None):
            pass
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()


class Zygote:
    """The worker process's zygote: started on first use, again after it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._owner_pid = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _socket_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "zygote.sock")

    def _ensure(self) -> str:
        """The socket of a running zygote, starting one if needed."""
        with self._lock:
            if self._owner_pid != os.getpid():  # forked worker process: that zygote is the parent's
                self._proc, self._dir, self._owner_pid = None, None, os.getpid()
            if self._proc is not None and self._proc.poll() is None:
                return self._socket_path()
            self._stop_locked()
            from appliance.extract.sandbox import _child_env

            self._dir = tempfile.mkdtemp(prefix="appliance-zygote-")  # mode 0700
            path = self._socket_path()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "appliance.extract.zygote", path],
                    stdin=subprocess.PIPE,  # never written: its EOF tells the zygote this process is gone
                    stdout=subprocess.DEVNULL,
                    cwd=self._dir,
                    env=_child_env(self._dir),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                self._stop_locked()
                raise ZygoteUnavailable(f"could not start the zygote: {exc}") from None
            deadline = time.monotonic() + START_TIMEOUT_S
            while not os.path.exists(path):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    code = self._proc.poll()
                    self._stop_locked()
                    raise ZygoteUnavailable(f"the zygote did not start (exit status {code})")
                time.sleep(0.005)
            return path

    def _stop_locked(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()  # it kills its children's process groups, then exits
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def stop(self) -> None:
        with self._lock:
            if self._owner_pid == os.getpid():
                self._stop_locked()

    def spawn(self, workdir: str) -> ZygoteChild:
        """A new sandbox child in `workdir` (its cwd, HOME and TMPDIR), its stdio on fresh pipes."""
        path = self._ensure()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs: list[int] = []
        ours: list[int] = []
        try:
            conn.settimeout(REPLY_TIMEOUT_S)
            conn.connect(path)
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            theirs, ours = [in_r, out_w, err_w], [in_w, out_r, err_r]
            header = json.dumps({"workdir": workdir}).encode()
            socket.send_fds(conn, [header], theirs)
            for fd in theirs:
                os.close(fd)
            theirs = []
            reply = b""
            while b"\n" not in reply:
                chunk = conn.recv(4096)
                if not chunk:
                    raise ZygoteUnavailable("the zygote closed the connection before the child started")
                reply += chunk
            line, _, rest = reply.partition(b"\n")
            pid = int(json.loads(line)["pid"])
            conn.settimeout(None)
        except BaseException as exc:
            for fd in theirs + ours:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            if not isinstance(exc, OSError | ValueError | KeyError | ZygoteUnavailable):
                raise
            self.stop()  # a zygote that fails to answer is replaced on the next call
            raise ZygoteUnavailable(f"the zygote did not start a child: {exc}") from None
        return ZygoteChild(pid, self.pid or 0, conn, ours, rest)


ZYGOTE = Zygote()
atexit.register(ZYGOTE.stop)


# ---------------------------------------- zygote side


def serve(socket_path: str) -> None:
    children: dict[socket.socket, int] = {}

    def end(*_: object) -> None:
        """The worker is gone (EOF on stdin) or asked (SIGTERM): every child's group goes too, with
        whatever a parser started (a child dies with the zygote anyway, its grandchildren would not)."""
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    # The worker holds the write end of our stdin and never writes: EOF means the worker process is
    # gone. (Not PR_SET_PDEATHSIG: that fires when the *thread* that started us ends, and workers
    # extract on pool threads that come and go.)
    os.set_blocking(0, False)
    from appliance.extract import kreuzberg_backend  # noqa: F401 - the point: loaded once, before any fork

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = socket_path + ".tmp"
    listener.bind(tmp)
    listener.listen(64)
    os.rename(tmp, socket_path)  # the worker waits for the final name: it appears ready to accept
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so set_wakeup_fd wakes select
    reported: set[int] = set()
    while True:
        try:
            watched: list[Any] = [0, listener, wake_r, *children]
            ready, _, _ = select.select(watched, [], [], 5.0)
        except InterruptedError:
            continue
        if 0 in ready:
            try:
                if not os.read(0, 4096):
                    end()  # the worker process has exited (or was killed)
            except BlockingIOError:
                pass
            except OSError:
                end()
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
        if listener in ready:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                pid = _fork_child(conn, listener, wake_r, wake_w, children)
                if pid is None:
                    conn.close()
                else:
                    children[conn] = pid
        for conn, pid in list(children.items()):
            if conn in ready:  # the worker is done with it (or gone): make sure it is dead, reap it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                conn.close()
                del children[conn]
                reported.discard(pid)
            elif pid not in reported:
                try:
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = None
                if info is not None:
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
                    reported.add(pid)


def _fork_child(
    conn: socket.socket,
    listener: socket.socket,
    wake_r: int,
    wake_w: int,
    children: dict[socket.socket, int],
) -> int | None:
    """Receive one request and fork its child; the child's pid once it leads its own session."""
    conn.settimeout(REPLY_TIMEOUT_S)
    try:
        message, fds, _, _ = socket.recv_fds(conn, _MAX_HEADER, 3)
        header = json.loads(message)
        workdir = str(header["workdir"])
    except (OSError, ValueError, KeyError):
        return None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    sync_r, sync_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.setsid()
            os.close(sync_r)
            os.close(sync_w)  # EOF tells the zygote: the session exists
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for other in (listener, conn, *children):
                other.close()
            os.close(wake_r)
            os.close(wake_w)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the zygote's but fds 0-2
            os.chdir(workdir)
            os.environ.update(HOME=workdir, TMPDIR=workdir, XDG_CACHE_HOME=workdir)
            tempfile.tempdir = None
            from appliance.extract.sandbox import main

            main()  # ends with os._exit
        except BaseException:  # noqa: BLE001 - nothing may return into the zygote's loop
            with contextlib.suppress(BaseException):
                import traceback

                traceback.print_exc()
        os._exit(70)
    os.close(sync_w)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.read(sync_r, 1)  # returns at EOF: the child has called setsid (or died)
    os.close(sync_r)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return None
    conn.settimeout(None)
    return pid


if __name__ == "__main__":  # python -m appliance.extract.zygote SOCKET
    serve(sys.argv[1])
