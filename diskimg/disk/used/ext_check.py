"""ext2/3/4: the blocks the inodes own, to cross-check the block bitmaps against.

A block bitmap can lie while every count agrees with it: a group flagged BLOCK_UNINIT whose
blocks are in use, a bit cleared in a bitmap whose group and superblock counts were lowered to
match (what a bit flip followed by a careless "fix" leaves).  partclone, and diskimg before this
module, then zero blocks that ``e2fsck`` would keep.  :func:`owned_blocks` walks what e2fsck's
pass 1 walks (every inode in use, by the inode bitmap *or* by the inode itself, within each
group's initialised part of the inode table) and returns the blocks they own: extent trees (the
index and leaf blocks as well as the data), direct/indirect/double/triple indirect blocks,
extended-attribute blocks, and the special inodes (bad blocks, resize inode with its reserved
GDT blocks, journal, quota, orphan file), plus the MMP block.

The caller takes the union with the bitmap.  Anything here that does not parse (an extent header
without its magic, a pointer outside the filesystem, a tree deeper than ext4 allows) raises
Unrecognised: the filesystem is damaged beyond what a bitmap union can repair, so it is read
fully rather than guessed at.

Speed: the inode table of each group is read in one pread (only its initialised part when the
filesystem records ``itable_unused``), and each inode is looked at with a few slices; a
million-inode filesystem takes a few seconds (numbers in the README).
"""
from __future__ import annotations

import logging
import struct

from diskimg.disk.used.raw import RangeCollector, SourceReader, Unrecognised, bit_runs, u16, u32

log = logging.getLogger(__name__)

_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_EXT_MAGIC = 0xF30A
_S_IFMT = 0xF000
_NO_BLOCKS = (0x1000, 0x2000, 0x6000, 0xC000)   # fifo, chr, blk, socket: i_block is no map
_S_IFLNK = 0xA000
_BG_INODE_UNINIT = 0x1
_INCOMPAT_MMP = 0x100
_FIFTEEN = struct.Struct("<15I")
_EXT_HDR = struct.Struct("<HHHHI")
_MAX_DEPTH = 5


class GroupInodes:
    """Where one group's inodes are: its inode bitmap and table, and how much is initialised."""

    __slots__ = ("group", "bitmap", "table", "flags", "unused")

    def __init__(self, group: int, bitmap: int, table: int, flags: int, unused: int) -> None:
        self.group = group
        self.bitmap = bitmap
        self.table = table
        self.flags = flags
        self.unused = unused


class _Walker:
    def __init__(self, rd: SourceReader, base: int, bs: int, blocks: int, first_data: int,
                 out: RangeCollector) -> None:
        self.rd = rd
        self.base = base
        self.bs = bs
        self.blocks = blocks
        self.first_data = first_data
        self.out = out
        self.ptrs = struct.Struct(f"<{bs // 4}I")
        self.ino = 0

    def _bad(self, what: str) -> Unrecognised:
        return Unrecognised(f"inode {self.ino}: {what}; the filesystem needs fsck")

    def _add(self, blk: int, n: int = 1) -> None:
        if blk < self.first_data or blk + n > self.blocks:
            raise self._bad(f"blocks {blk}-{blk + n - 1} lie outside the filesystem "
                            f"({self.blocks} blocks)")
        self.out.add(self.base + blk * self.bs, n * self.bs)

    def _block(self, blk: int) -> bytes:
        self._add(blk)
        return self.rd.read(self.base + blk * self.bs, self.bs)

    def extents(self, node: bytes, depth_expected: int | None) -> None:
        magic, entries, maxe, depth, _ = _EXT_HDR.unpack_from(node, 0)
        if magic != _EXT_MAGIC:
            raise self._bad("extent header lacks its 0xF30A signature")
        if depth > _MAX_DEPTH or (depth_expected is not None and depth != depth_expected):
            raise self._bad(f"extent tree depth {depth} is inconsistent")
        if entries > maxe or 12 + 12 * entries > len(node):
            raise self._bad(f"extent node holds {entries} of at most {maxe} entries")
        for k in range(entries):
            o = 12 + 12 * k
            if depth == 0:
                length = u16(node, o + 4)
                if length > 32768:          # an unwritten extent: allocated all the same
                    length -= 32768
                if length:
                    self._add(u16(node, o + 6) << 32 | u32(node, o + 8), length)
            else:
                child = u32(node, o + 4) | u16(node, o + 8) << 32
                self.extents(self._block(child), depth - 1)

    def indirect(self, blk: int, level: int) -> None:
        data = self._block(blk)
        if level == 1:
            add = self._add
            for p in self.ptrs.unpack(data):
                if p:
                    add(p)
        else:
            for p in self.ptrs.unpack(data):
                if p:
                    self.indirect(p, level - 1)


