"""The backup archive: a tar stream encrypted with age (https://age-encryption.org/v1).

    appliance-backup-<UTC time>.tar.age = age( tar( backup.json, keys/…, objects/<key>…,
                                                    postgres.dump, MANIFEST.json ) )

Why these choices:
- age (https://age-encryption.org/v1, X25519) is a small, audited, standard format with public-key
  recipients: the appliance needs only the backup *public* key to write backups, and an
  administrator can open one with the stock `age` or `rage` tool (`age -d -i backup.key | tar t`).
  Its STREAM construction authenticates every 64 KiB chunk and the end of the stream, so an edited
  or truncated archive fails to decrypt. `appliance.backup.age` writes and reads it with the
  `cryptography` primitives (pyrage, the Rust binding, was 5x slower here and holds the GIL); pyrage
  generates the keys and is the reference the tests check interoperability against.
- tar (GNU format: base-256 sizes, so a member may exceed 8 GiB) is what every operator can read.
  The tar is produced and parsed here as a stream, never staged whole on disk: `TarWriter` yields
  the bytes as age consumes them, `TarReader` is fed the bytes as age produces them.
- `MANIFEST.json`, the last member, lists the size and sha256 of every member before it, so
  `backup verify` checks each one and notices a missing or extra member, on top of age's
  authentication (which alone cannot say *which* part is wrong).

Nothing here decrypts document data: blobs are copied as stored (encrypted with tenant data keys
that are themselves wrapped by the master key, which is never in the archive).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyrage import x25519

from appliance.backup.age import AgeError, AgeWriter, decrypt_stream, identity_key, recipient_bytes

FORMAT = "appliance-backup/1"
METADATA = "backup.json"
MANIFEST = "MANIFEST.json"
TENANT_KEYS = "keys/tenant-keys.json"
KEK_DESCRIPTOR = "keys/kek.json"
AUDIT_KEYS_PREFIX = "keys/audit/"  # public keys that signed audit checkpoints (never a private key)
DUMP = "postgres.dump"
OBJECTS_PREFIX = "objects/"
BLOCK = tarfile.BLOCKSIZE  # 512
CHUNK = 1 << 20


class ArchiveError(Exception):
    """An archive that cannot be read, is not ours, or does not match its manifest (one line)."""


# Keys --------------------------------------------------------------------------------------------
def generate_identity() -> tuple[str, str]:
    """A new age X25519 key pair: (secret identity "AGE-SECRET-KEY-1…", public recipient "age1…")."""
    ident = x25519.Identity.generate()
    return str(ident), str(ident.to_public())


def load_recipient(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except FileNotFoundError:
        raise ArchiveError(
            f"no backup public key at {path} (create one: `appliance backup keygen`)"
        ) from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise ArchiveError(f"{path} holds no age recipient (a line starting with age1)")
    try:
        recipient_bytes(keys[0])
    except AgeError:
        raise ArchiveError(f"{path} does not hold a valid age X25519 recipient (age1…)") from None
    return keys[0]


def load_identity(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except FileNotFoundError:
        raise ArchiveError(f"no backup key at {path}") from None
    except PermissionError:
        raise ArchiveError(f"cannot read the backup key {path}: permission denied") from None
    keys = [ln for ln in lines if ln.startswith("AGE-SECRET-KEY-")]
    if not keys:
        raise ArchiveError(f"{path} holds no age identity (a line starting with AGE-SECRET-KEY-)")
    try:
        identity_key(keys[0])
    except AgeError:
        raise ArchiveError(f"{path} does not hold a valid age X25519 identity") from None
    return keys[0]


# Members -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One member as the manifest records it."""

    name: str
    size: int
    sha256: str


@dataclass
class Member:
    """A member to write: its size must be known up front (tar headers come first)."""

    name: str
    size: int
    chunks: Callable[[], Iterable[bytes]]  # called once, when the member's turn comes

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> Member:
        return cls(name, len(data), lambda: [data])

    @classmethod
    def from_file(cls, name: str, path: Path) -> Member:
        def read() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return cls(name, path.stat().st_size, read)


