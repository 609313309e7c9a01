"""exFAT: the used clusters from the allocation bitmap, cross-checked against the directories.

The main boot region's checksum sector is verified, the volume must not be flagged dirty or as
having had media failures, and the allocation bitmap is found through the root directory.
Then every directory is walked from the root and every file's clusters (a FAT chain, or a
contiguous run for NoFatChain streams) compared with the bitmap: a cluster a file owns that the
bitmap marks free is read as well (counted in ``repaired_blocks`` and logged); a chain that
cannot be followed (out of range, a bad-cluster mark, shared, a loop, shorter than the data)
means the filesystem is read fully.  Boot regions, FATs and everything before the cluster heap
are always read.
"""
from __future__ import annotations

import logging

from diskimg import ranges
from diskimg.disk.used.raw import (
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    bit_runs,
    u16,
    u32,
)

log = logging.getLogger(__name__)

_DIRTY = 0x2
_MEDIA_FAILURE = 0x4
_BAD = 0xFFFFFFF7
_CHUNK = 1 << 20
_MAX_FAT_WALK = 256 << 20


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "little")


def _boot_checksum(region: bytes, bps: int) -> int:
    c = 0
    for i, byte in enumerate(region[:11 * bps]):
        if i in (106, 107, 112):
            continue
        c = (((c << 31) | (c >> 1)) & 0xFFFFFFFF) + byte & 0xFFFFFFFF
    return c


