"""xfs: the used blocks are everything but the free extents of the AG free-space B+trees.

Every allocation group's free space is read from its AGF and both of its free-space B+trees:
the one by block number (bnobt) gives the free extents, the one by size (cntbt) must list
exactly the same extents, and their sum and longest must be what the AGF says; the AGFs must
add up to the superblock's free count.  Whatever is not a free extent is read: AG headers,
inode chunks, every B+tree, the free list, the internal log and all file data.  v5 (CRC)
filesystems have the CRC of the superblock, every AGF and every B+tree block checked, and each
block's recorded address and owner.

An xfs filesystem whose log was not cleanly unmounted has allocations in its log that the
B+trees on disk do not show yet, so the log is checked: its head is found from the cycle
numbers stamped in every 512-byte log block, and the last record before the head must be an
unmount record.  Anything else (a dirty or unreadable log, an external log, a realtime
subvolume, needsrepair, an unknown incompatible feature, any disagreement) raises Unrecognised
and the caller reads the filesystem fully, with the reason logged.
"""
from __future__ import annotations

import logging
import struct
import sys
from array import array

from diskimg.disk.used.raw import (
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    crc32c_raw,
)

log = logging.getLogger(__name__)

_SB = struct.Struct(">4sIQQQ")
_LOG_MAGIC = 0xFEEDBABE
_UNMOUNT_TRANS = 0x20
_XFS_LOG_CLIENT = 0xAA
_INCOMPAT_NEEDSREPAIR = 0x10
_INCOMPAT_OK = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
_MAGIC_BYTES = _LOG_MAGIC.to_bytes(4, "big")
# Log writes in flight at once (8 in-core logs of up to 256 KiB): holes can be only this close
# to the head
_LOG_WINDOW = 2 << 20


def _be16(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 2], "big")


def _be32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 4], "big")


def _be64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "big")


def _crc_ok(block: bytes, off: int) -> bool:
    """xfs's CRC: crc32c of the block with its CRC field zeroed, inverted, stored
    little-endian."""
    want = int.from_bytes(block[off:off + 4], "little")
    got = crc32c_raw(block[:off] + b"\0\0\0\0" + block[off + 4:]) ^ 0xFFFFFFFF
    return want == got


