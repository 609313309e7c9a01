"""Mounting an image read-only with FUSE: ``disk``, one file per partition, and with ``fs`` the
filesystems inside, so that getting one file back is one command.

Layout of the mount point DIR::

    DIR/disk        the whole device at the image's point in time
    DIR/p1 ...      one file per partition of its MBR or GPT (numbered as the kernel does)
    DIR/fs/p1/ ...  with `fs`: each recognised filesystem, mounted read-only through a loop
                    device (``noload`` for ext3/4, ``norecovery,nouuid`` for xfs: a journal is
                    never replayed, and a backup of a disk that is mounted too can be opened);
                    ``DIR/fs/disk`` for a filesystem on the whole disk
    DIR/.diskimg    (hidden) what ``umount_image`` needs: the serving process and the mounts

Every read goes through `ImageDisk` (the block view): verified like restore, zero and unused
blocks read as zeros without touching the image, and a request touching a damaged block fails
with EIO as a whole (logged once per block).  The kernel then retries page by page
(``filemap_read_folio``), so a reader gets every good page and EIO exactly on the damaged
block's pages; a short read would not do, because FUSE's page cache takes it as the end of the
file and fills the rest with zeros, i.e. wrong bytes.  The files are immutable, so the kernel
keeps its page cache across opens (``keep_cache``).

Speed: mfusepy is bound to libfuse 3 (it would take libfuse 2, whose requests are at most
128 KiB), the kernel's read-ahead on the mount is widened to 4 MiB, so that a sequential reader
has four 1 MiB requests in flight on libfuse's threads, and a request for a whole block has the
block decoded straight into libfuse's reply buffer (`_fuse_class`, `BlockView.read_into`): one
Python call, one decode and no copy per MiB.  A request inside a zero extent is answered with
no bytes at all where the kernel grants the writeback cache: with it, FUSE takes a short read
as a hole and zero-fills the pages itself, without changing the file's size (without it, a
short read means the end of the file, see above, so zeros are then sent as bytes).

The process model: `mount_image` runs the FUSE session on a thread and waits on `stop`;
whoever calls it (the CLI) sets `stop` on SIGTERM, SIGINT or SIGHUP.  Stopping unmounts the
filesystems inside first (lazily when busy), detaches their loop devices, then unmounts the FUSE
mount; a FUSE mount removed from outside (``fusermount3 -u``) ends the session too.  The CLI
handles these signals itself (libfuse installs handlers only where none is set), so cleanup
never races libfuse's own exit.  mfusepy is imported only here, only when mounting.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from diskimg.errors import DiskimgError, OperationFailed, UsageError
from diskimg.ops.imagedisk import ImageDisk

log = logging.getLogger(__name__)

INFO_NAME = ".diskimg"

# The kernel's read-ahead on the FUSE mount (see _widen_readahead): with libfuse 3 its requests
# are 1 MiB (FUSE_MAX_PAGES), so 4 MiB keeps four in flight, answered by libfuse's threads at
# once: whole blocks decoded in parallel, each straight into its reply buffer.
MOUNT_READAHEAD_KB = 4096
# libfuse 3's conn->want bit for the writeback cache (see _Fs.init_with_config)
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
# libfuse 3's threads kept waiting for requests: the read-ahead's four, and a random reader (a
# filesystem mounted inside) has a few more
FUSE_THREADS = 4
# Where the read-ahead cannot be widened (not root: sysfs), the kernel asks for 128 KiB at a
# time, one request after the other: then ImageDisk decodes the blocks after the one being read
# on as many threads (restore's workers on the 2-core machines this was measured on, and one
# more so that one is always ready).  With the read-ahead widened this only costs a copy.
READAHEAD = 3

# mount options for a filesystem opened read-only from a backup: never replay a journal (the
# image must not change, and the loop device is read-only anyway)
FS_OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery,nouuid",
    "btrfs": "ro,rescue=nologreplay",
    "vfat": "ro",
    "exfat": "ro",
    "ntfs": "ro",
    "ntfs3": "ro",
    "iso9660": "ro",
}


@dataclass(frozen=True)
class MountedFs:
    """A filesystem mounted inside: the file it lies in (``DIR/p1``), its type and where."""

    name: str
    fstype: str
    mountpoint: str


@dataclass(frozen=True)
class Mounted:
    """A mount that is ready: what DIR holds."""

    image: str
    mountpoint: str
    pid: int
    size: int
    files: tuple[str, ...]
    filesystems: tuple[MountedFs, ...] = ()
    skipped: tuple[str, ...] = ()       # partitions with no filesystem mounted, and why


@dataclass
class _File:
    offset: int
    length: int


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            out.append((point, fields[sep + 1]))
    return out


def is_fuse_mount(path: str) -> bool:
    path = os.path.realpath(path)
    return any(p == path and t.startswith("fuse") for p, t in _mountinfo())


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


class _Zeros:
    """The disk's zero extents, to answer reads inside them at once (a mostly empty disk is
    mostly zero extents)."""

    def __init__(self, disk: ImageDisk) -> None:
        zero = [e for e in disk.extents() if e.zero]
        self.starts = [e.offset for e in zero]
        self.ends = [e.offset + e.length for e in zero]

    def covers(self, offset: int, size: int) -> bool:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i >= 0 and offset + size <= self.ends[i]

    @staticmethod
    def fill(out: memoryview) -> None:
        """Zero `out` (memset, without the GIL)."""
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(out)), 0, len(out))


class _Fs:
    """The FUSE operations (mfusepy calls these by name; read-only, thread-safe)."""

    use_ns = True

    def __init__(self, disk: ImageDisk, files: dict[str, _File], dirs: set[str]) -> None:
        self.disk = disk
        self.files = files
        self.dirs = dirs
        self.info = b"{}"
        self.zeros = _Zeros(disk)
        self.ready = threading.Event()
        self.fuse3 = False           # set when bound to libfuse 3
        self.zero_holes = False      # a read of zeros may be answered short (writeback cache)
        try:
            stamp = datetime.fromisoformat(disk.view.header.created.replace("Z", "+00:00"))
            self.time = int(stamp.timestamp() * 1e9)
        except (ValueError, AttributeError):
            self.time = time.time_ns()

    def _fuse_error(self, code: int):
        import mfusepy
        return mfusepy.FuseOSError(code)

    def init(self, path):
        self.ready.set()

    def init_with_config(self, conn, config):
        """libfuse 3 (mfusepy calls this instead of `init` when it is there): ask for the
        writeback cache where the kernel offers it, only so that a short read is taken as a
        hole (the kernel fills the rest of the request with zeros itself) instead of as the
        end of the file; nothing is ever written, the mount is read-only."""
        if conn is not None and hasattr(conn, "want") and self.fuse3 \
                and conn.capable & FUSE_CAP_WRITEBACK_CACHE:
            conn.want |= FUSE_CAP_WRITEBACK_CACHE
            self.zero_holes = True
        self.ready.set()

    def getattr(self, path, fh=None):
        t = self.time
        base = {"st_atime": t, "st_mtime": t, "st_ctime": t, "st_uid": 0, "st_gid": 0}
        if path in self.dirs:
            return {**base, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        f = self.files.get(path)
        if f is not None:
            return {**base, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": f.length,
                    "st_blocks": (f.length + 511) // 512, "st_blksize": 1 << 17}
        if path == "/" + INFO_NAME:
            return {**base, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1,
                    "st_size": len(self.info)}
        raise self._fuse_error(errno.ENOENT)

    def readdir(self, path, fh):
        if path not in self.dirs:
            raise self._fuse_error(errno.ENOTDIR)
        prefix = path.rstrip("/") + "/"
        names = [p[len(prefix):] for p in (*self.dirs, *self.files)
                 if p.startswith(prefix) and p != path and "/" not in p[len(prefix):]]
        return [".", "..", *sorted(names)]

    def open(self, path, fi):
        if path not in self.files and path != "/" + INFO_NAME:
            raise self._fuse_error(errno.EISDIR if path in self.dirs else errno.ENOENT)
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise self._fuse_error(errno.EROFS)
        if path == "/" + INFO_NAME:
            # its content is filled in once mounted: no page cache, and no size trusted from
            # an earlier lookup (the writeback cache keeps the first size it saw)
            fi.keep_cache = 0
            fi.direct_io = 1
        else:
            fi.keep_cache = 1       # the content never changes
            fi.direct_io = 0
        return 0

    def read(self, path, size, offset, fi):
        """The bytes asked for (mfusepy calls this only without `_fuse_class`'s `read`)."""
        buf = bytearray(size)
        n = self.read_into(path, memoryview(buf), offset, fi)
        return bytes(buf[:n])

    def read_into(self, path, out: memoryview, offset: int, fi) -> int:
        """Fill `out` (libfuse's reply buffer, as long as the kernel's request) with the bytes
        of `path` from `offset`; how many there are (fewer at the end of the file)."""
        if path == "/" + INFO_NAME:
            data = self.info[offset:offset + len(out)]
            out[:len(data)] = data
            return len(data)
        f = self.files[path]
        if offset >= f.length:
            return 0
        size = min(len(out), f.length - offset)
        out = out[:size]
        if self.zeros.covers(f.offset + offset, size):
            # zero or unused: no index lookup, nothing decoded; with the writeback cache not
            # even zeros copied: the kernel fills the request's pages with zeros itself
            if self.zero_holes and offset + size < f.length:
                return 0
            self.zeros.fill(out)
            return size
        try:
            self.disk.read_into(f.offset + offset, out)
            return size
        except DiskimgError:
            # name (and log) the damaged blocks; the whole request fails, see the docstring
            bad = [p for p in self.disk.read_blocks(f.offset + offset, size) if p.error]
            log.debug("%s: read of %d bytes at %d failed on %d block(s)", path, size, offset,
                      len(bad))
            raise self._fuse_error(errno.EIO) from None

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (self.disk.size + 4095) // 4096,
                "f_bfree": 0, "f_bavail": 0, "f_files": len(self.files), "f_ffree": 0,
                "f_namemax": 255}

    def access(self, path, amode):
        if amode & os.W_OK:
            raise self._fuse_error(errno.EROFS)
        return 0


