"""ext2/ext3/ext4: the used blocks from the group descriptors and block bitmaps.

Reads the descriptors (32/64-bit, flex_bg, meta_bg, bigalloc, 1 KiB blocks, BLOCK_UNINIT groups)
and each group's bitmap, checking every structure against itself (descriptor and bitmap
checksums, free counts of every group against its bitmap, the superblock's totals, clean-unmount
state); on any doubt it raises Unrecognised and the caller reads the filesystem fully.
"""
from __future__ import annotations

import logging
from typing import Iterator

from diskimg import ranges
from diskimg.disk.used.ext_check import GroupInodes, owned_blocks
from diskimg.disk.used.raw import (
    FAST_CRC,
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    bit_runs,
    crc16_raw,
    crc32c_raw,
    popcount,
    u16,
    u32,
)

log = logging.getLogger(__name__)


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


class ExtFs:
    """One ext2/3/4 filesystem at byte ``base`` of the source."""

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        self.length = length
        sb = rd.read(base + 1024, 1024)
        if u16(sb, 0x38) != 0xEF53:
            raise NotThisFilesystem("no ext2/3/4 superblock magic")
        self.sb = sb
        self.compat = u32(sb, 0x5C)
        self.incompat = u32(sb, 0x60)
        self.ro_compat = u32(sb, 0x64)
        rev = u32(sb, 0x4C)
        if rev > 1:
            raise Unrecognised(f"ext revision {rev} is unknown")
        if rev == 0:
            self.compat = self.incompat = self.ro_compat = 0
        log_bs = u32(sb, 0x18)
        if log_bs > 6:
            raise Unrecognised(f"block size 1024<<{log_bs} is invalid")
        self.bs = self.unit = bs = 1024 << log_bs
        bad_in = self.incompat & ~_INCOMPAT_OK
        if self.incompat & _INCOMPAT_RECOVER:
            raise Unrecognised("the journal needs recovery (needs_recovery): mounted or not "
                               "cleanly unmounted")
        if self.incompat & _INCOMPAT_JOURNAL_DEV:
            raise Unrecognised("an external journal device")
        if bad_in:
            raise Unrecognised(f"unsupported incompatible features {bad_in:#x}")
        bad_ro = self.ro_compat & ~_RO_OK
        if bad_ro:
            raise Unrecognised(f"unsupported read-only-compatible features {bad_ro:#x}")
        state = u16(sb, 0x3A)
        if not state & 1:
            raise Unrecognised("not cleanly unmounted (state has no VALID flag): mounted, or "
                               "needs fsck")
        if state & 2:
            raise Unrecognised("marked as having errors (state ERROR_FS): run fsck first")
        self.csum = bool(self.ro_compat & _RO_METADATA_CSUM)
        self.gdt_csum = bool(self.ro_compat & _RO_GDT_CSUM) and not self.csum
        if self.csum:
            if sb[0x175] != 1:
                raise Unrecognised(f"unknown checksum type {sb[0x175]}")
            want, got = u32(sb, 0x3FC), crc32c_raw(sb[:0x3FC])
            if want != got:
                raise Unrecognised(f"superblock checksum {got:#010x} should be {want:#010x}")
            if self.incompat & _INCOMPAT_CSUM_SEED:
                self.seed = u32(sb, 0x270)
            else:
                self.seed = crc32c_raw(sb[0x68:0x78])

        self.blocks = u32(sb, 0x4)
        self.free_blocks = u32(sb, 0xC)
        if self.incompat & _INCOMPAT_64BIT:
            self.blocks |= u32(sb, 0x150) << 32
            self.free_blocks |= u32(sb, 0x158) << 32
            self.desc_size = u16(sb, 0xFE)
            ds = self.desc_size
            if ds < 64 or ds > 1024 or ds & (ds - 1):
                raise Unrecognised(f"descriptor size {self.desc_size} is invalid for 64bit")
        else:
            self.desc_size = 32
        self.first_data = u32(sb, 0x14)
        self.bpg = u32(sb, 0x20)
        self.cpg = u32(sb, 0x24)
        self.ipg = u32(sb, 0x28)
        if self.ro_compat & _RO_BIGALLOC:
            log_cs = u32(sb, 0x1C)
            if log_cs < log_bs or log_cs > 29:
                raise Unrecognised(f"cluster size 1024<<{log_cs} is invalid")
            self.ratio = 1 << (log_cs - log_bs)
        else:
            self.ratio = 1
            self.cpg = self.bpg
        self.cs = bs * self.ratio
        self.inode_size = inode_size = 128 if rev == 0 else u16(sb, 0x58)
        if (self.blocks == 0 or self.bpg == 0 or self.cpg == 0 or self.cpg > 8 * bs
                or self.bpg != self.cpg * self.ratio or self.ipg == 0
                or self.first_data != (1 if bs == 1024 and self.ratio == 1 else 0)
                or inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1)
                or self.first_data >= self.blocks or self.free_blocks > self.blocks):
            raise Unrecognised("superblock geometry is inconsistent")
        if self.blocks * bs > length:
            raise Unrecognised(f"filesystem ({self.blocks * bs} bytes) is larger than its "
                               f"container ({length} bytes): truncated?")
        self.groups = -(-(self.blocks - self.first_data) // self.bpg)
        self.itable_blocks = -(-(self.ipg * inode_size) // bs)
        self.desc_per_block = bs // self.desc_size
        self.gdt_blocks = -(-self.groups // self.desc_per_block)
        self.meta_bg = bool(self.incompat & _INCOMPAT_META_BG)
        self.first_meta_bg = u32(sb, 0x104) if self.meta_bg else 0
        if self.meta_bg and self.first_meta_bg > self.gdt_blocks:
            raise Unrecognised("s_first_meta_bg is beyond the descriptor count")
        self.reserved_gdt = u16(sb, 0xCE)
        # 1 KiB blocks with bigalloc: first_data_block is 0 but the superblock is block 1
        self.sb_block = 1 if self.bs == 1024 else self.first_data
        self.sparse = bool(self.ro_compat & _RO_SPARSE_SUPER)
        self.sparse2 = ((u32(sb, 0x24C), u32(sb, 0x250))
                        if self.compat & _COMPAT_SPARSE_SUPER2 else None)
        if self.groups > (1 << 32):
            raise Unrecognised("group count is absurd")

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
        want = u16(desc, 0x1E)
        le_group = g.to_bytes(4, "little")
        if self.csum:
            c = crc32c_raw(le_group, self.seed)
            c = crc32c_raw(desc[:0x1E] + b"\0\0" + desc[0x20:self.desc_size], c)
            got = c & 0xFFFF
        else:
            c = crc16_raw(self.sb[0x68:0x78])
            c = crc16_raw(le_group, c)
            got = crc16_raw(desc[:0x1E], c)
            if self.desc_size > 0x20:
                got = crc16_raw(desc[0x20:self.desc_size], got)
        if got != want:
            raise Unrecognised(f"group {g} descriptor checksum {got:#06x} should be {want:#06x}")

    def _descriptors(self) -> Iterator[tuple[int, bytes]]:
        ds = self.desc_size
        for j in range(self.gdt_blocks):
            blk = self._desc_block(j)
            if blk >= self.blocks:
                raise Unrecognised(f"descriptor block {j} at {blk} is beyond the filesystem")
            data = self.rd.read(self.base + blk * self.bs, self.bs)
            first = j * self.desc_per_block
            for k in range(min(self.desc_per_block, self.groups - first)):
                yield first + k, data[k * ds:(k + 1) * ds]

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        """Add this filesystem's used ranges to ``out``; returns (used bytes, total bytes) of the
        filesystem as its bitmaps count them.  If a check fails half-way the caller adds the
        whole area, a superset.

        With ``check`` the bitmaps are cross-checked against the blocks the inodes own
        (ext_check.py): what an inode owns but a bitmap marks free is read as well, counted in
        ``self.repaired_blocks`` and logged."""
        bs, base, cs = self.bs, self.base, self.cs
        self.repaired_blocks = 0
        final_out, out = out, RangeCollector()
        inode_groups: list[GroupInodes] = []
        meta = RangeCollector()
        # The boot block and primary superblock are always kept, even with 1 KiB blocks where
        # block 0 belongs to no group (it may hold a boot loader).
        meta.add(base, 2048)
        uninit_ok = self.csum or self.gdt_csum
        big = self.ro_compat & _RO_BIGALLOC
        is64 = self.incompat & _INCOMPAT_64BIT
        free_total = 0
        for g, d in self._descriptors():
            self._check_desc(g, d)
            bb, ib, it = u32(d, 0), u32(d, 4), u32(d, 8)
            free = u16(d, 0xC)
            flags = u16(d, 0x12)
            if is64:
                bb |= u32(d, 0x20) << 32
                ib |= u32(d, 0x24) << 32
                it |= u32(d, 0x28) << 32
                free |= u16(d, 0x2C) << 16
            if check:
                unused = u16(d, 0x1C) | (u16(d, 0x32) << 16 if is64 else 0)
                inode_groups.append(GroupInodes(g, ib, it, flags, unused if uninit_ok else 0))
            start = self.first_data + g * self.bpg
            nblocks = min(self.bpg, self.blocks - start)
            nclusters = -(-nblocks // self.ratio)
            for blk, n, what in ((bb, 1, "block bitmap"), (ib, 1, "inode bitmap"),
                                 (it, self.itable_blocks, "inode table")):
                if blk < self.first_data or blk + n > self.blocks:
                    raise Unrecognised(f"group {g}: {what} at block {blk} is outside the "
                                       "filesystem")
                meta.add(base + blk * bs, n * bs)
            head = start if g else self.sb_block
            meta.add(base + head * bs, self._base_meta_blocks(g) * bs)
            if free > nclusters:
                raise Unrecognised(f"group {g}: {free} free clusters in a group of {nclusters}")
            free_total += free
            if uninit_ok and flags & _BG_BLOCK_UNINIT:
                # The bitmap on disk is not initialised; the kernel derives it from the group's
                # metadata, which is already in ``meta``.  Nothing else can be allocated here.
                continue
            raw = self.rd.read(base + bb * bs, bs)
            if self.csum and FAST_CRC:
                want = u16(d, 0x18)
                got = crc32c_raw(raw[:self.cpg // 8], self.seed)
                if self.desc_size >= 0x3C:
                    want |= u16(d, 0x38) << 16
                else:
                    got &= 0xFFFF
                if got != want:
                    raise Unrecognised(f"group {g}: block bitmap checksum {got:#x} should be "
                                       f"{want:#x}")
            nbytes = (nclusters + 7) // 8
            bitmap = raw[:nbytes]
            if nclusters % 8:
                # The last group's bits past the end of the filesystem are padding (set to 1).
                bitmap = bitmap[:-1] + bytes([bitmap[-1] & ((1 << (nclusters % 8)) - 1)])
            counted_free = nclusters - popcount(bitmap)
            if counted_free != free:
                raise Unrecognised(f"group {g}: bitmap has {counted_free} free clusters, its "
                                   f"descriptor says {free}")
            cbase = base + (start if not big else g * self.cpg * self.ratio) * bs
            for first, count in bit_runs(bitmap):
                out.add(cbase + first * cs, count * cs)
        sb_free = self.free_blocks // self.ratio if big else self.free_blocks
        if sb_free != free_total:
            raise Unrecognised(f"superblock says {sb_free} free clusters, the group "
                               f"descriptors add up to {free_total}")
        end = base + self.blocks * bs
        for s, n in meta.merged(end):
            out.add(s, n)
        bitmap_used = out.merged(end)
        for s, n in bitmap_used:
            final_out.add(s, n)
        if check:
            owned = owned_blocks(self.rd, base, self.sb, bs=bs, blocks=self.blocks,
                                 first_data=self.first_data, ipg=self.ipg,
                                 inode_size=self.inode_size, is64=bool(is64),
                                 has_itable_unused=bool(uninit_ok), groups=inode_groups)
            missing = ranges.subtract(owned, list(bitmap_used))
            if missing:
                self.repaired_blocks = ranges.total(missing) // bs
                log.warning("ext at byte %d: %d blocks owned by inodes are marked free in the "
                            "block bitmaps (first at block %d); they are read as well",
                            base, self.repaired_blocks, (missing[0][0] - base) // bs)
                for s, n in missing:       # whole clusters, as the bitmap counts them
                    lo = base + (s - base) // cs * cs
                    final_out.add(lo, -(-(s + n - lo) // cs) * cs)
        total_clusters = -(-(self.blocks - self.first_data) // self.ratio)
        return (total_clusters - free_total) * cs, self.blocks * bs


# --------------------------------------------------------------------------------------------
# FAT12/16/32
