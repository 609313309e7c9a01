"""Block device discovery and the safety checks imaging and restore rely on.

This module owns everything diskimg knows about which block devices exist and who is using them:

* ``usage(path)``: why a device is busy (mounted, swap, held by device-mapper/md/loop), checked
  for the device, its partitions and its holders, recursively;
* ``holding_devices(path)``: which block devices hold the filesystem a file lives on, so an image
  is never written onto the disk being imaged;
* ``identify(path)``: model, serial and WWN, to tell disks apart;
* ``list_devices()``: the ``DeviceInfo`` rows behind ``diskimg list``.

Devices are matched by device number (``st_rdev`` against ``/proc/self/mountinfo``'s major:minor
and ``/sys/dev/block``), never by name, because names lie: ``/dev/disk/by-id`` symlinks,
``/dev/root``, renamed nodes in rescue systems.  pyudev is used when the udev database exists; in
containers and rescue systems (no ``/run/udev/data``) every property comes from sysfs instead, so
the answers are the same everywhere.  pyudev is imported only here.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/class/block")
SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")
UDEV_DB = Path("/run/udev/data")

__all__ = [
    "DeviceInfo", "Mount", "PartitionInfo", "holding_devices", "identify", "list_devices",
    "mounted_read_write", "mounts", "natural_key", "probe_fs", "usage",
]


# --------------------------------------------------------------------------------------------
# /proc readers

@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    options: str = ""          # this mount's options ("rw,relatime")
    super_options: str = ""    # the filesystem's ("rw,errors=remount-ro"): shared by its mounts

    @property
    def read_only(self) -> bool:
        """Whether the filesystem is read-only: a read-only bind mount of a filesystem that
        is read-write elsewhere (another mount, another namespace) does not count."""
        opts = (self.super_options or self.options).split(",")
        return "ro" in opts


def _unescape(s: str) -> str:
    # mountinfo and /proc/swaps escape space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1:i + 4]) == 3 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's mount namespace."""
    result = []
    try:
        text = mountinfo.read_text()
    except OSError as e:
        log.warning("cannot read %s: %s", mountinfo, e)
        return result
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
            major, minor = (int(x) for x in fields[2].split(":"))
            result.append(Mount(major, minor, _unescape(fields[4]), fields[sep + 1],
                                _unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                                fields[5], fields[sep + 3] if len(fields) > sep + 3 else ""))
        except (ValueError, IndexError):
            log.debug("unparsable mountinfo line: %r", line)
    return result


def _swap_devnums() -> dict[int, str]:
    """Device numbers used as swap: block devices directly, swap files by the device they live on."""
    result: dict[int, str] = {}
    try:
        lines = SWAPS.read_text().splitlines()[1:]
    except OSError:
        return result
    for line in lines:
        if not line.strip():
            continue
        name = _unescape(line.split()[0])
        kind = line.split()[1] if len(line.split()) > 1 else ""
        try:
            st = os.stat(name)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            result[st.st_rdev] = f"used as swap ({name})"
        else:
            result.setdefault(st.st_dev, f"holds swap {kind or 'file'} {name}")
    return result


# --------------------------------------------------------------------------------------------
# sysfs helpers

def _read(p: Path) -> str | None:
    try:
        v = p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return v or None


def _sysdir_of_devnum(devnum: int) -> Path | None:
    p = SYS_DEV_BLOCK / f"{os.major(devnum)}:{os.minor(devnum)}"
    try:
        return p.resolve(strict=True)
    except OSError:
        return None


def _devnum_of_sysdir(d: Path) -> int | None:
    dev = _read(d / "dev")
    if not dev:
        return None
    ma, mi = dev.split(":")
    return os.makedev(int(ma), int(mi))


def _is_partition(d: Path) -> bool:
    return (d / "partition").exists()


def _partitions(d: Path) -> list[Path]:
    """Partitions of a whole-disk sysfs directory, in partition order."""
    parts = [c for c in d.iterdir() if c.is_dir() and (c / "partition").exists()] \
        if d.is_dir() else []
    return sorted(parts, key=lambda c: int(_read(c / "partition") or 0))


