"""Used-block awareness: which byte ranges of a source hold data that must be read.

Like partclone, diskimg reads only what a filesystem has allocated; everything else is free space
that is neither read nor stored and is restored as zeros.  :func:`scan` looks at the start of a
source for a partition table (GPT, validated with its CRC32s, or MBR with extended/logical
partitions) or a bare filesystem, and then at every partition's content:

* ext2/ext3/ext4: the group descriptors and block bitmaps are read directly (32/64-bit
  descriptors, flex_bg, meta_bg, bigalloc, 1 KiB blocks, BLOCK_UNINIT groups), then
  cross-checked against the blocks every in-use inode owns (ext_check.py);
* FAT12/16/32: reserved sectors, FATs and the root directory, then every cluster whose FAT
  entry is not zero, cross-checked against the clusters reachable from the directories;
* xfs: everything but the free extents of each AG's free-space B+trees (xfs.py);
* NTFS: ``$Bitmap`` through the MFT's data runs (ntfs.py);
* exFAT: the allocation bitmap, cross-checked against the directories (exfat.py);
* btrfs on one device: the extent tree through the chunk tree (btrfs.py);
* anything else (swap, LUKS, unknown content, partition-table sectors, gaps between
  partitions, the backup GPT) is read in full.

A cross-check that finds blocks the metadata owns but the allocation map marks free reads them
as well and says so: ``Region.repaired_blocks``, ``UsedMap.repaired``, which the image header
records (``extra.allocation_repaired``) and ``info`` shows.

The one rule that shapes this package: never lose data.  A wrong "used" costs a few bytes of
image; a wrong "free" silently destroys a file on restore.  So every parser checks its structure
against itself (checksums where the format has them, free counts of every group against its
bitmap, clean-unmount flags) and on any doubt the whole filesystem is treated as unknown and
read fully, with the reason logged.  Metadata a filesystem always needs (superblocks, group
descriptors, bitmaps, inode tables) is added even where the bitmap already covers it.

Memory stays bounded by the result: bitmaps and FATs are read one group or one chunk at a
time and turned into runs at C speed (``re`` over bytes, ``int.from_bytes``/``bit_count``),
never bit by bit in Python.

Layout: this package walks a source (partition tables, then each partition's content) and owns
the results; ``partitions.py`` parses MBR/EBR and GPT, ``ext.py``, ``fat.py``, ``xfs.py``,
``ntfs.py``, ``exfat.py`` and ``btrfs.py`` read one filesystem's allocation data each,
``ext_check.py`` walks ext's inodes, and ``raw.py`` holds the bounded reader and decoding helpers
they share.  A new filesystem is one more module with the same small interface (a constructor
that raises Unrecognised, ``scan(out) -> (used bytes, filesystem bytes)``, ``kind``,
``detail``, and ``repaired_blocks``/``unit`` after a scan), listed in ``_PARSERS``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from diskimg import ranges
from diskimg.disk.used.ext import ExtFs
from diskimg.disk.used.btrfs import BtrfsFs
from diskimg.disk.used.exfat import ExfatFs
from diskimg.disk.used.fat import FatFs
from diskimg.disk.used.ntfs import NtfsFs
from diskimg.disk.used.xfs import XfsFs
from diskimg.disk.used.partitions import (
    GPT_SIG,
    Partition,
    gpt_header,
    mbr_entries,
    parse_gpt,
    parse_mbr,
)
from diskimg.disk.used.raw import (
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    u16,
    u32,
)
from diskimg.units import human

log = logging.getLogger(__name__)

__all__ = ["Region", "UsedMap", "content_ids", "scan"]


# --------------------------------------------------------------------------------------------
# results

@dataclass(frozen=True)
class Region:
    """One recognised (or unrecognised) area of the source.

    ``kind`` is what was found: "gpt", "mbr", "ebr", "gpt-backup", "gap", "ext2", "ext3",
    "ext4", "vfat", or for areas read in full "unknown", "xfs", "swap", "luks", "btrfs", ...
    ``detail`` is a human-readable description ("partition 1, 4096-byte blocks").
    ``analysed`` is True when the used ranges inside come from the filesystem's allocation
    data, False when the region is read in full.
    """

    offset: int
    length: int
    kind: str
    detail: str
    analysed: bool = False
    # blocks (of ``block_size`` bytes) the filesystem's metadata owns but its allocation map
    # marks free: read all the same (the cross-check of ext_check.py, fat.py)
    repaired_blocks: int = 0
    block_size: int = 0


@dataclass(frozen=True)
class UsedMap:
    """The byte ranges of a source that must be read; everything else is free space.

    ``ranges`` are sorted, merged, non-adjacent ``(offset, length)`` pairs inside ``[0, size)``.
    """

    size: int
    ranges: tuple[tuple[int, int], ...]
    regions: tuple[Region, ...]

    @property
    def used_bytes(self) -> int:
        return ranges.total(self.ranges)

    def is_used(self, offset: int, length: int) -> bool:
        """True when any byte of ``[offset, offset + length)`` must be read."""
        return length > 0 and bool(ranges.clip(self.ranges, offset, length))

    def used_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The used sub-ranges of the window ``[offset, offset + length)``, clipped to it."""
        return ranges.clip(self.ranges, offset, length)

    def used_bytes_in(self, offset: int, length: int) -> int:
        """How many bytes of ``[offset, offset + length)`` are used (for "43% used" lines)."""
        return ranges.total(self.used_in(offset, length))

    @property
    def repaired(self) -> list[dict]:
        """The regions whose allocation map was repaired: blocks owned but marked free."""
        return [{"offset": r.offset, "kind": r.kind, "detail": r.detail,
                 "blocks": r.repaired_blocks, "block_size": r.block_size}
                for r in self.regions if r.repaired_blocks]




