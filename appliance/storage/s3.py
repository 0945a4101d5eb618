"""S3 object store through the `minio` client (MinIO in production compose, Ceph radosgw in the tests).

- Keys are the store's flat 32-hex keys, used as object names in one bucket (created when missing).
- `put_file`/`put_bytes` go multipart above `part_size` (default 16 MiB, min 5 MiB); an S3 object
  only appears when the upload completes, and a failed multipart upload is aborted: readers never see a
  partial object. RGW returns no etag for a completed multipart put, so the etag comes from a stat then.
- The urllib3 pool has a short connect timeout and bounded retries, so a dead or unreachable server
  fails with StorageUnavailable in seconds rather than minutes (minio's own default is 5 min x 6 tries).
- Every HTTP response is closed and its connection released, also when a read fails half-way.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError

from appliance.storage.base import (
    ChunkIterator,
    ClosingContext,
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    check_key,
    check_range,
    is_key,
    new_key,
)

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB

_AUTH_CODES = frozenset(
    {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"}
)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchVersion"})


def _endpoint_host(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept `host:port` or a URL; return (`host:port`, secure)."""
    if "://" not in endpoint:
        return endpoint.strip().rstrip("/"), secure
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError("s3 endpoint must be host:port or http(s)://host:port (no path)")
    if "@" in parts.netloc:
        raise ValueError("s3 endpoint must not carry credentials: use s3_access_key / s3_secret_key")
    return parts.netloc, parts.scheme == "https"


def _reason(exc: BaseException) -> str:
    """A short, credential-free reason for a transport error (the innermost cause's class and text)."""
    inner: BaseException = exc
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        inner = exc.reason
    text = str(inner)
    # urllib3 messages look like "<HTTPConnection object at 0x..>: Failed to establish ...: [Errno 111] ..."
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return f"{type(inner).__name__}: {text}"[:200]


class S3Source(ClosingContext):
    """Ranged reads of one object, pinned to its etag at open: a replaced object raises ObjectChanged."""

    def __init__(self, store: S3Store, key: str, info: ObjectInfo) -> None:
        self._store = store
        self.key = key
        self.size = info.size
        self.etag = info.etag

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(offset, length)
        if length == 0 or offset >= self.size:
            return b""
        headers: dict[str, Any] | None = {"If-Match": f'"{self.etag}"'} if self.etag else None
        return self._store._get_range(self.key, offset, min(length, self.size - offset), headers)

    def close(self) -> None:
        pass


