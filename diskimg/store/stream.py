"""Images as streams: ``-`` is standard output for `diskimg image SRC -` and standard input for
`diskimg restore - TARGET`.

The image format is written front to back (header, records, index, footer, trailer) and never
sought back into, so a sink over a pipe writes the very bytes a file would hold.  A stream has
no names to list and cannot be read at offsets: `StreamStore` only writes; a restore from
standard input reads it with `ForwardReader`, which offers ``pread`` at offsets not behind what
it was told to let go (diskimg.ops.stream_restore).  A sink cannot take back what it wrote: an
aborted image ends without its trailer, and a reader of the stream sees it cut short.
"""
from __future__ import annotations

import os
from typing import Iterable

from diskimg.errors import DiskIOError, NotAnImage, UsageError
from diskimg.store import Store, StoreReader, StoreSink, StoreStat

STREAM = "-"


class StreamSink(StoreSink):
    """Appends to a file descriptor (standard output)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.partial_path = path
        self.pos = 0

    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                try:
                    n = os.write(self.fd, view)
                except OSError as err:
                    raise DiskIOError(self.path, "write", err) from err
                view = view[n:]
                self.pos += n

    def sync(self) -> None:
        """A pipe holds nothing to make durable."""

    def commit(self) -> None:
        """Everything was written in order: the trailer, written last, completes it."""

    def abort(self) -> None:
        """What was written cannot be taken back: the stream ends without its trailer."""

    def close(self) -> None:
        """Nothing to release (standard output stays open)."""


class StreamStore(Store):
    """Standard output, for writing one image to it."""

    seekable = False
    resumable = False
    location = STREAM

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd

    def path(self, name: str) -> str:
        return STREAM

    def list(self, prefix: str = "") -> list[str]:
        return []

    def stat(self, name: str) -> StoreStat:
        raise NotAnImage(STREAM, "a stream is not an image file (only restore reads one)")

    def open(self, name: str) -> StoreReader:
        raise NotAnImage(STREAM, "a stream is read front to back: only restore reads it "
                                 "(diskimg restore - TARGET)")

    def create(self, name: str, resume_at: int | None = None,
               size_hint: int | None = None) -> StreamSink:
        if resume_at is not None:
            raise UsageError(f"{STREAM}: a stream cannot be resumed")
        if os.isatty(self.fd):
            raise UsageError(f"{STREAM}: standard output is a terminal; send the image to a "
                             f"pipe or a file (diskimg image SRC - | ssh host 'cat > x.dimg')")
        return StreamSink(self.fd, STREAM)

    def delete(self, name: str) -> None:
        raise UsageError(f"{STREAM}: a stream holds nothing to delete")


class ForwardReader:
    """Reads a stream (standard input) front to back, keeping the bytes from the last `release`
    on, so that ``pread`` works at any offset not before it.  `size` is what was read so far;
    `eof` whether the stream ended."""

    CHUNK = 1 << 20

    def __init__(self, fd: int = 0, path: str = STREAM) -> None:
        self.fd = fd
        self.path = path
        self._buf = bytearray()
        self._base = 0          # stream offset of _buf[0]
        self.eof = False

    @property
    def size(self) -> int:
        return self._base + len(self._buf)

    @property
    def base(self) -> int:
        """The first offset still held (what is before it was released)."""
        return self._base

    def _fill(self, upto: int) -> None:
        while not self.eof and self.size < upto:
            try:
                chunk = os.read(self.fd, max(self.CHUNK, min(upto - self.size, 64 << 20)))
            except OSError as err:
                raise DiskIOError(self.path, "read", err, self.size) from err
            if not chunk:
                self.eof = True
            self._buf += chunk

    def read_all(self) -> None:
        """Read on to the end of the stream."""
        while not self.eof:
            self._fill(self.size + self.CHUNK)

    def pread(self, length: int, offset: int) -> bytes:
        if offset < self._base:
            raise ValueError(f"stream offset {offset} was released (at {self._base})")
        self._fill(offset + length)
        start = offset - self._base
        return bytes(self._buf[start:start + length])

    def release(self, upto: int) -> None:
        """Forget the bytes before `upto` (they will not be read again)."""
        if upto > self._base:
            del self._buf[:upto - self._base]
            self._base = upto
