"""NTFS: the used clusters from ``$Bitmap``, found through the MFT's data runs.

The boot sector gives the geometry and where the MFT starts; MFT record 0 (``$MFT``) gives the
MFT's own data runs, record 6 (``$Bitmap``) the runs of the cluster bitmap, one bit per
cluster.  Every MFT record read has its update-sequence fixups checked and applied.

Refused (read fully, the reason logged) when the volume is not known to be clean: ``$Volume``'s
dirty flag (set while mounted, and by Windows when chkdsk is due), or a ``$LogFile`` whose
restart area is in use and not marked clean (Windows hibernated or shut down with Fast
Startup leaves it so; a FUSE mount that was not unmounted too).  Self-checks: the runs of
``$MFT``, ``$MFTMirr``, ``$LogFile`` and ``$Bitmap`` itself must all be marked used in the
bitmap, and the bitmap must cover every cluster; the boot sector, its backup at the end of the
volume and all of the MFT are read whatever the bitmap says.

Cross-check, as for ext's inodes: every MFT record in use (base and extension records alike)
is read and the runs of each of its non-resident attributes compared with ``$Bitmap``; a
cluster a record owns but the bitmap marks free is read as well, counted in
``repaired_blocks`` and logged.  A record in use that does not parse (torn, BAAD, runs outside
the volume) means read fully.
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

_ATTR_LIST = 0x20
_VOLUME_INFO = 0x70
_DATA = 0x80
_END = 0xFFFFFFFF
_VOLUME_DIRTY = 0x0001
_RESTART_CLEAN = 0x0002
_NO_CLIENT = 0xFFFF
_CHUNK = 1 << 20     # bitmap bytes per read: 8 Mi clusters


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "little")


def data_runs(attr: bytes, what: str) -> list[tuple[int, int]]:
    """(LCN, clusters) of a non-resident attribute's mapping pairs; sparse runs left out."""
    pos = u16(attr, 0x20)
    lcn = 0
    runs = []
    while pos < len(attr):
        head = attr[pos]
        if head == 0:
            return runs
        ln, off = head & 0x0F, head >> 4
        if ln == 0 or ln > 8 or off > 8 or pos + 1 + ln + off > len(attr):
            raise Unrecognised(f"{what}: data runs are damaged")
        count = int.from_bytes(attr[pos + 1:pos + 1 + ln], "little")
        if off:
            lcn += int.from_bytes(attr[pos + 1 + ln:pos + 1 + ln + off], "little", signed=True)
            if lcn < 0:
                raise Unrecognised(f"{what}: a data run starts before the volume")
            runs.append((lcn, count))
        pos += 1 + ln + off
    raise Unrecognised(f"{what}: data runs have no end")


