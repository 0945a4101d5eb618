"""The extraction zygote (appliance/extract/zygote.py): sandbox children forked from one process that
has kreuzberg loaded. Its children keep the sandbox's promises (their own session, an empty
environment, their working directory, the same limits: test_extract.py and test_hostile_generated.py
run through it), die with it, and it dies with the worker; without it the worker starts children
itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from appliance.extract import ExtractionError, Limits, sandbox
from appliance.extract.base import FORMATS
from appliance.extract.sandbox import run_kreuzberg
from appliance.extract.zygote import ZYGOTE, ZygoteUnavailable

TEXT = FORMATS["text/plain"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _status(pid: int, field: str) -> str:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return line.split(":", 1)[1].strip()


def _sleeping_extraction(path: Path, pidfile: Path) -> tuple[threading.Thread, list[BaseException]]:
    """An extraction whose child sleeps (with a grandchild) until killed; the outcome lands in the list."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_kreuzberg(path, TEXT, limits=Limits(timeout_s=60), ocr=None, _test_hook=f"sleep:{pidfile}")
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()), "the child never started"
    return thread, outcome


def test_children_fork_from_the_zygote_in_a_clean_session(tmp_path: Path, sample_dir: Path) -> None:
    os.environ["APPLIANCE_TEST_SECRET"] = "must-not-reach-a-parser"
    try:
        thread, outcome = _sleeping_extraction(sample_dir / "plain.txt", tmp_path / "pids")
        child, grandchild = (int(x) for x in (tmp_path / "pids").read_text().split())
        assert ZYGOTE.pid is not None and int(_status(child, "PPid")) == ZYGOTE.pid
        assert os.getpgid(child) == os.getsid(child) == child  # its own session and process group
        assert os.getpgid(grandchild) == child
        # What a parser could read of its environment: the zygote's, as the sandbox's own (no secret).
        environ = dict(
            item.split(b"=", 1) for item in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if item
        )
        assert b"APPLIANCE_TEST_SECRET" not in environ and set(environ) <= {
            k.encode() for k in sandbox._child_env("/x")
        }
        assert Path(os.readlink(f"/proc/{child}/cwd")).name.startswith("appliance-extract-")
        # Only fds 0-2 (and what the child opened itself): nothing of the zygote's sockets.
        fds = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
        assert not any(target.startswith("socket:") for target in fds), fds
        # The zygote dies (as it would by the OOM killer): its children die with it, the extraction
        # ends at once with a transient error (not at its 60 s deadline), and the grandchild's group
        # is killed by the worker.
        zygote = ZYGOTE.pid
        started = time.monotonic()
        os.kill(zygote, signal.SIGKILL)
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - started < 10
        (error,) = outcome
        assert (
            isinstance(error, ExtractionError) and error.code == "extractor_crashed" and not error.permanent
        )
        assert _wait_for(lambda: _gone(child) and _gone(grandchild))
    finally:
        del os.environ["APPLIANCE_TEST_SECRET"]
    # The next extraction starts a new zygote.
    result = run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
    assert result.pages and ZYGOTE.pid not in (None, zygote)


@pytest.fixture
def parents(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The parent pid of each sandbox child started from now on (the zygote's, or this process's)."""
    seen: list[int] = []
    real = sandbox._start_child

    def start(workdir: str) -> tuple[sandbox.Child, int]:
        child, parent = real(workdir)
        seen.append(parent)
        return child, parent

    monkeypatch.setattr(sandbox, "_start_child", start)
    return seen


def test_without_the_zygote_the_worker_starts_the_child(
    sample_dir: Path, monkeypatch: pytest.MonkeyPatch, parents: list[int]
) -> None:
    def unavailable(workdir: str) -> None:
        raise ZygoteUnavailable("test: no zygote")

    monkeypatch.setattr(ZYGOTE, "spawn", unavailable)
    result = run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
    assert result.pages and parents == [os.getpid()]
    crash = pytest.raises(
        ExtractionError,
        lambda: run_kreuzberg(
            sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None, _test_hook="segfault"
        ),
    )
    assert crash.value.code == "extractor_crashed" and "SIGSEGV" in crash.value.message


def test_the_zygote_and_its_children_die_with_the_worker(tmp_path: Path, sample_dir: Path) -> None:
    """kill -9 of a worker mid-extraction leaves no zygote, no sandbox child and none of its children."""
    pidfile = tmp_path / "pids"
    zygote_file = tmp_path / "zygote"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from appliance.extract import Limits
        from appliance.extract.base import FORMATS
        from appliance.extract.sandbox import run_kreuzberg
        from appliance.extract.zygote import ZYGOTE
        import threading, time
        threading.Thread(target=lambda: run_kreuzberg(Path({str(sample_dir / "plain.txt")!r}),
            FORMATS["text/plain"], limits=Limits(timeout_s=60), ocr=None,
            _test_hook="sleep:{pidfile}"), daemon=True).start()
        while ZYGOTE.pid is None:
            time.sleep(0.01)
        Path({str(zygote_file)!r}).write_text(str(ZYGOTE.pid))
        time.sleep(600)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    try:
        assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() and zygote_file.exists())
        child, grandchild = (int(x) for x in pidfile.read_text().split())
        zygote = int(zygote_file.read_text())
        assert int(_status(child, "PPid")) == zygote
        worker.kill()
        worker.wait()
        # The zygote takes its children's process groups along: the parser's own child too.
        assert _wait_for(lambda: _gone(zygote) and _gone(child) and _gone(grandchild)), "outlived the worker"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_zygote_that_does_not_answer_is_replaced(sample_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.extract import zygote

    run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
    stuck = ZYGOTE.pid
    assert stuck is not None
    monkeypatch.setattr(zygote, "REPLY_TIMEOUT_S", 0.5)
    os.kill(stuck, signal.SIGSTOP)  # alive, but answers nothing
    try:
        # This document is parsed by a child the worker starts itself …
        result = run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
        assert result.pages
        assert _wait_for(lambda: _gone(stuck))  # … and the stuck zygote is gone
    finally:
        if not _gone(stuck):
            os.kill(stuck, signal.SIGKILL)
    run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
    assert ZYGOTE.pid not in (None, stuck)


def test_the_zygote_outlives_the_thread_that_started_it(sample_dir: Path) -> None:
    """Workers extract on pool threads that come and go (anyio's idle threads exit): the zygote must
    not die with the thread that started it (PR_SET_PDEATHSIG would do that)."""
    ZYGOTE.stop()
    starter = threading.Thread(
        target=lambda: run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None)
    )
    starter.start()
    starter.join()
    zygote = ZYGOTE.pid
    assert zygote is not None
    time.sleep(0.3)
    assert not _gone(zygote)
    assert run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None).pages
    assert ZYGOTE.pid == zygote


def test_the_setting_turns_the_zygote_off(
    sample_dir: Path, monkeypatch: pytest.MonkeyPatch, parents: list[int]
) -> None:
    from appliance.settings import get_settings

    monkeypatch.setenv("APPLIANCE_EXTRACT_ZYGOTE", "false")
    get_settings.cache_clear()
    try:
        assert run_kreuzberg(sample_dir / "plain.txt", TEXT, limits=Limits(), ocr=None).pages
        assert parents == [os.getpid()]
    finally:
        monkeypatch.delenv("APPLIANCE_EXTRACT_ZYGOTE")
        get_settings.cache_clear()
