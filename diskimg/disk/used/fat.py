"""FAT12/16/32: reserved sectors, FATs and the root directory are used, then every cluster
whose FAT entry is not zero.  The FAT copies are compared and FSInfo's free count checked; on any
doubt it raises Unrecognised and the caller reads the filesystem fully.

Cross-check (the FAT can lie as a block bitmap can): every directory is walked from the root
and every file's and directory's cluster chain followed through the FAT.  A cluster a chain
reaches but the FAT marks free (a zeroed entry at the end of a chain, a file whose first
cluster's entry was cleared) is read as well, counted in ``repaired_blocks`` and logged.  A
chain that cannot be followed (a free entry before the file's size is reached, a bad-cluster
mark, a pointer out of range, two chains sharing a cluster, a loop) is damage no union can
repair: the filesystem is read fully.
"""
from __future__ import annotations

import logging
from array import array

from diskimg.disk.used.raw import (
    NONZERO_RUNS,
    NotThisFilesystem,
    RangeCollector,
    SourceReader,
    Unrecognised,
    u16,
    u32,
)

log = logging.getLogger(__name__)

_FAT_CHUNK = 1 << 20   # a multiple of 2, 3 and 4 bytes (FAT12 is read whole anyway)
# The directory walk holds one FAT copy in memory, as an array: up to this size (a 2 TiB FAT32
# of 32 KiB clusters has a 256 MiB FAT); beyond it the walk is skipped and said so.
_WALK_MAX_FAT = 256 << 20
_ATTR_DIR = 0x10
_ATTR_VOLUME = 0x08
_ATTR_LFN = 0x0F


