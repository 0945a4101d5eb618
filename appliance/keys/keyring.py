"""The master keys this process can use, found by `kek_id`.

Files in the keys directory: `master.key` (current), `master.key.next` (only while a rotation
runs) and `master.key.retired-<kek_id>` (after one). Loading all of them means an interrupted
rotation leaves every DEK readable, whichever key wrapped it. A process that meets an unknown
`kek_id` reloads the directory once (another process may have finished a rotation).
"""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.keys.kek import FileKeyProvider, KeyProvider

CURRENT = "master.key"
NEXT = "master.key.next"
RETIRED_PREFIX = "master.key.retired-"


class UnknownKek(Exception):
    pass


class Keyring:
    def __init__(self, current_path: Path) -> None:
        self.current_path = current_path
        self._lock = threading.Lock()
        self._providers: dict[str, KeyProvider] = {}
        self._current: KeyProvider | None = None
        self.reload()

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
