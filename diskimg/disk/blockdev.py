"""Opening sources and targets: block devices and regular files, their sizes and sector sizes,
holes in sparse files, and zeroing ranges.  The one user of block-device ioctls.

A source is always opened read-only: nothing in diskimg holds a writable descriptor to it.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

from diskimg.errors import (
    DiskimgError,
    DiskIOError,
    PermissionDenied,
    SourceError,
    UnsafeTarget,
    UsageError,
    is_permission_error,
)

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKZEROOUT = 0x127F
BLKROGET = 0x125E
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(frozen=True)
class Source:
    path: str
    fd: int
    size: int
    is_block: bool
    logical_sector: int = 512

    def close(self) -> None:
        os.close(self.fd)


def _ioctl_int(fd: int, req: int, fmt: str) -> int:
    buf = fcntl.ioctl(fd, req, b"\0" * struct.calcsize(fmt))
    return struct.unpack(fmt, buf)[0]


def device_size(fd: int) -> int:
    try:
        return _ioctl_int(fd, BLKGETSIZE64, "Q")
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def file_kind(mode: int) -> str:
    """What a stat mode is, for messages: "a pipe", "a character device", ..."""
    for test, name in ((stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def missing_dir_error(path: str, parent_dir: str) -> DiskimgError:
    """The error for a file whose directory os.path.isdir says is not there: it may be there but
    out of reach (a parent directory without search permission), which is not "not found"."""
    try:
        os.stat(parent_dir)
    except OSError as err:
        if is_permission_error(err):
            return PermissionDenied(parent_dir, "look into the directory")
    return UsageError(f"{path}: directory {parent_dir} does not exist")


def open_source(path: str, direct: bool = False) -> Source:
    """Open a block device or a regular file of nonzero size read-only.  Raises SourceError for
    anything else (a pipe, /dev/stdin from a pipe, a character device, an empty or /proc file),
    PermissionDenied when it may not be read."""
    path = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise SourceError(path, "no such file or device") from err
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(path, "read the source") from err
        raise SourceError(path, err.strerror or str(err)) from err
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(path, "is a directory; give a block device or an image file")
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        # a pipe cannot be read at offsets, a character device has no size: nothing to image
        raise SourceError(path, f"is {file_kind(st.st_mode)}, not a block device or regular "
                                f"file")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        # /proc and /sys files say size 0 and produce text on read: not a disk either
        raise SourceError(path, "is an empty regular file (size 0; a /proc or /sys file?): "
                                "nothing to image")
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(path, "read the source") from err
        raise SourceError(path, f"cannot open read-only: {err.strerror}") from err
    if stat.S_ISBLK(st.st_mode):
        try:
            size = device_size(fd)
            logical = _ioctl_int(fd, BLKSSZGET, "i")
        except OSError as err:
            os.close(fd)
            raise SourceError(path, f"cannot read the device's size: {err.strerror}") from err
        return Source(path, fd, size, True, logical)
    return Source(path, fd, st.st_size, False)


def open_direct(path: str, write: bool = False) -> int | None:
    """A second descriptor on a device, opened O_DIRECT, or None when it refuses (then the
    caller goes through the page cache).  Reads and writes through it must be whole sectors
    from page-aligned buffers."""
    try:
        return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        log.debug("%s: no O_DIRECT (%s); going through the page cache", path, err)
        return None


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data of a regular file, skipping holes (SEEK_DATA/SEEK_HOLE).
    Falls back to the whole file where the filesystem does not support it."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, size - pos  # EINVAL: not supported here
            return
        end = min(os.lseek(fd, start, SEEK_HOLE), size)
        if end > start:
            yield start, end - start
        pos = end


def preadv_full(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` from `offset` (short reads retried); OSError is left to the caller."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of {path} at byte {offset + got}")
        got += n


def locate_bad_sector(path: str, start: int, end: int, sector: int = 512) -> int | None:
    """The offset of the first unreadable sector in [start, end), found with O_DIRECT reads
    (buffered reads fail whole read-ahead windows, often before the bad sector), or None."""
    chunk = 64 * 1024
    buf = mmap.mmap(-1, chunk)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pos = start // sector * sector
        while pos < end:
            n = min(chunk, end - pos)
            try:
                os.preadv(fd, [memoryview(buf)[:n]], pos)
            except OSError:
                for off in range(pos, pos + n, sector):
                    try:
                        os.preadv(fd, [memoryview(buf)[:sector]], off)
                    except OSError:
                        return off
            pos += n
        return None
    finally:
        os.close(fd)
        buf.close()


def replace_durably(tmp: str, path: str) -> None:
    """Rename `tmp` (already fsynced) to `path` and fsync the directory, so that the new name
    survives a crash."""
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (short writes continued)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


@dataclass
class Target:
    """A restore target.  On a block device, data blocks go through a second descriptor opened
    O_DIRECT (`direct_fd`) when the device allows it: the written data does not pass through,
    and fill, the page cache (restoring a disk does not push out the rescue system's cache or
    pile up dirty pages to flush at the end), and there is no copy into it."""

    path: str
    fd: int
    size: int
    is_block: bool
    created: bool          # a new regular file: zero blocks stay holes
    direct_fd: int | None = None
    sector: int = 512

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Write a block: O_DIRECT when its offset and length are whole sectors (the buffer
        must then be page-aligned, as BufferPool's are), buffered otherwise."""
        if (self.direct_fd is not None and offset % self.sector == 0
                and len(data) % self.sector == 0):
            try:
                pwrite_full(self.direct_fd, data, offset)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                log.debug("O_DIRECT write to %s refused (%s); writing through the page cache",
                          self.path, err)
                os.close(self.direct_fd)
                self.direct_fd = None
        pwrite_full(self.fd, data, offset)

    def close(self) -> None:
        """Close both descriptors (again: nothing)."""
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def stat_target(path: str) -> tuple[bool, bool, int]:
    """(exists, is_block, size) of a restore target; raises UnsafeTarget for other kinds."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False, False, 0
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(path, "look at the target") from err
        raise
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeTarget(path, "is a directory; give a block device or a file")
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            if is_permission_error(err):
                raise PermissionDenied(path, "open the target") from err
            raise
        try:
            return True, True, device_size(fd)
        finally:
            os.close(fd)
    if stat.S_ISREG(st.st_mode):
        return True, False, st.st_size
    raise UnsafeTarget(path, f"is {file_kind(st.st_mode)}, not a block device or regular file")


def check_writable_device(path: str) -> None:
    """Refuse a read-only block device (losetup -r, blockdev --setro, a write-protected card):
    it may open for writing and fail only at the first write, so it is asked (BLKROGET) before
    anything starts.  Raises UnsafeTarget (read-only), PermissionDenied or DiskIOError
    ("open")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(path, "open the target") from err
        raise DiskIOError(path, "open", err) from err
    try:
        read_only = _ioctl_int(fd, BLKROGET, "i")
    except OSError as err:
        log.debug("%s: BLKROGET: %s", path, err)
        return
    finally:
        os.close(fd)
    if read_only:
        raise UnsafeTarget(path, "is a read-only device (blockdev --setro, losetup -r or a "
                                 "write-protect switch); nothing was written")


