"""Where images live: the Store seam.

Everything that reads or writes an image goes through a `Store` (a local directory now; object
storage and streams later), so that nothing above this package calls ``os.listdir``,
``os.rename`` or ``os.pread`` on an image.  The interface is what every backend can offer
(after borgstore's ``BackendBase`` and restic's ``backend.Backend``):

- `Store.list(prefix)`, `stat(name)`, `open(name)` returning a `StoreReader` that reads at any
  offset (``pread``, ``read_into`` for reused buffers), `delete(name)`;
- `Store.unfinished(prefix)` and `discard_unfinished(name)`: what interrupted writes left
  (a ``.partial`` file, an object store's uncompleted multipart upload), found and removed
  the same way on every backend (backup jobs clean up after a killed run with them);
- `Store.create(name)` returning a `StoreSink` that appends (``write``, ``sync``) and publishes
  the name atomically on ``commit`` (a rename in a directory, complete-multipart in object
  storage) or leaves nothing on ``abort``: a reader never sees half an image under its name;
- what a backend can do: `seekable` (reads at offsets) and `resumable` (a sink reopened at an
  offset of what an interrupted run left, which rescue needs to resume).

`open_store(location)` picks the backend from a path or URL and returns it with the image's
name in it.  Errors are the diskimg errors, raised where the I/O happens and naming the path.
"""
from __future__ import annotations

import contextlib
import gc
import stat as _stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

from diskimg.errors import DiskimgError, UsageError

__all__ = ["Store", "StoreReader", "StoreSink", "StoreStat", "BytesReader", "open_store",
           "open_directory", "is_remote", "is_stream", "S3_OPTIONS"]


@dataclass(frozen=True)
class StoreStat:
    """What a store knows of one name.  `identity` tells whether two names are the very same
    object (a local file's device and inode: a hard link or a symlink is the same image);
    `mode` is a local file's st_mode (None for objects, which are always plain data)."""

    size: int
    mtime: float | None = None
    identity: tuple = ()
    mode: int | None = None

    @property
    def is_file(self) -> bool:
        """Plain data (a regular file or an object), not a directory, pipe or device."""
        return self.mode is None or _stat.S_ISREG(self.mode)


