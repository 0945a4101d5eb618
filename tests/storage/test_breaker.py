"""BreakerStore: over a real FilesystemStore (caller errors never open it) and over an S3Store aimed at
a loopback port where nothing listens (after fail_max failures, calls fail fast)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest

from appliance.resilience import CLOSED, HALF_OPEN, OPEN, CircuitOpen
from appliance.settings import Settings
from appliance.storage import (
    FilesystemStore,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageUnavailable,
    build_store,
)
from appliance.storage.breaker import (
    FAIL_MAX,
    RESET_TIMEOUT_S,
    BreakerStore,
    StorageCircuitOpen,
    store_breaker,
)
from tests.storage.conftest import free_port


def dead_s3() -> S3Store:
    return S3Store(
        f"127.0.0.1:{free_port()}",
        "AKEXAMPLEEXAMPLE0000",
        "secret-never-shown",
        "bucket",
        ensure_bucket=False,
        connect_timeout=0.5,
        retries=0,
    )


def test_defaults() -> None:
    assert (FAIL_MAX, RESET_TIMEOUT_S) == (5, 30.0)


def test_passes_through_over_the_filesystem(tmp_path: Path) -> None:
    inner = FilesystemStore(tmp_path / "objects")
    store: ObjectStore = BreakerStore(inner)
    assert isinstance(store, ObjectStore)
    assert store.name == inner.name == "filesystem"
    key = store.new_key()
    data = bytes(range(256)) * 5000
    assert store.put_bytes(key, data).size == len(data)
    source_file = tmp_path / "upload.bin"
    source_file.write_bytes(b"from a file")
    other = store.new_key()
    assert store.put_file(other, source_file).size == 11
    assert store.stat(key).size == len(data) and store.exists(key)
    assert store.read_at(key, 10, 5) == data[10:15]
    with store.open_source(key) as source:
        assert source.size == len(data) and source.read_at(len(data) - 3, 10) == data[-3:]
    with store.iter_chunks(key, chunk_size=100_000) as chunks:
        parts = list(chunks)
    assert b"".join(parts) == data and [len(p) for p in parts[:-1]] == [100_000] * (len(parts) - 1)
    assert b"".join(store.iter_chunks(other, chunk_size=4)) == b"from a file"
    assert sorted(store.iter_keys()) == sorted([key, other])
    store.check()
    store.delete(key)
    assert not store.exists(key)


def test_caller_errors_on_the_filesystem_never_open_it(tmp_path: Path) -> None:
    store = BreakerStore(FilesystemStore(tmp_path / "objects"), store_breaker("fs", fail_max=2))
    missing = store.new_key()
    for _ in range(10):
        with pytest.raises(ObjectNotFound):
            store.stat(missing)
        with pytest.raises(ObjectNotFound):
            store.read_at(missing, 0, 1)
        with pytest.raises(ObjectNotFound):
            store.iter_chunks(missing)
        with pytest.raises(ObjectNotFound):
            store.open_source(missing)
        with pytest.raises(InvalidKey):
            store.stat("../../etc/passwd")
        with pytest.raises(ValueError):
            store.read_at(missing, -1, 1)
        assert not store.exists(missing)
    assert (store.breaker.state, store.breaker.failures) == (CLOSED, 0)


def test_dead_s3_opens_after_fail_max_then_fails_fast() -> None:
    s3 = dead_s3()
    store = BreakerStore(s3, store_breaker(repr(s3), fail_max=3, reset_timeout_s=60))
    key = store.new_key()  # passes through: no request
    assert store.name == "s3"
    started = time.perf_counter()
    for _ in range(3):
        with pytest.raises(StorageUnavailable) as caught:
            store.stat(key)
        assert not isinstance(caught.value, CircuitOpen)
    slow = time.perf_counter() - started
    assert store.breaker.state == OPEN
    for call in (
        lambda: store.stat(key),
        lambda: store.put_bytes(key, b"x"),
        lambda: store.read_at(key, 0, 1),
        lambda: store.iter_chunks(key),
        lambda: store.open_source(key),
        lambda: store.delete(key),
        lambda: list(store.iter_keys()),
        store.check,
    ):
        started = time.perf_counter()
        with pytest.raises(StorageCircuitOpen) as fast:
            call()
        assert time.perf_counter() - started < 0.05
    assert isinstance(fast.value, StorageUnavailable) and isinstance(fast.value, CircuitOpen)
    message = str(fast.value)
    assert "\n" not in message and s3.endpoint in message and "next try in" in message
    assert "secret-never-shown" not in message
    assert 59 < fast.value.retry_in <= 60
    revived = pickle.loads(pickle.dumps(fast.value))
    assert type(revived) is StorageUnavailable and str(revived) == message
    print(f"\n3 failing calls to a dead S3: {slow * 1000:.0f} ms; fast fails: < 50 ms each")


def test_dead_s3_half_opens_and_a_failed_probe_reopens() -> None:
    s3 = dead_s3()
    store = BreakerStore(s3, store_breaker(repr(s3), fail_max=1, reset_timeout_s=0.1))
    key = store.new_key()
    with pytest.raises(StorageUnavailable):
        store.exists(key)
    with pytest.raises(StorageCircuitOpen):
        store.exists(key)
    time.sleep(0.11)
    assert store.breaker.state == HALF_OPEN
    with pytest.raises(StorageUnavailable) as probe:
        store.exists(key)  # the probe reaches the (dead) server
    assert not isinstance(probe.value, CircuitOpen)
    assert store.breaker.state == OPEN


def test_missing_key_answer_closes_a_half_open_circuit_only_on_success(tmp_path: Path) -> None:
    inner = FilesystemStore(tmp_path / "objects")
    store = BreakerStore(inner, store_breaker("fs", fail_max=1, reset_timeout_s=0.05))
    store.breaker.record_failure()  # as if the store had been down
    assert store.breaker.state == OPEN
    time.sleep(0.06)
    with pytest.raises(ObjectNotFound):
        store.stat(store.new_key())
    assert store.breaker.state == HALF_OPEN  # a caller error proves nothing either way
    store.check()
    assert store.breaker.state == CLOSED


def test_factory_wraps_s3_but_not_the_filesystem(tmp_path: Path) -> None:
    fs = build_store(Settings(home=tmp_path, environment="test"))
    assert isinstance(fs, FilesystemStore)
    s3 = build_store(
        Settings(home=tmp_path, environment="test", s3_endpoint=f"127.0.0.1:{free_port()}"),
        ensure_bucket=False,
    )
    assert isinstance(s3, BreakerStore) and isinstance(s3.inner, S3Store) and s3.name == "s3"
    assert s3.breaker.fail_max == FAIL_MAX and s3.breaker.reset_timeout_s == RESET_TIMEOUT_S