def open_target(path: str, size: int, exists: bool, is_block: bool,
                read_back: bool = False) -> Target:
    """Open a restore target for writing.  Block devices are opened O_EXCL, which the kernel
    refuses while anything has the device mounted or claimed.  A missing file is created at
    `size` bytes (sparse).  Raises UnsafeTarget (busy, read-only filesystem), PermissionDenied
    or DiskIOError ("open for writing")."""
    mode = os.O_RDWR if read_back else os.O_WRONLY
    try:
        if is_block:
            fd = os.open(path, mode | os.O_EXCL | os.O_CLOEXEC)
            try:
                # a read-only device (losetup -r, blockdev --setro, a write-protected card)
                # may open for writing and fail only at the first write: ask it first
                if _ioctl_int(fd, BLKROGET, "i"):
                    raise UnsafeTarget(path, "is a read-only device (blockdev --setro, "
                                             "losetup -r or a write-protect switch); nothing "
                                             "was written")
                tgt = Target(path, fd, device_size(fd), True, False,
                             sector=_ioctl_int(fd, BLKSSZGET, "i"))
            except BaseException:
                os.close(fd)
                raise
            tgt.direct_fd = open_direct(path, write=True)
            return tgt
        if not exists:
            fd = os.open(path, mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            return Target(path, fd, size, False, True)
        fd = os.open(path, mode | os.O_CLOEXEC)
        return Target(path, fd, os.fstat(fd).st_size, False, False)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise UnsafeTarget(path, "device is busy (mounted or in use)") from err
        if err.errno == errno.EROFS:
            raise UnsafeTarget(path, "cannot be written: on a read-only filesystem; nothing "
                                     "was written") from err
        if is_permission_error(err):
            detail = ("immutable or append-only: chattr -i" if err.errno == errno.EPERM
                      else err.strerror)
            raise PermissionDenied(path, "open for writing", f"{detail}; nothing was written") \
                from err
        raise DiskIOError(path, "open for writing", err) from err


def zero_range(target: Target, offset: int, length: int) -> None:
    """Make a range of the target read as zeros: BLKZEROOUT on a device (write-zeroes offload
    where the device has it), zero writes on a file."""
    if target.is_block:
        try:
            fcntl.ioctl(target.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as err:
            log.debug("BLKZEROOUT on %s failed (%s); writing zeros", target.path, err)
    zeros = bytes(min(length, 4 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_full(target.fd, memoryview(zeros)[:n], offset)
        offset += n


def open_readback(path: str) -> tuple[int, bool]:
    """A descriptor to read back what a restore wrote, from the device and not from the page
    cache: O_DIRECT where the device or filesystem allows it (True), else a plain descriptor
    whose cached pages have been dropped (the caller fsynced them first, so they are clean and
    POSIX_FADV_DONTNEED lets go of them; the reads then come from the disk)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as err:
        log.debug("%s: no O_DIRECT for the read-back (%s); dropping its cache instead", path, err)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as err:
        log.debug("%s: POSIX_FADV_DONTNEED failed (%s)", path, err)
    return fd, False
