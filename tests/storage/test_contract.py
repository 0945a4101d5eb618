"""One contract, two stores: every test here runs for "filesystem" and for "s3" (a real radosgw).

Each S3 test gets its own fresh bucket (removed afterwards, with a check that no multipart upload was
left behind); each filesystem test its own root. The S3 part size is 5 MiB so that the 40 MiB object
goes up in 8 parts. The last sections hold what only one of the stores has (S3: signatures, an
unreachable server; filesystem: modes, temp files) and the factory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error

from appliance.settings import Settings
from appliance.storage import (
    FilesystemStore,
    InvalidKey,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RandomAccessSource,
    S3Store,
    StorageError,
    StorageUnavailable,
    build_store,
)
from appliance.storage.breaker import BreakerStore
from tests.storage.conftest import RGW, free_port

MiB = 1 << 20
PART = 5 * MiB
SIZES = {"0B": 0, "1B": 1, "1MiB": MiB, "40MiB": 40 * MiB}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def minio_client(rgw: RGW, secret: str | None = None, access: str | None = None) -> Minio:
    return Minio(
        rgw.endpoint,
        access_key=access or rgw.access_key,
        secret_key=secret or rgw.secret_key,
        secure=False,
        region="us-east-1",
    )


def pending_uploads(client: Minio, bucket: str) -> list[str]:
    result = client._list_multipart_uploads(bucket)
    return [u.object_name for u in result.uploads]


def drop_bucket(client: Minio, bucket: str) -> None:
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name)
    for upload in client._list_multipart_uploads(bucket).uploads:
        client._abort_multipart_upload(bucket, str(upload.object_name), str(upload.upload_id))
    client.remove_bucket(bucket)


@contextlib.contextmanager
def fresh_s3_store(rgw: RGW) -> Iterator[S3Store]:
    """An S3Store on a bucket of its own, emptied and removed afterwards."""
    bucket = f"t-{secrets.token_hex(8)}"
    s3 = S3Store(rgw.endpoint, rgw.access_key, rgw.secret_key, bucket, part_size=PART)
    yield s3
    leftover = pending_uploads(s3.client, bucket)
    drop_bucket(s3.client, bucket)
    assert leftover == [], f"multipart uploads left behind: {leftover}"


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "filesystem":
        yield FilesystemStore(tmp_path / "objects")
        return
    with fresh_s3_store(request.getfixturevalue("rgw")) as s3:
        yield s3


@pytest.fixture
def s3(rgw: RGW) -> Iterator[S3Store]:
    with fresh_s3_store(rgw) as s3:
        yield s3


def blob(size: int) -> bytes:
    return os.urandom(size)


def read_all(store: ObjectStore, key: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.iter_chunks(key, chunk_size))


# Round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["put_file", "put_bytes"])
@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_round_trip(store: ObjectStore, tmp_path: Path, size: int, how: str) -> None:
    data = blob(size)
    key = store.new_key()
    if how == "put_file":
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        info = store.put_file(key, src)
    else:
        info = store.put_bytes(key, data)

    assert info == ObjectInfo(key=key, size=size, etag=info.etag)
    stat_info = store.stat(key)
    assert stat_info.size == size
    assert info.etag == stat_info.etag  # S3: also after a multipart put (RGW returns no etag there)
    if isinstance(store, S3Store):
        assert info.etag
        if size > PART:
            assert info.etag.endswith(f"-{-(-size // PART)}"), info.etag  # really went multipart
    assert store.exists(key)

    chunks = list(store.iter_chunks(key, chunk_size=MiB))
    assert sha(b"".join(chunks)) == sha(data)
    assert all(len(c) == MiB for c in chunks[:-1]) and all(chunks)
    assert sha(store.read_at(key, 0, size + 10)) == sha(data)
    with store.open_source(key) as source:
        assert isinstance(source, RandomAccessSource)
        assert source.size == size
        assert sha(source.read_at(0, size)) == sha(data)


def test_iter_chunks_sizes_and_early_close(store: ObjectStore) -> None:
    data = blob(3 * MiB + 5)
    key = store.new_key()
    store.put_bytes(key, data)
    chunks = list(store.iter_chunks(key, chunk_size=MiB))
    assert [len(c) for c in chunks] == [MiB, MiB, MiB, 5]
    odd = list(store.iter_chunks(key, chunk_size=65_537))
    assert b"".join(odd) == data
    # Abandoned streams release their file/connection; many in a row must not exhaust anything.
    for _ in range(30):
        it = store.iter_chunks(key, chunk_size=1024)
        assert next(it) == data[:1024]
        it.close()
        store.iter_chunks(key)  # never started
    assert store.read_at(key, 0, 10) == data[:10]


# Ranged reads -------------------------------------------------------------------------------------
def test_read_at_ranges(store: ObjectStore) -> None:
    size = 11 * MiB + 17  # multipart on S3: ranges also cross part boundaries
    data = blob(size)
    key = store.new_key()
    store.put_bytes(key, data)
    cases = [
        (0, 100),  # start
        (0, 1),
        (PART - 50, 100),  # across the first part boundary
        (size // 2, 4096),  # middle
        (size - 100, 100),  # exactly the end
        (size - 10, 100),  # straddles the end: short read
        (size - 1, 1),
        (size, 10),  # at EOF
        (size + 1000, 10),  # past EOF
        (1234, 0),  # empty read
        (0, size),  # everything
    ]
    with store.open_source(key) as source:
        for offset, length in cases:
            expected = data[offset : offset + length]
            assert store.read_at(key, offset, length) == expected, (offset, length)
            assert source.read_at(offset, length) == expected, (offset, length)
    with pytest.raises(ValueError):
        store.read_at(key, -1, 10)
    with pytest.raises(ValueError):
        store.read_at(key, 0, -1)


def test_read_at_on_empty_object(store: ObjectStore) -> None:
    key = store.new_key()
    store.put_bytes(key, b"")
    assert store.read_at(key, 0, 10) == b""
    assert store.read_at(key, 5, 10) == b""
    assert list(store.iter_chunks(key)) == []
    with store.open_source(key) as source:
        assert source.size == 0
        assert source.read_at(0, 10) == b""


# Missing objects and deletes ----------------------------------------------------------------------
def test_missing_key(store: ObjectStore) -> None:
    key = store.new_key()
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.stat(key)
    with pytest.raises(ObjectNotFound):
        store.read_at(key, 0, 10)
    with pytest.raises(ObjectNotFound):
        store.read_at(key, 0, 0)
    with pytest.raises(ObjectNotFound):
        store.open_source(key)
    with pytest.raises(ObjectNotFound):
        store.iter_chunks(key)
    assert issubclass(ObjectNotFound, StorageError)


def test_delete_is_idempotent(store: ObjectStore) -> None:
    key, other = store.new_key(), store.new_key()
    store.put_bytes(key, b"doomed")
    store.put_bytes(other, b"survivor")
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.stat(key)
    with pytest.raises(ObjectNotFound):
        store.read_at(key, 0, 6)
    store.delete(key)  # again
    store.delete(store.new_key())  # never existed
    assert store.read_at(other, 0, 100) == b"survivor"
    assert sorted(store.iter_keys()) == [other]


# Keys ---------------------------------------------------------------------------------------------
def test_new_keys_are_unique_and_opaque(store: ObjectStore) -> None:
    keys = [store.new_key() for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"[0-9a-f/]+", key), key
        assert len(key.replace("/", "")) >= 32  # 128 random bits


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "ab/cd/" + "a" * 32, "A" * 32, "a" * 31, "a" * 32 + "\n", "g" * 32]
)
def test_malformed_keys_are_refused(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidKey):
        store.put_bytes(bad, b"x")
    with pytest.raises(InvalidKey):
        store.stat(bad)
    with pytest.raises(InvalidKey):
        store.read_at(bad, 0, 1)
    with pytest.raises(InvalidKey):
        store.delete(bad)
    assert issubclass(InvalidKey, ValueError)
    assert list(store.iter_keys()) == []


def test_iter_keys_lists_exactly_what_was_put(store: ObjectStore, tmp_path: Path) -> None:
    assert list(store.iter_keys()) == []
    src = tmp_path / "f.bin"
    src.write_bytes(b"file")
    keys = {store.new_key() for _ in range(25)}
    for i, key in enumerate(sorted(keys)):
        if i % 2:
            store.put_bytes(key, str(i).encode())
        else:
            store.put_file(key, src)
    gone = sorted(keys)[:3]
    for key in gone:
        store.delete(key)
    listed = list(store.iter_keys())
    assert len(listed) == len(set(listed))
    assert set(listed) == keys - set(gone)


# Overwrites ---------------------------------------------------------------------------------------
def test_overwrite_replaces(store: ObjectStore, tmp_path: Path) -> None:
    key = store.new_key()
    old, new = blob(7 * MiB), blob(MiB + 3)
    src = tmp_path / "old.bin"
    src.write_bytes(old)
    store.put_file(key, src)
    info = store.put_bytes(key, new)
    assert info.size == len(new)
    assert store.stat(key).size == len(new)
    assert read_all(store, key) == new
    assert list(store.iter_keys()) == [key]


def test_overwrite_is_atomic_for_concurrent_readers(store: ObjectStore) -> None:
    key = store.new_key()
    versions = [blob(6 * MiB), blob(MiB), blob(6 * MiB + 1)]  # S3: multipart, single, multipart
    digests = {sha(v) for v in versions}
    sizes = {len(v) for v in versions}
    store.put_bytes(key, versions[0])
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(sha(read_all(store, key)))
                assert store.stat(key).size in sizes
        except BaseException as exc:  # a missing or partial object, seen by a reader
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for round_ in range(4):
            for version in versions[1:] + versions[:1]:
                store.put_bytes(key, version)
            if errors:
                break
            time.sleep(0.01 * round_)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[0]
    assert seen and set(seen) <= digests


def test_open_source_is_pinned_to_one_version(store: ObjectStore) -> None:
    key = store.new_key()
    old, new = blob(2 * MiB), blob(2 * MiB)
    store.put_bytes(key, old)
    with store.open_source(key) as source:
        assert source.read_at(0, 10) == old[:10]
        store.put_bytes(key, new)
        # Never a mix of two versions: the filesystem keeps reading the file it opened; S3 pins the
        # etag (If-Match) and says the object changed.
        if isinstance(store, S3Store):
            with pytest.raises(ObjectChanged):
                source.read_at(MiB, 100)
        else:
            assert source.read_at(MiB, 100) == old[MiB : MiB + 100]
    assert store.read_at(key, MiB, 100) == new[MiB : MiB + 100]


def test_failed_overwrite_keeps_the_old_object(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = store.new_key()
    old = blob(MiB)
    store.put_bytes(key, old)
    src = tmp_path / "new.bin"
    src.write_bytes(blob(17 * MiB))  # S3: 4 parts

    if isinstance(store, S3Store):
        real = store.client._upload_part
        calls = {"n": 0}

        def flaky(*args: Any) -> str:
            calls["n"] += 1
            if calls["n"] == 3:
                raise ConnectionResetError("injected: connection reset during part 3")
            return real(*args)

        monkeypatch.setattr(store.client, "_upload_part", flaky)
        expected: type[Exception] = StorageError
    else:
        import appliance.storage.filesystem as fs

        def full(*args: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(fs.os, "replace", full)
        expected = StorageUnavailable
    with pytest.raises(expected):
        store.put_file(key, src)
    monkeypatch.undo()
    assert store.read_at(key, 0, 2 * MiB) == old
    assert store.stat(key).size == MiB
    assert list(store.iter_keys()) == [key]
    if isinstance(store, FilesystemStore):
        leftovers = [p.name for p in store.root.rglob("*") if p.is_file()]
        assert leftovers == [key], leftovers


def test_put_file_of_a_missing_path(store: ObjectStore, tmp_path: Path) -> None:
    key = store.new_key()
    with pytest.raises(FileNotFoundError):
        store.put_file(key, tmp_path / "nope.bin")
    assert not store.exists(key)


def test_check_passes(store: ObjectStore) -> None:
    store.check()
    store.check()
    assert store.name in ("filesystem", "s3")
    assert isinstance(store, ObjectStore)


# S3 only ------------------------------------------------------------------------------------------
def test_s3_creates_its_bucket(rgw: RGW) -> None:
    bucket = f"t-{secrets.token_hex(8)}"
    client = minio_client(rgw)
    assert not client.bucket_exists(bucket)
    store = S3Store(rgw.endpoint, rgw.access_key, rgw.secret_key, bucket, ensure_bucket=False)
    assert not client.bucket_exists(bucket)
    try:
        store.check()
        assert client.bucket_exists(bucket)
        S3Store(rgw.endpoint, rgw.access_key, rgw.secret_key, bucket).check()  # already there: fine
        key = store.new_key()
        store.put_bytes(key, b"hello")
        assert [o.object_name for o in client.list_objects(bucket)] == [key]
    finally:
        drop_bucket(client, bucket)


def test_s3_keys_are_plain_object_names(s3: S3Store) -> None:
    key = s3.new_key()
    s3.put_bytes(key, b"x")
    assert [o.object_name for o in s3.client.list_objects(s3.bucket, recursive=True)] == [key]
    # Objects that are not store keys (someone else's files in the bucket) are not listed.
    s3.client.put_object(s3.bucket, "README.txt", io.BytesIO(b"hi"), 2)
    assert list(s3.iter_keys()) == [key]


def test_s3_wrong_secret_is_refused(rgw: RGW, s3: S3Store) -> None:
    key = s3.new_key()
    s3.put_bytes(key, b"secret blob")
    wrong = secrets.token_hex(20)

    # The server really checks signatures: a raw request signed with the wrong secret gets a 403.
    with pytest.raises(S3Error) as raw:
        minio_client(rgw, secret=wrong).get_object(s3.bucket, key)
    assert raw.value.code == "SignatureDoesNotMatch"
    assert raw.value.response.status == 403
    with pytest.raises(S3Error) as unknown:
        minio_client(rgw, access="AKUNKNOWN000000000000", secret=wrong).get_object(s3.bucket, key)
    assert unknown.value.code == "InvalidAccessKeyId"

    # Through the store: refused at construction (bucket check) and on every operation.
    with pytest.raises(StorageUnavailable) as built:
        S3Store(rgw.endpoint, rgw.access_key, wrong, s3.bucket)
    assert "SignatureDoesNotMatch" in str(built.value)
    bad = S3Store(rgw.endpoint, rgw.access_key, wrong, s3.bucket, ensure_bucket=False)
    with pytest.raises(StorageUnavailable) as checked:
        bad.check()
    with pytest.raises(StorageUnavailable):
        bad.read_at(key, 0, 5)
    with pytest.raises(StorageUnavailable):
        bad.put_bytes(bad.new_key(), b"intruder")
    with pytest.raises(StorageUnavailable):
        list(bad.iter_keys())
    for exc in (built.value, checked.value):
        message = str(exc)
        assert "\n" not in message
        assert wrong not in message and rgw.secret_key not in message and rgw.access_key not in message
    assert list(s3.iter_keys()) == [key]  # nothing was written with the wrong key
    assert s3.read_at(key, 0, 100) == b"secret blob"


def _timed_unavailable(build: Callable[[], object]) -> tuple[float, str]:
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        build()
    return time.monotonic() - started, str(info.value)


def test_s3_unreachable_endpoint_fails_fast() -> None:
    port = free_port()  # nothing listens there: connection refused
    access, secret = "AKSHOULDNOTAPPEAR000", secrets.token_hex(20)
    elapsed, message = _timed_unavailable(lambda: S3Store(f"127.0.0.1:{port}", access, secret, "bkt"))
    assert elapsed < 5, elapsed
    assert "unreachable" in message and "\n" not in message
    assert access not in message and secret not in message

    lazy = S3Store(f"127.0.0.1:{port}", access, secret, "bkt", ensure_bucket=False)
    for op in (lazy.check, lambda: lazy.stat(lazy.new_key()), lambda: lazy.put_bytes(lazy.new_key(), b"x")):
        elapsed, _ = _timed_unavailable(op)
        assert elapsed < 5, elapsed


def test_s3_server_that_never_answers_fails_fast() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connects hang (a
    # black-holed host); then one that accepts but never replies (a hung server).
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(0)
        port = hung.getsockname()[1]
        fillers = []
        try:
            for _ in range(2):
                s = socket.socket()
                s.settimeout(0.5)
                with contextlib.suppress(OSError):
                    s.connect(("127.0.0.1", port))
                fillers.append(s)
            elapsed, message = _timed_unavailable(
                lambda: S3Store(f"127.0.0.1:{port}", "ak", "sk", "bkt", connect_timeout=1.0)
            )
            assert elapsed < 6, elapsed
            assert "unreachable" in message
        finally:
            for s in fillers:
                s.close()

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        accepted: list[socket.socket] = []
        done = threading.Event()

        def accept() -> None:
            silent.settimeout(0.2)
            while not done.is_set():
                try:
                    accepted.append(silent.accept()[0])
                except OSError:
                    continue

        t = threading.Thread(target=accept)
        t.start()
        try:
            elapsed, message = _timed_unavailable(
                lambda: S3Store(f"127.0.0.1:{port}", "ak", "sk", "bkt", read_timeout=1.0)
            )
            assert elapsed < 6, elapsed
            assert "unreachable" in message
        finally:
            done.set()
            t.join()
            for s in accepted:
                s.close()


# Filesystem only ----------------------------------------------------------------------------------
def test_filesystem_layout_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "objects"
    store = FilesystemStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    key = store.new_key()
    store.put_bytes(key, b"x")
    path = root / key[:2] / key[2:4] / key
    assert path.read_bytes() == b"x"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700


def test_filesystem_temp_files_are_invisible_and_swept(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    key = store.new_key()
    store.put_bytes(key, b"x")
    stray = store.root / key[:2] / key[2:4] / f".tmp-{key}"
    stray.write_bytes(b"partial")
    (store.root / "not-a-fanout-dir").mkdir()
    assert list(store.iter_keys()) == [key]
    assert store.sweep_temp_files(older_than_s=3600) == 0
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_temp_files(older_than_s=3600) == 1
    assert not stray.exists() and store.exists(key)


def test_filesystem_check_fails_without_root(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.root.rmdir()
    with pytest.raises(StorageUnavailable, match="missing"):
        store.check()


# Factory ------------------------------------------------------------------------------------------
def test_factory_defaults_to_the_filesystem(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, environment="test", _env_file=None)  # type: ignore[call-arg]
    store = build_store(settings)
    assert isinstance(store, FilesystemStore)
    assert store.root == settings.objects_dir
    store.check()


def test_factory_builds_s3_from_settings(rgw: RGW, tmp_path: Path) -> None:
    bucket = f"t-{secrets.token_hex(8)}"
    settings = Settings(
        home=tmp_path,
        environment="test",
        s3_endpoint=f"http://{rgw.endpoint}",
        s3_access_key=rgw.access_key,
        s3_secret_key=rgw.secret_key,
        s3_bucket=bucket,
        _env_file=None,  # type: ignore[call-arg]
    )
    try:
        store = build_store(settings)
        assert isinstance(store, BreakerStore) and isinstance(store.inner, S3Store)
        assert store.inner.bucket == bucket and store.name == "s3"
        store.check()
        assert rgw.secret_key not in repr(store) and rgw.secret_key not in repr(settings)
    finally:
        drop_bucket(minio_client(rgw), bucket)