# --------------------------------------------------------------------------------------------
# content we do not analyse, named for the log and the CLI

_SIGNATURES = [
    (0, b"XFSB", "xfs"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"hsqs", "squashfs"),
    (3, b"NTFS    ", "ntfs"),
    (3, b"EXFAT   ", "exfat"),
    (512, b"LABELONE", "lvm2"),
    (4086, b"SWAPSPACE2", "swap"),
    (4086, b"SWAP-SPACE", "swap"),
    (0x8001, b"CD001", "iso9660"),
    (0x10040, b"_BHRfS_M", "btrfs"),
]


# Each parser: a constructor that raises Unrecognised for anything not its own filesystem (cheap:
# the superblock only), ``scan(out) -> (used bytes, filesystem bytes)``, ``kind``, ``detail``.
_PARSERS = (("ext", ExtFs), ("FAT", FatFs), ("xfs", XfsFs), ("NTFS", NtfsFs),
            ("exFAT", ExfatFs), ("btrfs", BtrfsFs))


def _signature(rd: SourceReader, base: int, length: int) -> str:
    for off, magic, name in _SIGNATURES:
        if off + len(magic) <= length:
            try:
                if rd.read(base + off, len(magic)) == magic:
                    return name
            except Unrecognised:
                continue
    return "unknown"


def _scan_content(rd: SourceReader, base: int, length: int, label: str,
                  out: RangeCollector, regions: list[Region]) -> None:
    """Recognise the filesystem in ``[base, base + length)`` and add its used ranges."""
    reasons = []         # why a filesystem that was there could not be analysed
    for name, cls in _PARSERS:
        try:
            fs = cls(rd, base, length)
            sub = RangeCollector()      # a parser that fails half-way leaves nothing behind
            used, fs_bytes = fs.scan(sub)
        except NotThisFilesystem:
            continue
        except Unrecognised as err:
            reasons.append(f"{name}: {err}")
            continue
        except Exception as err:   # anything odd in the bytes: never trust it, read fully
            log.debug("parsing %s at byte %d failed", name, base, exc_info=True)
            reasons.append(f"{name}: unexpected structure ({type(err).__name__}: {err})")
            continue
        for s, n in sub.merged(base + length):
            out.add(s, n)
        if isinstance(fs, ExtFs):
            kind, detail = fs.kind, f"{label}, {fs.bs}-byte blocks" + (
                f", {fs.cs}-byte clusters" if fs.ratio > 1 else "")
        else:
            kind, detail = fs.kind, f"{label}, {fs.detail}"
        if fs_bytes < length:
            out.add(base + fs_bytes, length - fs_bytes)
            detail += f"; {human(length - fs_bytes, exact=True)} after the filesystem read fully"
        log.debug("%s: %s, %d of %d bytes used", label, kind, used, fs_bytes)
        repaired = getattr(fs, "repaired_blocks", 0)
        if repaired:
            detail += (f"; allocation map repaired: {repaired} blocks owned but marked free")
        regions.append(Region(base, length, kind, detail, analysed=True,
                              repaired_blocks=repaired, block_size=getattr(fs, "unit", 0)))
        return
    kind = _signature(rd, base, length)
    # A filesystem that was recognised and failed its checks is worth a warning: the data may be
    # damaged or the filesystem mounted.  No known filesystem at all is ordinary.
    notable = reasons
    why = "; ".join(notable) if notable else f"no filesystem whose used blocks are known ({kind})"
    (log.warning if notable else log.info)("%s at byte %d: %s; read fully", label, base, why)
    out.add(base, length)
    regions.append(Region(base, length, kind if not notable else "unknown",
                          f"{label}: read fully: {why}"))