def _header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, int(mtime), 0o600, tarfile.REGTYPE
    info.uname = info.gname = "appliance"
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class TarWriter:
    """Yields a tar stream of `members` followed by `MANIFEST.json`, hashing every member as it goes.

    `on_bytes(n)` reports member bytes for progress bars. A member whose source yields a different
    number of bytes than announced is an error (the archive would be corrupt), never padded over.
    """

    def __init__(self, members: Iterable[Member], *, on_bytes: Callable[[int], None] | None = None) -> None:
        self._members = members
        self._on_bytes = on_bytes or (lambda n: None)
        self.entries: list[Entry] = []

    def __iter__(self) -> Iterator[bytes]:
        now = time.time()
        for member in self._members:
            yield from self._member(member, now)
        manifest = manifest_bytes(self.entries)
        yield from self._member(Member.from_bytes(MANIFEST, manifest), now, record=False)
        yield b"\0" * (2 * BLOCK)

    def _member(self, member: Member, mtime: float, *, record: bool = True) -> Iterator[bytes]:
        yield _header(member.name, member.size, mtime)
        digest = hashlib.sha256()
        written = 0
        for chunk in member.chunks():
            written += len(chunk)
            if written > member.size:
                raise ArchiveError(
                    f"{member.name} grew while it was archived (more than {member.size} bytes)"
                )
            digest.update(chunk)
            self._on_bytes(len(chunk))
            yield chunk
        if written != member.size:
            raise ArchiveError(f"{member.name} has {written} bytes, {member.size} were announced")
        yield _padding(member.size)
        if record:
            self.entries.append(Entry(member.name, member.size, digest.hexdigest()))


def manifest_bytes(entries: list[Entry]) -> bytes:
    body = {
        "format": FORMAT,
        "members": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in entries],
    }
    return json.dumps(body, indent=1).encode()


_END = object()


class _Pipeline:
    """Hands work to a second thread through a small bounded queue, so that the two halves of a
    backup (read and sha256 the blobs | encrypt and write) or of a restore (decrypt | sha256 and
    write the members) overlap on two cores: hashlib, file I/O and OpenSSL release the GIL.
    An error in either thread stops both and is raised in the caller's."""

    def __init__(self, depth: int = 8) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        if self.error is not None:
            raise self.error

    def items(self) -> Iterator[Any]:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if item is _END:
                return
            yield item


def write_archive(dest: Path, recipient: str, chunks: Iterable[bytes]) -> int:
    """Encrypt the stream `chunks` to `recipient` into `dest` (created 0600, fsynced); return its size.

    `chunks` is produced (blobs read and hashed) in a second thread while this one encrypts and
    writes. An error raised while producing (a blob that cannot be read) propagates as it was."""
    pipe = _Pipeline()

    def produce() -> None:
        try:
            for chunk in chunks:
                pipe.put(chunk)
                if pipe.stop.is_set():
                    return
            pipe.put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            pipe.error = exc
            pipe.stop.set()

    producer = threading.Thread(target=produce, name="backup-read", daemon=True)
    producer.start()
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb", buffering=0) as fh:
            writer = AgeWriter(fh, recipient)
            for chunk in pipe.items():
                writer.write(chunk)
            if pipe.error is not None:
                raise pipe.error
            writer.close()
            os.fsync(fh.fileno())
            return fh.tell()
    finally:
        pipe.stop.set()
        producer.join()


# Reading -----------------------------------------------------------------------------------------
class MemberSink(Protocol):
    """What a reader does with each member: `start` → `data`* → `end(sha256)`."""

    def start(self, name: str, size: int) -> None: ...

    def data(self, chunk: bytes) -> None: ...

    def end(self, entry: Entry) -> None: ...


@dataclass
class ReadResult:
    entries: list[Entry] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    bytes_read: int = 0


