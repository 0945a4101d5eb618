"""Entry points of the compose stack that `appliance up` has no equivalent for (docs/packaging.md).

`python -m appliance.packaging.container init`
    The one-shot `init` service: the data directory's layout and keys (URL-signing, audit-signing, the
    backup key pair) in the shared volume, a check of the master key mounted as a secret, then the
    database roles, extensions and migrations (`appliance db upgrade --bootstrap`). Idempotent: nothing
    that exists is regenerated. No system-admin API key is printed (container logs are kept); make one
    with `docker compose run --rm init appliance keys create --system-admin`.
`python -m appliance.packaging.container llm [--host 0.0.0.0]`
    The chat model's server, as `appliance.inference.llm_server` runs it (manifest model, sha256 checked
    first, one request streaming at a time) but listening on the stack's internal network instead of
    loopback, so the API containers reach it at APPLIANCE_LLM_URL.
`python -m appliance.packaging.container health api|worker|llm`
    Healthchecks: exit 0 when the component serves. api: /readyz answers 200; llm: /v1/models answers
    200; worker: a Dramatiq worker process runs and Redis (its broker) answers PING.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from appliance.runtime.common import RuntimeFailure
from appliance.settings import Settings, get_settings


def init(settings: Settings) -> None:
    """Prepare the data directory and keys, then bootstrap and migrate the database."""
    from appliance.db.migrations import upgrade_head
    from appliance.runtime import bootstrap_database
    from appliance.runtime.home import (
        ensure_audit_signing_key,
        ensure_backup_keys,
        ensure_master_key,
        ensure_signing_key,
        identity_for,
        prepare_home,
    )

    ident = identity_for(settings)
    prepare_home(settings, ident)
    if settings.master_key_passphrase is None:
        key = settings.master_key_path
        if not key.is_file():
            # Generating one here would put the only copy of the key in a container volume.
            raise RuntimeFailure(
                f"the master key {key} is missing: create secrets/master_key with "
                "`head -c 32 /dev/urandom > secrets/master_key` (docs/packaging.md)"
            )
        ensure_master_key(settings, ident)  # checks its size
    ensure_signing_key(settings, ident)
    ensure_audit_signing_key(settings, ident)
    ensure_backup_keys(settings, ident)
    bootstrap_database(settings)
    upgrade_head(settings)
    print(f"init: data directory {settings.home} ready, database at head", flush=True)


def serve_llm(settings: Settings, host: str) -> int:
    """llama-cpp-python's OpenAI-compatible server with the appliance's settings, on `host`."""
    import uvicorn
    from llama_cpp.server.app import create_app

    from appliance.inference.llm_server import server_config
    from appliance.inference.manifest import ManifestError, ModelIntegrityError

    try:
        server, model = server_config(settings)
    except (ManifestError, ModelIntegrityError, LookupError) as exc:
        print(f"llm: {exc}", file=sys.stderr)
        return 2
    server = server.model_copy(update={"host": host})
    app = create_app(server_settings=server, model_settings=[model])
    print(f"llm: serving {model.model_alias} on {host}:{server.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=server.port, log_level="warning", access_log=False)
    return 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - internal URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _dramatiq_running(proc: Path = Path("/proc")) -> bool:
    """Whether a process of this container runs `dramatiq ... appliance.workers`."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == "dramatiq" for a in argv[:2]) and any(
            a == b"appliance.workers" for a in argv
        ):
            return True
    return False


def health(settings: Settings, component: str) -> bool:
    if component == "api":
        return _http_ok(f"http://127.0.0.1:{settings.api_port}/readyz")
    if component == "llm":
        return _http_ok(f"http://127.0.0.1:{settings.llm_port}/v1/models")
    if component == "worker":
        import redis

        if not _dramatiq_running():
            return False
        try:
            return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=3).ping())
        except redis.RedisError:
            return False
    raise ValueError(component)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.packaging.container")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="prepare the data volume and keys, bootstrap and migrate the database")
    llm = sub.add_parser("llm", help="serve the chat model on the internal network")
    llm.add_argument("--host", default=os.environ.get("APPLIANCE_LLM_HOST", "0.0.0.0"))  # noqa: S104
    check = sub.add_parser("health", help="exit 0 when the component serves")
    check.add_argument("component", choices=("api", "worker", "llm"))
    args = parser.parse_args(argv)

    settings = get_settings()
    if args.command == "health":
        return 0 if health(settings, args.component) else 1
    if args.command == "llm":
        return serve_llm(settings, args.host)
    try:
        init(settings)
    except RuntimeFailure as exc:
        print(f"init: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line in the container log, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"init: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