def _holders(d: Path) -> list[Path]:
    h = d / "holders"
    if not h.is_dir():
        return []
    return [c.resolve() for c in sorted(h.iterdir())]


def _slaves(d: Path) -> list[Path]:
    s = d / "slaves"
    if not s.is_dir():
        return []
    return [c.resolve() for c in sorted(s.iterdir())]


def _block_sysdir(path: str) -> Path | None:
    """The sysfs directory of the block device at ``path`` (symlinks resolved); None otherwise."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return _sysdir_of_devnum(st.st_rdev)


def _devpath(d: Path) -> str:
    return f"/dev/{d.name}"


# --------------------------------------------------------------------------------------------
# safety checks

def usage(path: str) -> list[str]:
    """One-line reasons the block device at ``path`` is in use; empty when it is free.

    Checks the device itself, its partitions and, recursively, every holder (device-mapper, md,
    bcache...) of any of these: mounted filesystems (with their mountpoints), swap, and being held.
    A regular file, a missing path or anything that is not a block device gives an empty list.
    """
    top = _block_sysdir(path)
    if top is None:
        return []
    by_devnum: dict[int, list[Mount]] = {}
    for m in mounts():
        by_devnum.setdefault(os.makedev(m.major, m.minor), []).append(m)
    swaps = _swap_devnums()

    reasons: list[str] = []
    seen: set[Path] = set()

    def check(d: Path, via: str) -> None:
        if d in seen:
            return
        seen.add(d)
        devnum = _devnum_of_sysdir(d)
        label = _devpath(d) + via
        if devnum is not None:
            for m in by_devnum.get(devnum, []):
                reasons.append(f"{label} is mounted on {m.mountpoint} ({m.fstype})")
            if devnum in swaps:
                reasons.append(f"{label} {swaps[devnum]}")
        for h in _holders(d):
            reasons.append(f"{_devpath(d)}{via} is held by {_devpath(h)}{_dm_name(h)}")
            check(h, f" (holder of {_devpath(d)})")

    check(top, "")
    if not _is_partition(top):
        for part in _partitions(top):
            check(part, "")
    return reasons


def mounted_read_write(path: str) -> list[tuple[str, str]]:
    """(device, mountpoint) of every read-write mount of the block device at ``path``, of its
    partitions and, recursively, of their holders: what may change while ``path`` is read.
    Empty for a regular file, a missing path, or a device mounted read-only or not at all."""
    top = _block_sysdir(path)
    if top is None:
        return []
    rw: dict[int, list[str]] = {}
    for m in mounts():
        if not m.read_only:
            rw.setdefault(os.makedev(m.major, m.minor), []).append(m.mountpoint)
    result: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def check(d: Path) -> None:
        if d in seen:
            return
        seen.add(d)
        devnum = _devnum_of_sysdir(d)
        for mp in rw.get(devnum, []) if devnum is not None else []:
            result.append((_devpath(d), mp))
        for h in _holders(d):
            check(h)

    check(top)
    if not _is_partition(top):
        for part in _partitions(top):
            check(part)
    return result


def _dm_name(d: Path) -> str:
    name = _read(d / "dm" / "name")
    return f" ({name})" if name else ""


def holding_devices(path: str) -> list[str]:
    """The block devices that hold the filesystem ``path`` lives on (or would live on).

    For a path that does not exist yet its nearest existing parent directory is used.  The list
    holds the device of the filesystem (a partition or a whole disk), its whole disk, and for
    stacked devices (device-mapper, md) every underlying device and their disks.  A loop device
    stands for itself only: its backing file is not followed.  Empty when the filesystem is not
    on a block device (tmpfs, overlay, proc).
    """
    p = Path(os.path.abspath(path))
    while True:
        try:
            st = os.stat(p)
            break
        except FileNotFoundError:
            if p.parent == p:
                return []
            p = p.parent
    d = _sysdir_of_devnum(st.st_dev)
    if d is None:
        # btrfs and others report an anonymous device number; the mount table names the source
        for m in mounts():
            if os.makedev(m.major, m.minor) == st.st_dev and m.source.startswith("/dev/"):
                d = _block_sysdir(m.source)
                if d is not None:
                    break
    if d is None:
        return []
    result: list[str] = []

    def add(x: Path) -> None:
        for y in (x, x.parent) if _is_partition(x) else (x,):
            if _devpath(y) not in result:
                result.append(_devpath(y))
        for s in _slaves(x):
            add(s)

    add(d)
    return result


# --------------------------------------------------------------------------------------------
# identification

def _udev_available() -> bool:
    return UDEV_DB.is_dir()


def _udev_properties(devnum: int) -> dict[str, str]:
    """udev properties of a device number, or {} when udev or its database is missing."""
    if not _udev_available():
        return {}
    try:
        import pyudev
        ctx = pyudev.Context()
        dev = pyudev.Devices.from_device_number(ctx, "block", devnum)
        return dict(dev.properties)
    except Exception as e:  # pyudev raises several unrelated types; udev is only a bonus
        log.debug("udev lookup of %d:%d failed: %s", os.major(devnum), os.minor(devnum), e)
        return {}


def _first(*values: str | None) -> str | None:
    for v in values:
        if v:
            return v.strip() or None
    return None


def _wwn_from_sysfs(d: Path) -> str | None:
    wwid = _read(d / "wwid") or _read(d / "device" / "wwid")
    if not wwid:
        return None
    # "naa.5000c500a1b2c3d4", "eui.0025388...", "t10.ATA ..." (the last is not a WWN)
    if wwid.startswith(("naa.", "eui.")):
        return "0x" + wwid.split(".", 1)[1].lower()
    return None


def _sysfs_identity(d: Path) -> tuple[str | None, str | None, str | None]:
    disk = d.parent if _is_partition(d) else d
    model = _read(disk / "device" / "model")
    vendor = _read(disk / "device" / "vendor")
    if model and vendor and vendor not in ("ATA", "0x1af4") and not model.startswith(vendor):
        model = f"{vendor} {model}"
    serial = _read(disk / "device" / "serial") or _read(disk / "serial")
    return model, serial, _wwn_from_sysfs(disk)


def _identity(d: Path) -> tuple[str | None, str | None, str | None]:
    devnum = _devnum_of_sysdir(d)
    props = _udev_properties(devnum) if devnum is not None else {}
    model, serial, wwn = _sysfs_identity(d)
    return (
        _first(props.get("ID_MODEL", "").replace("_", " "), model),
        _first(props.get("ID_SERIAL_SHORT"), serial),
        _first(props.get("ID_WWN_WITH_EXTENSION"), props.get("ID_WWN"), wwn),
    )


def identify(path: str) -> dict:
    """``{"path", "model", "serial", "wwn"}`` of a block device or a regular file.

    Unknown values are None.  A loop device has no model or serial and adds ``"backing_file"``.
    A regular file (or anything that is not a block device) gives its absolute path and Nones.
    """
    d = _block_sysdir(path)
    if d is None:
        return {"path": os.path.abspath(path), "model": None, "serial": None, "wwn": None}
    model, serial, wwn = _identity(d)
    result = {"path": _devpath(d), "model": model, "serial": serial, "wwn": wwn}
    disk = d.parent if _is_partition(d) else d
    if disk.name.startswith("loop"):
        result["backing_file"] = _read(disk / "loop" / "backing_file")
    return result


# --------------------------------------------------------------------------------------------
# listing

@dataclass(frozen=True)
class PartitionInfo:
    name: str
    path: str
    number: int
    start: int            # bytes from the start of the disk
    size: int             # bytes
    mountpoints: tuple[str, ...]       # "[SWAP]" for active swap, as lsblk shows it
    fstype: str | None = None          # what lsblk -f shows: filesystem type, label, UUID
    label: str | None = None
    uuid: str | None = None
    read_only: bool | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """One whole disk (or loop, ram, zram device) as ``diskimg list`` shows it."""

    name: str
    path: str
    size: int                          # bytes
    model: str | None
    serial: str | None
    wwn: str | None
    transport: str | None              # sata, ata, nvme, usb, virtio, scsi, loop, ram, zram, md, dm
    rotational: bool | None
    removable: bool | None
    read_only: bool | None
    logical_sector_size: int | None
    physical_sector_size: int | None
    backing_file: str | None           # loop devices only
    partitions: tuple[PartitionInfo, ...] = field(default_factory=tuple)
    mountpoints: tuple[str, ...] = field(default_factory=tuple)   # the disk's, its partitions' and holders'
    smart_available: bool = False
    source: str = "sysfs"              # "udev" when the udev database supplied identity
    fstype: str | None = None          # a filesystem or swap on the whole disk (no partitions)
    label: str | None = None
    uuid: str | None = None


def natural_key(name: str) -> tuple:
    """Sort key that orders device names as people do: loop2 before loop10, sda before sdb,
    nvme0n1p2 before nvme0n1p10 (digit runs compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def _blkid() -> str | None:
    # blkid lives in /sbin on many systems whose PATH for root lacks it
    import shutil
    return shutil.which("blkid", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _unescape_blkid(value: str) -> str:
    # `blkid -o export` escapes shell metacharacters (spaces, quotes...) with a backslash
    return re.sub(r"\\(.)", r"\1", value)


def probe_fs(path: str) -> dict[str, str]:
    """TYPE, LABEL, UUID, PTTYPE and PTUUID of what is on a device or file, from ``blkid -p`` (the superblocks
    themselves, not blkid's cache); {} when nothing is recognised or blkid is missing or
    cannot read the device (not root)."""
    blkid = _blkid()
    if blkid is None:
        return {}
    try:
        proc = subprocess.run([blkid, "-p", "-o", "export", path], capture_output=True,
                              text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("blkid -p %s failed: %s", path, e)
        return {}
    result = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("TYPE", "LABEL", "UUID", "PTTYPE", "PTUUID"):
            result[key] = _unescape_blkid(value)
    return result


def _fs_identity(d: Path, props: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(fstype, label, uuid) of a disk or partition: udev's when it has probed the device,
    else blkid's."""
    if props:
        return (props.get("ID_FS_TYPE") or None, props.get("ID_FS_LABEL") or None,
                props.get("ID_FS_UUID") or None)
    if (_int(_read(d / "size")) or 0) == 0:
        return None, None, None
    found = probe_fs(_devpath(d))
    return found.get("TYPE"), found.get("LABEL"), found.get("UUID")


def _swap_devices() -> set[int]:
    """Device numbers of block devices in use as swap (shown as the mountpoint [SWAP])."""
    result: set[int] = set()
    try:
        lines = SWAPS.read_text().splitlines()[1:]
    except OSError:
        return result
    for line in lines:
        if not line.split():
            continue
        try:
            st = os.stat(_unescape(line.split()[0]))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            result.add(st.st_rdev)
    return result


_NO_SMART = ("loop", "ram", "zram", "virtio", "dm", "md", "nbd", "sr", "xen")


def _transport(d: Path, props: dict[str, str]) -> str | None:
    name = d.name
    for prefix, t in (("loop", "loop"), ("zram", "zram"), ("ram", "ram"), ("dm-", "dm"),
                      ("md", "md"), ("nbd", "nbd"), ("nvme", "nvme"), ("mmcblk", "mmc"),
                      ("vd", "virtio"), ("xvd", "xen")):
        if name.startswith(prefix):
            return t
    bus = props.get("ID_BUS")
    if props.get("ID_USB_DRIVER") or bus == "usb":
        return "usb"
    real = str(d)
    if "/usb" in real:
        return "usb"
    if "/ata" in real:
        return "sata"
    if "/virtio" in real:
        return "virtio"
    if bus:
        return bus
    if "/host" in real:
        return "scsi"
    return None


def _mountpoints_of(d: Path, by_devnum: dict[int, list[str]], seen: set[Path] | None = None,
                    ) -> list[str]:
    seen = set() if seen is None else seen
    if d in seen:
        return []
    seen.add(d)
    result = list(by_devnum.get(_devnum_of_sysdir(d) or -1, []))
    for h in _holders(d):
        result += _mountpoints_of(h, by_devnum, seen)
    return result


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _is_attached(d: Path) -> bool:
    """Whether a loop device has a backing file (an unattached loop has size 0 and no loop/)."""
    return (d / "loop" / "backing_file").exists()


def _device_info(d: Path, by_devnum: dict[int, list[str]], smartctl: bool) -> DeviceInfo:
    devnum = _devnum_of_sysdir(d)
    props = _udev_properties(devnum) if devnum is not None else {}
    model, serial, wwn = _identity(d)
    transport = _transport(d, props)
    q = d / "queue"
    rot = _read(q / "rotational")
    rem = _read(d / "removable")
    ro = _read(d / "ro")
    parts = []
    for p in _partitions(d):
        pnum = _devnum_of_sysdir(p)
        pprops = _udev_properties(pnum) if pnum is not None else {}
        fstype, label, uuid = _fs_identity(p, pprops)
        pro = _read(p / "ro")
        parts.append(PartitionInfo(
            name=p.name, path=_devpath(p), number=_int(_read(p / "partition")) or 0,
            start=(_int(_read(p / "start")) or 0) * 512, size=(_int(_read(p / "size")) or 0) * 512,
            mountpoints=tuple(_mountpoints_of(p, by_devnum)),
            fstype=fstype, label=label, uuid=uuid,
            read_only=None if pro is None else pro == "1",
        ))
    fstype, label, uuid = _fs_identity(d, props)
    mps = _mountpoints_of(d, by_devnum)
    for p in parts:
        mps += [m for m in p.mountpoints if m not in mps]
    return DeviceInfo(
        name=d.name, path=_devpath(d), size=(_int(_read(d / "size")) or 0) * 512,
        model=model, serial=serial, wwn=wwn, transport=transport,
        rotational=None if rot is None else rot == "1",
        removable=None if rem is None else rem == "1",
        read_only=None if ro is None else ro == "1",
        logical_sector_size=_int(_read(q / "logical_block_size")),
        physical_sector_size=_int(_read(q / "physical_block_size")),
        backing_file=_read(d / "loop" / "backing_file") if d.name.startswith("loop") else None,
        partitions=tuple(parts), mountpoints=tuple(mps),
        smart_available=smartctl and transport not in _NO_SMART,
        source="udev" if props else "sysfs",
        fstype=fstype, label=label, uuid=uuid,
    )


def list_devices(all_devices: bool = False, smartctl: str | None = None) -> list[DeviceInfo]:
    """Whole disks in natural name order (loop2 before loop10), each with its partitions
    nested.  Filesystem type, label and UUID come from udev, or else from ``blkid -p``.

    Without ``all_devices`` the list leaves out unattached loop devices, empty devices (size 0),
    ram and zram devices, and stacked devices (device-mapper, md), which show up as mountpoints
    of the disks under them.  ``smartctl`` is the binary whose presence makes ``smart_available``
    possible (default: ``smartctl`` on PATH); smartctl itself is never run here.
    """
    import shutil
    have_smartctl = bool(shutil.which(smartctl or "smartctl"))
    by_devnum: dict[int, list[str]] = {}
    for m in mounts():
        by_devnum.setdefault(os.makedev(m.major, m.minor), []).append(m.mountpoint)
    for devnum in _swap_devices():
        by_devnum.setdefault(devnum, []).append("[SWAP]")
    result = []
    try:
        entries = sorted(SYS_BLOCK.iterdir(), key=lambda e: natural_key(e.name))
    except OSError as e:
        log.warning("cannot list %s: %s", SYS_BLOCK, e)
        return result
    for entry in entries:
        d = entry.resolve()
        if _is_partition(d):
            continue
        name = d.name
        if not all_devices:
            if name.startswith("loop") and not _is_attached(d):
                continue
            if name.startswith(("ram", "zram", "dm-", "md")):
                continue
            if (_int(_read(d / "size")) or 0) == 0 and not name.startswith("loop"):
                continue
        result.append(_device_info(d, by_devnum, have_smartctl))
    return result