class NtfsFs:
    """One NTFS volume at byte ``base``."""

    kind = "ntfs"

    def __init__(self, rd: SourceReader, base: int, length: int) -> None:
        self.rd = rd
        self.base = base
        bs = rd.read(base, 512)
        if bs[3:11] != b"NTFS    ":
            raise NotThisFilesystem("no NTFS boot sector signature")
        if bs[510:512] != b"\x55\xaa":
            raise Unrecognised("NTFS boot sector has no 55AA end mark")
        self.bps = bps = u16(bs, 0x0B)
        spc = bs[0x0D]
        spc = 1 << (256 - spc) if spc > 0x80 else spc
        self.cs = cs = bps * spc
        self.unit = cs
        self.sectors = _u64(bs, 0x28)
        self.mft_lcn = _u64(bs, 0x30)
        self.mirr_lcn = _u64(bs, 0x38)
        rec = int.from_bytes(bs[0x40:0x41], "little", signed=True)
        self.rec_size = 1 << -rec if rec < 0 else rec * cs
        if (bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1)
                or cs > 2 << 20 or self.sectors == 0 or self.rec_size < 512
                or self.rec_size > 65536 or self.rec_size & (self.rec_size - 1)):
            raise Unrecognised("NTFS boot sector geometry is invalid")
        self.clusters = self.sectors // spc
        if self.mft_lcn >= self.clusters or self.mirr_lcn >= self.clusters:
            raise Unrecognised("NTFS MFT lies outside the volume")
        # the backup boot sector is the sector after the last one counted
        self.fs_bytes = (self.sectors + 1) * bps
        if self.fs_bytes > length:
            raise Unrecognised(f"filesystem ({self.fs_bytes} bytes) is larger than its "
                               f"container ({length} bytes): truncated?")

    @property
    def detail(self) -> str:
        return f"NTFS, {self.clusters} clusters of {self.cs} bytes"

    def _record(self, n: int, mft_runs: list[tuple[int, int]] | None = None) -> bytes:
        """MFT record ``n`` with its fixups applied (from the MFT's first run)."""
        off = n * self.rec_size
        if mft_runs is not None:
            first_lcn, first_len = mft_runs[0]
            if off + self.rec_size > first_len * self.cs:
                raise Unrecognised(f"NTFS MFT record {n} is not in the MFT's first run")
        rec = self.rd.read(self.base + self.mft_lcn * self.cs + off, self.rec_size)
        if rec[:4] != b"FILE":
            raise Unrecognised(f"NTFS MFT record {n} has no FILE signature")
        rec = self._fixed(rec, n)
        if not u16(rec, 0x16) & 1:
            raise Unrecognised(f"NTFS MFT record {n} is not in use")
        return bytes(rec)

    def _fixed(self, raw: bytes, n: int) -> bytes:
        """An MFT record with its update-sequence fixups checked and applied."""
        rec = bytearray(raw)
        usa, count = u16(rec, 4), u16(rec, 6)
        if count < 2 or usa + 2 * count > self.rec_size or (count - 1) * 512 > self.rec_size:
            raise Unrecognised(f"NTFS MFT record {n}: update sequence is invalid")
        usn = rec[usa:usa + 2]
        for k in range(1, count):
            end = k * 512
            if rec[end - 2:end] != usn:
                raise Unrecognised(f"NTFS MFT record {n}: torn write (update sequence "
                                   "mismatch)")
            rec[end - 2:end] = rec[usa + 2 * k:usa + 2 * k + 2]
        return bytes(rec)

    @staticmethod
    def _attrs(rec: bytes, n: int) -> list[tuple[int, bytes]]:
        pos = u16(rec, 0x14)
        out = []
        while pos + 8 <= len(rec):
            t = u32(rec, pos)
            if t == _END:
                return out
            ln = u32(rec, pos + 4)
            if ln < 16 or pos + ln > len(rec):
                raise Unrecognised(f"NTFS MFT record {n}: attribute list is damaged")
            out.append((t, rec[pos:pos + ln]))
            pos += ln
        raise Unrecognised(f"NTFS MFT record {n}: attributes have no end")

    def _unnamed(self, rec: bytes, n: int, kind: int) -> bytes:
        attrs = self._attrs(rec, n)
        if any(t == _ATTR_LIST for t, _ in attrs):
            raise Unrecognised(f"NTFS MFT record {n} has an attribute list (heavily "
                               "fragmented system file)")
        found = [a for t, a in attrs if t == kind and a[9] == 0]
        if len(found) != 1:
            raise Unrecognised(f"NTFS MFT record {n}: {len(found)} unnamed attributes "
                               f"{kind:#x}")
        return found[0]

    def _runs(self, rec: bytes, n: int, what: str) -> list[tuple[int, int]]:
        attr = self._unnamed(rec, n, _DATA)
        if not attr[8]:
            raise Unrecognised(f"NTFS {what} is resident")
        if _u64(attr, 0x10) != 0:
            raise Unrecognised(f"NTFS {what}'s data attribute does not start at VCN 0")
        runs = data_runs(attr, f"NTFS {what}")
        for lcn, count in runs:
            if lcn + count > self.clusters:
                raise Unrecognised(f"NTFS {what}: a data run lies outside the volume")
        return runs

    def _check_clean(self, mft_runs: list[tuple[int, int]]) -> None:
        vol = self._unnamed(self._record(3, mft_runs), 3, _VOLUME_INFO)
        if vol[8]:
            raise Unrecognised("NTFS $Volume information is not resident")
        val = vol[u16(vol, 0x14):u16(vol, 0x14) + u32(vol, 0x10)]
        if len(val) < 12:
            raise Unrecognised("NTFS $Volume information is too short")
        if u16(val, 0x0A) & _VOLUME_DIRTY:
            raise Unrecognised("NTFS volume is marked dirty: mounted, or Windows wants chkdsk")
        logruns = self._runs(self._record(2, mft_runs), 2, "$LogFile")
        if not logruns:
            raise Unrecognised("NTFS $LogFile has no clusters")
        lcn, _ = logruns[0]
        page = self.rd.read(self.base + lcn * self.cs, 4096)
        if page.count(0xFF) == len(page):
            return          # emptied by ntfs-3g (or ntfsfix) at unmount: nothing to replay
        if page[:4] != b"RSTR":
            raise Unrecognised(f"NTFS $LogFile restart page is {page[:4]!r}, not RSTR: "
                               "needs chkdsk")
        ra = u16(page, 0x18)
        if ra + 0x10 > 510:
            raise Unrecognised("NTFS $LogFile restart area is out of place")
        in_use, flags = u16(page, ra + 0x0C), u16(page, ra + 0x0E)
        if in_use != _NO_CLIENT and not flags & _RESTART_CLEAN:
            raise Unrecognised("NTFS $LogFile is not clean: Windows hibernated or shut down "
                               "with Fast Startup, or not cleanly unmounted")

    def _owned(self, mft_runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(LCN, clusters) of every non-resident attribute of every MFT record in use (base
        and extension records alike: each attribute extent carries its own runs), as chkdsk
        walks them.  A record in use that does not parse means read fully."""
        rs, cs = self.rec_size, self.cs
        owned: list[tuple[int, int]] = []
        n = 0                       # the number of the first record in ``data``
        data = b""                  # records may straddle two runs when clusters are small
        for lcn, count in mft_runs:
            pos, end = 0, count * cs
            while pos < end:
                k = min(_CHUNK, end - pos)
                data += self.rd.read(self.base + lcn * cs + pos, k)
                pos += k
                whole = len(data) // rs * rs
                for o in range(0, whole, rs):
                    head = data[o:o + 4]
                    if head != b"FILE":
                        if head == b"BAAD":
                            raise Unrecognised(f"NTFS MFT record {n}: marked BAAD (a torn "
                                               "write): needs chkdsk")
                    elif data[o + 0x16] & 1:
                        rec = self._fixed(data[o:o + rs], n)
                        for _, attr in self._attrs(rec, n):
                            if attr[8]:
                                for run in data_runs(attr, f"NTFS MFT record {n}"):
                                    if run[0] + run[1] > self.clusters:
                                        raise Unrecognised(f"NTFS MFT record {n}: a data run "
                                                           "lies outside the volume")
                                    owned.append(run)
                    n += 1
                data = data[whole:]
        return owned

    def scan(self, out: RangeCollector, check: bool = True) -> tuple[int, int]:
        self.repaired_blocks = 0
        base, cs = self.base, self.cs
        mft_runs = self._runs(self._record(0), 0, "$MFT")
        if not mft_runs or mft_runs[0][0] != self.mft_lcn:
            raise Unrecognised("NTFS $MFT's first run is not where the boot sector says")
        self._check_clean(mft_runs)
        bm_runs = self._runs(self._record(6, mft_runs), 6, "$Bitmap")
        mirr = self._runs(self._record(1, mft_runs), 1, "$MFTMirr")
        logf = self._runs(self._record(2, mft_runs), 2, "$LogFile")
        need = (self.clusters + 7) // 8
        if sum(c for _, c in bm_runs) * cs < need:
            raise Unrecognised("NTFS $Bitmap is smaller than the volume")
        used = RangeCollector()
        n_used = 0
        vcn_byte = 0          # bitmap byte at the start of the current read
        for lcn, count in bm_runs:
            pos = 0
            while pos < count * cs and vcn_byte < need:
                k = min(_CHUNK, count * cs - pos, need - vcn_byte)
                chunk = self.rd.read(base + lcn * cs + pos, k)
                if vcn_byte + k == need and self.clusters % 8:
                    chunk = chunk[:-1] + bytes([chunk[-1] & ((1 << (self.clusters % 8)) - 1)])
                n_used += int.from_bytes(chunk, "little").bit_count()
                first = vcn_byte * 8
                for s, c in bit_runs(chunk):
                    used.add(base + (first + s) * cs, c * cs)
                pos += k
                vcn_byte += k
        bitmap = used.merged(base + self.clusters * cs)
        for what, runs in (("$MFT", mft_runs), ("$MFTMirr", mirr), ("$LogFile", logf),
                           ("$Bitmap", bm_runs)):
            want = [(base + lcn * cs, count * cs) for lcn, count in runs]
            if ranges.subtract(sorted(want), list(bitmap)):
                raise Unrecognised(f"NTFS {what} lies in clusters $Bitmap marks free: the "
                                   "bitmap disagrees with the MFT")
        for s, n in bitmap:
            out.add(s, n)
        if check:
            owned = ranges.merge([(base + lcn * cs, count * cs)
                                  for lcn, count in self._owned(mft_runs)])
            missing = ranges.subtract(owned, list(bitmap))
            if missing:
                self.repaired_blocks = ranges.total(missing) // cs
                log.warning("NTFS at byte %d: %d clusters owned by MFT records are marked free "
                            "in $Bitmap (first at cluster %d); they are read as well", base,
                            self.repaired_blocks, (missing[0][0] - base) // cs)
                for s, n in missing:
                    out.add(s, n)
        out.add(base, cs)                                   # boot sector and $Boot
        for lcn, count in mft_runs:                         # all of the MFT
            out.add(base + lcn * cs, count * cs)
        tail = base + self.clusters * cs
        out.add(tail, self.fs_bytes - self.clusters * cs)   # the backup boot sector
        return n_used * cs, self.fs_bytes
