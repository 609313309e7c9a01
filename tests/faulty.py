"""A real block device with real read errors: a loop device over a file served by ``faultfs``
(tests/faultfs.py), a FUSE filesystem that fails reads of chosen byte ranges with EIO.

There is no device-mapper (dm-error, dm-flakey) on the test machines, and scsi_debug is not loaded;
FUSE + loop needs only /dev/fuse, fusermount3 and losetup.  With ``losetup --direct-io=on`` every
read of the loop device reaches the FUSE server as a read of the same offset and size, so the error
granularity is the loop device's logical sector (512 bytes, or 4096 with ``sector_size=4096``) for
O_DIRECT readers; buffered readers of the loop device see errors per 4 KiB page.

    with faulty_device(tmp_path, backing, bad=[(1 << 20, 512)]) as fd:
        os.open(fd.dev, os.O_RDONLY | os.O_DIRECT) ...

or, in a test, the ``faulty`` factory fixture, which closes every device it made:

    def test_x(faulty, tmp_path):
        fd = faulty(backing, bad=[(0, 512)])

Cleanup always runs in this order, because each step holds the next one busy: detach the loop
device (it holds the FUSE file open), unmount (``fusermount3 -u``, retried, then ``umount -l``),
then wait for the faultfs process, terminating and finally killing it.

Also here: ``parse_ddrescue_map`` and ``ddrescue_bad_ranges`` for GNU ddrescue mapfiles, so a test
can compare diskimg's idea of the bad areas with ddrescue's.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

FAULTFS = Path(__file__).with_name("faultfs.py")
BAD_STATUSES = frozenset("-*/")


class FaultyDeviceError(RuntimeError):
    """Setting up the faulty device failed; the message says which step and shows its stderr."""


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise FaultyDeviceError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def missing_requirements() -> str | None:
    """Why a faulty device cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: loop devices and FUSE mounts"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing (no FUSE in this kernel or container)"
    for tool in ("fusermount3", "losetup"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: libfuse3.so not found
        return f"mfusepy unusable: {err}"
    return None


def _write_config(path: Path, bad, delay: float, heal_after: int | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"bad": [[int(s), int(n)] for s, n in bad], "delay": delay,
                               "heal_after": heal_after}))
    os.replace(tmp, path)  # atomic: faultfs never sees a half-written file


