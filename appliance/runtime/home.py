"""The data directory (`settings.home`): layout, first-run secrets and the master key.

Everything under it belongs to the service user; its subdirectories are 0700, secrets 0600. Values
that exist are never regenerated: a second `appliance up` reuses the directory as it is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from appliance.runtime.common import RuntimeFailure, log, make_private_dir, write_private
from appliance.runtime.identity import IdentityError, ServiceIdentity, describe_blocker, resolve_identity
from appliance.settings import Settings, env_file_path

# Settings field -> env file key, generated on first run.
SECRET_FIELDS = {
    "pg_superuser_password": "APPLIANCE_PG_SUPERUSER_PASSWORD",
    "pg_owner_password": "APPLIANCE_PG_OWNER_PASSWORD",
    "pg_app_password": "APPLIANCE_PG_APP_PASSWORD",
    "redis_password": "APPLIANCE_REDIS_PASSWORD",
}
# Ports given (by env or explicitly) at first run are written too, so later runs reuse them.
PORT_FIELDS = {
    "api_port": "APPLIANCE_API_PORT",
    "pg_port": "APPLIANCE_PG_PORT",
    "redis_port": "APPLIANCE_REDIS_PORT",
}
MASTER_KEY_BYTES = 32
# What marks a directory as an appliance home we may take over.
_HOME_MARKERS = ("appliance.env", "postgres", "run", "keys")


def identity_for(settings: Settings) -> ServiceIdentity:
    try:
        return resolve_identity(settings.service_user)
    except IdentityError as exc:
        raise RuntimeFailure(str(exc)) from None


def home_subdirs(settings: Settings) -> list[Path]:
    return [
        settings.run_dir,
        settings.log_dir,
        settings.redis_dir,
        settings.keys_dir,
        settings.objects_dir,
        settings.pg_data_dir.parent,
        settings.home / "runtime",
        settings.tmp_dir,
    ]


def check_reachable(ident: ServiceIdentity, path: Path, what: str, *, parents_only: bool = False) -> None:
    blocked = ident.blocking_dir(path.parent if parents_only else path)
    if blocked is not None:
        raise RuntimeFailure(
            f"the service user {ident.user!r} cannot reach {what} {path}: {describe_blocker(*blocked)} "
            "blocks it; set APPLIANCE_HOME to a directory it can reach, e.g. /var/lib/appliance"
        )


def prepare_home(settings: Settings, ident: ServiceIdentity) -> None:
    """Create the data directory and its subdirectories, owned by the service user, mode 0700."""
    home = Path(os.path.abspath(settings.home))
    if home == Path("/"):
        raise RuntimeFailure("refusing to use / as the data directory; set APPLIANCE_HOME")
    # The home itself is made the service user's below; what matters is the way to it.
    check_reachable(ident, home, "the data directory", parents_only=True)
    if home.exists():
        if not home.is_dir():
            raise RuntimeFailure(f"the data directory {home} exists and is not a directory")
        owner = home.stat().st_uid
        if owner != ident.uid:
            entries = {p.name for p in home.iterdir()}
            if entries and not entries.intersection(_HOME_MARKERS):
                raise RuntimeFailure(
                    f"refusing to take over {home}: it is not empty and not an appliance data directory; "
                    "set APPLIANCE_HOME to a new or empty directory"
                )
            if not ident.drop:
                raise RuntimeFailure(
                    f"the data directory {home} is owned by uid {owner}, not by {ident.user}"
                )
    try:
        make_private_dir(home, ident)
        for sub in home_subdirs(settings):
            make_private_dir(sub, ident)
    except PermissionError as exc:
        raise RuntimeFailure(
            f"cannot set up the data directory: {exc.strerror} on {exc.filename}; run as root or "
            "set APPLIANCE_HOME to a directory you own"
        ) from None
    # Files created earlier by root (e.g. a hand-written appliance.env) must be readable by the servers.
    env_file = env_file_path(home)
    if env_file.exists():
        ident.chown(env_file)
        env_file.chmod(0o600)


def _read_env_keys(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def ensure_secrets(settings: Settings, ident: ServiceIdentity) -> Settings:
    """Write missing secrets (and first-run ports) to `appliance.env`; return settings that hold them.

    Never regenerates a value the file already has. A secret given in the environment at first run
    is written as given rather than generated.
    """
    path = env_file_path(settings.home)
    existed = path.exists()
    current = _read_env_keys(path)
    additions: dict[str, str] = {}
    update: dict[str, object] = {}
    for field, key in SECRET_FIELDS.items():
        have: SecretStr | None = getattr(settings, field)
        if key in current:
            if have is None:  # settings built without reading the file
                update[field] = SecretStr(current[key])
            continue
        value = have.get_secret_value() if have is not None else secrets.token_urlsafe(32)
        additions[key] = value
        update[field] = SecretStr(value)
    if not existed:
        for field, key in PORT_FIELDS.items():
            if field in settings.model_fields_set and key not in current:
                additions[key] = str(getattr(settings, field))
    if additions:
        header = "" if existed else "# Written by `appliance up` on first run. Keep it secret (mode 0600).\n"
        old = path.read_text() if existed else ""
        if old and not old.endswith("\n"):
            old += "\n"
        body = "".join(f"{k}={v}\n" for k, v in additions.items())
        write_private(path, header + old + body, ident)
        log.info("wrote %s to %s", ", ".join(sorted(additions)), path)
    else:
        ident.chown(path)
    return settings.model_copy(update=update) if update else settings


def ensure_master_key(settings: Settings, ident: ServiceIdentity) -> Path:
    """Create the 32-byte master key (0600) when missing; an existing one is never touched."""
    return _ensure_key_file(settings.master_key_path, ident, "the master key")


def ensure_signing_key(settings: Settings, ident: ServiceIdentity) -> Path:
    """Create the 32-byte HMAC key for signed download URLs (0600) when missing."""
    return _ensure_key_file(settings.url_signing_key_path, ident, "the URL-signing key")


def ensure_audit_signing_key(settings: Settings, ident: ServiceIdentity) -> Path:
    """Create the Ed25519 key that signs audit checkpoints (raw 32-byte seed, 0600) when missing,
    and its public key (PEM) beside it; an existing pair is checked, never replaced."""
    from appliance.audit.signing import SigningKeyError, load_private_key, load_public_key, public_pem

    path = settings.audit_signing_key_path
    if not path.exists():  # an existing one may be raw or PEM: loading it below checks it
        _ensure_key_file(path, ident, "the audit signing key")
    pub_path = settings.audit_signing_pubkey_path
    try:
        public = public_pem(load_private_key(path).public_key())
        if not pub_path.exists():
            write_private(pub_path, public, ident, mode=0o644)
            log.info("created the audit public key %s", pub_path)
        elif public_pem(load_public_key(pub_path)) != public:
            raise RuntimeFailure(f"{pub_path} does not match the audit signing key {path}")
    except SigningKeyError as exc:
        raise RuntimeFailure(str(exc)) from None
    return path


def _ensure_key_file(path: Path, ident: ServiceIdentity, what: str) -> Path:
    if path.exists():
        size = path.stat().st_size
        if size != MASTER_KEY_BYTES:
            raise RuntimeFailure(f"{what} {path} has {size} bytes, expected {MASTER_KEY_BYTES}")
        return path
    if not path.parent.exists():
        make_private_dir(path.parent, ident)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(MASTER_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    ident.chown(path)
    log.info("created %s %s", what, path)
    return path


def ensure_backup_keys(settings: Settings, ident: ServiceIdentity) -> Path:
    """Create the age key pair backups are encrypted to, when there is no public key yet.

    Only the public half (`backup.pub`) is needed to write backups; the secret half (`backup.key`,
    0600) only to verify and restore. An administrator may move it off the host (docs/backup.md)."""
    from appliance.backup.archive import generate_identity

    pub = settings.backup_recipient_path
    if pub.exists():
        return pub
    secret, public = generate_identity()
    key = settings.backup_identity_path
    if not key.parent.exists():
        make_private_dir(key.parent, ident)
    if key.exists():
        raise RuntimeFailure(f"{key} exists but its public key {pub} is missing; restore it or move both")
    write_private(key, f"# appliance backup key (age); public key: {public}\n{secret}\n", ident)
    write_private(pub, public + "\n", ident, mode=0o644)
    log.info("created the backup key pair %s and %s", key, pub)
    return pub


def prepare(settings: Settings) -> tuple[Settings, ServiceIdentity]:
    """Identity, data directory, secrets and master key: everything before any server starts."""
    ident = identity_for(settings)
    settings = settings.model_copy(update={"home": Path(os.path.abspath(settings.home))})
    prepare_home(settings, ident)
    settings = ensure_secrets(settings, ident)
    if settings.master_key_passphrase is None:  # otherwise the master key is derived, never stored
        ensure_master_key(settings, ident)
    ensure_signing_key(settings, ident)
    ensure_audit_signing_key(settings, ident)
    ensure_backup_keys(settings, ident)
    return settings, ident