class FatFs:
    """One FAT12/16/32 filesystem at byte ``base``."""

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        bs = rd.read(base, 512)
        if bs[3:11] in (b"EXFAT   ", b"NTFS    "):
            raise NotThisFilesystem(f"{bs[3:7].decode().lower()} is not FAT")
        if bs[510:512] != b"\x55\xaa" or bs[0] not in (0xEB, 0xE9):
            raise NotThisFilesystem("no FAT boot sector")
        self.bps = bps = u16(bs, 0x0B)
        self.spc = spc = bs[0x0D]
        self.reserved = u16(bs, 0x0E)
        self.nfats = bs[0x10]
        root_entries = u16(bs, 0x11)
        total = u16(bs, 0x13) or u32(bs, 0x20)
        self.media = bs[0x15]
        fatsz = u16(bs, 0x16) or u32(bs, 0x24)
        if (bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1)
                or self.reserved == 0 or self.nfats not in (1, 2, 3, 4) or fatsz == 0
                or not (self.media == 0xF0 or self.media >= 0xF8) or total == 0):
            raise Unrecognised("BIOS parameter block is not FAT")
        root_sectors = -(-(root_entries * 32) // bps)
        self.data_start = self.reserved + self.nfats * fatsz + root_sectors   # sectors
        if self.data_start >= total:
            raise Unrecognised("FAT metadata is larger than the filesystem")
        self.clusters = (total - self.data_start) // spc
        # As Linux and dosfstools decide (not by the cluster count alone, as Microsoft's spec
        # does): FAT32 has no 16-bit FAT size; otherwise FAT12 up to 4084 clusters.
        if u16(bs, 0x16) == 0:
            self.bits = 32
            if root_entries:
                raise Unrecognised("FAT32 boot sector with a fixed root directory")
        else:
            self.bits = 12 if self.clusters < 4085 else 16
            if not root_entries:
                raise Unrecognised("FAT12/16 boot sector without a root directory")
        if fatsz * bps * 8 // self.bits < self.clusters + 2:
            raise Unrecognised("the FAT is too small for the cluster count")
        if total * bps > length:
            raise Unrecognised(f"filesystem ({total * bps} bytes) is larger than its container "
                               f"({length} bytes): truncated?")
        self.fatsz = fatsz
        self.total = total
        self.fat_offsets = [base + (self.reserved + i * fatsz) * bps for i in range(self.nfats)]
        dirty_off = 0x41 if self.bits == 32 else 0x25
        if bs[dirty_off] & 1:
            raise Unrecognised("the dirty flag is set: mounted or not cleanly unmounted")
        self.mirrored = True
        if self.bits == 32:
            ext_flags = u16(bs, 0x28)
            if ext_flags & 0x80:
                active = ext_flags & 0x0F
                if active >= self.nfats:
                    raise Unrecognised(f"active FAT {active} does not exist")
                self.fat_offsets = [self.fat_offsets[active]]
                self.mirrored = False
            self.fsinfo = u16(bs, 0x30)
        self.boot = bs

    kind = "vfat"

    @property
    def detail(self) -> str:
        return f"FAT{self.bits}, {self.clusters} clusters of {self.spc * self.bps} bytes"

    def _check_head(self, fat: bytes) -> None:
        if fat[0] != self.media:
            raise Unrecognised(f"FAT[0] {fat[0]:#x} does not match the media byte "
                               f"{self.media:#x}")
        if self.bits == 16 and not u16(fat, 2) & 0x8000:
            raise Unrecognised("FAT[1] clean-shutdown bit is clear: not cleanly unmounted")
        if self.bits == 32 and not u32(fat, 4) & 0x08000000:
            raise Unrecognised("FAT[1] clean-shutdown bit is clear: not cleanly unmounted")

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

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        base, bps = self.base, self.bps
        self.unit = self.spc * bps
        self.repaired_blocks = 0
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
                raise Unrecognised(f"the FAT copies differ (within FAT bytes {pos}-{pos + n})")
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
                for m in NONZERO_RUNS.finditer(view):
                    s, e = m.span()
                    out.add(data_off + (cl0 + s) * csize, (e - s) * csize)
            pos += n
        if self.bits == 32:
            self._check_fsinfo(used_clusters)
        if check:
            if need > _WALK_MAX_FAT:
                log.info("FAT at byte %d: FAT of %d bytes, larger than the directory walk's "
                         "limit; the FAT is trusted as it is", base, need)
            else:
                missing = self._reachable_but_free(self.rd.read(self.fat_offsets[0], need))
                for c in missing:
                    out.add(data_off + (c - 2) * csize, csize)
                if missing:
                    self.repaired_blocks = len(missing)
                    log.warning("FAT at byte %d: %d clusters reachable from directories are "
                                "marked free in the FAT (first %d); they are read as well",
                                base, len(missing), missing[0])
        # Sectors after the last whole cluster and after the filesystem are kept.
        data_end = data_off + self.clusters * csize
        out.add(data_end, base + self.total * bps - data_end)
        return self.data_start * bps + used_clusters * csize, self.total * bps

    def _entries(self, fat: bytes) -> list[int] | array:
        n = self.clusters + 2
        if self.bits == 16:
            return array("H", fat[:2 * n])
        if self.bits == 32:
            return array("I", fat[:4 * n])      # the top 4 bits are masked where read
        out = []
        for i in range(n):
            v = int.from_bytes(fat[i * 3 // 2:i * 3 // 2 + 2], "little")
            out.append(v >> 4 if i & 1 else v & 0xFFF)
        return out

    def _reachable_but_free(self, fat: bytes) -> list[int]:
        """Clusters that a directory's chains reach but the FAT marks free (sorted)."""
        entries = self._entries(fat)
        n = self.clusters + 2
        bad = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}[self.bits]
        csize = self.spc * self.bps
        seen = bytearray(n)
        missing: list[int] = []

        def chain(start: int, size: int | None, what: str) -> list[int]:
            """The clusters of one chain; ``size`` for a file (None: a directory)."""
            got: list[int] = []
            c = start
            while True:
                if c < 2 or c >= n:
                    raise Unrecognised(f"{what}: cluster {c} is outside the filesystem")
                if seen[c]:
                    raise Unrecognised(f"{what}: cluster {c} is shared with another chain "
                                       "or loops")
                seen[c] = 1
                got.append(c)
                v = entries[c] & 0x0FFFFFFF
                if v == 0:
                    missing.append(c)
                    break
                if v == bad:
                    raise Unrecognised(f"{what}: chain runs into bad cluster {c}")
                if v > bad:
                    break
                c = v
            if size is not None and len(got) * csize < size:
                raise Unrecognised(f"{what}: chain of {len(got)} clusters is shorter than its "
                                   f"size {size}")
            return got

        def entries_of(data: bytes, path: str) -> list[tuple[int, bool, int, str]]:
            found = []
            for o in range(0, len(data) - 31, 32):
                first = data[o]
                if first == 0:
                    break
                attr = data[o + 11]
                if first == 0xE5 or attr & _ATTR_LFN == _ATTR_LFN or attr & _ATTR_VOLUME:
                    continue
                name = data[o:o + 11]
                if name in (b".          ", b"..         "):
                    continue
                start = u16(data, o + 0x1A) | (u16(data, o + 0x14) << 16 if self.bits == 32
                                                else 0)
                size = u32(data, o + 0x1C)
                label = f"{path}/{name[:8].decode('latin-1').rstrip()}"
                if start:
                    found.append((start, bool(attr & _ATTR_DIR), size, label))
                elif size and not attr & _ATTR_DIR:
                    raise Unrecognised(f"{label}: {size} bytes but no first cluster")
            return found

        def read_chain(clusters: list[int]) -> bytes:
            data_off = self.base + self.data_start * self.bps
            return b"".join(self.rd.read(data_off + (c - 2) * csize, csize) for c in clusters)

        if self.bits == 32:
            root_cl = u32(self.boot, 0x2C)
            todo = [(read_chain(chain(root_cl, None, "root directory")), "")]
        else:
            root_off = self.base + (self.reserved + self.nfats * self.fatsz) * self.bps
            root_len = u16(self.boot, 0x11) * 32
            todo = [(self.rd.read(root_off, root_len), "")]
        while todo:
            data, path = todo.pop()
            for start, is_dir, size, label in entries_of(data, path):
                if is_dir:
                    todo.append((read_chain(chain(start, None, label)), label))
                else:
                    chain(start, size, label)
        return sorted(missing)

    def _check_fsinfo(self, used: int) -> None:
        if not self.fsinfo or self.fsinfo >= self.reserved:
            return
        info = self.rd.read(self.base + self.fsinfo * self.bps, 512)
        if u32(info, 0) != 0x41615252 or u32(info, 484) != 0x61417272:
            return
        free = u32(info, 488)
        if free != 0xFFFFFFFF and free != self.clusters - used:
            # FSInfo is a hint the spec says may be wrong; the FAT itself is the authority.
            log.info("FAT32 at byte %d: FSInfo says %d free clusters, the FAT has %d",
                     self.base, free, self.clusters - used)