@dataclass
class _Session:
    mountpoint: str
    fs_mounts: list[str] = field(default_factory=list)
    error: BaseException | None = None


def _check_mountpoint(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{path}: mount point does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{path}: mount point is not a directory")
    real = os.path.realpath(path)
    if os.path.ismount(real):
        raise UsageError(f"{path}: is a mount point already (diskimg umount {path}?)")
    # (pathlib, not os.listdir: tests/unit/test_store.py keeps os.listdir for images to the
    # store, and a mount point is no image)
    if any(Path(real).iterdir()):
        raise UsageError(f"{path}: mount point is not empty")
    return real


def _fstype(path: str) -> str | None:
    if not shutil.which("blkid"):
        return None
    proc = _run("blkid", "-p", "-o", "value", "-s", "TYPE", path)
    return proc.stdout.strip() or None


def _mount_filesystems(real: str, names: list[str], session: _Session
                       ) -> tuple[list[MountedFs], list[str]]:
    mounted, skipped = [], []
    for name in names:
        src = os.path.join(real, name)
        fstype = _fstype(src)
        if fstype is None:
            skipped.append(f"{name}: no filesystem recognised")
            continue
        opts = FS_OPTIONS.get(fstype)
        if opts is None:
            skipped.append(f"{name}: {fstype} is not mounted (not a filesystem diskimg mounts)")
            continue
        target = os.path.join(real, "fs", name)
        # -o loop: a read-only loop device with autoclear, detached by the kernel at umount
        proc = _run("mount", "-t", fstype, "-o", f"{opts},loop", src, target)
        if proc.returncode != 0:
            why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            skipped.append(f"{name}: {fstype}: mount failed: {why[-1] if why else proc.returncode}")
            log.warning("%s", skipped[-1])
            continue
        session.fs_mounts.append(target)
        mounted.append(MountedFs(name, fstype, target))
        log.info("mounted %s (%s) on %s", src, fstype, target)
    return mounted, skipped


def _loops_of(paths: Iterable[str]) -> list[str]:
    """Loop devices whose backing file is one of `paths`."""
    found = []
    for path in paths:
        proc = _run("losetup", "--noheadings", "-O", "NAME", "-j", path)
        found += [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return found


def _teardown(real: str, fs_mounts: Iterable[str]) -> list[str]:
    """Unmount what is mounted inside `real` (lazily when busy), detach loop devices left over
    the files in it, then unmount the FUSE mount itself (lazily when something still holds it:
    that detaches what is mounted inside too, as when the serving process died and every path
    under `real` says "transport endpoint is not connected").  Returns what is still mounted."""
    prefix = real.rstrip("/") + "/"
    inside = [p for p, _ in _mountinfo() if p.startswith(prefix)]
    for target in reversed(list(dict.fromkeys([*fs_mounts, *inside]))):
        if _run("umount", target).returncode != 0 and \
                _run("umount", "-l", target).returncode == 0:
            log.warning("%s: busy; detached lazily (unmounted once no longer in use)", target)
    files = []
    try:
        files = [str(p) for p in Path(real).iterdir()]
    except OSError:
        pass
    for loop in _loops_of(files):
        _run("losetup", "-d", loop)
    errors = []
    if is_fuse_mount(real):
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        cmd = [tool, "-u", real] if tool else ["umount", real]
        if _run(*cmd).returncode != 0:
            proc = _run(*([tool, "-u", "-z", real] if tool else ["umount", "-l", real]))
            errors.append(proc.stderr.strip())
    left = [p for p, _ in _mountinfo() if p == real or p.startswith(prefix)]
    return [f"{p} is still mounted" + (f" ({errors[0]})" if errors and errors[0] else "")
            for p in left]


def _widen_readahead(real: str) -> None:
    """Let the kernel read ahead MOUNT_READAHEAD_KB on the mount instead of FUSE's 128 KiB, so
    that a sequential reader has several 1 MiB requests in flight (with libfuse 3; 128 KiB
    ones with libfuse 2), answered by several threads at once.  Root only (sysfs); without it
    the mount works as well, only slower."""
    try:
        st = os.stat(os.path.join(real, "disk"))
        with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb",
                  "w") as f:
            f.write(str(MOUNT_READAHEAD_KB))
    except OSError as err:
        log.debug("%s: read-ahead left as it is: %s", real, err)


def _fuse_class(mfusepy):
    """mfusepy's FUSE with a `read` that lets the operations fill libfuse's reply buffer
    themselves (`_Fs.read_into`): mfusepy's own asks for the bytes and copies them into it, so a
    block would be decoded into a buffer of its own, copied and thrown away.  The method is
    mfusepy's ctypes callback for libfuse's read (same signature as mfusepy's `FUSE.read`)."""

    class Fuse(mfusepy.FUSE):
        def read(self, path, buf, size, offset, fip):
            if size <= 0:
                return 0
            out = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            return self.operations.read_into(path.decode(self.encoding, self.errors),
                                             memoryview(out).cast("B"), offset, fip.contents)

    return Fuse


def _import_mfusepy():
    """mfusepy bound to libfuse 3 when it is installed.  mfusepy looks for libfuse 2 first, and
    libfuse 2 reads at most 128 KiB per request (its buffer); libfuse 3 asks the kernel for
    FUSE_MAX_PAGES, so that with the mount's read-ahead widened a sequential reader's requests
    are 1 MiB, one block each: 8 times fewer requests, each a Python call.  A library chosen
    with FUSE_LIBRARY_PATH or FUSE_LIBRARY_NAME (mfusepy's own variables) is left as chosen."""
    if "mfusepy" not in sys.modules and not os.environ.get("FUSE_LIBRARY_PATH") \
            and not os.environ.get("FUSE_LIBRARY_NAME"):
        from ctypes.util import find_library
        lib = find_library("fuse3")
        if lib:
            os.environ["FUSE_LIBRARY_PATH"] = lib
            try:
                import mfusepy
            finally:
                del os.environ["FUSE_LIBRARY_PATH"]   # not for the tools run from here
            return mfusepy
    import mfusepy
    return mfusepy


def mount_image(image: str, mountpoint: str, *, search: Iterable[str] = (), fs: bool = False,
                stop: threading.Event, ready: Callable[[Mounted], None] | None = None) -> Mounted:
    """Mount `image` (its chain resolved through `search`) on `mountpoint` and serve it until
    `stop` is set or the FUSE mount is removed from outside; then undo everything.  `ready` is
    called once everything is mounted.  Raises UsageError (mount point missing, not empty,
    mounted), what opening the chain raises, OperationFailed when FUSE cannot mount."""
    try:
        mfusepy = _import_mfusepy()
    except (ImportError, OSError) as err:   # OSError: libfuse not installed
        raise OperationFailed(f"{mountpoint}: cannot mount: FUSE is not available ({err}); "
                              f"install fuse3 and the Python package mfusepy") from err
    real = _check_mountpoint(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise OperationFailed(f"{mountpoint}: cannot mount: /dev/fuse does not exist "
                              f"(modprobe fuse)")
    # root widens the kernel's read-ahead (sysfs), which then reads ahead for us
    ahead = 0 if os.geteuid() == 0 else READAHEAD
    with ImageDisk(image, search, readahead=ahead) as disk:
        files = {"/disk": _File(0, disk.size)}
        for part in disk.partitions():
            if part.offset + part.length <= disk.size:
                files[f"/p{part.number}"] = _File(part.offset, part.length)
        names = [n[1:] for n in files if n != "/disk"] or ["disk"]
        dirs = {"/"} | ({"/fs"} | {f"/fs/{n}" for n in names} if fs else set())
        ops = _Fs(disk, files, dirs)
        session = _Session(real)

        def serve() -> None:
            try:
                kw = {"allow_other": True} if os.geteuid() == 0 else {}
                ops.fuse3 = mfusepy.fuse_version_major >= 3
                if ops.fuse3:
                    # threads kept for the next requests instead of one made per request
                    # (and libfuse 3.14 warns on stderr when this is not set)
                    kw["max_idle_threads"] = FUSE_THREADS
                _fuse_class(mfusepy)(ops, real, raw_fi=True, foreground=True, ro=True,
                                     default_permissions=True,
                                     fsname=f"diskimg:{os.path.abspath(image)}",
                                     subtype="diskimg", **kw)
            except BaseException as err:   # noqa: BLE001 (reported by the main thread)
                session.error = err
            finally:
                ops.ready.set()

        thread = threading.Thread(target=serve, name="fuse", daemon=True)
        thread.start()
        ops.ready.wait()
        if session.error is not None or not thread.is_alive() and not is_fuse_mount(real):
            raise OperationFailed(f"{mountpoint}: FUSE mount failed: "
                                  f"{session.error or 'the FUSE session ended at once'}")
        _widen_readahead(real)
        try:
            mounted, skipped = _mount_filesystems(real, names, session) if fs else ([], [])
            result = Mounted(os.path.abspath(image), real, os.getpid(), disk.size,
                             tuple(sorted(files)), tuple(mounted), tuple(skipped))
            ops.info = json.dumps({"pid": os.getpid(), "image": result.image,
                                   "filesystems": [m.mountpoint for m in mounted]}).encode()
            if ready is not None:
                ready(result)
            while not stop.is_set() and thread.is_alive():
                stop.wait(0.5)
        finally:
            problems = _teardown(real, session.fs_mounts)
            thread.join(10)
            for p in problems:
                log.error("could not unmount %s", p)
        return result


def umount_image(mountpoint: str, timeout: float = 30.0) -> list[str]:
    """Undo `mount_image` on `mountpoint`: ask the serving process to stop (SIGTERM) and wait
    for it; if it is gone, unmount what is left directly.  Returns the filesystems that were
    mounted inside.  Raises UsageError when `mountpoint` is not a diskimg mount,
    OperationFailed when it could not be unmounted."""
    real = os.path.realpath(mountpoint)
    mounts = _mountinfo()
    if not any(p == real for p, _ in mounts):
        raise UsageError(f"{mountpoint}: not mounted")
    try:
        with open(os.path.join(real, INFO_NAME)) as f:
            info = json.load(f)
    except OSError as err:
        if err.errno not in (errno.ENOTCONN, errno.ECONNABORTED):   # else: a dead FUSE mount
            raise UsageError(f"{mountpoint}: not a diskimg mount") from err
        info = None
    except ValueError as err:
        raise UsageError(f"{mountpoint}: not a diskimg mount") from err
    if info is not None:
        fs_mounts = info.get("filesystems", [])
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and is_fuse_mount(real):
            time.sleep(0.1)
        if not is_fuse_mount(real):
            return fs_mounts
    else:
        fs_mounts = []
    # the serving process is gone (the mount says "transport endpoint is not connected") or
    # did not stop: unmount directly
    problems = _teardown(real, fs_mounts)
    if problems or is_fuse_mount(real):
        raise OperationFailed(f"{mountpoint}: could not unmount: {'; '.join(problems)}")
    return fs_mounts
