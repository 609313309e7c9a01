"""A directory of image files: the local Store.

Reads are ``pread`` on a file descriptor (one system call per record, into the caller's buffer
or a new bytes object, never through a copy of ours).  A new image is written under
``NAME.partial`` and published by fsync, rename and an fsync of the directory, so that after a
crash the name holds the whole image or what it held before, never half of one.  Write-behind
hints (POSIX_FADV_DONTNEED behind the writer) are this store's business: the disk writes the
image while it is made, not all at the final fsync, and a large image does not fill the page
cache.  Every OSError is wrapped where it happens into a diskimg error naming the path.
"""
from __future__ import annotations

import os
from typing import Iterable

from diskimg.errors import DiskimgError, DiskIOError, NotAnImage, PermissionDenied
from diskimg.errors import UsageError
from diskimg.errors import is_permission_error
from diskimg.store import Store, StoreReader, StoreSink, StoreStat


def _failed(err: OSError, path: str, operation: str, io_operation: str,
            offset: int | None = None) -> DiskimgError:
    """The diskimg error for `err`: PermissionDenied (EACCES, EPERM: exit 4) saying it could not
    `operation`, else a DiskIOError (exit 3) for `io_operation` ("read", "write", "fsync",
    "open for writing", ...) at `offset`."""
    if is_permission_error(err):
        return PermissionDenied(path, operation)
    return DiskIOError(path, io_operation, err, offset)


def _stat_of(st: os.stat_result) -> StoreStat:
    return StoreStat(size=st.st_size, mtime=st.st_mtime, identity=(st.st_dev, st.st_ino),
                     mode=st.st_mode)


class LocalReader(StoreReader):
    def __init__(self, fd: int, path: str, stat: StoreStat) -> None:
        self.fd = fd
        self.path = path
        self.stat = stat

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as err:
            raise _failed(err, self.path, "read the image", "read", offset) from err

    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        try:
            while got < len(view):
                n = os.preadv(self.fd, [view[got:]], offset + got)
                if n == 0:
                    break
                got += n
        except OSError as err:
            raise _failed(err, self.path, "read the image", "read", offset + got) from err
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalSink(StoreSink):
    """Appends to ``NAME.partial``; see the module docstring."""

    WRITE_BEHIND = 32 << 20

    def __init__(self, path: str, partial_path: str, resume_at: int | None) -> None:
        self.path = path
        self.partial_path = partial_path
        self.fd = -1
        self._done = False   # committed: nothing left to abort
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if resume_at is None else 0)
        try:
            self.fd = os.open(partial_path, flags, 0o644)
            if resume_at is not None:
                os.ftruncate(self.fd, resume_at)  # drop a record torn by a crash
                os.lseek(self.fd, resume_at, os.SEEK_SET)
        except OSError as err:
            self.close()
            raise _failed(err, partial_path, "create the image", "open for writing") from err
        self.pos = resume_at or 0
        self._behind = [self.pos, self.pos]   # the last two write-behind marks

    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        parts = list(parts)
        try:
            n = os.writev(self.fd, parts)
            want = sum(len(p) for p in parts)
            while n < want:  # short write: finish it piece by piece
                rest = b"".join(bytes(p) for p in parts)[n:]
                n += os.write(self.fd, rest)
        except OSError as err:
            raise _failed(err, self.partial_path, "write the image", "write") from err
        self.pos += want
        older, last = self._behind
        if self.pos - last >= self.WRITE_BEHIND:
            try:
                # the pages since the last mark start going to disk; those before it have
                # had a whole mark's time to get there, and are dropped if they have
                os.posix_fadvise(self.fd, older, self.pos - older, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            self._behind = [last, self.pos]

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise _failed(err, self.partial_path, "write the image", "fsync") from err

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.partial_path, self.path)
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)   # the new name survives a crash
            finally:
                os.close(dfd)
        except OSError as err:
            raise _failed(err, self.path, "complete the image", "complete the image") from err
        self._done = True

    def abort(self) -> None:
        self.close()
        if self._done:
            return
        try:
            os.unlink(self.partial_path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalStore(Store):
    """The image files in one directory.  `root` is the directory as given ("" for the current
    one), so that `path(name)` names a file the way the user did."""

    seekable = True
    resumable = True

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self.location = os.path.abspath(self.root or ".")

    @classmethod
    def for_file(cls, location: str) -> tuple[LocalStore, str]:
        """The store of the directory holding `location`, and its name there."""
        name = os.path.basename(location)
        return cls(location[:len(location) - len(name)]), name

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def local_path(self, name: str) -> str | None:
        return self.path(name)

    def list(self, prefix: str = "") -> list[str]:
        where = self.root or "."
        try:
            with os.scandir(where) as it:
                # is_file follows symlinks: a link to an image is an image
                return sorted(e.name for e in it if e.name.startswith(prefix) and e.is_file())
        except OSError as err:
            raise _failed(err, where, "list the directory", "list the directory") from err

    def stat(self, name: str) -> StoreStat:
        path = self.path(name)
        try:
            return _stat_of(os.stat(path))
        except (FileNotFoundError, NotADirectoryError) as err:
            raise NotAnImage(path, "no such file") from err
        except OSError as err:
            raise _failed(err, path, "look at the file", "look at the file") from err

    def open(self, name: str) -> LocalReader:
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotAnImage(path, "no such file") from err
        except IsADirectoryError as err:
            raise NotAnImage(path, "is a directory, not an image") from err
        except OSError as err:
            raise _failed(err, path, "read the image", "open") from err
        try:
            st = os.fstat(fd)
        except OSError as err:
            os.close(fd)
            raise _failed(err, path, "read the image", "open") from err
        return LocalReader(fd, path, _stat_of(st))

    def create(self, name: str, resume_at: int | None = None,
               size_hint: int | None = None) -> LocalSink:
        return LocalSink(self.path(name), self.path(self.partial_name(name)), resume_at)

    def rename(self, src: str, dst: str) -> None:
        path = self.path(dst)
        try:
            os.replace(self.path(src), path)
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            raise _failed(err, path, "replace the image", "replace the image") from err

    def delete(self, name: str) -> None:
        path = self.path(name)
        try:
            os.unlink(path)
        except FileNotFoundError as err:
            raise NotAnImage(path, "no such file") from err
        except OSError as err:
            raise _failed(err, path, "delete the image", "delete") from err

    def rewrite_head(self, name: str, data: bytes, expected: bytes) -> None:
        """One pwrite of the header's bytes and an fsync.  A header is a few KiB: the write
        lies in one or two pages; a crash in between can tear it (the CRC-32C then says so and
        the previous header is gone, which is why `diskimg key export --paper` exists)."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotAnImage(path, "no such file") from err
        except OSError as err:
            raise _failed(err, path, "change the image", "open for writing") from err
        try:
            if len(expected) != len(data) or os.pread(fd, len(expected), 0) != expected:
                raise UsageError(f"{path}: changed while its key slots were rewritten; "
                                 f"nothing written")
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as err:
            raise _failed(err, path, "change the image", "write", 0) from err
        finally:
            os.close(fd)