# --------------------------------------------------------------------------------------------
# partition tables


# --------------------------------------------------------------------------------------------
# walking the partitions

def _scan_partitions(rd: SourceReader, table: str, parts: list[Partition], out: RangeCollector,
                     regions: list[Region]) -> None:
    parts = sorted(parts, key=lambda p: p.offset)
    for a, b in zip(parts, parts[1:]):
        if a.offset + a.length > b.offset:
            raise Unrecognised(f"partitions {a.number} and {b.number} overlap")
    pos = 0
    for p in parts:
        if p.offset >= rd.size:
            log.warning("partition %d starts beyond the end of the source; ignored", p.number)
            continue
        if p.offset > pos:
            kind = table if pos == 0 else ("ebr" if p.number > 4 and table == "mbr" else "gap")
            regions.append(Region(pos, p.offset - pos, kind,
                                  "partition table" if pos == 0 else "between partitions"))
            out.add(pos, p.offset - pos)
        length = p.length
        label = f"partition {p.number}" + (f" ({p.name})" if p.name else "")
        if p.offset + length > rd.size:
            length = rd.size - p.offset
            log.warning("%s extends beyond the end of the source; read fully", label)
            out.add(p.offset, length)
            regions.append(Region(p.offset, length, "unknown",
                                  f"{label}: read fully: extends beyond the end of the source"))
        else:
            _scan_content(rd, p.offset, length, label, out, regions)
        pos = p.offset + length
    if pos < rd.size:
        kind = "gpt-backup" if table == "gpt" else ("mbr" if pos == 0 else "gap")
        detail = ("backup GPT and unpartitioned space" if table == "gpt"
                  else "partition table" if pos == 0 else "unpartitioned space")
        regions.append(Region(pos, rd.size - pos, kind, detail))
        out.add(pos, rd.size - pos)


# --------------------------------------------------------------------------------------------
# entry point

def scan(fd: int, size: int, *, sector_size: int = 512, min_gap: int = 0) -> UsedMap:
    """Which byte ranges of the source open on ``fd`` (``size`` bytes) must be read.

    ``sector_size`` is the logical sector size used to interpret MBR LBAs (GPT finds its own
    at 512 or 4096).  ``min_gap`` merges used ranges separated by less than that many free
    bytes, trading a little image size for fewer, longer reads and a smaller map.

    Never raises for the content of the source: whatever cannot be analysed safely, including
    unreadable metadata, is reported as used (and logged).
    """
    rd = SourceReader(fd, size)
    out = RangeCollector()
    regions: list[Region] = []
    if size <= 0:
        return UsedMap(size, (), ())
    try:
        _scan_whole(rd, sector_size, out, regions)
    except Unrecognised as err:
        log.warning("source: %s; read fully", err)
        out = RangeCollector()
        out.add(0, size)
        regions = [Region(0, size, "unknown", f"whole source: read fully: {err}")]
    return UsedMap(size, out.merged(size, min_gap), tuple(regions))


