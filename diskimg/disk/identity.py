"""What a path really is, so that sources, targets, images and chain members are compared by
identity and never by their names.

Names lie: a hard link, a symlink, a /dev/disk/by-id link, a renamed or deleted backing file all
reach the same bytes under another name.  So a path is identified by the things it reads and
writes:

* a regular file by (st_dev, st_ino);
* a block device by its device number (major:minor);
* a loop device also by its backing file, read with LOOP_GET_STATUS64 (lo_device, lo_inode:
  they survive renames and deleted paths), falling back to /sys/block/loopN/loop/backing_file;
* a partition also by its whole disk (and a loop partition loopNpM by loopN, and so by loopN's
  backing file); a device-mapper or md device also by the devices under it (its slaves).

Each thing is touched either whole (the path *is* it, or covers all of it) or in part (a
partition covers part of its disk).  Two paths overlap when one of them touches whole a thing the
other touches at all: /dev/sda and /dev/sda1 overlap, /dev/sda1 and /dev/sda2 do not.  A loop
device always counts as covering all of its backing file (even with an offset), because two
views of one file must never be written under each other.

Also here: the identity of a source *disk* (serial, WWN, partition-table id, filesystem UUID,
loop backing file) that an incremental image is checked against, and the comparison of two.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYS_DEV_BLOCK = Path("/sys/dev/block")
SYS_BLOCK = Path("/sys/block")
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")   # struct loop_info64, 232 bytes

# ("file", st_dev, st_ino) or ("blk", devnum)
Key = tuple


__all__ = ["PathIdentity", "identify", "overlap", "same", "loops_backed_by", "source_mismatch",
           "SOURCE_KEYS"]


@dataclass(frozen=True)
class PathIdentity:
    """The things a path touches: `whole` it is or covers entirely, `part` it covers in part.
    `notes` say, for a thing the path reaches indirectly, how (for the one-line reasons)."""

    path: str
    exists: bool
    primary: Key | None = None      # the file or device the path itself is
    whole: frozenset = frozenset()
    part: frozenset = frozenset()
    notes: tuple[tuple[Key, str], ...] = ()

    @property
    def things(self) -> frozenset:
        return self.whole | self.part

    def note(self, key: Key) -> str | None:
        for k, text in self.notes:
            if k == key:
                return text
        return None


def _file_key(st: os.stat_result) -> Key:
    return ("file", st.st_dev, st.st_ino)


def _blk_key(devnum: int) -> Key:
    return ("blk", devnum)


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _sysdir(devnum: int) -> Path | None:
    try:
        return (SYS_DEV_BLOCK / f"{os.major(devnum)}:{os.minor(devnum)}").resolve(strict=True)
    except OSError:
        return None


def _devnum(d: Path) -> int | None:
    dev = _read(d / "dev")
    if not dev or ":" not in dev:
        return None
    ma, mi = dev.split(":", 1)
    return os.makedev(int(ma), int(mi))


def _loop_backing(disk: Path, node: str | None) -> tuple[Key | None, str | None]:
    """The backing file of the loop device whose sysfs directory is `disk`: its key and a name
    for messages (None, None when the loop device is not attached).  `node` is a device node
    known to be this loop device (else /dev/NAME is tried, checked by its device number)."""
    name_path = _read(disk / "loop" / "backing_file")
    devnum = _devnum(disk)
    candidates = [c for c in (node, f"/dev/{disk.name}") if c]
    for cand in candidates:
        try:
            st = os.stat(cand)
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != devnum:
                continue
            fd = os.open(cand, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            buf = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
        except OSError as err:   # ENXIO: not attached
            log.debug("%s: LOOP_GET_STATUS64: %s", cand, err)
            if name_path is None:
                return None, None
            break
        finally:
            os.close(fd)
        lo_device, lo_inode = _LOOP_INFO64.unpack(buf)[:2]
        # the kernel encodes lo_device with new_encode_dev; decode and re-encode for st_dev
        major = (lo_device & 0xFFF00) >> 8
        minor = (lo_device & 0xFF) | ((lo_device >> 12) & 0xFFF00)
        return ("file", os.makedev(major, minor), lo_inode), name_path or f"inode {lo_inode}"
    if name_path is None:
        return None, None
    path = name_path.removesuffix(" (deleted)")
    try:
        st = os.stat(path)
    except OSError:
        return ("loop-backing", disk.name), name_path   # unknown file: only the loop itself
    return _file_key(st), name_path


def identify(path: str) -> PathIdentity:
    """The identity of `path` (symlinks followed).  A path that does not exist (yet) touches
    nothing; neither does anything that is not a regular file or a block device."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError:
        return PathIdentity(path, False)
    if stat.S_ISREG(st.st_mode):
        return PathIdentity(path, True, _file_key(st), frozenset({_file_key(st)}))
    if not stat.S_ISBLK(st.st_mode):
        return PathIdentity(path, True)
    whole: set[Key] = {_blk_key(st.st_rdev)}
    part: set[Key] = set()
    notes: list[tuple[Key, str]] = []
    d = _sysdir(st.st_rdev)
    if d is None:
        return PathIdentity(path, True, _blk_key(st.st_rdev), frozenset(whole))
    covers_all = True          # does `path` cover all of the disk (and so of its backing file)?
    disk, disk_node = d, path
    if (d / "partition").exists():
        disk, disk_node, covers_all = d.parent, None, False
        dn = _devnum(disk)
        if dn is not None:
            part.add(_blk_key(dn))
            notes.append((_blk_key(dn), f"{path} is a partition of /dev/{disk.name}"))
    if disk.name.startswith("loop"):
        key, name = _loop_backing(disk, disk_node)
        if key is not None:
            (whole if covers_all else part).add(key)
            notes.append((key, f"{path} is backed by {name}" if covers_all else
                          f"{path} lies in {name}, the backing file of /dev/{disk.name}"))
    # devices under a stacked device (device-mapper, md): touched in part
    todo, seen = [d], {d}
    while todo:
        x = todo.pop()
        try:
            slaves = sorted((x / "slaves").iterdir())
        except OSError:
            slaves = []
        for s in slaves:
            s = s.resolve()
            if s in seen:
                continue
            seen.add(s)
            todo.append(s)
            sn = _devnum(s)
            if sn is not None:
                part.add(_blk_key(sn))
                notes.append((_blk_key(sn), f"{path} lies on /dev/{s.name}"))
            if (s / "partition").exists():
                todo.append(s.parent)
    return PathIdentity(path, True, _blk_key(st.st_rdev), frozenset(whole),
                        frozenset(part - whole), tuple(notes))


