"""`appliance up | down | status`: the embedded run mode (see appliance/runtime)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.table import Table

from appliance.cli._common import console, err_console, fail, print_json
from appliance.runtime.common import RuntimeFailure, file_size, log_tail, open_log, read_json, write_private
from appliance.runtime.home import prepare
from appliance.runtime.supervisor import (
    COMPONENTS,
    ENV_DETACHED,
    Supervisor,
    _http_status,
    bootstrap_key_file,
    component_status,
    running_supervisor,
    state_file,
    stop_running,
)
from appliance.settings import PROJECT_ROOT, Settings, invalid_settings_line, load_settings

NOT_ALL_RUNNING = 3


def _configure_logging() -> None:
    logger = logging.getLogger("appliance.runtime")
    if not any(getattr(h, "_appliance_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._appliance_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _settings() -> Settings:
    try:
        return load_settings()
    except PermissionError as exc:
        fail(f"cannot read {exc.filename}: run as root or as the service user")
    except ValidationError as exc:
        fail(invalid_settings_line(exc))
    except ValueError as exc:
        fail(f"invalid settings: {str(exc).splitlines()[0]}")


def _show_key(key: str) -> None:
    console.print(f"System-admin API key: [bold]{key}[/]", highlight=False, soft_wrap=True)
    console.print("Store it now: it will not be shown again.", style="yellow")


def up(
    detach: bool = typer.Option(
        False, "--detach", "-d", help="Start in the background and return when ready."
    ),
    timeout: float = typer.Option(120, help="With --detach: seconds to wait for the API to be ready."),
) -> None:
    """Start Postgres, Redis, the API and the workers under the data directory (APPLIANCE_HOME)."""
    _configure_logging()
    settings = _settings()
    if detach:
        _up_detached(settings, timeout)
        return
    detached_child = os.environ.get(ENV_DETACHED) == "1"
    keys: list[str] = []

    def on_key(key: str) -> None:
        if detached_child:
            # The `up --detach` parent prints it, then deletes the file.
            assert sup.ident is not None
            write_private(bootstrap_key_file(sup.settings), key + "\n", sup.ident)
        else:
            keys.append(key)

    def on_ready(s: Supervisor) -> None:
        console.print(f"appliance is up: [bold]{s.settings.api_url}[/]", highlight=False)
        if keys:
            _show_key(keys.pop())
        if not detached_child:
            console.print("Ctrl-C stops everything.", style="dim")

    sup = Supervisor(settings, on_bootstrap_key=on_key)
    try:
        code = sup.run(on_ready)
    except RuntimeFailure as exc:
        if keys:  # created, but the start failed later: never lose it
            _show_key(keys.pop())
        if sup.signalled is not None:
            err_console.print("start interrupted; everything started so far is stopped", highlight=False)
            raise typer.Exit(128 + sup.signalled) from None
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if code:
        fail("stopped after repeated failures; see the logs in " + str(sup.settings.log_dir), code)


def _up_detached(settings: Settings, timeout: float) -> None:
    if pid := running_supervisor(settings):
        fail(f"already running, pid {pid}")
    try:
        settings, ident = prepare(settings)
    except RuntimeFailure as exc:
        fail(str(exc))
    log_path = settings.log_dir / "supervisor.log"
    key_file = bootstrap_key_file(settings)
    key_file.unlink(missing_ok=True)
    offset = file_size(log_path)
    env = dict(os.environ)
    env.update(
        {
            "APPLIANCE_HOME": str(settings.home),
            ENV_DETACHED: "1",
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
    )
    fd = open_log(log_path, ident)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.server", "up"],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)

    def take_key() -> None:
        try:
            key = key_file.read_text().strip()
        except OSError:
            return
        key_file.unlink(missing_ok=True)
        if key:
            _show_key(key)

    try:
        _wait_ready(settings, child, timeout, log_path, offset, take_key)
    except KeyboardInterrupt:
        take_key()
        err_console.print(
            f"stopped waiting; the supervisor (pid {child.pid}) keeps starting in the background "
            "(`appliance status`, `appliance down`)",
            highlight=False,
        )
        raise typer.Exit(130) from None


def _wait_ready(
    settings: Settings,
    child: subprocess.Popen[bytes],
    timeout: float,
    log_path: Path,
    offset: int,
    take_key: Callable[[], None],
) -> None:
    started = time.monotonic()
    url = f"{settings.api_url}/readyz"
    while True:
        if child.poll() is not None:
            take_key()
            tail = log_tail(log_path, 15, offset)
            err_console.print(tail, highlight=False, markup=False)
            fail(f"the supervisor exited with code {child.returncode} during start; see {log_path}")
        # Only our child's API counts (not one a killed supervisor left on the port): the state file
        # names the supervisor that started the API.
        state = read_json(state_file(settings)) or {}
        ours = state.get("supervisor_pid") == child.pid and "api" in (state.get("components") or {})
        if ours and _http_status(url, timeout=2.0) == 200:
            break
        if time.monotonic() - started > timeout:
            take_key()
            fail(
                f"not ready after {timeout:.0f} s; the supervisor (pid {child.pid}) keeps running in the "
                f"background: see {log_path}, `appliance status`, or stop it with `appliance down`"
            )
        time.sleep(0.25)
    console.print(
        f"appliance is up: [bold]{settings.api_url}[/] (supervisor pid {child.pid}, "
        f"ready in {time.monotonic() - started:.1f} s)",
        highlight=False,
    )
    take_key()


def down(timeout: float = typer.Option(90, help="Seconds to wait before killing the supervisor.")) -> None:
    """Stop everything `appliance up` started (or the leftovers of a killed supervisor)."""
    _configure_logging()
    settings = _settings()
    try:
        message = stop_running(settings, timeout)
    except RuntimeFailure as exc:
        fail(str(exc))
    console.print(message, highlight=False)


_STYLE = {"running": "green", "external": "cyan", "stopped": "dim", "unhealthy": "bold red"}


def status(json_output: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each component's state, pid and port; exit 0 when all run, 3 otherwise."""
    settings = _settings()
    info: dict[str, Any] = component_status(settings)
    components = info["components"]
    if json_output:
        print_json(
            {
                "api_url": info["api_url"],
                "supervisor_pid": info["supervisor"]["pid"],
                "components": components,
            }
        )
    else:
        table = Table(title=f"appliance at {info['home']}", title_justify="left")
        for col in ("component", "state", "pid", "port"):
            table.add_column(col)
        for name in COMPONENTS:
            c = components[name]
            table.add_row(
                name,
                f"[{_STYLE[c['state']]}]{c['state']}[/]",
                str(c["pid"] or "-"),
                str(c["port"] or "-"),
            )
        console.print(table)
        sup = info["supervisor"]["pid"]
        console.print(f"API: {info['api_url']}   supervisor: {f'pid {sup}' if sup else 'not running'}")
    if any(c["state"] not in ("running", "external") for c in components.values()):
        raise typer.Exit(NOT_ALL_RUNNING)


if __name__ == "__main__":  # `python -m appliance.cli.server up`: what `up --detach` runs in the background
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command("up")(up)
    _app.command("down")(down)
    _app.command("status")(status)
    _app()