class XfsFs:
    """One xfs filesystem at byte ``base``."""

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        head = rd.read(base, 512)
        if head[:4] != b"XFSB":
            raise NotThisFilesystem("no xfs superblock magic")
        self.bs = bs = _be32(head, 4)
        self.unit = bs
        self.dblocks = _be64(head, 8)
        rblocks = _be64(head, 0x10)
        self.logstart = _be64(head, 0x30)
        self.agblocks = _be32(head, 0x54)
        self.agcount = _be32(head, 0x58)
        self.logblocks = _be32(head, 0x60)
        version = _be16(head, 0x64)
        self.sectsize = _be16(head, 0x66)
        self.agblklog = head[0x7C]
        inprogress = head[0x7E]
        self.fdblocks = _be64(head, 0x90)
        self.v5 = version & 0xF == 5
        if version & 0xF not in (4, 5):
            raise Unrecognised(f"xfs version {version & 0xF} is unknown")
        if (bs < 512 or bs > 65536 or bs & (bs - 1) or self.sectsize < 512
                or self.sectsize > bs or self.sectsize & (self.sectsize - 1)
                or self.agblocks == 0 or self.agcount == 0
                or self.agblocks > 1 << self.agblklog or self.agblklog > 31
                or not (self.agcount - 1) * self.agblocks < self.dblocks
                <= self.agcount * self.agblocks):
            raise Unrecognised("xfs superblock geometry is inconsistent")
        if inprogress:
            raise Unrecognised("xfs mkfs did not finish (sb_inprogress)")
        if rblocks:
            raise Unrecognised("xfs with a realtime subvolume")
        if self.logstart == 0:
            raise Unrecognised("xfs with an external log: cannot tell whether it is clean")
        if self.dblocks * bs > length:
            raise Unrecognised(f"filesystem ({self.dblocks * bs} bytes) is larger than its "
                               f"container ({length} bytes): truncated?")
        if self.v5:
            sb = rd.read(base, self.sectsize)
            if not _crc_ok(sb, 0xE0):
                raise Unrecognised("xfs superblock CRC does not match")
            incompat = _be32(sb, 0xD8)
            if incompat & _INCOMPAT_NEEDSREPAIR:
                raise Unrecognised("xfs is flagged needsrepair: run xfs_repair first")
            if incompat & ~_INCOMPAT_OK:
                raise Unrecognised(f"unsupported xfs incompatible features "
                                   f"{incompat & ~_INCOMPAT_OK:#x}")
            self.uuid = sb[0x20:0x30]
            self.meta_uuid = sb[0xF8:0x108] if incompat & 0x4 else self.uuid

    kind = "xfs"

    @property
    def detail(self) -> str:
        return (f"xfs v{5 if self.v5 else 4}, {self.agcount} allocation groups, "
                f"{self.bs}-byte blocks")

    def _byte(self, agno: int, agbno: int) -> int:
        return self.base + (agno * self.agblocks + agbno) * self.bs

    # ----------------------------------------------------------------------------------------
    # the log

    def _check_log(self) -> None:
        """The last record before the log's head must be an unmount record.

        The head is found as xfs finds it: every 512-byte log block starts with the cycle
        number it was written in (a record header with its magic, the cycle next), block 0 is
        the first written in each cycle, so a binary search finds where the newest cycle
        ends.  Out-of-order log writes can leave holes only within the last few in-flight
        records, so the window of _LOG_WINDOW bytes before the head must all be of the newest
        cycle and the window after it of none as new: anything else is a dirty log."""
        mask = (1 << self.agblklog) - 1
        agno, agbno = self.logstart >> self.agblklog, self.logstart & mask
        if agno >= self.agcount or agbno + self.logblocks > self.agblocks:
            raise Unrecognised("xfs log lies outside the filesystem")
        start = self._byte(agno, agbno)
        n = self.logblocks * self.bs // 512

        def cycle(b: int) -> int:
            w = self.rd.read(start + b * 512, 8)
            return _be32(w, 4) if w[:4] == _MAGIC_BYTES else _be32(w, 0)

        def cycles(first: int, count: int) -> tuple[list[int], list[int]]:
            """Cycles of blocks [first, first + count) and which of them are headers."""
            data = self.rd.read(start + first * 512, count * 512)
            words = array("I", memoryview(data).cast("I")[::128].tobytes())
            nxt = array("I", memoryview(data[4:] + b"\0\0\0\0").cast("I")[::128].tobytes())
            if sys.byteorder == "little":
                words.byteswap()
                nxt.byteswap()
            hdrs = [first + i for i, w in enumerate(words) if w == _LOG_MAGIC]
            return [nxt[i] if w == _LOG_MAGIC else w for i, w in enumerate(words)], hdrs

        newest = cycle(0)
        if cycle(n - 1) == newest:
            raise Unrecognised("xfs log is all of one cycle: its head cannot be told")
        lo, hi = 0, n - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cycle(mid) == newest:
                lo = mid
            else:
                hi = mid
        head = hi
        win = min(_LOG_WINDOW // 512, n)
        before, hdrs = cycles(max(0, head - win), head - max(0, head - win))
        after, _ = cycles(head, min(win, n - head))
        if any(c != newest for c in before) or any(c >= newest for c in after):
            raise Unrecognised("xfs log cycle numbers are out of order around its head: a "
                               "dirty log")
        if not hdrs:
            raise Unrecognised("xfs log has no record header before its head")
        b = hdrs[-1]
        rec = self.rd.read(start + b * 512, 512)
        h_len, logops, h_size = _be32(rec, 12), _be32(rec, 40), _be32(rec, 320)
        hdr_bbs = max(1, -(-h_size // 32768)) if _be32(rec, 8) & 2 else 1
        if b + hdr_bbs + -(-h_len // 512) > head:
            raise Unrecognised("xfs log ends in a torn record: not cleanly unmounted")
        data = self.rd.read(start + (b + hdr_bbs) * 512, 512)
        if logops != 1 or data[8] != _XFS_LOG_CLIENT or not data[9] & _UNMOUNT_TRANS:
            raise Unrecognised("xfs log was not cleanly unmounted (its last record is no "
                               "unmount record): mounted, or needs log recovery")

    # ----------------------------------------------------------------------------------------
    # free-space B+trees

    def _btree(self, agno: int, root: int, levels: int, magic: bytes, what: str) -> list:
        hdr = 56 if self.v5 else 16
        bs = self.bs
        maxleaf = (bs - hdr) // 8
        maxnode = (bs - hdr) // 12
        recs: list[tuple[int, int]] = []
        todo = [(root, levels - 1)]
        seen = 0
        while todo:
            agbno, level = todo.pop()
            seen += 1
            if seen > self.agblocks:
                raise Unrecognised(f"AG {agno} {what}: B+tree loops")
            if agbno == 0 or agbno >= self.agblocks:
                raise Unrecognised(f"AG {agno} {what}: block {agbno} outside the AG")
            block = self.rd.read(self._byte(agno, agbno), bs)
            if block[:4] != magic or _be16(block, 4) != level:
                raise Unrecognised(f"AG {agno} {what}: block {agbno} is not a level-{level} "
                                   f"node of the tree")
            nrecs = _be16(block, 6)
            if self.v5:
                if not _crc_ok(block, 52):
                    raise Unrecognised(f"AG {agno} {what}: block {agbno} CRC does not match")
                daddr = (agno * self.agblocks + agbno) * bs // 512
                if (_be64(block, 16) != daddr or block[32:48] != self.meta_uuid
                        or _be32(block, 48) != agno):
                    raise Unrecognised(f"AG {agno} {what}: block {agbno} belongs elsewhere")
            if level == 0:
                if nrecs > maxleaf:
                    raise Unrecognised(f"AG {agno} {what}: {nrecs} records in a leaf")
                recs += struct.iter_unpack(">II", block[hdr:hdr + 8 * nrecs])
            else:
                if nrecs > maxnode:
                    raise Unrecognised(f"AG {agno} {what}: {nrecs} keys in a node")
                ptrs = struct.unpack_from(f">{nrecs}I", block, hdr + 8 * maxnode)
                todo += [(p, level - 1) for p in reversed(ptrs)]
        return recs

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        self.repaired_blocks = 0
        self._check_log()
        bs = self.bs
        fd_sum = 0
        free_total = 0
        ag_free: list[list[tuple[int, int]]] = []
        for agno in range(self.agcount):
            agf = self.rd.read(self._byte(agno, 0) + self.sectsize, self.sectsize)
            if agf[:4] != b"XAGF" or _be32(agf, 8) != agno:
                raise Unrecognised(f"AG {agno}: no AGF")
            if self.v5 and not _crc_ok(agf, 0xD8):
                raise Unrecognised(f"AG {agno}: AGF CRC does not match")
            length = _be32(agf, 0x0C)
            want_len = min(self.agblocks, self.dblocks - agno * self.agblocks)
            if length != want_len:
                raise Unrecognised(f"AG {agno}: AGF length {length} should be {want_len}")
            bno_root, cnt_root = _be32(agf, 0x10), _be32(agf, 0x14)
            bno_lvl, cnt_lvl = _be32(agf, 0x1C), _be32(agf, 0x20)
            flcount, freeblks, longest = _be32(agf, 0x30), _be32(agf, 0x34), _be32(agf, 0x38)
            btreeblks = _be32(agf, 0x3C)
            if not (1 <= bno_lvl <= 10 and 1 <= cnt_lvl <= 10):
                raise Unrecognised(f"AG {agno}: free-space B+tree levels are invalid")
            v = b"AB3B" if self.v5 else b"ABTB"
            c = b"AB3C" if self.v5 else b"ABTC"
            by_bno = self._btree(agno, bno_root, bno_lvl, v, "bnobt")
            by_cnt = self._btree(agno, cnt_root, cnt_lvl, c, "cntbt")
            pos = 0
            for s, n in by_bno:
                if n == 0 or s < pos or s + n > length:
                    raise Unrecognised(f"AG {agno}: free extent {s}+{n} overlaps or lies "
                                       "outside the AG")
                pos = s + n
            if sorted(by_cnt) != by_bno:
                raise Unrecognised(f"AG {agno}: the free-space trees by block and by size "
                                   "disagree")
            total = sum(n for _, n in by_bno)
            if total != freeblks or (by_bno and max(n for _, n in by_bno) != longest):
                raise Unrecognised(f"AG {agno}: free-space tree holds {total} blocks, the AGF "
                                   f"says {freeblks}")
            fd_sum += freeblks + flcount + btreeblks
            free_total += total
            ag_free.append(by_bno)
        if fd_sum != self.fdblocks:
            raise Unrecognised(f"xfs superblock says {self.fdblocks} free blocks, the AGFs add "
                               f"up to {fd_sum}")
        for agno, free in enumerate(ag_free):
            pos = 0
            length = min(self.agblocks, self.dblocks - agno * self.agblocks)
            for s, n in free:
                if s > pos:
                    out.add(self._byte(agno, pos), (s - pos) * bs)
                pos = s + n
            if pos < length:
                out.add(self._byte(agno, pos), (length - pos) * bs)
        return (self.dblocks - free_total) * bs, self.dblocks * bs