@dataclass
class FaultyDevice:
    """A loop device over faultfs's ``disk`` file.  Use as a context manager or call close()."""

    backing: Path
    mountpoint: Path
    config_file: Path
    log_file: Path
    process: subprocess.Popen
    dev: str = ""
    direct_io: bool = True
    sector_size: int = 512
    _closed: bool = field(default=False, repr=False)

    @property
    def fuse_file(self) -> Path:
        return self.mountpoint / "disk"

    @property
    def size(self) -> int:
        return self.backing.stat().st_size

    def set_faults(self, bad, delay: float = 0.0, heal_after: int | None = None) -> None:
        """Replace the bad ranges (and delay, heal_after) while the device is in use.  Resets the
        heal counters.  Takes effect on the next read request faultfs receives; data the kernel
        already cached (buffered reads of the loop device) is not re-read, so drop caches with
        ``drop_caches()`` or use O_DIRECT."""
        _write_config(self.config_file, bad, delay, heal_after)
        # mtime has ns resolution on tmpfs/ext4, and faultfs also compares the size, but two
        # rewrites of the same length within one clock tick would look alike: make sure they don't.
        time.sleep(0.01)

    def drop_caches(self) -> None:
        """Drop the loop device's page cache (BLKFLSBUF), so buffered reads go to faultfs again."""
        _run("blockdev", "--flushbufs", self.dev)

    def reads(self) -> list[tuple[int, int, str]]:
        """The read requests faultfs has served: (offset, length, result), result being the byte
        count returned or 'EIO'."""
        out = []
        for line in self.log_file.read_text().splitlines():
            off, size, result = line.split()
            if result != "W":   # a write (a writable device)
                out.append((int(off), int(size), result))
        return out

    def clear_reads(self) -> None:
        # faultfs appends with O_APPEND semantics (mode "a"), so truncating is safe.
        os.truncate(self.log_file, 0)

    def sysfs(self, name: str) -> str:
        """A loop queue attribute, e.g. sysfs('queue/logical_block_size') or sysfs('loop/dio')."""
        return Path("/sys/block", Path(self.dev).name, name).read_text().strip()

    def close(self) -> None:
        """Detach, unmount, stop faultfs; always runs every step, raises the first failure after."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self.dev:
            proc = _run("losetup", "-d", self.dev, check=False)
            if proc.returncode != 0:
                errors.append(f"losetup -d {self.dev}: {proc.stderr.strip()}")
            self._wait_detached(errors)
        if os.path.ismount(self.mountpoint):
            for _ in range(20):
                if _run("fusermount3", "-u", str(self.mountpoint), check=False).returncode == 0:
                    break
                time.sleep(0.1)  # the loop device may still hold the file for a moment
            else:
                errors.append(f"fusermount3 -u {self.mountpoint} kept failing; lazy unmount")
                _run("umount", "-l", str(self.mountpoint), check=False)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            errors.append("faultfs did not exit after unmount; terminated")
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if os.path.ismount(self.mountpoint):
            errors.append(f"{self.mountpoint} still mounted after cleanup")
        if errors:
            raise FaultyDeviceError("; ".join(errors))

    def _wait_detached(self, errors: list[str]) -> None:
        backing_dir = Path("/sys/block", Path(self.dev).name, "loop")
        deadline = time.monotonic() + 10
        while backing_dir.exists():
            if time.monotonic() > deadline:
                errors.append(f"{self.dev} still attached 10 s after losetup -d (held open?)")
                return
            time.sleep(0.05)

    def __enter__(self) -> FaultyDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def faulty_device(tmp_path: Path, backing: Path, bad=(), direct_io: bool = True,
                  delay: float = 0.0, heal_after: int | None = None, sector_size: int = 512,
                  partial: str = "short", fuse_direct_io: bool = True,
                  timeout: float = 10.0, corrupt_writes=(), drop_writes=(),
                  writable: bool = False) -> FaultyDevice:
    """Serve `backing` through faultfs with the byte ranges `bad` [(start, length), ...] failing,
    attach a read-only loop device to it and return the running FaultyDevice.

    direct_io: ``losetup --direct-io=on``; the loop driver then forwards each request to faultfs
    with its own offset and size (sector granularity).  Raises FaultyDeviceError if the kernel
    silently declined it.  Off, the loop driver reads through the page cache of the FUSE file.
    sector_size: the loop device's logical block size (512 or 4096).
    partial, fuse_direct_io: see tests/faultfs.py (defaults are the realistic ones).
    corrupt_writes, drop_writes: byte ranges [(start, length), ...] where the device takes writes
    and lies about them (inverts the bytes, or loses them); either makes the device writable, as
    does `writable` (a loop device that takes writes and keeps them all).

    Raises FaultyDeviceError when the mount does not appear within `timeout` seconds or a command
    fails; whatever was set up by then is torn down first.
    """
    if partial == "short" and not fuse_direct_io:
        # Without FOPEN_DIRECT_IO the FUSE kernel module takes a short read as end of file: it
        # shrinks the file's size and every later sector reads as EOF (measured: 1 MiB of errors
        # for one bad sector).  Only the "fail the whole request" model is usable then.
        raise ValueError("partial='short' needs fuse_direct_io=True; use partial='eio'")
    work = Path(tmp_path) / f"faulty-{os.getpid()}-{time.monotonic_ns()}"
    mountpoint = work / "mnt"
    mountpoint.mkdir(parents=True)
    config_file = work / "faults.json"
    log_file = work / "reads.log"
    log_file.touch()
    _write_config(config_file, bad, delay, heal_after)
    cmd = [sys.executable, str(FAULTFS), str(backing), str(mountpoint), "--config", str(config_file),
           "--log", str(log_file), "--partial", partial]
    if not fuse_direct_io:
        cmd.append("--no-fuse-direct-io")
    writable = writable or bool(corrupt_writes) or bool(drop_writes)
    if writable:
        cmd.append("--writable")
        cmd += [f"--corrupt={int(a)}:{int(n)}" for a, n in corrupt_writes]
        cmd += [f"--drop={int(a)}:{int(n)}" for a, n in drop_writes]
    stderr = open(work / "faultfs.stderr", "w+")
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    stderr.close()  # the child has its copy
    device = FaultyDevice(backing=Path(backing), mountpoint=mountpoint, config_file=config_file,
                          log_file=log_file, process=process, direct_io=direct_io,
                          sector_size=sector_size)
    try:
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(mountpoint) and device.fuse_file.exists()):
            if process.poll() is not None:
                raise FaultyDeviceError(f"faultfs exited {process.returncode}: "
                                        f"{(work / 'faultfs.stderr').read_text().strip()}")
            if time.monotonic() > deadline:
                raise FaultyDeviceError(f"faultfs mount at {mountpoint} did not appear in {timeout} s")
            time.sleep(0.02)
        device.dev = _run("losetup", "--find", "--show", *(() if writable else ("--read-only",)),
                          f"--direct-io={'on' if direct_io else 'off'}",
                          f"--sector-size={sector_size}", str(device.fuse_file)).stdout.strip()
        if device.sysfs("loop/dio") != ("1" if direct_io else "0"):
            raise FaultyDeviceError(f"{device.dev}: asked for direct-io={direct_io}, "
                                    f"kernel reports dio={device.sysfs('loop/dio')}")
        if int(device.sysfs("queue/logical_block_size")) != sector_size:
            raise FaultyDeviceError(f"{device.dev}: logical block size is "
                                    f"{device.sysfs('queue/logical_block_size')}, not {sector_size}")
    except BaseException:
        try:
            device.close()
        except FaultyDeviceError:
            pass  # the setup error is the one worth seeing
        raise
    return device


@pytest.fixture
def faulty(tmp_path) -> Iterator:
    """Factory: ``faulty(backing, bad=[...], **kw) -> FaultyDevice`` (same keywords as
    faulty_device); every device made is closed after the test, even when it fails.  Skips with
    the reason when root, /dev/fuse, fusermount3, losetup or mfusepy is missing."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    made: list[FaultyDevice] = []

    def make(backing: Path, bad=(), **kw) -> FaultyDevice:
        device = faulty_device(tmp_path, backing, bad, **kw)
        made.append(device)
        return device

    yield make
    errors = []
    for device in reversed(made):
        try:
            device.close()
        except FaultyDeviceError as err:
            errors.append(str(err))
    if errors:
        pytest.fail("faulty device cleanup: " + "; ".join(errors))


