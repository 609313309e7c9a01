"""btrfs (one device): the used bytes from the extent tree, mapped through the chunk tree.

The superblock's system chunk array bootstraps the logical-to-physical map, the chunk tree
completes it, the root tree gives the extent tree, and every EXTENT_ITEM (data) and
METADATA_ITEM (a tree block) becomes a used range on each of its chunk's stripes (SINGLE and
DUP profiles; a single device has no other).  Their total must equal the superblock's
``bytes_used``, every tree block read must carry its own address and the filesystem's fsid,
and crc32c checksums (superblock and tree blocks) are checked.  Always read: the first MiB
(boot loaders), every superblock copy within the device (64 KiB, 64 MiB, 256 GiB), and the
whole of every SYSTEM chunk.

Refused, and so read fully: more than one device, a pending log tree (fsynced data that only a
log replay would account for), another checksum type, unknown incompatible features, any
disagreement.  btrfs copies on write, so a filesystem not cleanly unmounted is still
consistent as of its last commit, which is what the superblock points to.
"""
from __future__ import annotations

import logging
import struct

from diskimg import ranges
from diskimg.disk.used.raw import (
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    crc32c_raw,
    u32,
)

log = logging.getLogger(__name__)

_MAGIC = b"_BHRfS_M"
_SUPERS = (0x10000, 0x4000000, 0x4000000000)
_CHUNK_ITEM = 228
_ROOT_ITEM = 132
_EXTENT_ITEM = 168
_METADATA_ITEM = 169
_EXTENT_TREE = 2
_SYSTEM = 0x2
_PROFILES_OK = 0x0 | (1 << 5)               # single, DUP
_PROFILE_MASK = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) \
    | (1 << 10)
# mixed backref, default subvol, mixed groups, lzo, zstd, big metadata, extended iref,
# skinny metadata, no holes, metadata uuid, raid1c34; refused: raid56, zoned, extent tree v2,
# raid stripe tree, simple quotas (each changes where or how extents are accounted)
_INCOMPAT_OK = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x800
_HDR = 101
_KEY = struct.Struct("<QBQ")


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "little")


def _csum_ok(block: bytes) -> bool:
    return u32(block, 0) == crc32c_raw(block[32:]) ^ 0xFFFFFFFF


