"""The master keys this process can use, found by `kek_id`.

Files in the keys directory: `master.key` (current), `master.key.next` (only while a rotation
runs) and `master.key.retired-<kek_id>` (after one). Loading all of them means an interrupted
rotation leaves every DEK readable, whichever key wrapped it. A process that meets an unknown
`kek_id` reloads the directory once (another process may have finished a rotation).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from appliance.keys.kek import FileKeyProvider, KeyProvider, PassphraseKeyProvider, PassphraseParams
from appliance.settings import Settings

CURRENT = "master.key"
NEXT = "master.key.next"
RETIRED_PREFIX = "master.key.retired-"


class UnknownKek(Exception):
    pass


class Keyring:
    """`passphrase`: derive the current KEK from a passphrase (Argon2id, parameters and salt in
    `kek.json` beside the key files, created on first use) instead of reading `master.key`."""

    def __init__(self, current_path: Path, *, passphrase: str | None = None) -> None:
        self.current_path = current_path
        self._lock = threading.Lock()
        self._providers: dict[str, KeyProvider] = {}
        self._current: KeyProvider | None = None
        self._passphrase_provider = (
            _passphrase_provider(current_path.parent, passphrase) if passphrase else None
        )
        self.reload()

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        secret = settings.master_key_passphrase
        return cls(settings.master_key_path, passphrase=secret.get_secret_value() if secret else None)

    @property
    def passphrase_mode(self) -> bool:
        return self._passphrase_provider is not None

    @property
    def directory(self) -> Path:
        return self.current_path.parent

    def reload(self) -> None:
        providers: dict[str, KeyProvider] = {}
        current: KeyProvider | None = None
        paths = [self.current_path, self.directory / NEXT, *sorted(self.directory.glob(RETIRED_PREFIX + "*"))]
        for path in paths:
            if path.exists():
                provider = FileKeyProvider.load(path)
                providers[provider.key_id] = provider
                if current is None and path.name in (self.current_path.name, NEXT):
                    current = provider
        if self._passphrase_provider is not None:
            current = self._passphrase_provider
            providers[current.key_id] = current
        if current is None:
            raise UnknownKek(f"no master key at {self.current_path}")
        with self._lock:
            self._providers, self._current = providers, current

    @property
    def current(self) -> KeyProvider:
        assert self._current is not None
        return self._current

    def get(self, kek_id: str) -> KeyProvider:
        provider = self._providers.get(kek_id)
        if provider is None:
            self.reload()
            provider = self._providers.get(kek_id)
        if provider is None:
            raise UnknownKek(
                f"the data key was wrapped by master key {kek_id}, which is not in {self.directory}"
            )
        return provider

    def key_ids(self) -> list[str]:
        return list(self._providers)


KEK_DESCRIPTOR = "kek.json"


def _passphrase_provider(directory: Path, passphrase: str) -> KeyProvider:
    """Derive the KEK; the first use writes the parameters (salt, costs) to `kek.json` (0600)."""
    path = directory / KEK_DESCRIPTOR
    if path.exists():
        params = PassphraseParams.from_json(json.loads(path.read_text()))
    else:
        params = PassphraseParams.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(params.to_json(), f)
    return PassphraseKeyProvider.derive(passphrase, params)
