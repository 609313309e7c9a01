"""Images in S3-compatible object storage (AWS S3, Ceph RGW, MinIO, SeaweedFS, B2, Wasabi).

Imported only when an ``s3://bucket/prefix/name`` location is used: the client (boto3) costs
about 0.3 s to import, which no local command pays.

- Credentials, region and endpoint come the standard ways (boto3's own resolution:
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
  ``~/.aws/{credentials,config}``, ``AWS_ENDPOINT_URL``), or ``--endpoint-url`` (`configure`).
  Checksums are computed only when an operation requires them (``when_required``): the newer
  defaults break many S3-compatible servers (boto3 #4392).  No message, log line or result
  ever carries a key or secret: errors name the ``s3://`` URL and the server's error code.
- Writing (`S3Sink`) is a multipart upload fed from a bounded buffer: parts are uploaded
  while the image is made, at most `UPLOADS_IN_FLIGHT` at a time, so memory is a few parts
  whatever the disk size; the part size grows with the size the image may reach (the store is
  told it) so that the 10,000-part limit is never hit, and keeps doubling past 9,000 parts
  should the hint be short.  The object appears under its name only when the upload is
  completed, after the last byte; an abort (error, Ctrl-C) aborts the upload.  A run killed
  outright leaves an unfinished upload that holds no object: the next write of the same name
  aborts it and says so (a warning), so no orphan parts pile up unseen.
- Reading (`S3Reader`) is ranged GETs.  Reads that follow each other (restore, verify) are
  served, once STREAK bytes were read in sequence, from windows of `WINDOW` bytes fetched
  concurrently ahead of the reader; small scattered reads (a header, a trailer, the footer,
  index segments) from chunks of SMALL_CHUNK bytes kept; larger ones fetch what is asked.
  A window's buffer is used again for a later window once no read copies from it (fresh
  8 MiB buffers cost a page fault per 4 KiB).
- Transient failures (connection errors, timeouts, HTTP 5xx, 429, SlowDown) are retried with
  exponential backoff and jitter, each retry logged at INFO (``-v``); permanent ones become
  one diskimg error: no such object -> NotAnImage (exit 2), no such bucket -> UsageError
  (exit 2), access denied or no credentials -> PermissionDenied (exit 4), anything else after
  the retries -> OperationFailed (exit 3).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from diskimg.errors import DiskimgError, NotAnImage, OperationFailed, PermissionDenied
from diskimg.errors import UsageError
from diskimg.store import Store, StoreReader, StoreSink, StoreStat, collector_paused

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
MIN_PART = 8 * MiB            # S3's minimum is 5 MiB (all parts but the last)
MAX_PART = 5 << 30            # S3's maximum
MAX_PARTS = 10_000
PLANNED_PARTS = 9_000         # parts the hint is spread over: room for a short hint
UPLOADS_IN_FLIGHT = 4
WINDOW = 8 * MiB              # a read-ahead window of sequential reads
AHEAD = 6                     # windows fetched ahead of a sequential reader
SMALL_READ = 64 << 10         # a read this small is served from a chunk of SMALL_CHUNK bytes,
SMALL_CHUNK = 256 << 10       # kept (the last SMALL_KEPT): opening an image reads its header,
SMALL_KEPT = 4                # trailer, footer and index in a dozen small reads close together
STREAK = 256 << 10            # bytes read in sequence before windows are fetched ahead
KEEP = AHEAD + 2              # windows kept (the ones ahead, the current one, one behind)
READ_CHUNK = 1 << 20          # a GET's body is read in pieces this large (see S3Reader._get)
ATTEMPTS = 6                  # tries of one request (0.25 s .. 8 s apart, with jitter)

_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
        "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_settings: dict[str, str | None] = {"endpoint_url": None}
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def configure(endpoint_url: str | None = None) -> None:
    """Set what the command line gave (``--endpoint-url``); it wins over the environment."""
    _settings["endpoint_url"] = endpoint_url or None


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; raises UsageError for a URL without a bucket."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"{url}: no bucket in the URL (s3://BUCKET/PREFIX/NAME)")
    return bucket, key


def part_size_for(size_hint: int | None) -> int:
    """The part size of an upload that may reach `size_hint` bytes: at least MIN_PART, and
    large enough for the hint to fit in PLANNED_PARTS parts (rounded up to a MiB)."""
    want = -(-(size_hint or 0) // PLANNED_PARTS)
    return min(MAX_PART, max(MIN_PART, -(-want // MiB) * MiB))


def _client():
    """One client per endpoint (thread-safe: boto3 clients may be shared by threads)."""
    endpoint = _settings["endpoint_url"]
    # the environment is read when a client is made: a change of it (tests, a library user
    # switching accounts) gets a new one
    key = (endpoint, *(os.environ.get(v) for v in _ENV))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            with collector_paused():
                session = boto3.session.Session()
                config = Config(
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"max_attempts": 1, "mode": "standard"},   # ours, logged, below
                    connect_timeout=10, read_timeout=60, max_pool_connections=32,
                    s3={"addressing_style": "path"} if endpoint else None,
                )
                client = session.client("s3", endpoint_url=endpoint,
                                        region_name=session.region_name or "us-east-1",
                                        config=config)
            _clients[key] = client
        return client


# -- errors and retries ----------------------------------------------------------------------

_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeoutException", "SlowDown", "InternalError",
                    "ServiceUnavailable", "Throttling", "ThrottlingException",
                    "RequestThrottled", "TooManyRequests", "OperationAborted"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken",
                 "Forbidden"}
_TRANSIENT_ERRORS = (bce.EndpointConnectionError, bce.ConnectionClosedError,
                     bce.ReadTimeoutError, bce.ConnectTimeoutError,
                     bce.ResponseStreamingError, bce.IncompleteReadError,
                     bce.ProxyConnectionError, ConnectionError, TimeoutError)


def _code(err: bce.ClientError) -> tuple[str, int]:
    response = getattr(err, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, bce.ClientError):
        code, status = _code(err)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(err, _TRANSIENT_ERRORS)


def _brief(err: BaseException) -> str:
    """What went wrong, without anything secret (botocore's messages carry none; the
    request's signature or credentials never appear in them)."""
    if isinstance(err, bce.ClientError):
        code, status = _code(err)
        message = (err.response.get("Error", {}) or {}).get("Message") or ""
        return f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
    return str(err) or type(err).__name__


def _failure(err: BaseException, url: str, what: str) -> DiskimgError:
    """The diskimg error for a request that failed for good."""
    if isinstance(err, DiskimgError):
        return err
    if isinstance(err, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return PermissionDenied(url, what, "no credentials: set AWS_ACCESS_KEY_ID and "
                                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                           "~/.aws/credentials")
    if isinstance(err, bce.ClientError):
        code, status = _code(err)
        if code == "NoSuchBucket":
            bucket = split_url(url)[0]
            return UsageError(f"{url}: no such bucket {bucket!r}")
        if code in ("NoSuchKey", "NoSuchUpload", "NotFound") or status == 404:
            return NotAnImage(url, "no such object")
        if code in _DENIED_CODES or status in (401, 403):
            return PermissionDenied(url, what, _brief(err))
    if isinstance(err, bce.EndpointConnectionError):
        return OperationFailed(f"{url}: cannot {what}: cannot reach the server "
                               f"({err.kwargs.get('endpoint_url', '')})", path=url)
    if isinstance(err, bce.BotoCoreError) and not _is_transient(err):
        return UsageError(f"{url}: cannot {what}: {_brief(err)}")
    return OperationFailed(f"{url}: cannot {what}: {_brief(err)}", path=url)


def _retrying(url: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried on transient errors with exponential backoff and jitter (logged at
    INFO); the failure that remains becomes a diskimg error."""
    delay = 0.25
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted below
            if attempt == ATTEMPTS or not _is_transient(err):
                raise _failure(err, url, what) from err
            wait = delay * (0.5 + random.random())
            log.info("%s: %s failed (%s); retrying in %.1f s (attempt %d of %d)",
                     url, what, _brief(err), wait, attempt + 1, ATTEMPTS)
            time.sleep(wait)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


# -- reading ---------------------------------------------------------------------------------

class S3Reader(StoreReader):
    """Ranged GETs of one object; see the module docstring for the read-ahead windows."""

    def __init__(self, store: S3Store, key: str, path: str, stat: StoreStat) -> None:
        self.store, self.key, self.path, self.stat = store, key, path, stat
        self._windows: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._last_end: int | None = None
        self._streak = 0
        self._small: list[tuple[int, bytes | bytearray]] = []
        self._pool: ThreadPoolExecutor | None = None
        # window buffers are used again: a fresh 8 MiB buffer per GET costs a page fault per
        # 4 KiB (0.2-0.3 CPU s of a 361 MiB restore).  A window's buffer is taken back only
        # once no read is copying from it: reads pin the windows they copy from (_pins), and
        # a window dropped while pinned waits in _retired for its last reader.
        self._free: list[bytearray] = []
        self._pins: dict[Future, int] = {}
        self._retired: set[Future] = set()

    def _get(self, start: int, end: int, window: bool = False) -> bytes | bytearray:
        """Bytes [start, end) of the object (end within it), retried as a whole; a whole
        `window` goes into a buffer used again (see __init__)."""
        client = _client()
        reuse = None
        if window and end - start == WINDOW:
            with self._lock:
                reuse = self._free.pop() if self._free else None

        def call() -> bytes | bytearray:
            r = client.get_object(Bucket=self.store.bucket, Key=self.key,
                                  Range=f"bytes={start}-{end - 1}")
            body = r["Body"]
            try:
                # into one buffer of the final size: reading whole would hold the received
                # chunks and their join at once, twice the range.  In pieces of READ_CHUNK:
                # the client reads each piece into a temporary buffer of the piece's size
                # first, and a temporary of 8 MiB is fresh memory every time (a page fault
                # per 4 KiB); 1 MiB ones are reused by the allocator
                buf = reuse if reuse is not None else bytearray(end - start)
                view, got = memoryview(buf), 0
                while got < len(buf):
                    n = body.readinto(view[got:got + READ_CHUNK])
                    if not n:
                        break
                    got += n
                if got != len(buf):    # the connection ended early: retried like a reset
                    raise bce.IncompleteReadError(actual_bytes=got, expected_bytes=len(buf))
                return buf
            finally:
                body.close()

        data = _retrying(self.path, "read the image", call)
        if len(data) != end - start:
            raise OperationFailed(f"{self.path}: read at byte {start} returned {len(data)} "
                                  f"bytes of {end - start} (was the object replaced?)",
                                  path=self.path)
        return data

    def _window(self, i: int, pin: bool = False) -> Future:
        """The future of window `i` (fetched once while kept); `pin`: the caller copies from
        it and calls _unpin when done."""
        with self._lock:
            fut = self._windows.get(i)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(AHEAD + 2, thread_name_prefix="s3-read")
                start = i * WINDOW
                fut = self._pool.submit(self._get, start, min(start + WINDOW, self.size), True)
                self._windows[i] = fut
                while len(self._windows) > KEEP:
                    _, old = self._windows.popitem(last=False)
                    if old in self._pins:
                        self._retired.add(old)
                    else:
                        self._recycle(old)
            else:
                self._windows.move_to_end(i)
            if pin:
                self._pins[fut] = self._pins.get(fut, 0) + 1
            return fut

    def _recycle(self, fut: Future) -> None:
        """Keep the buffer of a window no longer kept nor read (lock held)."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            buf = fut.result()
            if len(buf) == WINDOW and len(self._free) < KEEP:
                self._free.append(buf)

    def _unpin(self, windows: list[tuple[int, Future]]) -> None:
        with self._lock:
            for _, fut in windows:
                n = self._pins[fut] - 1
                if n:
                    self._pins[fut] = n
                    continue
                del self._pins[fut]
                if fut in self._retired:
                    self._retired.discard(fut)
                    self._recycle(fut)

    def _plan(self, length: int, offset: int) -> tuple[int, list[tuple[int, Future]] | None]:
        """The end of the read and, for a read that continues a sequential run, the windows
        that serve it (the next AHEAD ones are asked for too); None: fetch it as it is.

        Read-ahead starts only once the run has read STREAK bytes: opening an image reads its
        header, footer and index (a few small reads, some of them close together), and
        checking an object (--force, a look for images depending on one) reads its first
        bytes only: fetching windows ahead for those would GET up to 56 MiB for nothing."""
        end = min(offset + length, self.size)
        with self._lock:
            last_end, self._last_end = self._last_end, end
            sequential = last_end is not None and abs(offset - last_end) <= 2 * WINDOW
            self._streak = self._streak + (end - offset) if sequential else 0
            streak = self._streak
        if not sequential or streak < STREAK or end - offset > 2 * WINDOW:
            return end, None
        first, last = offset // WINDOW, (end - 1) // WINDOW
        windows = self.size // WINDOW + 1
        for i in range(last + 1, min(last + 1 + AHEAD, windows)):
            self._window(i)
        return end, [(i, self._window(i, pin=True)) for i in range(first, last + 1)]

    def _small_read(self, offset: int, end: int) -> memoryview | None:
        """Bytes [offset, end) of a small scattered read, from a chunk kept or fetched (one
        round trip for the several small reads near each other that opening an image makes:
        the header at the start; the trailer, footer and index, and a parity tail, at the
        end); None for a read too large for it."""
        if end - offset > SMALL_READ:
            return None
        with self._lock:
            for start, data in self._small:
                if start <= offset and end <= start + len(data):
                    return memoryview(data)[offset - start:end - start]
        start = offset - offset % SMALL_READ
        if start + SMALL_CHUNK >= self.size:        # near the end: the last chunk
            start = max(0, self.size - SMALL_CHUNK)
        stop = min(self.size, start + SMALL_CHUNK)
        if end > stop:
            return None
        data = self._get(start, stop)
        with self._lock:
            self._small.insert(0, (start, data))
            del self._small[SMALL_KEPT:]
        return memoryview(data)[offset - start:end - start]

    def pread(self, length: int, offset: int) -> bytes:
        end, windows = self._plan(length, offset)
        if offset >= end:
            return b""
        if windows is None:
            small = self._small_read(offset, end)
            return bytes(small if small is not None else self._get(offset, end))
        try:
            pieces = []
            for i, fut in windows:
                window, base = fut.result(), i * WINDOW
                pieces.append(memoryview(window)[max(offset, base) - base:
                                                 min(end, base + WINDOW) - base])
            return b"".join(pieces)
        finally:
            self._unpin(windows)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        """Into `buf` straight from the windows (one copy)."""
        view = memoryview(buf).cast("B")
        end, windows = self._plan(len(view), offset)
        if offset >= end:
            return 0
        if windows is None:
            data = self._small_read(offset, end)
            if data is None:
                data = self._get(offset, end)
            view[:len(data)] = data
            return len(data)
        try:
            for i, fut in windows:
                window, base = fut.result(), i * WINDOW
                lo, hi = max(offset, base), min(end, base + WINDOW)
                view[lo - offset:hi - offset] = memoryview(window)[lo - base:hi - base]
        finally:
            self._unpin(windows)
        return end - offset

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._windows.clear()
            self._free.clear()
            self._retired.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# -- writing ---------------------------------------------------------------------------------

class S3Sink(StoreSink):
    """A multipart upload fed by `write`; see the module docstring.  Parts are filled in a
    fixed pool of UPLOADS_IN_FLIGHT + 1 buffers allocated once: one being filled, the others
    being uploaded; `write` waits for a free one.  Memory is that pool whatever the image's
    size (buffers allocated and freed per part would fragment the heap of a process whose
    threads all allocate: its resident size grew to twice the parts' size in a test)."""

    def __init__(self, store: S3Store, name: str, size_hint: int | None) -> None:
        self.store = store
        self.key = store.key(name)
        self.path = store.path(name)
        self.partial_path = self.path + " (unfinished upload)"
        self.pos = 0
        self.part_size = part_size_for(size_hint)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buffers = 1
        self._buf = bytearray(self.part_size)
        self._fill = 0
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self._done = False
        store.abort_unfinished(name)

    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        for p in parts:
            view = memoryview(p).cast("B")
            self.pos += len(view)
            while view:
                room = len(self._buf) - self._fill
                n = min(room, len(view))
                self._buf[self._fill:self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == len(self._buf):
                    self._send()

    def _part_size(self) -> int:
        done = len(self._parts)
        if done < PLANNED_PARTS:
            return self.part_size
        # the hint was short: double every 250 parts, up to S3's largest part
        return min(MAX_PART, self.part_size << (1 + (done - PLANNED_PARTS) // 250))

    def _client_call(self, what: str, call: Callable[[], T]) -> T:
        return _retrying(self.path, what, call)

    def _next_buffer(self) -> bytearray:
        """A free buffer for the next part: a new one while the pool is not full, else the
        first one an upload gives back."""
        size = self._part_size()
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if self._buffers <= UPLOADS_IN_FLIGHT:
                self._buffers += 1
                return bytearray(size)
            while True:
                try:
                    buf = self._free.get(timeout=1)
                    break
                except queue.Empty:
                    self._raise_failed()
        if len(buf) != size:
            buf = bytearray(size)        # past 9,000 parts: larger parts
        return buf

    def _raise_failed(self) -> None:
        """Raise the error of a part that failed for good (it stops the whole upload)."""
        for fut in self._parts:
            if fut.done() and fut.exception() is not None:
                fut.result()

    def _send(self) -> None:
        """Upload the filled buffer as the next part (in the background)."""
        client = _client()
        if self._upload_id is None:
            r = self._client_call("start the upload", lambda: client.create_multipart_upload(
                Bucket=self.store.bucket, Key=self.key))
            self._upload_id = r["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT, thread_name_prefix="s3-upload")
            log.info("%s: multipart upload in parts of %d MiB", self.path, self.part_size // MiB)
        if len(self._parts) >= MAX_PARTS:
            raise OperationFailed(f"{self.path}: more than {MAX_PARTS} parts", path=self.path)
        self._raise_failed()
        number = len(self._parts) + 1
        upload_id = self._upload_id
        buf, length = self._buf, self._fill
        assert self._pool is not None

        def upload() -> dict:
            try:
                # the pooled buffer itself when the part fills it (all parts but the last: no
                # copy).  A bytes-like body, not a file object: the client then hashes it for
                # the signature in one call and sends it in one, and sends no "Expect:
                # 100-continue" (a round trip per part); a file object is read 16 KiB at a time
                # in Python, twice.
                body = buf if length == len(buf) else bytes(memoryview(buf)[:length])
                r = self._client_call(f"upload part {number}", lambda: client.upload_part(
                    Bucket=self.store.bucket, Key=self.key, UploadId=upload_id,
                    PartNumber=number, Body=body, ContentLength=length))
                return {"PartNumber": number, "ETag": r["ETag"]}
            finally:
                self._free.put(buf)

        self._parts.append(self._pool.submit(upload))
        self._buf = self._next_buffer()
        self._fill = 0

    def sync(self) -> None:
        """Nothing is durable before the upload completes (rescue does not write here)."""

    def commit(self) -> None:
        client = _client()
        try:
            if self._upload_id is None:   # small enough for one request
                data = bytes(memoryview(self._buf)[:self._fill])
                self._client_call("upload the image", lambda: client.put_object(
                    Bucket=self.store.bucket, Key=self.key, Body=data))
            else:
                if self._fill:
                    self._send()
                parts = [f.result() for f in self._parts]
                upload_id = self._upload_id
                self._client_call("complete the upload", lambda: client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}))
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._shutdown()

    def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._buf = bytearray()
        self._fill = 0
        while True:
            try:
                self._free.get_nowait()
            except queue.Empty:
                break

    def abort(self) -> None:
        self._shutdown()
        if self._done or self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._client_call("abort the upload", lambda: _client().abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=upload_id))
            log.info("%s: upload aborted", self.path)
        except DiskimgError as err:
            log.warning("%s: could not abort the unfinished upload %s (%s); the next write of "
                        "this name aborts it", self.path, upload_id, err)

    def close(self) -> None:
        """An upload cannot be resumed by diskimg: closing aborts it."""
        self.abort()


# -- the store -------------------------------------------------------------------------------

class S3Store(Store):
    """The objects under ``s3://bucket/prefix``.  Names are what follows the prefix (no
    ``/`` in them: the images directly under the prefix, as in a directory)."""

    seekable = True
    resumable = False

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}"

    @classmethod
    def for_url(cls, url: str) -> tuple[S3Store, str]:
        """The store of the prefix holding ``s3://bucket/prefix/name``, and the name."""
        bucket, key = split_url(url)
        prefix, _, name = key.rpartition("/")
        if not name:
            raise UsageError(f"{url}: no object name in the URL (s3://BUCKET/PREFIX/NAME)")
        return cls(bucket, prefix + "/" if prefix else ""), name

    @classmethod
    def for_prefix(cls, url: str) -> S3Store:
        """The store at ``s3://bucket/prefix`` (a trailing ``/`` is implied)."""
        bucket, key = split_url(url)
        return cls(bucket, key if not key or key.endswith("/") else key + "/")

    def __repr__(self) -> str:
        return f"S3Store({self.location!r})"

    def key(self, name: str) -> str:
        return self.prefix + name

    def path(self, name: str) -> str:
        return self.location + name

    def list(self, prefix: str = "") -> list[str]:
        client = _client()
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            r = _retrying(self.location, "list the objects",
                          lambda: client.list_objects_v2(**kwargs))
            names += [o["Key"][len(self.prefix):] for o in r.get("Contents", [])]
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return sorted(names)

    def stat(self, name: str) -> StoreStat:
        client = _client()
        try:
            r = _retrying(self.path(name), "look at the object",
                          lambda: client.head_object(Bucket=self.bucket, Key=self.key(name)))
        except NotAnImage:
            # a HEAD's 404 has no body to tell a missing object from a missing bucket
            self._check_bucket(self.path(name))
            raise
        modified = r.get("LastModified")
        return StoreStat(size=int(r["ContentLength"]),
                         mtime=modified.timestamp() if modified is not None else None,
                         identity=("s3", _settings["endpoint_url"], self.bucket,
                                   self.key(name)))

    def _check_bucket(self, url: str) -> None:
        """Raise UsageError when the bucket does not exist."""
        client = _client()
        try:
            _retrying(url, "look at the bucket", lambda: client.head_bucket(Bucket=self.bucket))
        except NotAnImage as err:
            raise UsageError(f"{url}: no such bucket {self.bucket!r}") from err

    def open(self, name: str) -> S3Reader:
        return S3Reader(self, self.key(name), self.path(name), self.stat(name))

    def create(self, name: str, resume_at: int | None = None,
               size_hint: int | None = None) -> S3Sink:
        if resume_at is not None:
            raise UsageError(f"{self.path(name)}: an upload to object storage cannot be "
                             f"resumed")
        return S3Sink(self, name, size_hint)

    def delete(self, name: str) -> None:
        self.stat(name)     # NotAnImage when there is none (DeleteObject does not say)
        client = _client()
        _retrying(self.path(name), "delete the object",
                  lambda: client.delete_object(Bucket=self.bucket, Key=self.key(name)))

    def _uploads(self, prefix: str, url: str) -> list[dict]:
        """The multipart uploads whose keys start with `prefix` (a key), every page."""
        client = _client()
        uploads: list[dict] = []
        marker: dict = {}
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **marker}
            r = _retrying(url, "list unfinished uploads",
                          lambda: client.list_multipart_uploads(**kwargs))
            uploads += r.get("Uploads", [])
            if not r.get("IsTruncated") or not r.get("NextKeyMarker"):
                return uploads
            marker = {"KeyMarker": r["NextKeyMarker"],
                      "UploadIdMarker": r.get("NextUploadIdMarker") or ""}

    def unfinished_uploads(self, name: str) -> list[dict]:
        """The multipart uploads of `name` started and neither completed nor aborted."""
        key = self.key(name)
        return [u for u in self._uploads(key, self.path(name)) if u.get("Key") == key]

    def unfinished(self, prefix: str = "") -> list[str]:
        """The names under this prefix with a multipart upload never completed nor aborted
        (a run killed while it uploaded): no object, but parts the bucket keeps (and bills)."""
        names = {u["Key"][len(self.prefix):]
                 for u in self._uploads(self.prefix + prefix, self.location)
                 if "/" not in u["Key"][len(self.prefix):]}
        return sorted(names)

    def unfinished_label(self, name: str) -> str:
        return name + " (unfinished upload)"

    def discard_unfinished(self, name: str) -> None:
        if not self._abort(name, self.unfinished_uploads(name)):
            raise NotAnImage(self.path(name), "no unfinished upload")

    def _abort(self, name: str, uploads: list[dict]) -> int:
        client = _client()
        for u in uploads:
            upload_id = u["UploadId"]
            _retrying(self.path(name), "abort an unfinished upload",
                      lambda: client.abort_multipart_upload(Bucket=self.bucket,
                                                            Key=self.key(name),
                                                            UploadId=upload_id))
        return len(uploads)

    def abort_unfinished(self, name: str) -> int:
        """Abort what an interrupted run left of an upload of `name` (saying so); how many."""
        uploads = self.unfinished_uploads(name)
        self._abort(name, uploads)
        for u in uploads:
            started = u.get("Initiated")
            log.warning("%s: aborted an unfinished upload of this name%s (an interrupted "
                        "run's); starting again", self.path(name),
                        f" started {started:%Y-%m-%d %H:%M:%S %Z}" if started else "")
        return len(uploads)
