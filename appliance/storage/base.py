"""The object-store interface: opaque keys in, bytes out.

Blobs handed to a store are already encrypted by the caller; a store only moves bytes, atomically.
Two implementations pass the same contract suite (tests/storage/test_contract.py): the local
filesystem (the embedded default) and S3 (through the `minio` client). Everything here is
synchronous: async callers run it in a thread (`anyio.to_thread.run_sync`/`asyncio.to_thread`).
"""

from __future__ import annotations

import re
import secrets
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

# Keys are random hex: nothing about the tenant, the document or the file name is ever in clear.
# Both stores use the same flat form so that keys copy from one store to the other (backups, moves).
KEY_RE = re.compile(r"[0-9a-f]{32}")
KEY_BYTES = 16


def new_key() -> str:
    """A fresh opaque key: 32 lowercase hex characters (128 random bits)."""
    return secrets.token_hex(KEY_BYTES)


def is_key(value: str) -> bool:
    return KEY_RE.fullmatch(value) is not None


def check_key(key: str) -> str:
    """Return `key` if it is a well-formed store key, else raise InvalidKey (never echoing it long)."""
    if not isinstance(key, str) or not is_key(key):
        shown = repr(key)[:40]
        raise InvalidKey(f"not an object key (expected 32 lowercase hex characters): {shown}")
    return key


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0 (got offset={offset}, length={length})")


def one_line(message: str) -> str:
    return " ".join(str(message).split())


# Errors ---------------------------------------------------------------------------------------------
class StorageError(Exception):
    """Base of every store error. Messages are one line and never carry credentials."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ObjectNotFound(StorageError):
    """No object under this key."""


class StorageUnavailable(StorageError):
    """The store cannot be used now: unreachable, refused credentials, missing bucket, unwritable root."""


class ObjectChanged(StorageError):
    """The object was replaced or deleted while an open source was reading it (S3: its etag changed)."""


class InvalidKey(StorageError, ValueError):
    """The key is not one a store hands out (a programming error, also a path-traversal guard)."""


# Values ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None  # S3: the server's etag (multipart: "<md5>-<parts>"); filesystem: None


class ClosingContext:
    """`with obj:` calls `obj.close()` on exit (the sources and iterators of this package)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChunkIterator(ClosingContext, Iterator[bytes]):
    """Chunks of exactly `chunk_size` bytes (the last one may be shorter) from `read(n)`.

    The underlying file or HTTP response is released at the end, on `close()`, on leaving a `with`
    block, or when the iterator is garbage-collected unfinished (also if it was never started).
    """

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        self._read = read
        self._chunk_size = chunk_size
        self._done = False
        self._finalizer = weakref.finalize(self, close)  # `close` must not refer to self

    def __iter__(self) -> ChunkIterator:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            parts: list[bytes] = []
            want = self._chunk_size
            while want > 0:
                piece = self._read(want)
                if not piece:
                    break
                parts.append(piece)
                want -= len(piece)
        except BaseException:
            self.close()
            raise
        data = b"".join(parts)
        if want > 0:  # end of the object
            self.close()
        if not data:
            raise StopIteration
        return data

    def close(self) -> None:
        self._done = True
        self._finalizer()


@runtime_checkable
class RandomAccessSource(Protocol):
    """A readable view of one object, as the decrypting reader needs it."""

    size: int

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`; fewer only at the end of the object."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> RandomAccessSource: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class ObjectStore(Protocol):
    name: str  # "filesystem" | "s3"

    def new_key(self) -> str:
        """An opaque random key (32 hex characters)."""
        ...

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        """Upload a local file (multipart when large, on S3); atomic: readers see old or new, never part."""
        ...

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    def stat(self, key: str) -> ObjectInfo:
        """Size (and etag if any); ObjectNotFound if missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def read_at(self, key: str, offset: int, length: int) -> bytes:
        """Ranged read; a short read only at the end of the object (b"" at or past it)."""
        ...

    def open_source(self, key: str) -> RandomAccessSource:
        """A source pinned to the object as it is now (close it, or use it as a context manager)."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> ChunkIterator:
        """The whole object, streamed in chunks of `chunk_size` bytes (the last one may be shorter).

        ObjectNotFound is raised by this call, not at the first chunk. An Iterator[bytes] that also has
        `close()` (and works as a context manager) to let the file or connection go early.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def iter_keys(self) -> Iterator[str]:
        """Every key in the store (backups, orphan sweeps); no order promised."""
        ...

    def check(self) -> None:
        """Readiness: return, or raise StorageUnavailable with a one-line reason."""
        ...