def _scan_whole(rd: SourceReader, ss: int, out: RangeCollector, regions: list[Region]) -> None:
    size = rd.size
    sector0 = rd.read(0, min(512, size)) if size >= 512 else b""
    entries = mbr_entries(sector0) if sector0 else None
    if entries and any(t == 0xEE for t, _, _ in entries):
        for gss in (512, 4096):
            if size >= 2 * gss and rd.read(gss, 8) == GPT_SIG:
                break
        else:
            gss = ss
        _scan_partitions(rd, "gpt", parse_gpt(rd, gss), out, regions)
        return
    # A bare filesystem?  An ext superblock lives at byte 1024, outside sector 0, so a disk
    # that was partitioned after holding a whole-disk ext fs can show both; that ambiguity is
    # settled by reading everything.
    mbr_parts = None
    if entries and any(t and n for t, lba, n in entries if lba):
        try:
            mbr_parts = parse_mbr(rd, sector0, ss)
        except Unrecognised as err:
            mbr_error = err
            mbr_parts = None
        else:
            mbr_error = None
    else:
        mbr_error = None
    for _, cls in _PARSERS:
        try:
            cls(rd, 0, size)
        except Unrecognised:
            continue
        except Exception:
            continue
        if mbr_parts or mbr_error:
            raise Unrecognised("both a filesystem and an MBR partition table at the start; "
                               "cannot tell which is current")
        _scan_content(rd, 0, size, "whole device", out, regions)
        return
    if mbr_error is not None:
        raise mbr_error
    if mbr_parts is not None:
        _scan_partitions(rd, "mbr", mbr_parts, out, regions)
        return
    _scan_content(rd, 0, size, "whole device", out, regions)


# --------------------------------------------------------------------------------------------
# identity of the content: which disk or filesystem this is, where no serial says it

def _guid(b: bytes) -> str:
    """A GUID as GPT stores it (the first three fields little-endian)."""
    return "-".join((b[3::-1].hex(), b[5:3:-1].hex(), b[7:5:-1].hex(), b[8:10].hex(),
                     b[10:16].hex())).upper()


def _fs_uuid(rd: SourceReader, base: int, length: int) -> tuple[str, str] | None:
    """(type, UUID or volume id) of the filesystem at ``base``, or None.  Only the magic is
    checked, not the clean-unmount state: a mounted filesystem keeps its UUID."""
    def at(off: int, n: int) -> bytes | None:
        if off + n > length:
            return None
        try:
            return rd.read(base + off, n)
        except Unrecognised:
            return None
    sb = at(1024, 1024)
    if sb is not None and u16(sb, 0x38) == 0xEF53 and any(sb[0x68:0x78]):
        u = sb[0x68:0x78].hex()
        return "ext", f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    head = at(0, 512)
    if head is not None and head[:4] == b"XFSB" and any(head[32:48]):
        u = head[32:48].hex()
        return "xfs", f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    btrfs = at(0x10000, 0x48)
    if btrfs is not None and btrfs[0x40:0x48] == b"_BHRfS_M":
        u = btrfs[0x20:0x30].hex()
        return "btrfs", f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    if (head is not None and head[510:512] == b"\x55\xaa" and head[0] in (0xEB, 0xE9)
            and head[3:11] not in (b"EXFAT   ", b"NTFS    ") and u16(head, 0x0B) in
            (512, 1024, 2048, 4096)):
        sig = 0x42 if u16(head, 0x16) == 0 else 0x26   # FAT32 has no 16-bit FAT size
        if head[sig] == 0x29:
            vid = u32(head, sig + 1)
            if vid:
                return "vfat", f"{vid >> 16:04X}-{vid & 0xFFFF:04X}"
    return None


def content_ids(fd: int, size: int, *, sector_size: int = 512) -> dict[str, str]:
    """What identifies the source's content where the disk has no serial: ``ptable_id``
    ("gpt:<disk GUID>" or "mbr:<disk signature>") and, for a bare filesystem, ``fs_uuid``
    and ``fs_type``.  Reads only the first sectors (and the backup GPT when the primary is
    invalid); never raises for the content: what cannot be read is left out."""
    rd = SourceReader(fd, size)
    ids: dict[str, str] = {}
    try:
        sector0 = rd.read(0, 512) if size >= 512 else b""
    except Unrecognised:
        return ids
    entries = mbr_entries(sector0) if sector0 else None
    if entries and any(t == 0xEE for t, _, _ in entries):
        for gss in dict.fromkeys((512, 4096, sector_size)):
            for lba in (1, size // gss - 1):
                got = gpt_header(rd, lba, gss) if size >= 2 * gss else "too small"
                if isinstance(got, tuple):
                    ids["ptable_id"] = "gpt:" + _guid(got[0][56:72])
                    return ids
        return ids
    try:
        parts = parse_mbr(rd, sector0, sector_size) if entries else None
    except Unrecognised:
        parts = None
    sig = u32(sector0, 440) if sector0 else 0
    if parts and sig:
        ids["ptable_id"] = f"mbr:{sig:08x}"
    if not parts:
        fs = _fs_uuid(rd, 0, size)
        if fs is not None:
            ids["fs_type"], ids["fs_uuid"] = fs
    return ids