class S3Store:
    name = "s3"

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str = "appliance",
        *,
        region: str = "us-east-1",
        secure: bool = False,
        part_size: int = DEFAULT_PART_SIZE,
        parallel_uploads: int = 3,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
        retries: int = 2,
        ensure_bucket: bool = True,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB (got {part_size})")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r} (3-63 of a-z 0-9 . -)")
        host, secure = _endpoint_host(endpoint, secure)
        self.endpoint = host
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.parallel_uploads = max(1, parallel_uploads)
        scheme = "https" if secure else "http"
        self._where = f"S3 at {scheme}://{host}, bucket {bucket}"
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=max(10, self.parallel_uploads + 2),
            retries=urllib3.Retry(
                total=retries,
                connect=min(retries, 1),  # each failed connect costs a full connect timeout
                read=min(retries, 1),
                status=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                raise_on_status=False,  # let minio parse the last error response (its S3 code)
            ),
        )
        self.client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,  # also spares a GetBucketLocation round trip per bucket
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        if ensure_bucket:
            self._ensure_bucket()

    # Errors ---------------------------------------------------------------------------------------
    def _raise(self, exc: BaseException, action: str, key: str | None = None) -> NoReturn:
        """Translate a minio/urllib3 exception into a StorageError (one line, no credentials)."""
        if isinstance(exc, StorageError):
            raise exc
        if isinstance(exc, S3Error):
            code = exc.code or "unknown"
            if code in _NOT_FOUND_CODES and key is not None:
                raise ObjectNotFound(f"no object {key}") from exc
            if code == "NoSuchBucket":
                raise StorageUnavailable(f"{self._where}: the bucket does not exist") from exc
            if code == "PreconditionFailed" and key is not None:
                raise ObjectChanged(f"object {key} was replaced while being read") from exc
            if code in _AUTH_CODES:
                raise StorageUnavailable(
                    f"{self._where}: the server refused the credentials or access ({code}); "
                    "check s3_access_key / s3_secret_key and the bucket policy"
                ) from exc
            status = exc.response.status if exc.response is not None else 0
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                raise StorageUnavailable(f"{self._where}: {action} failed: server error {code}") from exc
            raise StorageError(f"{self._where}: {action} failed: {code}") from exc
        if isinstance(exc, ServerError | InvalidResponseError):
            raise StorageUnavailable(f"{self._where}: {action} failed: {type(exc).__name__}") from exc
        if isinstance(exc, Urllib3HTTPError | ConnectionError | TimeoutError):
            raise StorageUnavailable(f"{self._where}: unreachable ({_reason(exc)})") from exc
        if isinstance(exc, MinioException):
            raise StorageError(f"{self._where}: {action} failed: {type(exc).__name__}") from exc
        raise exc

    def _call(self, action: str, fn: Callable[[], Any], key: str | None = None) -> Any:
        try:
            return fn()
        except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
            self._raise(exc, action, key)

    # Bucket ---------------------------------------------------------------------------------------
    def _ensure_bucket(self) -> None:
        """Create the bucket if it is missing; map refusals to a precise reason."""
        with self._bucket_lock:
            try:
                if not self.client.bucket_exists(self.bucket):
                    try:
                        self.client.make_bucket(self.bucket, location=self.region)
                    except S3Error as exc:
                        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                self._bucket_ready = True
            except S3Error as exc:
                if exc.code == "AccessDenied":
                    # A HEAD error has no body, so no precise code: ask with a GET, which has one.
                    try:
                        self.client.list_buckets()
                    except S3Error as detail:
                        self._raise(detail, "checking the bucket")
                    except (MinioException, Urllib3HTTPError) as detail:
                        self._raise(detail, "checking the bucket")
                self._raise(exc, "checking the bucket")
            except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
                self._raise(exc, "checking the bucket")

    def _ready(self) -> None:
        if not self._bucket_ready:
            self._ensure_bucket()

    def check(self) -> None:
        self._ensure_bucket()

    # Writes ---------------------------------------------------------------------------------------
    def new_key(self) -> str:
        return new_key()

    def _part_size_for(self, size: int) -> int:
        """The configured part size, grown (whole MiB) when the object would need more than 10,000 parts."""
        needed = math.ceil(size / MAX_PARTS / MiB) * MiB
        return min(MAX_PART_SIZE, max(self.part_size, needed))

    def _finish_put(self, key: str, size: int, etag: str | None) -> ObjectInfo:
        if etag:
            return ObjectInfo(key=key, size=size, etag=etag)
        # RGW answers a completed multipart upload without an etag: the stat has the right one.
        return self.stat(key)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        check_key(key)
        path = Path(path)
        size = path.stat().st_size  # FileNotFoundError (the caller's) before any request
        self._ready()
        result = self._call(
            "uploading an object",
            lambda: self.client.fput_object(
                self.bucket,
                key,
                str(path),
                part_size=self._part_size_for(size),
                num_parallel_uploads=self.parallel_uploads,
            ),
            key,
        )
        return self._finish_put(key, size, result.etag)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        check_key(key)
        self._ready()
        size = len(data)
        result = self._call(
            "uploading an object",
            lambda: self.client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                size,
                part_size=self._part_size_for(size),
                num_parallel_uploads=self.parallel_uploads,
            ),
            key,
        )
        return self._finish_put(key, size, result.etag)

    # Reads ----------------------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        obj = self._call("stat of an object", lambda: self.client.stat_object(self.bucket, key), key)
        return ObjectInfo(key=key, size=int(obj.size or 0), etag=obj.etag or None)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def _get_range(self, key: str, offset: int, length: int, headers: dict[str, Any] | None = None) -> bytes:
        """GET bytes [offset, offset+length) (length > 0); b"" when offset is at or past the end."""
        response = None
        try:
            response = self.client.get_object(
                self.bucket, key, offset=offset, length=length, request_headers=headers
            )
            data = response.read()
            if response.status == 200:  # the server ignored the Range header
                data = data[offset : offset + length]
            return data
        except S3Error as exc:
            if exc.code == "InvalidRange":  # offset at or past the end (or an empty object)
                return b""
            self._raise(exc, "reading an object", key)
        except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
            self._raise(exc, "reading an object", key)
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def read_at(self, key: str, offset: int, length: int) -> bytes:
        check_key(key)
        check_range(offset, length)
        if length == 0:
            self.stat(key)  # still ObjectNotFound for a missing key
            return b""
        return self._get_range(key, offset, length)

    def open_source(self, key: str) -> S3Source:
        return S3Source(self, key, self.stat(key))

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> ChunkIterator:
        check_key(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        # One GET for the whole object: the stream sees one version even if the key is overwritten.
        response = self._call("reading an object", lambda: self.client.get_object(self.bucket, key), key)

        def read(n: int) -> bytes:
            try:
                return response.read(n)
            except (Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
                self._raise(exc, "reading an object", key)

        def release() -> None:
            response.close()
            response.release_conn()

        return ChunkIterator(read, release, chunk_size)

    # Deletes and listing --------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        check_key(key)
        self._call("deleting an object", lambda: self.client.remove_object(self.bucket, key), key)

    def iter_keys(self) -> Iterator[str]:
        objects = self.client.list_objects(self.bucket, recursive=True)
        while True:
            try:
                obj = next(objects)
            except StopIteration:
                return
            except (MinioException, Urllib3HTTPError, ConnectionError, TimeoutError) as exc:
                self._raise(exc, "listing objects")
            name = obj.object_name or ""
            if is_key(name):  # anything else in the bucket is not ours
                yield name

    def __repr__(self) -> str:
        return f"S3Store({self._where})"
