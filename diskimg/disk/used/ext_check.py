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

from diskimg import ranges

from diskimg.disk.used.raw import RangeCollector, SourceReader, Unrecognised, u16, u32

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


# The fields of an inode the walk needs: mode, size (low), dtime, links, flags, i_block[15],
# file_acl (low), size (high), file_acl (high).  A whole table is unpacked by one Struct call
# into a flat tuple at C speed; the loop then only indexes into it.
_INODE_FIELDS = "H2xI12xI2xH4xI4x15I4xII6xH"
_INODE_LEN = struct.calcsize("<" + _INODE_FIELDS)     # 0x78
# the first pass unpacks only what the common inode's test needs (mode, links, flags,
# i_block[0], [1], [4], [5], file_acl low and high): 9 values per inode instead of 23; an
# inode that fails the test is unpacked whole (_INODE_FIELDS) on its own
_FAST_FIELDS = "H24xH4xI4xII8xII40xI10xH"
_NQ = 9
assert struct.calcsize("<" + _FAST_FIELDS) == _INODE_LEN
_ONE_EXTENT = 1 << 16 | _EXT_MAGIC          # header word 0: magic, one entry
_FAST_MASK = _EXTENTS_FL | _INLINE_DATA_FL


def owned_blocks(rd: SourceReader, base: int, sb: bytes, *, bs: int, blocks: int,
                 first_data: int, ipg: int, inode_size: int, is64: bool, has_itable_unused: bool,
                 groups: list[GroupInodes]) -> tuple[tuple[int, int], ...]:
    """The byte ranges (absolute, merged) of every block an in-use inode owns, plus the MMP
    block.  Raises Unrecognised when the inodes' metadata does not parse."""
    out = RangeCollector()
    w = _Walker(rd, base, bs, blocks, first_data, out)
    if u32(sb, 0x60) & _INCOMPAT_MMP:
        mmp = int.from_bytes(sb[0x168:0x170], "little")
        if mmp:
            w._add(mmp)
    isz = inode_size
    pad = f"{isz - _INODE_LEN}x"
    whole = struct.Struct("<" + _INODE_FIELDS)     # one inode, every field the walk reads
    structs: dict[int, struct.Struct] = {}
    # Extents in i_block (a tree of depth 0: nearly every inode) are gathered as block
    # numbers, checked and merged once at the end; everything else goes through _Walker.
    found: list[tuple[int, int]] = []
    add = found.append
    nq = _NQ
    # every inode bitmap and table read below, asked for at once: the kernel reads them in
    # parallel while the loop unpacks the first (on the benchmark disk, 0.09 s of one-by-one
    # reads with a cold cache)
    rd.will_need([span for g in groups
                  if not (has_itable_unused and g.flags & _BG_INODE_UNINIT)
                  for span in ((base + g.bitmap * bs, bs),
                               (base + g.table * bs,
                                (ipg - g.unused if has_itable_unused else ipg) * isz))])
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
        table = rd.read(base + g.table * bs, n * isz)
        st = structs.get(n)
        if st is None:
            st = structs[n] = struct.Struct("<" + (_FAST_FIELDS + pad) * n)
        quick = st.unpack(table)
        first = g.group * ipg + 1              # inode number of slot 0
        for i, mode, lk, fl, h0, h1, x, lo, acl, acl_hi in zip(
                range(n), quick[0::nq], quick[1::nq], quick[2::nq], quick[3::nq],
                quick[4::nq], quick[5::nq], quick[6::nq], quick[7::nq], quick[8::nq]):
            # the common inode first: linked, one extent in i_block, no xattr block
            if (h0 == _ONE_EXTENT and lk and fl & _FAST_MASK == _EXTENTS_FL and not acl
                    and not h1 >> 16 and not acl_hi and mode & _S_IFMT not in _NO_BLOCKS):
                length = x & 0xFFFF
                if length > 32768:
                    length -= 32768
                if length:
                    add(((x >> 16) << 32 | lo, length))
                continue
            if not mode and first + i != 1:
                continue                        # free (the bad-blocks inode 1 has no mode)
            flat = whole.unpack_from(table, i * isz)
            if not mode and not any(flat[5:20]):
                continue
            if not lk and flat[2] and not ibitmap[i >> 3] >> (i & 7) & 1:
                # deleted; but e2fsck's pass 1 judges an inode by itself: one with links (or
                # a mode and no deletion time) is in use even when its bitmap bit is clear
                continue
            acl |= flat[22] << 32 if is64 else 0
            if acl:
                w.ino = first + i
                w._add(acl)
            fl = flat[4]
            fmt = mode & _S_IFMT
            if fmt in _NO_BLOCKS or fl & _INLINE_DATA_FL:
                continue
            w.ino = first + i
            ib = flat[5:20]
            if fl & _EXTENTS_FL:
                w.extents(struct.pack("<15I", *ib), None)
                continue
            if fmt == _S_IFLNK and (flat[1] | flat[21] << 32) < 60:
                continue                # a fast symlink: the target is in i_block
            for p in ib[:12]:
                if p:
                    add((p, 1))
            for level, p in ((1, ib[12]), (2, ib[13]), (3, ib[14])):
                if p:
                    w.indirect(p, level)
    merged: list[tuple[int, int]] = []
    if found:
        found.sort()
        cur_s, cur_e = found[0][0], found[0][0] + found[0][1]
        if cur_s < first_data:
            raise Unrecognised(f"an inode owns block {cur_s}, outside the filesystem; the "
                               "filesystem needs fsck")
        for s, k in found:
            if s > cur_e:
                merged.append((base + cur_s * bs, (cur_e - cur_s) * bs))
                cur_s, cur_e = s, s + k
            elif s + k > cur_e:
                cur_e = s + k
        if cur_e > blocks:
            raise Unrecognised(f"an inode owns blocks up to {cur_e - 1}, outside the "
                               f"filesystem ({blocks} blocks); the filesystem needs fsck")
        merged.append((base + cur_s * bs, (cur_e - cur_s) * bs))
    walked = out.merged(base + blocks * bs)
    if not walked:
        return tuple(merged)
    return tuple(ranges.merge([*merged, *walked]))