class TarReader:
    """A push parser for the tar stream this module writes: feed it with `write(bytes)`.

    backup.json and MANIFEST.json are kept and parsed; every member is hashed and
    handed to `sink`. Only plain files are accepted; any other entry (links, devices, paths with
    '..' or a leading '/') is refused, so a crafted archive cannot write outside the staging area.
    """

    KEEP = {METADATA, MANIFEST}  # parsed here; a sink keeps whatever else it needs

    def __init__(
        self, sink: MemberSink | None = None, *, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        self._sink = sink
        self._on_bytes = on_bytes or (lambda n: None)
        self._pending = bytearray()
        self._name: str | None = None
        self._remaining = 0
        self._pad = 0
        self._digest = hashlib.sha256()
        self._size = 0
        self._kept: bytearray | None = None
        self.kept: dict[str, bytes] = {}
        self.result = ReadResult()
        self.finished = False

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.result.bytes_read += len(data)
        self._feed(data)
        return len(data)

    def flush(self) -> None:
        pass

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._name is not None and self._remaining:
                n = min(self._remaining, len(view))
                self._body(bytes(view[:n]))
                view = view[n:]
                self._remaining -= n
                if not self._remaining:
                    self._finish_member()
                continue
            if self._pad:
                n = min(self._pad, len(view))
                view = view[n:]
                self._pad -= n
                continue
            need = BLOCK - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) == BLOCK:
                block = bytes(self._pending)
                self._pending.clear()
                self._header(block)

    def _header(self, block: bytes) -> None:
        if self.finished:
            if block.strip(b"\0"):
                raise ArchiveError("data after the end of the archive")
            return
        if not block.strip(b"\0"):
            self.finished = self.result.manifest is not None
            if not self.finished:
                raise ArchiveError("the archive ends before its manifest (truncated or not a backup)")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.TarError as exc:
            raise ArchiveError(f"not a backup archive: bad tar header ({exc})") from None
        name = info.name
        if not info.isreg() or name.startswith("/") or ".." in name.split("/"):
            raise ArchiveError(f"unexpected entry in the archive: {name!r}")
        if self.result.manifest is not None:
            raise ArchiveError(f"member {name!r} after the manifest")
        self._name, self._size, self._remaining = name, info.size, info.size
        self._pad = -info.size % BLOCK
        self._digest = hashlib.sha256()
        self._kept = bytearray() if name in self.KEEP else None
        if name != MANIFEST and self._sink is not None:
            self._sink.start(name, info.size)
        if not info.size:
            self._finish_member()

    def _body(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._on_bytes(len(chunk))
        if self._kept is not None:
            self._kept += chunk
        if self._name != MANIFEST and self._sink is not None:
            self._sink.data(chunk)

    def _finish_member(self) -> None:
        assert self._name is not None
        entry = Entry(self._name, self._size, self._digest.hexdigest())
        if self._kept is not None:
            self.kept[self._name] = bytes(self._kept)
        if self._name == MANIFEST:
            try:
                self.result.manifest = json.loads(self.kept[MANIFEST])
            except ValueError:
                raise ArchiveError("the manifest is not valid JSON") from None
        else:
            if self._name == METADATA:
                try:
                    self.result.metadata = json.loads(self.kept[METADATA])
                except ValueError:
                    raise ArchiveError("backup.json is not valid JSON") from None
                if self.result.metadata.get("format") != FORMAT:
                    raise ArchiveError(
                        f"not an appliance backup of format {FORMAT} "
                        f"(found {self.result.metadata.get('format')!r})"
                    )
            self.result.entries.append(entry)
            if self._sink is not None:
                self._sink.end(entry)
        self._name = None


def read_archive(
    src: Path,
    identity_path: Path,
    sink: MemberSink | None = None,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> ReadResult:
    """Decrypt and parse the whole archive, then check every member against the manifest.

    Raises ArchiveError with one line naming the first problem: a wrong key, an edited or truncated
    archive (age's authentication), a member missing, extra, or differing from the manifest."""
    identity = load_identity(identity_path)
    reader = TarReader(sink, on_bytes=on_bytes)
    pipe = _Pipeline()

    def consume() -> None:  # parse, hash and stage in a second thread while this one decrypts
        try:
            for chunk in pipe.items():
                reader.write(chunk)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            pipe.error = exc
            pipe.stop.set()

    class _Feed:
        def write(self, data: bytes) -> int:
            pipe.put(data)
            return len(data)

    consumer = threading.Thread(target=consume, name="restore-stage", daemon=True)
    consumer.start()
    try:
        with open(src, "rb", buffering=1 << 20) as fh:
            decrypt_stream(fh, identity, _Feed())  # type: ignore[arg-type]
        pipe.put(_END)
    except AgeError as exc:
        pipe.stop.set()
        consumer.join()
        if pipe.error is not None:
            raise pipe.error from None
        text = str(exc)
        if text.startswith("no matching key"):
            text = "the backup key does not open this archive (it was encrypted to another key)"
        elif text.startswith("not an age file"):
            text = (
                f"not an age-encrypted backup archive ({text.removeprefix('not an age file ').strip('()')})"
            )
        raise ArchiveError(text) from None
    except BaseException:
        pipe.stop.set()
        raise
    finally:
        consumer.join()
    if pipe.error is not None:
        raise pipe.error
    if not reader.finished:
        raise ArchiveError("the archive ends before its end-of-archive marker (truncated)")
    check_manifest(reader.result)
    return reader.result


def check_manifest(result: ReadResult) -> None:
    manifest = result.manifest
    if manifest is None:
        raise ArchiveError("the archive has no manifest")
    if manifest.get("format") != FORMAT:
        raise ArchiveError(f"unknown manifest format {manifest.get('format')!r}")
    listed = {m["name"]: m for m in manifest.get("members", [])}
    seen: set[str] = set()
    for entry in result.entries:
        want = listed.get(entry.name)
        if want is None:
            raise ArchiveError(f"member {entry.name} is not in the manifest")
        if entry.name in seen:
            raise ArchiveError(f"member {entry.name} appears twice")
        seen.add(entry.name)
        if int(want["size"]) != entry.size or want["sha256"] != entry.sha256:
            raise ArchiveError(
                f"member {entry.name} does not match the manifest "
                f"(size {entry.size} vs {want['size']}, "
                f"sha256 {entry.sha256[:12]}… vs {want['sha256'][:12]}…)"
            )
    missing = sorted(set(listed) - seen)
    if missing:
        raise ArchiveError(f"{len(missing)} member(s) listed in the manifest are missing, first {missing[0]}")
    if result.metadata is None:
        raise ArchiveError("the archive has no backup.json")
