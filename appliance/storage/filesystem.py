"""The embedded default: objects as files under one root directory (`$APPLIANCE_HOME/objects`).

Layout: ROOT/ab/cd/abcd… (two levels of fan-out on the key's first hex digits), directories 0700,
files 0600. A write goes to a temporary file in the object's own directory, is fsynced, renamed over the
final name with `os.replace` and the directory is fsynced: readers see the old object or the new one,
never a partial one, and a completed put survives a power cut. Temporary files start with `.tmp-` and are
never listed; `sweep_temp_files()` removes the ones a crash left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from appliance.storage.base import (
    ChunkIterator,
    ClosingContext,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    check_key,
    check_range,
    is_key,
    new_key,
)

TEMP_PREFIX = ".tmp-"
COPY_BUFFER = 1 << 20
_HEX2 = frozenset(f"{i:02x}" for i in range(256))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, fewer only at end of file (pread may return short reads)."""
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _os_error(action: str, exc: OSError) -> StorageError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return StorageUnavailable(f"filesystem store: {action} failed: {reason}")
    return StorageError(f"filesystem store: {action} failed: {reason}")


class FileSource(ClosingContext):
    """An open object file: reads see the object as it was when opened, even if it is replaced later."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size
        self._finalizer = weakref.finalize(self, os.close, fd)

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(offset, length)
        if not self._finalizer.alive:
            raise StorageError("read on a closed object source")
        return _pread_full(self._fd, offset, length)

    def close(self) -> None:
        self._finalizer()


class FilesystemStore:
    name = "filesystem"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            created = not self.root.exists()
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created or (self.root.stat().st_mode & 0o077 and self.root.stat().st_uid == os.geteuid()):
                os.chmod(self.root, 0o700)
        except OSError as exc:
            raise _os_error(f"creating the root {self.root}", exc) from exc

    # Paths ----------------------------------------------------------------------------------------
    def _dir(self, key: str) -> Path:
        return self.root / key[0:2] / key[2:4]

    def _path(self, key: str) -> Path:
        return self._dir(check_key(key)) / key

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        # Create each missing level 0700 and fsync its parent, so the new entry itself is durable.
        for level in (directory.parent, directory):
            if level.is_dir():
                continue
            with contextlib.suppress(FileExistsError):
                level.mkdir(mode=0o700)
                fsync_dir(level.parent)

    # Writes ---------------------------------------------------------------------------------------
    def new_key(self) -> str:
        return new_key()

    def _write_atomic(self, key: str, write: Callable[[BinaryIO], object]) -> ObjectInfo:
        final = self._path(key)
        directory = final.parent
        tmp: str | None = None
        try:
            self._ensure_dir(directory)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)  # mode 0600
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
                size = os.fstat(out.fileno()).st_size
            os.replace(tmp, final)
            tmp = None
            fsync_dir(directory)
        except OSError as exc:
            raise _os_error("writing an object", exc) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return ObjectInfo(key=key, size=size)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        check_key(key)
        with open(path, "rb") as src:  # FileNotFoundError before anything is created

            def copy(out: BinaryIO) -> None:
                while chunk := src.read(COPY_BUFFER):
                    out.write(chunk)

            return self._write_atomic(key, copy)

    def adopt_file(self, key: str, path: Path) -> ObjectInfo:
        """Move a file (on the same filesystem) into the store under `key`: fsync, rename, fsync dir.

        Restores use it to place staged blobs without copying them a second time; a file on another
        filesystem is copied (put_file) instead."""
        final = self._path(key)
        try:
            self._ensure_dir(final.parent)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.chmod(path, 0o600)
            os.replace(path, final)
            fsync_dir(final.parent)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                info = self.put_file(key, path)
                os.unlink(path)
                return info
            raise _os_error("adopting an object", exc) from exc
        return ObjectInfo(key=key, size=size)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        check_key(key)
        return self._write_atomic(key, lambda out: out.write(data))

    # Reads ----------------------------------------------------------------------------------------
    def _open(self, key: str) -> int:
        path = self._path(key)
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None
        except OSError as exc:
            raise _os_error("opening an object", exc) from exc

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key}") from None
        except OSError as exc:
            raise _os_error("stat of an object", exc) from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"no object {key}")
        return ObjectInfo(key=key, size=st.st_size)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def read_at(self, key: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        fd = self._open(key)
        try:
            return _pread_full(fd, offset, length)
        except OSError as exc:
            raise _os_error("reading an object", exc) from exc
        finally:
            os.close(fd)

    def open_source(self, key: str) -> FileSource:
        return FileSource(self._open(key))

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> ChunkIterator:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        f = os.fdopen(self._open(key), "rb")  # ObjectNotFound now, not at the first next()

        def read(n: int) -> bytes:
            try:
                return f.read(n)  # a buffered read returns n bytes unless at end of file
            except OSError as exc:
                raise _os_error("reading an object", exc) from exc

        return ChunkIterator(read, f.close, chunk_size)

    # Deletes and listing --------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error("deleting an object", exc) from exc
        # Fan-out directories stay: removing them would race with a concurrent put into them.
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)

    def _leaf_dirs(self) -> Iterator[tuple[str, Path]]:
        try:
            top = sorted(e.name for e in os.scandir(self.root) if e.name in _HEX2 and e.is_dir())
        except OSError as exc:
            raise _os_error("listing the root", exc) from exc
        for a in top:
            try:
                subs = sorted(e.name for e in os.scandir(self.root / a) if e.name in _HEX2 and e.is_dir())
            except FileNotFoundError:
                continue
            for b in subs:
                yield a + b, self.root / a / b

    def iter_keys(self) -> Iterator[str]:
        for prefix, directory in self._leaf_dirs():
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if is_key(name) and name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                    yield name

    def sweep_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by interrupted writes (older than `older_than_s`); return how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for _, directory in self._leaf_dirs():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    if entry.name.startswith(TEMP_PREFIX) and entry.stat().st_mtime < cutoff:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            removed += 1
        return removed

    # Readiness ------------------------------------------------------------------------------------
    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageUnavailable(f"filesystem store: root {self.root} is missing or not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "check-", dir=self.root)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise StorageUnavailable(
                f"filesystem store: cannot write in {self.root}: {exc.strerror or type(exc).__name__}"
            ) from exc

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"