def owned_blocks(rd: SourceReader, base: int, sb: bytes, *, bs: int, blocks: int,
                 first_data: int, ipg: int, inode_size: int, is64: bool, has_itable_unused: bool,
                 groups: list[GroupInodes]) -> tuple[tuple[int, int], ...]:
    """The byte ranges (absolute, merged) of every block an in-use inode owns, plus the MMP
    block.  Raises Unrecognised when the inodes' metadata does not parse."""
    out = RangeCollector()
    w = _Walker(rd, base, bs, blocks, first_data, out)
    first_ino = u32(sb, 0x54) if u32(sb, 0x4C) >= 1 else 11
    if u32(sb, 0x60) & _INCOMPAT_MMP:
        mmp = int.from_bytes(sb[0x168:0x170], "little")
        if mmp:
            w._add(mmp)
    fifteen = _FIFTEEN.unpack_from
    isz = inode_size
    for g in groups:
        if has_itable_unused and g.flags & _BG_INODE_UNINIT:
            continue
        n = ipg - g.unused if has_itable_unused else ipg
        if n <= 0:
            continue
        if n > ipg:
            raise Unrecognised(f"group {g.group}: {g.unused} unused inodes in a group of {ipg}")
        if g.bitmap < first_data or g.bitmap >= blocks or g.table + -(-n * isz // bs) > blocks:
            raise Unrecognised(f"group {g.group}: inode bitmap or table outside the filesystem")
        ibitmap = rd.read(base + g.bitmap * bs, bs)
        marked = bytearray(n)
        for s, c in bit_runs(ibitmap[:(n + 7) // 8]):
            marked[s:min(n, s + c)] = b"\1" * (min(n, s + c) - s)
        table = rd.read(base + g.table * bs, n * isz)
        ino0 = g.group * ipg + 1
        for i in range(n):
            o = i * isz
            mode = table[o] | table[o + 1] << 8
            ino = ino0 + i
            if not marked[i]:
                # e2fsck's pass 1 judges an inode by itself, not by the bitmap: one with links
                # (or a mode and no deletion time) is in use even when its bit is clear
                links = table[o + 0x1A] | table[o + 0x1B] << 8
                if not links and not (mode and not any(table[o + 0x14:o + 0x18])):
                    continue
            if ino < first_ino:
                if ino != 1 and not mode:
                    continue
            elif not mode:
                continue
            w.ino = ino
            acl = u32(table, o + 0x68)
            if is64:
                acl |= u16(table, o + 0x76) << 32
            if acl:
                w._add(acl)
            fmt = mode & _S_IFMT
            if fmt in _NO_BLOCKS:
                continue
            flags = u32(table, o + 0x20)
            if flags & _INLINE_DATA_FL:
                continue
            if flags & _EXTENTS_FL:
                w.extents(table[o + 0x28:o + 0x64], None)
                continue
            if fmt == _S_IFLNK:
                size = u32(table, o + 0x4) | u32(table, o + 0x6C) << 32
                if size < 60:           # a fast symlink: the target is in i_block
                    continue
            ptrs = fifteen(table, o + 0x28)
            for p in ptrs[:12]:
                if p:
                    w._add(p)
            for level, p in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
                if p:
                    w.indirect(p, level)
    return out.merged(base + blocks * bs)
