"""Used-block awareness: which byte ranges of a source hold data that must be read.

Like partclone, diskimg reads only what a filesystem has allocated; everything else is free space
that is neither read nor stored and is restored as zeros.  :func:`scan` looks at the start of a
source for a partition table (GPT, validated with its CRC32s, or MBR with extended/logical
partitions) or a bare filesystem, and then at every partition's content:

* ext2/ext3/ext4: the group descriptors and block bitmaps are read directly (32/64-bit
  descriptors, flex_bg, meta_bg, bigalloc, 1 KiB blocks, BLOCK_UNINIT groups);
* FAT12/16/32: reserved sectors, FATs and the root directory, then every cluster whose FAT
  entry is not zero;
* anything else (xfs, swap, LUKS, unknown content, partition-table sectors, gaps between
  partitions, the backup GPT) is read in full.

The one rule that shapes this module: never lose data.  A wrong "used" costs a few bytes of
image; a wrong "free" silently destroys a file on restore.  So every parser checks its structure
against itself (checksums where the format has them, free counts of every group against its
bitmap, clean-unmount flags) and on any doubt the whole filesystem is treated as unknown and
read fully, with the reason logged.  Metadata a filesystem always needs (superblocks, group
descriptors, bitmaps, inode tables) is added even where the bitmap already covers it.

Memory stays bounded by the result: bitmaps and FATs are read one group or one chunk at a
time and turned into runs at C speed (``re`` over bytes, ``int.from_bytes``/``bit_count``),
never bit by bit in Python.
"""
from __future__ import annotations

