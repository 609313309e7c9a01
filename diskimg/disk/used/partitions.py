"""Partition tables: MBR (with the EBR chain of logical partitions) and GPT (validated with
its CRC32s, the backup used when the primary is damaged).  Only parsing: which partitions there
are; the scanner (the package) walks them.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from diskimg.disk.used.raw import SourceReader, Unrecognised, u32, u64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int
    length: int
    name: str = ""


_EXTENDED = (0x05, 0x0F, 0x85)


def mbr_entries(sector: bytes) -> list[tuple[int, int, int]] | None:
    """(type, first LBA, sector count) of the four entries, or None if not an MBR."""
    if sector[510:512] != b"\x55\xaa":
        return None
    entries = []
    for i in range(4):
        e = sector[446 + 16 * i:446 + 16 * (i + 1)]
        if e[0] not in (0x00, 0x80):
            return None
        entries.append((e[4], u32(e, 8), u32(e, 12)))
    return entries


def parse_mbr(rd: SourceReader, sector0: bytes, ss: int) -> list[Partition] | None:
    entries = mbr_entries(sector0)
    if entries is None or not any(t and n for t, _, n in entries):
        return None
    parts: list[Partition] = []
    for i, (ptype, lba, n) in enumerate(entries):
        if not ptype or not n:
            continue
        if lba == 0:
            raise Unrecognised(f"MBR partition {i + 1} starts at sector 0")
        if ptype in _EXTENDED:
            parts.extend(_parse_ebr_chain(rd, lba, n, ss))
        else:
            parts.append(Partition(i + 1, lba * ss, n * ss))
    return parts


def _parse_ebr_chain(rd: SourceReader, ext_lba: int, ext_len: int, ss: int) -> list[Partition]:
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_lba
    number = 5
    while True:
        if ebr in seen or len(seen) > 256:
            raise Unrecognised("the extended partition's EBR chain loops")
        if not ext_lba <= ebr < ext_lba + ext_len:
            raise Unrecognised(f"EBR at sector {ebr} is outside the extended partition")
        seen.add(ebr)
        entries = mbr_entries(rd.read(ebr * ss, 512))
        if entries is None:
            if ebr == ext_lba:
                return parts   # an empty extended partition
            raise Unrecognised(f"EBR at sector {ebr} has no signature")
        ptype, rel, n = entries[0]
        if ptype and n:
            start = ebr + rel
            if rel == 0 or start + n > ext_lba + ext_len:
                raise Unrecognised(f"logical partition {number} lies outside its extended "
                                   "partition")
            parts.append(Partition(number, start * ss, n * ss))
            number += 1
        ntype, nrel, nn = entries[1]
        if not (ntype in _EXTENDED and nn):
            return parts
        ebr = ext_lba + nrel


GPT_SIG = b"EFI PART"


def gpt_header(rd: SourceReader, lba: int, ss: int) -> tuple[bytes, list[Partition]] | str:
    """The partitions of the GPT header at ``lba``, or why it is not valid."""
    try:
        h = rd.read(lba * ss, ss)
    except Unrecognised as err:
        return str(err)
    if h[:8] != GPT_SIG:
        return f"no GPT header at LBA {lba}"
    hsize = u32(h, 12)
    if not 92 <= hsize <= ss:
        return f"GPT header size {hsize} is invalid"
    want = u32(h, 16)
    got = zlib.crc32(h[:16] + b"\0\0\0\0" + h[20:hsize])
    if want != got:
        return f"GPT header at LBA {lba}: CRC32 {got:#010x} should be {want:#010x}"
    if u64(h, 24) != lba:
        return f"GPT header at LBA {lba} says it is at LBA {u64(h, 24)}"
    entries_lba, count, esize = u64(h, 72), u32(h, 80), u32(h, 84)
    if esize < 128 or esize % 8 or count > 65536 or count * esize > 16 << 20:
        return f"GPT entry array ({count} x {esize}) is invalid"
    try:
        arr = rd.read(entries_lba * ss, count * esize)
    except Unrecognised as err:
        return str(err)
    want = u32(h, 88)
    got = zlib.crc32(arr)
    if want != got:
        return f"GPT entry array: CRC32 {got:#010x} should be {want:#010x}"
    parts = []
    last_lba = rd.size // ss - 1
    for i in range(count):
        e = arr[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = u64(e, 32), u64(e, 40)
        if first == 0 or last < first or last > last_lba:
            return f"GPT partition {i + 1} ({first}-{last}) lies outside the disk"
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, first * ss, (last - first + 1) * ss, name))
    return h, parts


def parse_gpt(rd: SourceReader, ss: int) -> list[Partition]:
    """Partitions of the GPT: the primary's, else the backup's."""
    primary = gpt_header(rd, 1, ss)
    if isinstance(primary, tuple):
        return primary[1]
    last = rd.size // ss - 1
    backup = gpt_header(rd, last, ss)
    if isinstance(backup, tuple):
        log.warning("primary GPT is invalid (%s); using the backup GPT", primary)
        return backup[1]
    raise Unrecognised(f"protective MBR but no valid GPT: {primary}; backup: {backup}")