class BtrfsFs:
    """One single-device btrfs filesystem at byte ``base``."""

    kind = "btrfs"

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        self.length = length
        if length < 0x10000 + 4096:
            raise NotThisFilesystem("too small for btrfs")
        sb = rd.read(base + 0x10000, 4096)
        if sb[0x40:0x48] != _MAGIC:
            raise NotThisFilesystem("no btrfs superblock magic")
        self.csum_type = int.from_bytes(sb[0xC4:0xC6], "little")
        if self.csum_type != 0:
            raise Unrecognised(f"btrfs checksum type {self.csum_type} (only crc32c is checked)")
        if not _csum_ok(sb):
            raise Unrecognised("btrfs superblock checksum does not match")
        if _u64(sb, 0x30) != 0x10000:
            raise Unrecognised("btrfs superblock is not at its own address")
        self.sb = sb
        self.fsid = sb[0x20:0x30]
        incompat = _u64(sb, 0xBC)
        self.metadata_uuid = sb[0x23B:0x24B] if incompat & 0x400 else self.fsid
        if incompat & ~_INCOMPAT_OK:
            raise Unrecognised(f"unsupported btrfs incompatible features "
                               f"{incompat & ~_INCOMPAT_OK:#x}")
        if _u64(sb, 0x88) != 1:
            raise Unrecognised(f"btrfs with {_u64(sb, 0x88)} devices: only one device is "
                               "analysed")
        if _u64(sb, 0x60):
            raise Unrecognised("btrfs has a log tree to replay (fsynced data not yet "
                               "committed): not cleanly unmounted")
        self.devid = _u64(sb, 0xC9)
        self.dev_bytes = _u64(sb, 0xC9 + 8)
        self.nodesize = u32(sb, 0x94)
        self.sectorsize = self.unit = u32(sb, 0x90)
        if (self.nodesize < 4096 or self.nodesize > 65536 or self.nodesize & (self.nodesize - 1)
                or self.sectorsize < 4096 or self.sectorsize & (self.sectorsize - 1)):
            raise Unrecognised("btrfs geometry is invalid")
        if self.dev_bytes > length:
            raise Unrecognised(f"filesystem ({self.dev_bytes} bytes) is larger than its "
                               f"container ({length} bytes): truncated?")
        self.chunks: list[tuple[int, int, int, list[int]]] = []   # logical, length, type, phys

    @property
    def detail(self) -> str:
        return f"btrfs, {self.nodesize}-byte nodes, {self.sectorsize}-byte sectors"

    # ----------------------------------------------------------------------------------------
    # chunks

    def _add_chunk(self, logical: int, data: bytes, o: int) -> int:
        length, stype = _u64(data, o), _u64(data, o + 24)
        nstripes = int.from_bytes(data[o + 44:o + 46], "little")
        if stype & _PROFILE_MASK & ~_PROFILES_OK:
            raise Unrecognised(f"btrfs chunk at {logical} has a multi-device profile")
        if nstripes == 0 or o + 48 + 32 * nstripes > len(data):
            raise Unrecognised(f"btrfs chunk at {logical} is damaged")
        phys = []
        for k in range(nstripes):
            s = o + 48 + 32 * k
            devid, off = _u64(data, s), _u64(data, s + 8)
            if devid != self.devid:
                raise Unrecognised(f"btrfs chunk at {logical} lies on another device {devid}")
            if off + length > self.dev_bytes:
                raise Unrecognised(f"btrfs chunk at {logical} lies beyond the device")
            phys.append(off)
        if not any(c[0] == logical for c in self.chunks):
            self.chunks.append((logical, length, stype, phys))
            self.chunks.sort()
        return 48 + 32 * nstripes

    def _map(self, logical: int, length: int) -> list[int]:
        """Physical byte offsets (one per stripe) of ``[logical, logical + length)``."""
        lo, hi = 0, len(self.chunks)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.chunks[mid][0] <= logical:
                lo = mid + 1
            else:
                hi = mid
        if lo:
            start, clen, _, phys = self.chunks[lo - 1]
            if logical + length <= start + clen:
                return [p + logical - start for p in phys]
        raise Unrecognised(f"btrfs logical range {logical}+{length} is in no chunk")

    # ----------------------------------------------------------------------------------------
    # trees

    def _node(self, logical: int, level: int | None) -> bytes:
        phys = self._map(logical, self.nodesize)[0]
        block = self.rd.read(self.base + phys, self.nodesize)
        if not _csum_ok(block):
            raise Unrecognised(f"btrfs tree block {logical}: checksum does not match")
        if block[0x20:0x30] != self.metadata_uuid or _u64(block, 0x30) != logical:
            raise Unrecognised(f"btrfs tree block {logical} belongs elsewhere")
        if level is not None and block[0x64] != level:
            raise Unrecognised(f"btrfs tree block {logical}: level {block[0x64]}, expected "
                               f"{level}")
        return block

    def _leaves(self, root: int, level: int):
        """Every leaf of the tree at ``root``, left to right."""
        todo = [(root, level)]
        seen = 0
        while todo:
            logical, lvl = todo.pop()
            seen += 1
            if seen > self.dev_bytes // self.nodesize:
                raise Unrecognised("btrfs tree loops")
            block = self._node(logical, lvl)
            n = u32(block, 0x60)
            if lvl == 0:
                if _HDR + 25 * n > len(block):
                    raise Unrecognised(f"btrfs leaf {logical}: {n} items do not fit")
                yield block, n
                continue
            if _HDR + 33 * n > len(block):
                raise Unrecognised(f"btrfs node {logical}: {n} pointers do not fit")
            ptrs = [_u64(block, _HDR + 33 * i + 17) for i in range(n)]
            todo += [(p, lvl - 1) for p in reversed(ptrs)]

    @staticmethod
    def _items(leaf: bytes, n: int):
        for i in range(n):
            o = _HDR + 25 * i
            objectid, typ, offset = _KEY.unpack_from(leaf, o)
            doff, dsize = u32(leaf, o + 17), u32(leaf, o + 21)
            if _HDR + doff + dsize > len(leaf):
                raise Unrecognised("btrfs leaf item lies outside its block")
            yield objectid, typ, offset, _HDR + doff, dsize

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        self.repaired_blocks = 0
        sb, base = self.sb, self.base
        # bootstrap: the system chunk array
        size = u32(sb, 0xA0)
        arr = sb[0x32B:0x32B + size]
        if size > 2048:
            raise Unrecognised("btrfs system chunk array is too large")
        o = 0
        while o < size:
            _, typ, logical = _KEY.unpack_from(arr, o)
            if typ != _CHUNK_ITEM:
                raise Unrecognised("btrfs system chunk array holds something else")
            o += 17 + self._add_chunk(logical, arr, o + 17)
        for leaf, n in self._leaves(_u64(sb, 0x58), sb[0xC7]):
            for _, typ, offset, doff, dsize in self._items(leaf, n):
                if typ == _CHUNK_ITEM:
                    self._add_chunk(offset, leaf[:doff + dsize], doff)
        extent_root = None
        for leaf, n in self._leaves(_u64(sb, 0x50), sb[0xC6]):
            for objectid, typ, _, doff, dsize in self._items(leaf, n):
                if objectid == _EXTENT_TREE and typ == _ROOT_ITEM:
                    if dsize < 239:
                        raise Unrecognised("btrfs extent tree root item is too short")
                    extent_root = (_u64(leaf, doff + 176), leaf[doff + 238])
        if extent_root is None:
            raise Unrecognised("btrfs root tree has no extent tree")
        used = RangeCollector()
        total = 0
        last_end = 0
        for leaf, n in self._leaves(*extent_root):
            for objectid, typ, offset, _, _ in self._items(leaf, n):
                if typ == _EXTENT_ITEM:
                    length = offset
                    total += length
                elif typ == _METADATA_ITEM:
                    length = self.nodesize
                    total += length
                else:
                    continue
                if objectid < last_end:
                    raise Unrecognised(f"btrfs extents overlap at {objectid}")
                last_end = objectid + length
                for p in self._map(objectid, length):
                    used.add(base + p, length)
        if total != _u64(sb, 0x78):
            raise Unrecognised(f"btrfs extent tree holds {total} bytes, the superblock says "
                               f"{_u64(sb, 0x78)}")
        for s, n in used.merged(base + self.dev_bytes):
            out.add(s, n)
        out.add(base, 1 << 20)
        for at in _SUPERS:
            if at + 4096 <= self.dev_bytes:
                out.add(base + at, 4096)
        for _, clen, stype, phys in self.chunks:
            if stype & _SYSTEM:
                for p in phys:
                    out.add(base + p, clen)
        return ranges.total(used.merged(base + self.dev_bytes)), self.dev_bytes
