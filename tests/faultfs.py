"""A read-only FUSE filesystem serving one file, ``disk``, that reads through to a backing file and
fails with EIO where the configured bad byte ranges are: a disk with unreadable sectors that a loop
device can sit on, so diskimg meets real kernel read errors (there is no device-mapper here).

    python tests/faultfs.py BACKING MOUNTPOINT [--bad START:LEN ...] [--delay SECONDS]
                            [--heal-after N] [--config FILE] [--log FILE] [--partial {eio,short}]

It runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or sent SIGTERM/SIGINT.

Failure model, chosen to look like a real disk to the kernel.  Bad ranges are widened to whole
512-byte sectors.

- ``--partial short`` (default): a read that starts on good bytes and runs into a bad range returns
  the good bytes up to the first bad byte (a short read); a read that starts on a bad byte fails
  with EIO.  This is what sd does with a medium error: it completes the sectors before the failing
  LBA and fails the rest.  The loop driver's direct-I/O path turns a short read into "complete
  this much, retry the rest", and the retry then fails, so the caller of the loop device sees EIO
  for its request and nothing is zero-filled.  This needs FOPEN_DIRECT_IO (set in open(), on by
  default): without it the FUSE kernel module takes a short read as end of file.
- ``--partial eio``: any read touching a bad byte fails as a whole.

``--delay`` sleeps on every failing read (a slow, dying disk).  ``--heal-after N`` makes each
512-byte bad sector readable after it has failed N reads (a sector that a retry pass recovers).

``--config FILE`` names a JSON file ``{"bad": [[start, length], ...], "delay": 0.0,
"heal_after": null}`` that overrides the command-line values; it is re-read whenever its mtime or
size changes (checked on every read), so a test can move bad sectors while the device is in use.
Rewriting it also resets the heal counters.  Write it atomically (write a temp file, rename).

``--log FILE`` appends one line per read request, ``offset length result``, where result is the
number of bytes returned or ``EIO``; tests use it to see the request sizes the kernel sends.

Writes are refused with EROFS, the mount is read-only and the backing file is opened O_RDONLY, so a
test can prove the backing file is unchanged afterwards.  With ``--writable`` the file takes writes,
and lies about some of them, as a failing USB stick or a bad cable does: bytes written inside a
``--corrupt START:LEN`` range land inverted (each byte XOR 0xFF), bytes inside a ``--drop
START:LEN`` range are not written at all; the write still reports success.  The filesystem is single-threaded so the
read log, heal counters and delays are deterministic (a disk serves one command at a time, too).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mfusepy as fuse

FILE_NAME = "disk"
SECTOR = 512

log = logging.getLogger("faultfs")


@dataclass(frozen=True)
class FaultConfig:
    bad: tuple[tuple[int, int], ...] = ()
    delay: float = 0.0
    heal_after: int | None = None

    def __post_init__(self) -> None:
        # A disk fails whole sectors.  Widening to 512-byte sectors also keeps short reads
        # sector-aligned: the loop driver completes a short read's bytes and resubmits the rest,
        # and a short read that is not a whole number of sectors goes wrong (measured on 6.18: a
        # 4095-byte short read of a 4096-byte sector is retried as a 1-byte read of the wrong
        # offset, and the sector then reads as *good* with a wrong last byte: silent corruption).
        widened = []
        for start, length in self.bad:
            if length > 0:
                lo, hi = start // SECTOR * SECTOR, -(-(start + length) // SECTOR) * SECTOR
                widened.append((lo, hi - lo))
        object.__setattr__(self, "bad", tuple(sorted(widened)))

    @classmethod
    def from_json(cls, text: str) -> FaultConfig:
        data = json.loads(text)
        bad = tuple((int(s), int(n)) for s, n in data.get("bad", []))
        heal = data.get("heal_after")
        return cls(bad=bad, delay=float(data.get("delay", 0.0)),
                   heal_after=None if heal is None else int(heal))

    def to_json(self) -> str:
        return json.dumps({"bad": [list(r) for r in self.bad], "delay": self.delay,
                           "heal_after": self.heal_after})


def parse_range(text: str) -> tuple[int, int]:
    """``START:LEN`` in bytes (decimal or 0x hex) -> (start, length)."""
    try:
        start, length = (int(part, 0) for part in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected START:LEN in bytes, got {text!r}") from err
    if start < 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: start must be >= 0, length > 0")
    return start, length


class FaultFS(fuse.Operations):
    use_ns = True

    def __init__(self, backing: Path, config: FaultConfig, config_file: Path | None,
                 partial: str, read_log: Path | None, fuse_direct_io: bool,
                 writable: bool = False, corrupt=(), drop=()) -> None:
        self.backing = backing
        self.writable = writable
        self.corrupt = tuple(corrupt)
        self.drop = tuple(drop)
        self.fd = os.open(backing, os.O_RDWR if writable else os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.config = config
        self.config_file = config_file
        self.config_stamp: tuple[int, int] | None = None
        self.partial = partial
        self.fuse_direct_io = fuse_direct_io
        self.failures: dict[int, int] = {}  # bad sector -> failed reads so far (for heal_after)
        self.lock = threading.Lock()
        self.log_file = open(read_log, "a", buffering=1) if read_log else None
        self.started = time.time_ns()
        self._reload_config()

    # -- configuration -------------------------------------------------------------------------
    def _reload_config(self) -> None:
        if self.config_file is None:
            return
        try:
            st = os.stat(self.config_file)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self.config_stamp:
            return
        try:
            self.config = FaultConfig.from_json(self.config_file.read_text())
        except (ValueError, OSError) as err:
            # Half-written file: keep the old config, retry on the next read.
            log.warning("ignoring unreadable config %s: %s", self.config_file, err)
            return
        self.config_stamp = stamp
        self.failures.clear()
        log.info("config: %s", self.config)

    def _first_bad(self, offset: int, end: int) -> int | None:
        """The first still-bad byte in [offset, end), or None."""
        heal = self.config.heal_after
        first: int | None = None
        for start, length in self.config.bad:
            lo, hi = max(start, offset), min(start + length, end)
            if lo >= hi:
                continue
            if heal is None:
                cand = lo
            else:
                cand = None
                for sector in range(lo // SECTOR, (hi - 1) // SECTOR + 1):
                    if self.failures.get(sector, 0) < heal:
                        cand = max(lo, sector * SECTOR)
                        break
            if cand is not None and (first is None or cand < first):
                first = cand
        return first

    def _count_failure(self, offset: int, end: int) -> None:
        if self.config.heal_after is None:
            return
        for start, length in self.config.bad:
            lo, hi = max(start, offset), min(start + length, end)
            for sector in range(lo // SECTOR, (hi - 1) // SECTOR + 1) if lo < hi else ():
                self.failures[sector] = self.failures.get(sector, 0) + 1

    # -- FUSE operations -----------------------------------------------------------------------
    def getattr(self, path, fh=None):
        now = self.started
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2,
                    "st_atime": now, "st_mtime": now, "st_ctime": now}
        if path == "/" + FILE_NAME:
            return {"st_mode": stat.S_IFREG | (0o644 if self.writable else 0o444), "st_nlink": 1, "st_size": self.size,
                    "st_blocks": (self.size + 511) // 512, "st_blksize": 4096,
                    "st_atime": now, "st_mtime": now, "st_ctime": now}
        raise fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        if path != "/":
            raise fuse.FuseOSError(errno.ENOTDIR)
        return [".", "..", FILE_NAME]

    def open(self, path, fi):
        if path != "/" + FILE_NAME:
            raise fuse.FuseOSError(errno.ENOENT)
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND) and not self.writable:
            raise fuse.FuseOSError(errno.EROFS)
        # FOPEN_DIRECT_IO: the kernel forwards each read with its own offset and size instead of
        # filling the FUSE page cache page by page, and caches nothing, so a bad sector that
        # heals is seen as soon as it heals.
        fi.direct_io = 1 if self.fuse_direct_io else 0
        fi.keep_cache = 0
        return 0

    def read(self, path, size, offset, fi):
        with self.lock:
            self._reload_config()
            end = min(offset + size, self.size)
            if offset >= end:
                self._log(offset, size, "0")
                return b""
            bad = self._first_bad(offset, end)
            if bad is not None and (bad == offset or self.partial == "eio"):
                self._count_failure(offset, end)
                delay = self.config.delay
                self._log(offset, size, "EIO")
                if delay:
                    time.sleep(delay)
                raise fuse.FuseOSError(errno.EIO)
            if bad is not None:
                end = bad  # short read up to the first bad byte
            data = os.pread(self.fd, end - offset, offset)
            self._log(offset, size, str(len(data)))
            return data

    def _log(self, offset: int, size: int, result: str) -> None:
        if self.log_file:
            self.log_file.write(f"{offset} {size} {result}\n")

    def write(self, path, data, offset, fi):
        if not self.writable:
            raise fuse.FuseOSError(errno.EROFS)
        with self.lock:
            end = min(offset + len(data), self.size)
            if offset >= end:
                raise fuse.FuseOSError(errno.ENOSPC)
            buf = bytearray(data[:end - offset])
            for start, length in self.corrupt:   # the device garbles these bytes
                lo, hi = max(start, offset), min(start + length, end)
                for i in range(lo - offset, hi - offset):
                    buf[i] ^= 0xFF
            keep = [(offset, end)]               # and silently loses these
            for start, length in self.drop:
                cut = []
                for lo, hi in keep:
                    a, b = max(lo, start), min(hi, start + length)
                    if a >= b:
                        cut.append((lo, hi))
                        continue
                    if lo < a:
                        cut.append((lo, a))
                    if b < hi:
                        cut.append((b, hi))
                keep = cut
            for lo, hi in keep:
                os.pwrite(self.fd, bytes(buf[lo - offset:hi - offset]), lo)
            self._log(offset, len(data), "W")
            return len(data)

    def fsync(self, path, datasync, fi):
        if self.writable:
            os.fsync(self.fd)
        return 0

    def flush(self, path, fi):
        return 0

    def truncate(self, path, length, fh=None):
        raise fuse.FuseOSError(errno.EROFS)

    def create(self, path, mode, fi=None):
        raise fuse.FuseOSError(errno.EROFS)

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 512, "f_blocks": (self.size + 511) // 512,
                "f_bfree": 0, "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}

    def release(self, path, fi):
        return 0

    def destroy(self, path):
        os.close(self.fd)
        if self.log_file:
            self.log_file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--bad", type=parse_range, action="append", default=[],
                        metavar="START:LEN", help="bad byte range (repeatable)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per failing read")
    parser.add_argument("--heal-after", type=int, default=None, metavar="N",
                        help="a bad sector becomes readable after N failed reads")
    parser.add_argument("--config", type=Path, help="JSON config, re-read when it changes")
    parser.add_argument("--log", type=Path, help="append 'offset length result' per read")
    parser.add_argument("--partial", choices=("short", "eio"), default="short",
                        help="read running into a bad range: short read (default) or EIO")
    parser.add_argument("--no-fuse-direct-io", dest="fuse_direct_io", action="store_false",
                        help="let the kernel use the FUSE page cache (page-sized reads)")
    parser.add_argument("--writable", action="store_true", help="take writes (see --corrupt)")
    parser.add_argument("--corrupt", type=parse_range, action="append", default=[],
                        metavar="START:LEN", help="with --writable: invert bytes written here")
    parser.add_argument("--drop", type=parse_range, action="append", default=[],
                        metavar="START:LEN", help="with --writable: lose bytes written here")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="faultfs: %(message)s", stream=sys.stderr)
    config = FaultConfig(bad=tuple(sorted(args.bad)), delay=args.delay, heal_after=args.heal_after)
    ops = FaultFS(args.backing.resolve(), config, args.config and args.config.resolve(),
                  args.partial, args.log, args.fuse_direct_io, args.writable, args.corrupt,
                  args.drop)
    fuse.FUSE(ops, str(args.mountpoint), raw_fi=True, foreground=True, nothreads=True,
              ro=not args.writable,
              allow_other=True, default_permissions=True, fsname="faultfs", subtype="faultfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
