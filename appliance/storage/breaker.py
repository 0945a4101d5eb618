"""An ObjectStore wrapper with a circuit breaker: a dead S3 server fails calls in microseconds.

S3Store already bounds each request (2 s connect timeout, bounded retries); once `fail_max` calls in
a row have still failed with StorageUnavailable, `BreakerStore` stops calling for `reset_timeout_s`
and raises `StorageCircuitOpen` (a StorageUnavailable) at once, then lets one trial call through.
Only StorageUnavailable and connection-level errors count: ObjectNotFound, InvalidKey, ObjectChanged
and other caller errors mean the server answered and never open the circuit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from urllib3.exceptions import HTTPError as Urllib3HTTPError

from appliance.resilience import CircuitBreaker, CircuitOpen, open_message
from appliance.storage.base import (
    ChunkIterator,
    ClosingContext,
    ObjectInfo,
    ObjectStore,
    RandomAccessSource,
    StorageUnavailable,
)

T = TypeVar("T")

FAIL_MAX = 5
RESET_TIMEOUT_S = 30.0
WINDOW_S = 60.0


class StorageCircuitOpen(StorageUnavailable, CircuitOpen):
    """The object store's circuit is open: the call was not attempted."""

    def __init__(self, dependency: str, retry_in: float) -> None:
        super().__init__(open_message(dependency, retry_in))
        self.dependency = dependency
        self.retry_in = retry_in

    def __reduce__(self) -> tuple[Any, ...]:  # pickles as the plain error it also is
        return (StorageUnavailable, (str(self),))


def is_storage_failure(exc: BaseException) -> bool:
    """Does `exc` say the store itself is unhealthy (as opposed to the caller asking something wrong)?"""
    if isinstance(exc, CircuitOpen):
        return False
    return isinstance(exc, StorageUnavailable | ConnectionError | TimeoutError | Urllib3HTTPError)


def store_breaker(
    dependency: str,
    *,
    fail_max: int = FAIL_MAX,
    reset_timeout_s: float = RESET_TIMEOUT_S,
    window_s: float = WINDOW_S,
    clock: Callable[[], float] | None = None,
) -> CircuitBreaker:
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return CircuitBreaker(
        dependency,
        is_failure=is_storage_failure,
        open_error=StorageCircuitOpen,
        fail_max=fail_max,
        reset_timeout_s=reset_timeout_s,
        window_s=window_s,
        **extra,
    )


class _BreakerSource(ClosingContext):
    """A source whose reads go through the breaker too (S3Source reads call the server)."""

    def __init__(self, inner: RandomAccessSource, breaker: CircuitBreaker) -> None:
        self._inner = inner
        self._breaker = breaker
        self.size = inner.size

    def read_at(self, offset: int, length: int) -> bytes:
        return self._breaker.call(self._inner.read_at, offset, length)

    def close(self) -> None:
        self._inner.close()


class BreakerStore:
    """`inner` with every call that can reach the server guarded by `breaker`."""

    def __init__(self, inner: ObjectStore, breaker: CircuitBreaker | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.breaker = breaker if breaker is not None else store_breaker(repr(inner))

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.breaker.call(fn, *args)

    def new_key(self) -> str:
        return self.inner.new_key()  # local randomness: nothing to guard

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        return self._call(self.inner.put_file, key, path)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._call(self.inner.put_bytes, key, data)

    def stat(self, key: str) -> ObjectInfo:
        return self._call(self.inner.stat, key)

    def exists(self, key: str) -> bool:
        return self._call(self.inner.exists, key)

    def read_at(self, key: str, offset: int, length: int) -> bytes:
        return self._call(self.inner.read_at, key, offset, length)

    def open_source(self, key: str) -> RandomAccessSource:
        return _BreakerSource(self._call(self.inner.open_source, key), self.breaker)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> ChunkIterator:
        inner = self._call(self.inner.iter_chunks, key, chunk_size)
        breaker = self.breaker

        def read(n: int) -> bytes:
            # Chunks arrive already sized; a failure mid-stream is counted but not gated (the
            # stream is open, so there is no call left to refuse).
            try:
                return next(inner, b"")
            except BaseException as exc:
                breaker.record(exc)
                raise

        return ChunkIterator(read, inner.close, chunk_size)

    def delete(self, key: str) -> None:
        self._call(self.inner.delete, key)

    def iter_keys(self) -> Iterator[str]:
        keys = self._call(self.inner.iter_keys)  # S3: a generator, so the requests happen in next()
        while True:
            try:
                key = self._call(next, keys, None)
            except BaseException:
                close = getattr(keys, "close", None)
                if close is not None:
                    close()
                raise
            if key is None:
                return
            yield key

    def check(self) -> None:
        self._call(self.inner.check)

    def __repr__(self) -> str:
        return f"BreakerStore({self.inner!r}, {self.breaker.state})"