class StoreReader(ABC):
    """One object open for reading at any offset.  `path` names it in errors; `size` and
    `stat` are as it was opened."""

    path: str
    stat: StoreStat

    @property
    def size(self) -> int:
        return self.stat.size

    @abstractmethod
    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end).  Raises DiskIOError
        ("read", at the offset) or PermissionDenied."""

    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; the number of bytes read (fewer only at the end).  This
        one copies what `pread` returns; a reader that can fill `buf` directly overrides it."""
        data = self.pread(len(buf), offset)
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)

    @abstractmethod
    def close(self) -> None:
        """Release it; closing twice is harmless."""

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BytesReader(StoreReader):
    """Bytes in memory read like an object (a copy of a header kept elsewhere in a file)."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = bytes(data)
        self.path = path
        self.stat = StoreStat(size=len(self.data))

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]

    def close(self) -> None:
        pass


class StoreSink(ABC):
    """A new object being written.  Nothing appears under its name before `commit`; `abort`
    leaves nothing; `close` (resumable stores) keeps what was written for a later run.
    `path` is the name it is published under, `partial_path` where it is written meanwhile,
    `pos` how many bytes it holds."""

    path: str
    partial_path: str
    pos: int

    @abstractmethod
    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        """Append `parts`, all of them.  Raises DiskIOError ("write") or PermissionDenied."""

    @abstractmethod
    def sync(self) -> None:
        """Make what was written so far durable (before a rescue map claims it)."""

    @abstractmethod
    def commit(self) -> None:
        """Publish atomically under the name, durably: after a crash the name holds either the
        whole object or what it held before."""

    @abstractmethod
    def abort(self) -> None:
        """Discard what was written; harmless after commit, abort or close."""

    @abstractmethod
    def close(self) -> None:
        """Stop writing, keeping what was written unpublished (an interrupted rescue resumes
        from it with `Store.create(name, resume_at=...)`)."""


class Store(ABC):
    """A place holding images by name."""

    #: reads at any offset are cheap (a file; object storage with range requests)
    seekable: bool = True
    #: `create(name, resume_at=n)` reopens what an interrupted sink left
    resumable: bool = False
    #: where the store is, absolute, as messages name it (a directory, a URL)
    location: str

    @abstractmethod
    def path(self, name: str) -> str:
        """How errors and results name `name` in this store."""

    def local_path(self, name: str) -> str | None:
        """A local file system path of `name`, for the identity and safety checks (is the image
        on the source disk, is it the source itself); None for a remote store."""
        return None

    def partial_name(self, name: str) -> str:
        """The name under which `create(name)` holds what is written until it is committed."""
        return name + ".partial"

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """The names (sorted) of the objects whose names start with `prefix`."""

    def unfinished(self, prefix: str = "") -> list[str]:
        """The names (sorted) starting with `prefix` that an interrupted `create` left
        something of, unpublished (a ``NAME.partial`` file here; an object store's multipart
        upload never completed).  None of them is an image; `discard_unfinished` removes what
        was left."""
        partial = self.partial_name("")
        return sorted(n[:-len(partial)] for n in self.list(prefix)
                      if n.endswith(partial) and len(n) > len(partial))

    def unfinished_label(self, name: str) -> str:
        """How a listing names what an interrupted `create(name)` left."""
        return self.partial_name(name)

    def discard_unfinished(self, name: str) -> None:
        """Remove what an interrupted `create(name)` left (NotAnImage when nothing)."""
        self.delete(self.partial_name(name))

    @abstractmethod
    def stat(self, name: str) -> StoreStat:
        """Raises NotAnImage (no such name), PermissionDenied or DiskIOError."""

    @abstractmethod
    def open(self, name: str) -> StoreReader:
        """Raises NotAnImage (no such name), PermissionDenied or DiskIOError ("open")."""

    @abstractmethod
    def create(self, name: str, resume_at: int | None = None,
               size_hint: int | None = None) -> StoreSink:
        """A sink publishing `name` on commit; with `resume_at` (resumable stores), the
        unpublished data an earlier sink of `name` left, cut to its first `resume_at` bytes,
        to be appended to.  `size_hint` is the most the object may hold, if known (object
        storage sizes its upload parts by it)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name`; raises NotAnImage when there is no such name."""

    def rename(self, src: str, dst: str) -> None:
        """Put `src` in the place of `dst` atomically and durably (a repaired image replaces
        the damaged one).  Raises UsageError where the store cannot."""
        raise UsageError(f"{self.path(dst)}: this store cannot replace an image in place")

    def rewrite_head(self, name: str, data: bytes, expected: bytes) -> None:
        """Replace the first len(data) bytes of the published `name` in place, durably, when
        they still are `expected` (`diskimg key` rewrites an encrypted image's key slots, never
        its records).  Stores that cannot change an object in place raise UsageError."""
        raise UsageError(f"{self.path(name)}: this store cannot change an image in place")

    def exists(self, name: str) -> bool:
        """Whether `name` holds something (an error to look counts as not)."""
        try:
            self.stat(name)
        except DiskimgError:
            return False
        return True


#: what the command line says of object storage (``--endpoint-url``), for diskimg.store.s3,
#: which is imported only when an s3:// location is used
S3_OPTIONS: dict[str, str | None] = {"endpoint_url": None}


def is_stream(location: str) -> bool:
    """Whether `location` is ``-``: standard output (image) or standard input (restore)."""
    return str(location) == "-"


def is_remote(location: str) -> bool:
    """Whether `location` is an object-storage URL (``s3://bucket/prefix/name``)."""
    return str(location)[:5].lower() == "s3://"


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection inside: importing boto3 and making its client build large
    object graphs that all stay (botocore's service models and their caches), which the
    collector walked again and again (README "Object storage": `diskimg info s3://...` 0.317 ->
    0.292 s on a warm cache)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _s3():
    try:
        with collector_paused():
            from diskimg.store import s3
    except ImportError as err:   # boto3 missing: an install without the dependency
        raise UsageError(f"object storage needs boto3 (pip install boto3): {err}") from err
    s3.configure(S3_OPTIONS["endpoint_url"])
    return s3


def open_store(location: str) -> tuple[Store, str]:
    """The store holding the image at `location` and its name there.  A local path gives the
    directory it is in (`store.path(name)` gives back `location` as written); an
    ``s3://bucket/prefix/name`` URL the objects under ``prefix/``."""
    location = str(location)
    if is_remote(location):
        return _s3().S3Store.for_url("s3://" + location[5:])
    if location == "-":
        from diskimg.store.stream import StreamStore
        return StreamStore(), "-"
    from diskimg.store.local import LocalStore
    return LocalStore.for_file(location)


def open_directory(location: str) -> Store:
    """The store at a directory (or prefix) `location`: where parents are looked for."""
    location = str(location)
    if is_remote(location):
        return _s3().S3Store.for_prefix("s3://" + location[5:])
    from diskimg.store.local import LocalStore
    return LocalStore(location)