import bisect
import logging
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import crcmod

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
        return sum(length for _, length in self.ranges)

    def _first_at_or_after(self, offset: int) -> int:
        """Index of the first range that ends after ``offset``."""
        i = bisect.bisect_right(self.ranges, offset, key=lambda r: r[0]) - 1
        if i < 0:
            return 0
        start, length = self.ranges[i]
        return i if start + length > offset else i + 1

    def is_used(self, offset: int, length: int) -> bool:
        """True when any byte of ``[offset, offset + length)`` must be read."""
        if length <= 0:
            return False
        i = self._first_at_or_after(offset)
        return i < len(self.ranges) and self.ranges[i][0] < offset + length

    def used_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The used sub-ranges of the window ``[offset, offset + length)``, clipped to it."""
        out: list[tuple[int, int]] = []
        end = offset + length
        i = self._first_at_or_after(offset)
        while i < len(self.ranges):
            start, rlen = self.ranges[i]
            if start >= end:
                break
            lo, hi = max(start, offset), min(start + rlen, end)
            if hi > lo:
                out.append((lo, hi - lo))
            i += 1
        return out

    def used_bytes_in(self, offset: int, length: int) -> int:
        """How many bytes of ``[offset, offset + length)`` are used (for "43% used" lines)."""
        return sum(n for _, n in self.used_in(offset, length))


# --------------------------------------------------------------------------------------------
# plumbing

class _Unrecognised(Exception):
    """This area is not something we can analyse safely; the message says why."""


class _Reader:
    """pread within ``[0, size)``; a short read or an I/O error means "cannot analyse"."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise _Unrecognised(f"structure at byte {offset} (+{length}) lies outside the source "
                                f"({self.size} bytes)")
        parts = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(self.fd, length - done, offset + done)
            except OSError as err:
                raise _Unrecognised(f"read error at byte {offset + done}: {err}") from err
            if not chunk:
                raise _Unrecognised(f"source ends at byte {offset + done}, before its stated size")
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Ranges:
    """Collects byte ranges; merges in-order ones on the fly so memory follows the result."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []   # [start, end] in increasing order
        self._stray: list[tuple[int, int]] = []

    def add(self, start: int, length: int) -> None:
        if length <= 0:
            return
        end = start + length
        runs = self._runs
        if runs and start >= runs[-1][0]:
            last = runs[-1]
            if start <= last[1]:
                if end > last[1]:
                    last[1] = end
                return
            runs.append([start, end])
        elif not runs:
            runs.append([start, end])
        else:
            self._stray.append((start, end))

    def merged(self, size: int, min_gap: int = 0) -> tuple[tuple[int, int], ...]:
        items: Iterable = self._runs
        if self._stray:
            items = sorted([*map(tuple, self._runs), *self._stray])
        out: list[tuple[int, int]] = []
        cur_s = cur_e = -1
        for s, e in items:
            s, e = max(s, 0), min(e, size)
            if e <= s:
                continue
            if cur_e >= 0 and (s <= cur_e or s - cur_e < min_gap):
                cur_e = max(cur_e, e)
                continue
            if cur_e >= 0:
                out.append((cur_s, cur_e - cur_s))
            cur_s, cur_e = s, e
        if cur_e >= 0:
            out.append((cur_s, cur_e - cur_s))
        return tuple(out)


_NONZERO = re.compile(rb"[^\x00]+")
_ONES = re.compile(r"1+")


def _bit_runs(bitmap: bytes) -> Iterator[tuple[int, int]]:
    """(first bit, count) of every run of set bits, bit i being ``bitmap[i // 8] >> (i % 8)``.

    Zero bytes are skipped by the regex engine, all-0xFF stretches become one run at once, and
    only stretches with mixed bytes are expanded to a bit string (``bin`` is C code too)."""
    for m in _NONZERO.finditer(bitmap):
        s, e = m.span()
        chunk = m.group()
        if chunk.count(0xFF) == len(chunk):
            yield s * 8, (e - s) * 8
            continue
        bits = bin(int.from_bytes(chunk, "little"))[:1:-1]   # character i is bit i
        base = s * 8
        for r in _ONES.finditer(bits):
            yield base + r.start(), r.end() - r.start()


def _popcount(data: bytes) -> int:
    return int.from_bytes(data, "little").bit_count()


_crc32c_raw = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0xFFFFFFFF, rev=True, xorOut=0)
_crc16_raw = crcmod.mkCrcFun(0x18005, initCrc=0xFFFF, rev=True, xorOut=0)
# Pure-Python crcmod would make checking every bitmap's CRC slow on a big filesystem; the
# descriptor and superblock CRCs are checked either way.
_FAST_CRC = bool(getattr(crcmod, "_usingExtension", False))


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "little")


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "little")


def _u64(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 8], "little")


def _size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# ext2/3/4

# Feature bits (lib/ext2fs/ext2_fs.h).  Only those known not to change what the block bitmaps
# mean are accepted; anything else means "unknown, read fully".
_COMPAT_HAS_JOURNAL = 0x4
_INCOMPAT_COMPRESSION = 0x1
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_CSUM_SEED = 0x2000
_INCOMPAT_OK = (0x2 | _INCOMPAT_META_BG | 0x40 | _INCOMPAT_64BIT | 0x100 | 0x200 | 0x400 | 0x1000
                | _INCOMPAT_CSUM_SEED | 0x4000 | 0x8000 | 0x10000 | 0x20000)
_INCOMPAT_EXT3 = 0x2 | _INCOMPAT_META_BG      # what an ext3 driver handles (plus recover)
_RO_SPARSE_SUPER = 0x1
_RO_GDT_CSUM = 0x10
_RO_BIGALLOC = 0x200
_RO_METADATA_CSUM = 0x400
_RO_OK = (_RO_SPARSE_SUPER | 0x2 | 0x4 | 0x8 | _RO_GDT_CSUM | 0x20 | 0x40 | 0x100 | _RO_BIGALLOC
          | _RO_METADATA_CSUM | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000)
_RO_EXT3 = _RO_SPARSE_SUPER | 0x2 | 0x4
_COMPAT_SPARSE_SUPER2 = 0x200
_BG_BLOCK_UNINIT = 0x2


def _has_super(group: int, sparse: bool, sparse2: tuple[int, int] | None) -> bool:
    """Whether a block group holds a superblock copy (ext4_bg_has_super)."""
    if group == 0:
        return True
    if sparse2 is not None:
        return group in sparse2
    if not sparse or group == 1:
        return True
    if group % 2 == 0:
        return False
    for p in (3, 5, 7):
        n = p
        while n < group:
            n *= p
        if n == group:
            return True
    return False


class _Ext:
    """One ext2/3/4 filesystem at byte ``base`` of the source."""

    def __init__(self, rd: _Reader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        self.length = length
        sb = rd.read(base + 1024, 1024)
        if _u16(sb, 0x38) != 0xEF53:
            raise _Unrecognised("no ext2/3/4 superblock magic")
        self.sb = sb
        self.compat = _u32(sb, 0x5C)
        self.incompat = _u32(sb, 0x60)
        self.ro_compat = _u32(sb, 0x64)
        rev = _u32(sb, 0x4C)
        if rev > 1:
            raise _Unrecognised(f"ext revision {rev} is unknown")
        if rev == 0:
            self.compat = self.incompat = self.ro_compat = 0
        log_bs = _u32(sb, 0x18)
        if log_bs > 6:
            raise _Unrecognised(f"block size 1024<<{log_bs} is invalid")
        self.bs = bs = 1024 << log_bs
        bad_in = self.incompat & ~_INCOMPAT_OK
        if self.incompat & _INCOMPAT_RECOVER:
            raise _Unrecognised("the journal needs recovery (needs_recovery): mounted or not "
                                "cleanly unmounted")
        if self.incompat & _INCOMPAT_JOURNAL_DEV:
            raise _Unrecognised("an external journal device")
        if bad_in:
            raise _Unrecognised(f"unsupported incompatible features {bad_in:#x}")
        bad_ro = self.ro_compat & ~_RO_OK
        if bad_ro:
            raise _Unrecognised(f"unsupported read-only-compatible features {bad_ro:#x}")
        state = _u16(sb, 0x3A)
        if not state & 1:
            raise _Unrecognised("not cleanly unmounted (state has no VALID flag): mounted, or "
                                "needs fsck")
        if state & 2:
            raise _Unrecognised("marked as having errors (state ERROR_FS): run fsck first")
        self.csum = bool(self.ro_compat & _RO_METADATA_CSUM)
        self.gdt_csum = bool(self.ro_compat & _RO_GDT_CSUM) and not self.csum
        if self.csum:
            if sb[0x175] != 1:
                raise _Unrecognised(f"unknown checksum type {sb[0x175]}")
            want, got = _u32(sb, 0x3FC), _crc32c_raw(sb[:0x3FC])
            if want != got:
                raise _Unrecognised(f"superblock checksum {got:#010x} should be {want:#010x}")
            if self.incompat & _INCOMPAT_CSUM_SEED:
                self.seed = _u32(sb, 0x270)
            else:
                self.seed = _crc32c_raw(sb[0x68:0x78])

        self.blocks = _u32(sb, 0x4)
        self.free_blocks = _u32(sb, 0xC)
        if self.incompat & _INCOMPAT_64BIT:
            self.blocks |= _u32(sb, 0x150) << 32
            self.free_blocks |= _u32(sb, 0x158) << 32
            self.desc_size = _u16(sb, 0xFE)
            ds = self.desc_size
            if ds < 64 or ds > 1024 or ds & (ds - 1):
                raise _Unrecognised(f"descriptor size {self.desc_size} is invalid for 64bit")
        else:
            self.desc_size = 32
        self.first_data = _u32(sb, 0x14)
        self.bpg = _u32(sb, 0x20)
        self.cpg = _u32(sb, 0x24)
        self.ipg = _u32(sb, 0x28)
        if self.ro_compat & _RO_BIGALLOC:
            log_cs = _u32(sb, 0x1C)
            if log_cs < log_bs or log_cs > 29:
                raise _Unrecognised(f"cluster size 1024<<{log_cs} is invalid")
            self.ratio = 1 << (log_cs - log_bs)
        else:
            self.ratio = 1
            self.cpg = self.bpg
        self.cs = bs * self.ratio
        inode_size = 128 if rev == 0 else _u16(sb, 0x58)
        if (self.blocks == 0 or self.bpg == 0 or self.cpg == 0 or self.cpg > 8 * bs
                or self.bpg != self.cpg * self.ratio or self.ipg == 0
                or self.first_data != (1 if bs == 1024 and self.ratio == 1 else 0)
                or inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1)
                or self.first_data >= self.blocks or self.free_blocks > self.blocks):
            raise _Unrecognised("superblock geometry is inconsistent")
        if self.blocks * bs > length:
            raise _Unrecognised(f"filesystem ({self.blocks * bs} bytes) is larger than its "
                                f"container ({length} bytes): truncated?")
        self.groups = -(-(self.blocks - self.first_data) // self.bpg)
        self.itable_blocks = -(-(self.ipg * inode_size) // bs)
        self.desc_per_block = bs // self.desc_size
        self.gdt_blocks = -(-self.groups // self.desc_per_block)
        self.meta_bg = bool(self.incompat & _INCOMPAT_META_BG)
        self.first_meta_bg = _u32(sb, 0x104) if self.meta_bg else 0
        if self.meta_bg and self.first_meta_bg > self.gdt_blocks:
            raise _Unrecognised("s_first_meta_bg is beyond the descriptor count")
        self.reserved_gdt = _u16(sb, 0xCE)
        # 1 KiB blocks with bigalloc: first_data_block is 0 but the superblock is block 1
        self.sb_block = 1 if self.bs == 1024 else self.first_data
        self.sparse = bool(self.ro_compat & _RO_SPARSE_SUPER)
        self.sparse2 = ((_u32(sb, 0x24C), _u32(sb, 0x250))
                        if self.compat & _COMPAT_SPARSE_SUPER2 else None)
        if self.groups > (1 << 32):
            raise _Unrecognised("group count is absurd")

    @property
    def kind(self) -> str:
        if (self.incompat & ~_INCOMPAT_EXT3) or (self.ro_compat & ~_RO_EXT3):
            return "ext4"
        return "ext3" if self.compat & _COMPAT_HAS_JOURNAL else "ext2"

    def _desc_block(self, j: int) -> int:
        """Block number of group descriptor block ``j`` (classic layout or meta_bg), as
        ext2fs_descriptor_block_loc2 computes it."""
        group = j * self.desc_per_block
        start = self.first_data + group * self.bpg
        if group == 0:
            start = self.sb_block
        if not self.meta_bg or j < self.first_meta_bg:
            return self.sb_block + 1 + j
        return start + (1 if _has_super(group, self.sparse, self.sparse2) else 0)

    def _base_meta_blocks(self, g: int) -> int:
        """Superblock copy, descriptor blocks and reserved GDT blocks at the start of group
        ``g`` (ext4_num_base_meta_clusters, in blocks)."""
        has_sb = _has_super(g, self.sparse, self.sparse2)
        n = 1 if has_sb else 0
        if not self.meta_bg or g < self.first_meta_bg * self.desc_per_block:
            if has_sb:
                n += (self.first_meta_bg if self.meta_bg else self.gdt_blocks) + self.reserved_gdt
        else:
            first = (g // self.desc_per_block) * self.desc_per_block
            if g in (first, first + 1, first + self.desc_per_block - 1):
                n += 1
        return n

    def _check_desc(self, g: int, desc: bytes) -> None:
        if not (self.csum or self.gdt_csum):
            return
        want = _u16(desc, 0x1E)
        le_group = g.to_bytes(4, "little")
        if self.csum:
            c = _crc32c_raw(le_group, self.seed)
            c = _crc32c_raw(desc[:0x1E] + b"\0\0" + desc[0x20:self.desc_size], c)
            got = c & 0xFFFF
        else:
            c = _crc16_raw(self.sb[0x68:0x78])
            c = _crc16_raw(le_group, c)
            got = _crc16_raw(desc[:0x1E], c)
            if self.desc_size > 0x20:
                got = _crc16_raw(desc[0x20:self.desc_size], got)
        if got != want:
            raise _Unrecognised(f"group {g} descriptor checksum {got:#06x} should be {want:#06x}")

    def _descriptors(self) -> Iterator[tuple[int, bytes]]:
        ds = self.desc_size
        for j in range(self.gdt_blocks):
            blk = self._desc_block(j)
            if blk >= self.blocks:
                raise _Unrecognised(f"descriptor block {j} at {blk} is beyond the filesystem")
            data = self.rd.read(self.base + blk * self.bs, self.bs)
            first = j * self.desc_per_block
            for k in range(min(self.desc_per_block, self.groups - first)):
                yield first + k, data[k * ds:(k + 1) * ds]

    def scan(self, out: _Ranges) -> tuple[int, int]:
        """Add this filesystem's used ranges to ``out``; returns (used bytes, total bytes) of the
        filesystem as its bitmaps count them.  Runs go straight into ``out`` (memory follows
        the result); if a check fails half-way the caller adds the whole area, a superset."""
        bs, base, cs = self.bs, self.base, self.cs
        meta = _Ranges()
        # The boot block and primary superblock are always kept, even with 1 KiB blocks where
        # block 0 belongs to no group (it may hold a boot loader).
        meta.add(base, 2048)
        uninit_ok = self.csum or self.gdt_csum
        big = self.ro_compat & _RO_BIGALLOC
        is64 = self.incompat & _INCOMPAT_64BIT
        free_total = 0
        for g, d in self._descriptors():
            self._check_desc(g, d)
            bb, ib, it = _u32(d, 0), _u32(d, 4), _u32(d, 8)
            free = _u16(d, 0xC)
            flags = _u16(d, 0x12)
            if is64:
                bb |= _u32(d, 0x20) << 32
                ib |= _u32(d, 0x24) << 32
                it |= _u32(d, 0x28) << 32
                free |= _u16(d, 0x2C) << 16
            start = self.first_data + g * self.bpg
            nblocks = min(self.bpg, self.blocks - start)
            nclusters = -(-nblocks // self.ratio)
            for blk, n, what in ((bb, 1, "block bitmap"), (ib, 1, "inode bitmap"),
                                 (it, self.itable_blocks, "inode table")):
                if blk < self.first_data or blk + n > self.blocks:
                    raise _Unrecognised(f"group {g}: {what} at block {blk} is outside the "
                                        "filesystem")
                meta.add(base + blk * bs, n * bs)
            head = start if g else self.sb_block
            meta.add(base + head * bs, self._base_meta_blocks(g) * bs)
            if free > nclusters:
                raise _Unrecognised(f"group {g}: {free} free clusters in a group of {nclusters}")
            free_total += free
            if uninit_ok and flags & _BG_BLOCK_UNINIT:
                # The bitmap on disk is not initialised; the kernel derives it from the group's
                # metadata, which is already in ``meta``.  Nothing else can be allocated here.
                continue
            raw = self.rd.read(base + bb * bs, bs)
            if self.csum and _FAST_CRC:
                want = _u16(d, 0x18)
                got = _crc32c_raw(raw[:self.cpg // 8], self.seed)
                if self.desc_size >= 0x3C:
                    want |= _u16(d, 0x38) << 16
                else:
                    got &= 0xFFFF
                if got != want:
                    raise _Unrecognised(f"group {g}: block bitmap checksum {got:#x} should be "
                                        f"{want:#x}")
            nbytes = (nclusters + 7) // 8
            bitmap = raw[:nbytes]
            if nclusters % 8:
                # The last group's bits past the end of the filesystem are padding (set to 1).
                bitmap = bitmap[:-1] + bytes([bitmap[-1] & ((1 << (nclusters % 8)) - 1)])
            counted_free = nclusters - _popcount(bitmap)
            if counted_free != free:
                raise _Unrecognised(f"group {g}: bitmap has {counted_free} free clusters, its "
                                    f"descriptor says {free}")
            cbase = base + (start if not big else g * self.cpg * self.ratio) * bs
            for first, count in _bit_runs(bitmap):
                out.add(cbase + first * cs, count * cs)
        sb_free = self.free_blocks // self.ratio if big else self.free_blocks
        if sb_free != free_total:
            raise _Unrecognised(f"superblock says {sb_free} free clusters, the group "
                                f"descriptors add up to {free_total}")
        for s, n in meta.merged(base + self.blocks * bs):
            out.add(s, n)
        total_clusters = -(-(self.blocks - self.first_data) // self.ratio)
        return (total_clusters - free_total) * cs, self.blocks * bs


# --------------------------------------------------------------------------------------------
# FAT12/16/32

_FAT_CHUNK = 1 << 20   # a multiple of 2, 3 and 4 bytes (FAT12 is read whole anyway)


class _Fat:
    """One FAT12/16/32 filesystem at byte ``base``."""

    def __init__(self, rd: _Reader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        bs = rd.read(base, 512)
        if bs[3:11] in (b"EXFAT   ", b"NTFS    "):
            raise _Unrecognised(f"{bs[3:7].decode().lower()} is not FAT")
        if bs[510:512] != b"\x55\xaa" or bs[0] not in (0xEB, 0xE9):
            raise _Unrecognised("no FAT boot sector")
        self.bps = bps = _u16(bs, 0x0B)
        self.spc = spc = bs[0x0D]
        self.reserved = _u16(bs, 0x0E)
        self.nfats = bs[0x10]
        root_entries = _u16(bs, 0x11)
        total = _u16(bs, 0x13) or _u32(bs, 0x20)
        self.media = bs[0x15]
        fatsz = _u16(bs, 0x16) or _u32(bs, 0x24)
        if (bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1)
                or self.reserved == 0 or self.nfats not in (1, 2, 3, 4) or fatsz == 0
                or not (self.media == 0xF0 or self.media >= 0xF8) or total == 0):
            raise _Unrecognised("BIOS parameter block is not FAT")
        root_sectors = -(-(root_entries * 32) // bps)
        self.data_start = self.reserved + self.nfats * fatsz + root_sectors   # sectors
        if self.data_start >= total:
            raise _Unrecognised("FAT metadata is larger than the filesystem")
        self.clusters = (total - self.data_start) // spc
        # As Linux and dosfstools decide (not by the cluster count alone, as Microsoft's spec
        # does): FAT32 has no 16-bit FAT size; otherwise FAT12 up to 4084 clusters.
        if _u16(bs, 0x16) == 0:
            self.bits = 32
            if root_entries:
                raise _Unrecognised("FAT32 boot sector with a fixed root directory")
        else:
            self.bits = 12 if self.clusters < 4085 else 16
            if not root_entries:
                raise _Unrecognised("FAT12/16 boot sector without a root directory")
        if fatsz * bps * 8 // self.bits < self.clusters + 2:
            raise _Unrecognised("the FAT is too small for the cluster count")
        if total * bps > length:
            raise _Unrecognised(f"filesystem ({total * bps} bytes) is larger than its container "
                                f"({length} bytes): truncated?")
        self.fatsz = fatsz
        self.total = total
        self.fat_offsets = [base + (self.reserved + i * fatsz) * bps for i in range(self.nfats)]
        dirty_off = 0x41 if self.bits == 32 else 0x25
        if bs[dirty_off] & 1:
            raise _Unrecognised("the dirty flag is set: mounted or not cleanly unmounted")
        self.mirrored = True
        if self.bits == 32:
            ext_flags = _u16(bs, 0x28)
            if ext_flags & 0x80:
                active = ext_flags & 0x0F
                if active >= self.nfats:
                    raise _Unrecognised(f"active FAT {active} does not exist")
                self.fat_offsets = [self.fat_offsets[active]]
                self.mirrored = False
            self.fsinfo = _u16(bs, 0x30)
        self.boot = bs

    @property
    def detail(self) -> str:
        return f"FAT{self.bits}, {self.clusters} clusters of {self.spc * self.bps} bytes"

    def _check_head(self, fat: bytes) -> None:
        if fat[0] != self.media:
            raise _Unrecognised(f"FAT[0] {fat[0]:#x} does not match the media byte "
                                f"{self.media:#x}")
        if self.bits == 16 and not _u16(fat, 2) & 0x8000:
            raise _Unrecognised("FAT[1] clean-shutdown bit is clear: not cleanly unmounted")
        if self.bits == 32 and not _u32(fat, 4) & 0x08000000:
            raise _Unrecognised("FAT[1] clean-shutdown bit is clear: not cleanly unmounted")

    def _used_entries(self, chunk: bytes) -> bytes:
        """One byte per FAT entry in ``chunk``, non-zero when that entry is not free."""
        if self.bits == 12:
            chunk += bytes(-len(chunk) % 3)
            out = bytearray()
            for i in range(0, len(chunk), 3):
                b0, b1, b2 = chunk[i], chunk[i + 1], chunk[i + 2]
                out.append(1 if b0 or b1 & 0x0F else 0)
                out.append(1 if b1 & 0xF0 or b2 else 0)
            return bytes(out)
        x = int.from_bytes(chunk, "little")
        if self.bits == 16:
            x |= x >> 8
            return x.to_bytes(len(chunk), "little")[0::2]
        # FAT32: the top 4 bits are reserved; a non-zero value there is kept (conservative).
        x |= x >> 8
        x |= x >> 16
        return x.to_bytes(len(chunk), "little")[0::4]

    def scan(self, out: _Ranges) -> tuple[int, int]:
        base, bps = self.base, self.bps
        csize = self.spc * bps
        data_off = base + self.data_start * bps
        out.add(base, self.data_start * bps)
        fat_bytes = self.fatsz * bps
        # bytes of the FAT that hold entries 0 .. clusters + 1
        n_entries = self.clusters + 2
        need = (n_entries * 3 + 1) // 2 if self.bits == 12 else n_entries * (self.bits // 8)
        need = min(need, fat_bytes)
        chunk_size = need if self.bits == 12 else _FAT_CHUNK
        used_clusters = 0
        per_entry = 1.5 if self.bits == 12 else self.bits // 8
        pos = 0
        while pos < need:
            n = min(chunk_size, need - pos)
            copies = [self.rd.read(off + pos, n) for off in self.fat_offsets]
            if self.mirrored and any(c != copies[0] for c in copies[1:]):
                raise _Unrecognised(f"the FAT copies differ (within FAT bytes {pos}-{pos + n})")
            chunk = copies[0]
            if pos == 0:
                self._check_head(chunk)
            flags = self._used_entries(chunk)
            first_entry = int(pos / per_entry)
            lo = max(0, 2 - first_entry)
            hi = min(len(flags), n_entries - first_entry)
            if hi > lo:
                view = flags[lo:hi]
                used_clusters += len(view) - view.count(0)
                cl0 = first_entry + lo - 2
                for m in _NONZERO.finditer(view):
                    s, e = m.span()
                    out.add(data_off + (cl0 + s) * csize, (e - s) * csize)
            pos += n
        if self.bits == 32:
            self._check_fsinfo(used_clusters)
        # Sectors after the last whole cluster and after the filesystem are kept.
        data_end = data_off + self.clusters * csize
        out.add(data_end, base + self.total * bps - data_end)
        return self.data_start * bps + used_clusters * csize, self.total * bps

    def _check_fsinfo(self, used: int) -> None:
        if not self.fsinfo or self.fsinfo >= self.reserved:
            return
        info = self.rd.read(self.base + self.fsinfo * self.bps, 512)
        if _u32(info, 0) != 0x41615252 or _u32(info, 484) != 0x61417272:
            return
        free = _u32(info, 488)
        if free != 0xFFFFFFFF and free != self.clusters - used:
            # FSInfo is a hint the spec says may be wrong; the FAT itself is the authority.
            log.info("FAT32 at byte %d: FSInfo says %d free clusters, the FAT has %d",
                     self.base, free, self.clusters - used)


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


def _signature(rd: _Reader, base: int, length: int) -> str:
    for off, magic, name in _SIGNATURES:
        if off + len(magic) <= length:
            try:
                if rd.read(base + off, len(magic)) == magic:
                    return name
            except _Unrecognised:
                continue
    return "unknown"


def _scan_content(rd: _Reader, base: int, length: int, label: str,
                  out: _Ranges, regions: list[Region]) -> None:
    """Recognise the filesystem in ``[base, base + length)`` and add its used ranges."""
    reasons = []
    for name, cls in (("ext", _Ext), ("FAT", _Fat)):
        try:
            fs = cls(rd, base, length)
            used, fs_bytes = fs.scan(out)
        except _Unrecognised as err:
            reasons.append(f"{name}: {err}")
            continue
        except Exception as err:   # anything odd in the bytes: never trust it, read fully
            log.debug("parsing %s at byte %d failed", name, base, exc_info=True)
            reasons.append(f"{name}: unexpected structure ({type(err).__name__}: {err})")
            continue
        if isinstance(fs, _Ext):
            kind, detail = fs.kind, f"{label}, {fs.bs}-byte blocks" + (
                f", {fs.cs}-byte clusters" if fs.ratio > 1 else "")
        else:
            kind, detail = "vfat", f"{label}, {fs.detail}"
        if fs_bytes < length:
            out.add(base + fs_bytes, length - fs_bytes)
            detail += f"; {_size_text(length - fs_bytes)} after the filesystem read fully"
        log.debug("%s: %s, %d of %d bytes used", label, kind, used, fs_bytes)
        regions.append(Region(base, length, kind, detail, analysed=True))
        return
    kind = _signature(rd, base, length)
    # An ext/FAT magic that failed its checks is worth a warning: the data may be damaged or the
    # filesystem mounted.  Plain "not ext, not FAT" is ordinary.
    notable = [r for r in reasons if "magic" not in r and "not FAT" not in r
               and "no FAT boot sector" not in r]
    why = "; ".join(notable) if notable else f"not ext2/3/4 or FAT ({kind})"
    (log.warning if notable else log.info)("%s at byte %d: %s; read fully", label, base, why)
    out.add(base, length)
    regions.append(Region(base, length, kind if not notable else "unknown",
                          f"{label}: read fully: {why}"))


# --------------------------------------------------------------------------------------------
# partition tables

@dataclass(frozen=True)
class _Part:
    number: int
    offset: int
    length: int
    name: str = ""


_EXTENDED = (0x05, 0x0F, 0x85)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]] | None:
    """(type, first LBA, sector count) of the four entries, or None if not an MBR."""
    if sector[510:512] != b"\x55\xaa":
        return None
    entries = []
    for i in range(4):
        e = sector[446 + 16 * i:446 + 16 * (i + 1)]
        if e[0] not in (0x00, 0x80):
            return None
        entries.append((e[4], _u32(e, 8), _u32(e, 12)))
    return entries


def _parse_mbr(rd: _Reader, sector0: bytes, ss: int) -> list[_Part] | None:
    entries = _mbr_entries(sector0)
    if entries is None or not any(t and n for t, _, n in entries):
        return None
    parts: list[_Part] = []
    for i, (ptype, lba, n) in enumerate(entries):
        if not ptype or not n:
            continue
        if lba == 0:
            raise _Unrecognised(f"MBR partition {i + 1} starts at sector 0")
        if ptype in _EXTENDED:
            parts.extend(_parse_ebr_chain(rd, lba, n, ss))
        else:
            parts.append(_Part(i + 1, lba * ss, n * ss))
    return parts


def _parse_ebr_chain(rd: _Reader, ext_lba: int, ext_len: int, ss: int) -> list[_Part]:
    parts: list[_Part] = []
    seen: set[int] = set()
    ebr = ext_lba
    number = 5
    while True:
        if ebr in seen or len(seen) > 256:
            raise _Unrecognised("the extended partition's EBR chain loops")
        if not ext_lba <= ebr < ext_lba + ext_len:
            raise _Unrecognised(f"EBR at sector {ebr} is outside the extended partition")
        seen.add(ebr)
        entries = _mbr_entries(rd.read(ebr * ss, 512))
        if entries is None:
            if ebr == ext_lba:
                return parts   # an empty extended partition
            raise _Unrecognised(f"EBR at sector {ebr} has no signature")
        ptype, rel, n = entries[0]
        if ptype and n:
            start = ebr + rel
            if rel == 0 or start + n > ext_lba + ext_len:
                raise _Unrecognised(f"logical partition {number} lies outside its extended "
                                    "partition")
            parts.append(_Part(number, start * ss, n * ss))
            number += 1
        ntype, nrel, nn = entries[1]
        if not (ntype in _EXTENDED and nn):
            return parts
        ebr = ext_lba + nrel


_GPT_SIG = b"EFI PART"


def _gpt_header(rd: _Reader, lba: int, ss: int) -> tuple[bytes, list[_Part]] | str:
    """The partitions of the GPT header at ``lba``, or why it is not valid."""
    try:
        h = rd.read(lba * ss, ss)
    except _Unrecognised as err:
        return str(err)
    if h[:8] != _GPT_SIG:
        return f"no GPT header at LBA {lba}"
    hsize = _u32(h, 12)
    if not 92 <= hsize <= ss:
        return f"GPT header size {hsize} is invalid"
    want = _u32(h, 16)
    got = zlib.crc32(h[:16] + b"\0\0\0\0" + h[20:hsize])
    if want != got:
        return f"GPT header at LBA {lba}: CRC32 {got:#010x} should be {want:#010x}"
    if _u64(h, 24) != lba:
        return f"GPT header at LBA {lba} says it is at LBA {_u64(h, 24)}"
    entries_lba, count, esize = _u64(h, 72), _u32(h, 80), _u32(h, 84)
    if esize < 128 or esize % 8 or count > 65536 or count * esize > 16 << 20:
        return f"GPT entry array ({count} x {esize}) is invalid"
    try:
        arr = rd.read(entries_lba * ss, count * esize)
    except _Unrecognised as err:
        return str(err)
    want = _u32(h, 88)
    got = zlib.crc32(arr)
    if want != got:
        return f"GPT entry array: CRC32 {got:#010x} should be {want:#010x}"
    parts = []
    last_lba = rd.size // ss - 1
    for i in range(count):
        e = arr[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = _u64(e, 32), _u64(e, 40)
        if first == 0 or last < first or last > last_lba:
            return f"GPT partition {i + 1} ({first}-{last}) lies outside the disk"
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(_Part(i + 1, first * ss, (last - first + 1) * ss, name))
    return h, parts


def _parse_gpt(rd: _Reader, ss: int) -> list[_Part]:
    """Partitions of the GPT: the primary's, else the backup's."""
    primary = _gpt_header(rd, 1, ss)
    if isinstance(primary, tuple):
        return primary[1]
    last = rd.size // ss - 1
    backup = _gpt_header(rd, last, ss)
    if isinstance(backup, tuple):
        log.warning("primary GPT is invalid (%s); using the backup GPT", primary)
        return backup[1]
    raise _Unrecognised(f"protective MBR but no valid GPT: {primary}; backup: {backup}")


def _scan_partitions(rd: _Reader, table: str, parts: list[_Part], out: _Ranges,
                     regions: list[Region]) -> None:
    parts = sorted(parts, key=lambda p: p.offset)
    for a, b in zip(parts, parts[1:]):
        if a.offset + a.length > b.offset:
            raise _Unrecognised(f"partitions {a.number} and {b.number} overlap")
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
    rd = _Reader(fd, size)
    out = _Ranges()
    regions: list[Region] = []
    if size <= 0:
        return UsedMap(size, (), ())
    try:
        _scan_whole(rd, sector_size, out, regions)
    except _Unrecognised as err:
        log.warning("source: %s; read fully", err)
        out = _Ranges()
        out.add(0, size)
        regions = [Region(0, size, "unknown", f"whole source: read fully: {err}")]
    return UsedMap(size, out.merged(size, min_gap), tuple(regions))


def _scan_whole(rd: _Reader, ss: int, out: _Ranges, regions: list[Region]) -> None:
    size = rd.size
    sector0 = rd.read(0, min(512, size)) if size >= 512 else b""
    entries = _mbr_entries(sector0) if sector0 else None
    if entries and any(t == 0xEE for t, _, _ in entries):
        for gss in (512, 4096):
            if size >= 2 * gss and rd.read(gss, 8) == _GPT_SIG:
                break
        else:
            gss = ss
        _scan_partitions(rd, "gpt", _parse_gpt(rd, gss), out, regions)
        return
    # A bare filesystem?  An ext superblock lives at byte 1024, outside sector 0, so a disk
    # that was partitioned after holding a whole-disk ext fs can show both; that ambiguity is
    # settled by reading everything.
    mbr_parts = None
    if entries and any(t and n for t, lba, n in entries if lba):
        try:
            mbr_parts = _parse_mbr(rd, sector0, ss)
        except _Unrecognised as err:
            mbr_error = err
            mbr_parts = None
        else:
            mbr_error = None
    else:
        mbr_error = None
    for cls in (_Ext, _Fat):
        try:
            cls(rd, 0, size)
        except _Unrecognised:
            continue
        except Exception:
            continue
        if mbr_parts or mbr_error:
            raise _Unrecognised("both a filesystem and an MBR partition table at the start; "
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


def _fs_uuid(rd: _Reader, base: int, length: int) -> tuple[str, str] | None:
    """(type, UUID or volume id) of the filesystem at ``base``, or None.  Only the magic is
    checked, not the clean-unmount state: a mounted filesystem keeps its UUID."""
    def at(off: int, n: int) -> bytes | None:
        if off + n > length:
            return None
        try:
            return rd.read(base + off, n)
        except _Unrecognised:
            return None
    sb = at(1024, 1024)
    if sb is not None and _u16(sb, 0x38) == 0xEF53 and any(sb[0x68:0x78]):
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
            and head[3:11] not in (b"EXFAT   ", b"NTFS    ") and _u16(head, 0x0B) in
            (512, 1024, 2048, 4096)):
        sig = 0x42 if _u16(head, 0x16) == 0 else 0x26   # FAT32 has no 16-bit FAT size
        if head[sig] == 0x29:
            vid = _u32(head, sig + 1)
            if vid:
                return "vfat", f"{vid >> 16:04X}-{vid & 0xFFFF:04X}"
    return None


def content_ids(fd: int, size: int, *, sector_size: int = 512) -> dict[str, str]:
    """What identifies the source's content where the disk has no serial: ``ptable_id``
    ("gpt:<disk GUID>" or "mbr:<disk signature>") and, for a bare filesystem, ``fs_uuid``
    and ``fs_type``.  Reads only the first sectors (and the backup GPT when the primary is
    invalid); never raises for the content: what cannot be read is left out."""
    rd = _Reader(fd, size)
    ids: dict[str, str] = {}
    try:
        sector0 = rd.read(0, 512) if size >= 512 else b""
    except _Unrecognised:
        return ids
    entries = _mbr_entries(sector0) if sector0 else None
    if entries and any(t == 0xEE for t, _, _ in entries):
        for gss in dict.fromkeys((512, 4096, sector_size)):
            for lba in (1, size // gss - 1):
                got = _gpt_header(rd, lba, gss) if size >= 2 * gss else "too small"
                if isinstance(got, tuple):
                    ids["ptable_id"] = "gpt:" + _guid(got[0][56:72])
                    return ids
        return ids
    try:
        parts = _parse_mbr(rd, sector0, sector_size) if entries else None
    except _Unrecognised:
        parts = None
    sig = _u32(sector0, 440) if sector0 else 0
    if parts and sig:
        ids["ptable_id"] = f"mbr:{sig:08x}"
    if not parts:
        fs = _fs_uuid(rd, 0, size)
        if fs is not None:
            ids["fs_type"], ids["fs_uuid"] = fs
    return ids