class ExfatFs:
    """One exFAT volume at byte ``base``."""

    kind = "exfat"

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        bs = rd.read(base, 512)
        if bs[3:11] != b"EXFAT   ":
            raise NotThisFilesystem("no exFAT boot sector signature")
        if bs[510:512] != b"\x55\xaa" or any(bs[11:64]):
            raise Unrecognised("exFAT boot sector is malformed")
        self.volume_sectors = _u64(bs, 0x48)
        self.fat_offset, self.fat_length = u32(bs, 0x50), u32(bs, 0x54)
        self.heap_offset, self.clusters = u32(bs, 0x58), u32(bs, 0x5C)
        self.root = u32(bs, 0x60)
        self.flags = u16(bs, 0x6A)
        bps_shift, spc_shift, nfats = bs[0x6C], bs[0x6D], bs[0x6E]
        if not 9 <= bps_shift <= 12 or bps_shift + spc_shift > 25 or nfats not in (1, 2):
            raise Unrecognised("exFAT geometry is invalid")
        self.bps = 1 << bps_shift
        self.cs = self.unit = self.bps << spc_shift
        if nfats != 1:
            raise Unrecognised("exFAT with two FATs (TexFAT)")
        if (self.fat_offset < 24 or self.heap_offset < self.fat_offset + self.fat_length
                or self.fat_length * self.bps < (self.clusters + 2) * 4
                or self.heap_offset * self.bps + self.clusters * self.cs
                > self.volume_sectors * self.bps
                or not 2 <= self.root < self.clusters + 2):
            raise Unrecognised("exFAT geometry is inconsistent")
        self.fs_bytes = self.volume_sectors * self.bps
        if self.fs_bytes > length:
            raise Unrecognised(f"filesystem ({self.fs_bytes} bytes) is larger than its "
                               f"container ({length} bytes): truncated?")
        region = rd.read(base, 12 * self.bps)
        want = _boot_checksum(region, self.bps)
        sums = region[11 * self.bps:12 * self.bps]
        if sums != want.to_bytes(4, "little") * (self.bps // 4):
            raise Unrecognised("exFAT boot region checksum does not match")
        if self.flags & _DIRTY:
            raise Unrecognised("exFAT volume is marked dirty: mounted, or not cleanly removed")
        if self.flags & _MEDIA_FAILURE:
            raise Unrecognised("exFAT volume records media failures")

    @property
    def detail(self) -> str:
        return f"exFAT, {self.clusters} clusters of {self.cs} bytes"

    def _heap(self, cluster: int) -> int:
        return self.base + self.heap_offset * self.bps + (cluster - 2) * self.cs

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        self.repaired_blocks = 0
        fat_bytes = (self.clusters + 2) * 4
        if fat_bytes > _MAX_FAT_WALK:
            raise Unrecognised("exFAT FAT too large to check")
        fat = memoryview(self.rd.read(self.base + self.fat_offset * self.bps, fat_bytes)).cast("I")
        if fat[0] != 0xFFFFFFF8 or fat[1] != 0xFFFFFFFF:
            raise Unrecognised("exFAT FAT does not start with its media and end marks")
        n = self.clusters + 2
        cs = self.cs
        seen = bytearray(n)
        owned: list[int] = []                   # every cluster a file or directory owns

        def clusters_of(first: int, size: int, contiguous: bool, what: str) -> list[int]:
            count = -(-size // cs)
            if first == 0:
                if size:
                    raise Unrecognised(f"exFAT {what}: {size} bytes but no first cluster")
                return []
            if contiguous:
                got = list(range(first, first + count))
                if first < 2 or first + count > n:
                    raise Unrecognised(f"exFAT {what}: clusters outside the volume")
            else:
                got = []
                c = first
                while True:
                    if c < 2 or c >= n:
                        raise Unrecognised(f"exFAT {what}: cluster {c} outside the volume")
                    if len(got) > n:
                        raise Unrecognised(f"exFAT {what}: FAT chain loops")
                    got.append(c)
                    v = fat[c]
                    if v == 0xFFFFFFFF:
                        break
                    if v == _BAD or v >= 0xFFFFFFF8 or v == 0:
                        raise Unrecognised(f"exFAT {what}: FAT chain broken at cluster {c}")
                    c = v
                if size and len(got) < count:
                    raise Unrecognised(f"exFAT {what}: chain of {len(got)} clusters is shorter "
                                       f"than its {size} bytes")
            for c in got:
                if seen[c]:
                    raise Unrecognised(f"exFAT {what}: cluster {c} is shared or loops")
                seen[c] = 1
            owned.extend(got)
            return got

        def read(clusters: list[int]) -> bytes:
            return b"".join(self.rd.read(self._heap(c), cs) for c in clusters)

        root = read(clusters_of(self.root, 0, False, "root directory"))
        bitmap_entry = None
        todo = [(root, "")]
        while todo:
            data, path = todo.pop()
            o = 0
            while o + 32 <= len(data):
                t = data[o]
                if t == 0:
                    break
                if t == 0x81 and not path:
                    if data[o + 1] & 1:
                        raise Unrecognised("exFAT second allocation bitmap (TexFAT)")
                    bitmap_entry = (u32(data, o + 20), _u64(data, o + 24))
                    clusters_of(*bitmap_entry, False, "allocation bitmap")
                elif t == 0x82 and not path:
                    clusters_of(u32(data, o + 20), _u64(data, o + 24), False, "up-case table")
                elif t == 0x85:
                    secondary = data[o + 1]
                    attrs = u16(data, o + 4)
                    if o + 64 > len(data) or data[o + 32] != 0xC0:
                        raise Unrecognised(f"exFAT {path}/: file entry without its stream")
                    st = o + 32
                    flags = data[st + 1]
                    name = f"{path}/entry@{o}"
                    first, size = u32(data, st + 20), _u64(data, st + 24)
                    if flags & 1:
                        got = clusters_of(first, size, bool(flags & 2), name)
                        if attrs & 0x10:
                            todo.append((read(got), name))
                    o += 32 * (1 + secondary)
                    continue
                o += 32
        if bitmap_entry is None:
            raise Unrecognised("exFAT root directory has no allocation bitmap")
        first, size = bitmap_entry
        if size * 8 < self.clusters:
            raise Unrecognised("exFAT allocation bitmap is smaller than the cluster heap")
        # the bitmap's clusters in chain order (the chain was checked above)
        chain, c = [], first
        while True:
            chain.append(c)
            if fat[c] == 0xFFFFFFFF:
                break
            c = fat[c]
        raw = read(chain)[:(self.clusters + 7) // 8]
        if self.clusters % 8:
            raw = raw[:-1] + bytes([raw[-1] & ((1 << (self.clusters % 8)) - 1)])
        base_heap = self._heap(2)
        used = RangeCollector()
        for s, k in bit_runs(raw):
            used.add(base_heap + s * cs, k * cs)
        marked = used.merged(self.base + self.fs_bytes)
        owned.sort()
        own_ranges = ranges.merge([(self._heap(c), cs) for c in owned])
        missing = ranges.subtract(own_ranges, list(marked))
        out.add(self.base, self.heap_offset * self.bps)        # boot regions, FAT, gaps
        for s, k in marked:
            out.add(s, k)
        if missing:
            self.repaired_blocks = ranges.total(missing) // cs
            log.warning("exFAT at byte %d: %d clusters owned by files are marked free in the "
                        "allocation bitmap; they are read as well", self.base,
                        self.repaired_blocks)
            for s, k in missing:
                out.add(s, k)
        heap_end = base_heap + self.clusters * cs
        out.add(heap_end, self.base + self.fs_bytes - heap_end)
        n_used = int.from_bytes(raw, "little").bit_count()
        return self.heap_offset * self.bps + n_used * cs, self.fs_bytes