def _describe(ident: PathIdentity, key: Key) -> str:
    note = ident.note(key)
    if note:
        return note
    if key[0] == "blk":
        return f"{ident.path} is device {os.major(key[1])}:{os.minor(key[1])}"
    return f"{ident.path} is that file"


def overlap(a: PathIdentity, b: PathIdentity) -> str | None:
    """None when writing one of `a` and `b` cannot change the other; else one line saying
    what they share, naming both paths ("/dev/loop3 is backed by /tmp/x/full.dimg")."""
    shared = (a.whole & b.things) | (b.whole & a.things)
    if not shared:
        return None
    # the most direct explanation first: the same thing, then one reached through the other
    key = min(shared, key=lambda k: ((a.note(k) is not None) + (b.note(k) is not None), repr(k)))
    na, nb = a.note(key), b.note(key)
    if na is None and nb is None:
        what = "file" if key[0] == "file" else "device"
        return f"{a.path} and {b.path} are the same {what}"
    if na is not None and nb is not None:
        return f"{na}, and {nb}"
    return na or nb


def same(a: PathIdentity, b: PathIdentity) -> bool:
    """Whether `a` and `b` are the very same file or device (not just overlapping)."""
    return a.primary is not None and a.primary == b.primary


def loops_backed_by(path: str) -> list[str]:
    """The attached loop devices (/dev/loopN) that read or write the same file as `path`:
    over the regular file at `path`, or for a loop device (or a partition of one), the other
    loop devices over its backing file.  Matched by device and inode; `path`'s own loop device
    is left out.  Empty for anything else."""
    ident = identify(path)
    files = {k for k in ident.things if k[0] == "file"}
    if not files:
        return []
    result = []
    try:
        entries = sorted(SYS_BLOCK.glob("loop*"), key=lambda p: int(p.name[4:])
                         if p.name[4:].isdigit() else -1)
    except OSError:
        return []
    for entry in entries:
        if not (entry / "loop").is_dir():
            continue
        d = entry.resolve()
        devnum = _devnum(d)
        if devnum is not None and _blk_key(devnum) in ident.things:
            continue    # path's own loop device
        found, _ = _loop_backing(d, None)
        if found in files:
            result.append(f"/dev/{entry.name}")
    return result


# --------------------------------------------------------------------------------------------
# the identity of a source disk

# strongest first
SOURCE_KEYS = ("serial", "wwn", "ptable_id", "fs_uuid", "backing_file")
_DISK_KEYS = ("serial", "wwn")              # which disk
_CONTENT_KEYS = ("ptable_id", "fs_uuid")    # what is on it: tells its partitions apart


def _show(key: str, value: str) -> str:
    if key == "ptable_id":
        kind, _, v = value.partition(":")
        return {"gpt": f"GPT disk GUID {v}", "mbr": f"MBR disk signature {v}"}.get(
            kind, f"partition table id {value}")
    if key == "fs_uuid":
        return f"filesystem UUID {value}"
    if key == "backing_file":
        return f"loop backing file {value}"
    return f"{key} {value}"


def source_mismatch(ours: dict | None, theirs: dict | None, source: str, image: str
                    ) -> str | None:
    """Why the source described by `ours` is not the disk (or partition) `image` (whose header
    recorded `theirs`) was made from; None when they agree or have nothing in common to
    compare (old images record only serial and WWN).

    Serial and WWN say which disk; they are the same for every partition of it (udev gives
    sda1 and sda2 the disk's serial).  So the partition-table id and the filesystem UUID are
    compared too whenever both sides have them: on the same disk a different one is another
    partition, or a filesystem made again.  The loop backing file, the weakest (a file can be
    moved or copied), decides only when nothing else is shared."""
    ours, theirs = ours or {}, theirs or {}
    compared = False
    for key in _DISK_KEYS + _CONTENT_KEYS:
        a, b = ours.get(key), theirs.get(key)
        if not a or not b:
            continue
        if a != b:
            why = f"{source}: {_show(key, a)} differs from {image}'s source {_show(key, b)}"
            same_disk = [k for k in _DISK_KEYS if ours.get(k) and ours.get(k) == theirs.get(k)]
            if same_disk and key in _CONTENT_KEYS:
                why += (f" (the same disk by its {same_disk[0]}: another partition, or the "
                        f"{'partition table' if key == 'ptable_id' else 'filesystem'} was "
                        f"made again)")
            return why
        compared = True
    if compared:
        return None
    a, b = ours.get("backing_file"), theirs.get("backing_file")
    if a and b and a != b:
        return f"{source}: {_show('backing_file', a)} differs from {image}'s source " \
               f"{_show('backing_file', b)}"
    return None