def read_direct(dev: str | Path, sector_size: int = 512, chunk: int = 1 << 20,
                ) -> tuple[bytes, list[tuple[int, int]]]:
    """Read a whole block device with O_DIRECT: (data, unreadable ranges).  Chunks that fail are
    re-read sector by sector; unreadable sectors are zeros in `data`, and the (start, length)
    ranges are merged.  This is the ground truth a faulty-device test compares against."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    out = bytearray()
    bad: list[tuple[int, int]] = []
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for pos in range(0, size, chunk):
            n = min(chunk, size - pos)
            try:
                got = os.preadv(fd, [view[:n]], pos)
                if got != n:
                    raise FaultyDeviceError(f"{dev}: short O_DIRECT read at {pos}: {got} of {n}")
                out += view[:n]
                continue
            except OSError as err:
                if err.errno != errno.EIO:
                    raise
            for sec in range(pos, pos + n, sector_size):
                try:
                    os.preadv(fd, [view[:sector_size]], sec)
                    out += view[:sector_size]
                except OSError as err:
                    if err.errno != errno.EIO:
                        raise
                    out += bytes(sector_size)
                    if bad and bad[-1][0] + bad[-1][1] == sec:
                        bad[-1] = (bad[-1][0], bad[-1][1] + sector_size)
                    else:
                        bad.append((sec, sector_size))
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return bytes(out), bad


# -- GNU ddrescue mapfiles -------------------------------------------------------------------------

def parse_ddrescue_map(path: Path) -> list[tuple[int, int, str]]:
    """The data blocks of a GNU ddrescue mapfile: (pos, size, status) in file order.

    Format (ddrescue manual, "Mapfile structure"): '#' comment lines; the first non-comment line is
    the status line ``current_pos current_status [current_pass]``; each following line is
    ``pos size status`` with pos and size in C notation (0x... hex, usually) and status one of
    ``?`` non-tried, ``*`` non-trimmed, ``/`` non-scraped, ``-`` bad sector, ``+`` finished.
    """
    blocks: list[tuple[int, int, str]] = []
    seen_status_line = False
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not seen_status_line:
            seen_status_line = True
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in "?*/-+" or len(parts[2]) != 1:
            raise ValueError(f"{path}:{lineno}: not a ddrescue map block line: {raw!r}")
        blocks.append((int(parts[0], 0), int(parts[1], 0), parts[2]))
    if not seen_status_line:
        raise ValueError(f"{path}: no status line; not a ddrescue mapfile")
    return blocks


def ddrescue_bad_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, length) ranges a ddrescue mapfile marks bad or not yet fully read ('-', '*',
    '/'), adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for pos, size, status in parse_ddrescue_map(path):
        if status not in BAD_STATUSES or size == 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == pos:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((pos, size))
    return merged


def merged(ranges, align: int = 512) -> list[tuple[int, int]]:
    """`ranges` widened to `align` boundaries, sorted and merged: what a reader of sectors of
    size `align` must find unreadable."""
    out: list[list[int]] = []
    for start, length in sorted(ranges):
        lo, hi = start // align * align, -(-(start + length) // align) * align
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]


def blank(data: bytes, ranges) -> bytes:
    """`data` with `ranges` zeroed: what a restore of a rescued image must give."""
    buf = bytearray(data)
    for start, length in ranges:
        buf[start:start + length] = bytes(length)
    return bytes(buf)
