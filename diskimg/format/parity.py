"""The parity container (format feature "parity", docs/FORMAT.md section 16): geometry, where
every slice lies, the checksum tables, the tail and the parity trailer.  Pure layout: the I/O is
diskimg.image.parity's.

An image with parity is an ordinary image (header, records, index, footer, trailer: the
*logical* stream, whose offsets the index and footer hold) cut into *windows* of `k * D` slices
of `S` bytes.  Each window is stored as its data slices, its checksum table, `m * D` parity
slices and the previous window's checksum table.  Slot `p` of a window (data and parity counted on) belongs to group `p mod D`; so
a group's slices lie `D` slices apart and any run of `m * D` consecutive slots (a burst) costs
each group at most `m` slices, which its parity fills.  Between data and parity lies the window's
checksum table; after the parity, the previous window's (its second copy).  Every slice has a CRC-32 in its window's
table, stored in the window and again in the next window (the last window's in the tail), so a
reader knows which slices are bad and only fills erasures.  The file ends with two copies of the
tail (geometry, logical length, a copy of the header, the last window's table) and a 32-byte
parity trailer; the header at offset 0 holds the geometry too.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from diskimg.transforms.parity import MAX_SHARES, slice_crc

SLICE = 4096                 # bytes per slice: a 4 KiB sector of the medium is one slice
WINDOW_DATA = 32 << 20       # target data bytes per window (memory: two windows while writing)
GROUP_DATA = 32              # about this many data slices per group (see Geometry.for_percent)
CRC_NAME = "crc32"

TABLE_MAGIC = b"DIPC"
# magic, window, count, the geometry (k u16, m u16, depth u32, slice u32) | count x u32 | u32 crc:
# every table names the geometry, so that the layout can be found from a table near the end of
# the file when the header and both tail copies are lost
_TABLE_HEAD = struct.Struct("<4sQIHHII")
TAIL_MAGIC = b"DIPARITY"
_TAIL_HEAD = struct.Struct("<8sIII")          # magic, json len, header len, table len | ... | crc
PTRAILER_MAGIC = b"DIPTEND\x00"
_PTRAILER = struct.Struct("<8sQIHHI")         # magic, tail offset, tail length, version, 0, 0
PTRAILER_SIZE = _PTRAILER.size + 4            # 32
CONTAINER_VERSION = 1
TAIL_SCAN = 8 << 20          # how far from the end a reader looks for a tail copy by its magic


class ParityLayoutError(ValueError):
    """A parity structure that does not check out (bad magic, CRC, or values)."""


@dataclass(frozen=True)
class Geometry:
    """The code's parameters: `k` data and `m` parity slices per group, `depth` groups per
    window (interleaving), `slice` bytes per slice."""

    k: int
    m: int
    depth: int
    slice: int = SLICE

    def __post_init__(self) -> None:
        if not (1 <= self.k and 1 <= self.m and self.k + self.m <= MAX_SHARES
                and 1 <= self.depth <= 1 << 16 and self.slice in (512, 1024, 2048, 4096, 8192)):
            raise ParityLayoutError(f"parity geometry {self.k}+{self.m} x {self.depth} of "
                                    f"{self.slice} bytes is not valid")

    @classmethod
    def for_percent(cls, pct: float) -> Geometry:
        """The geometry closest to `pct` percent of parity (0.5 to 100): m/k ~ pct/100 with
        k + m <= 256, groups of about GROUP_DATA data slices, windows of about WINDOW_DATA.

        The encoding costs CPU in proportion to m (each data byte goes into m parity bytes),
        whatever k; the burst a window survives is WINDOW_DATA * m/k whatever m; the scattered
        sectors it survives are m.  Groups of 32 (6.25%: 32+2) were measured against 64 (64+4)
        on the benchmark disk: 0.65 against 1.0-1.17 user CPU seconds more than --parity 0
        (2.74), the same size and the same 2 MiB burst (README: Parity)."""
        if not 0.5 <= pct <= 100:
            raise ValueError(f"parity {pct}% must be 0 or from 0.5 to 100")
        m = max(1, min(64, round(GROUP_DATA * pct / 100)))
        k = max(1, min(MAX_SHARES - 1 - m, round(100 * m / pct)))
        return cls(k, m, max(1, WINDOW_DATA // (k * SLICE)))

    @property
    def percent(self) -> float:
        return 100.0 * self.m / self.k

    @property
    def window_data(self) -> int:
        """Logical bytes of a full window."""
        return self.k * self.depth * self.slice

    def table_len(self, count: int) -> int:
        return _TABLE_HEAD.size + 4 * count + 4

    def padded(self, n: int) -> int:
        return -(-n // self.slice) * self.slice

    @property
    def full_window_bytes(self) -> int:
        """Physical bytes of a full window: data, parity, its own table and the previous one's
        (each padded to a slice)."""
        slots = (self.k + self.m) * self.depth
        return slots * self.slice + 2 * self.padded(self.table_len(slots))

    def to_json(self) -> dict:
        return {"slice": self.slice, "data": self.k, "parity": self.m, "depth": self.depth,
                "checksum": CRC_NAME}

    @classmethod
    def from_json(cls, d: object) -> Geometry:
        """Raises ParityLayoutError (a ValueError)."""
        if not isinstance(d, dict):
            raise ParityLayoutError("parity is not an object")
        vals = []
        for key in ("slice", "data", "parity", "depth"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ParityLayoutError(f"parity.{key} is {v!r}, an integer expected")
            vals.append(v)
        if d.get("checksum") != CRC_NAME:
            raise ParityLayoutError(f"parity.checksum is {d.get('checksum')!r}, "
                                    f"{CRC_NAME!r} expected")
        s, k, m, depth = vals
        return cls(k, m, depth, s)


@dataclass(frozen=True)
class Window:
    """Window `index` of an image: `n` data slices per group (k for every window but a short
    last one), `depth` groups; where it starts in the file and in the logical stream."""

    index: int
    depth: int
    n: int
    phys: int          # file offset of its first data slice
    logical: int       # logical offset of its first data byte
    geom: Geometry

    @property
    def data_slots(self) -> int:
        return self.n * self.depth

    @property
    def parity_slots(self) -> int:
        return self.geom.m * self.depth

    @property
    def slots(self) -> int:
        return self.data_slots + self.parity_slots

    @property
    def data_bytes(self) -> int:
        return self.data_slots * self.geom.slice

    @property
    def table_phys(self) -> int:
        """Where its own checksum table is: right after its data, before its parity, so that
        a burst reaching it from the end of the file would have to take all the parity too."""
        return self.phys + self.data_bytes

    @property
    def parity_phys(self) -> int:
        return self.table_phys + self.geom.padded(self.geom.table_len(self.slots))

    @property
    def prev_table_phys(self) -> int:
        """Where the previous window's table (its second copy) is: after the parity."""
        return self.parity_phys + self.parity_slots * self.geom.slice

    def slot_phys(self, slot: int) -> int:
        """File offset of slot `slot`: data slots first, then parity slots."""
        if slot < self.data_slots:
            return self.phys + slot * self.geom.slice
        return self.parity_phys + (slot - self.data_slots) * self.geom.slice

    def group_slots(self, group: int) -> tuple[list[int], list[int]]:
        """The data slots (n of them) and parity slots (m) of `group`."""
        d = self.depth
        return ([group + i * d for i in range(self.n)],
                [self.data_slots + group + i * d for i in range(self.geom.m)])


@dataclass(frozen=True)
class Layout:
    """Where everything of a parity image lies, from its geometry and logical length."""

    geom: Geometry
    logical_size: int

    @property
    def windows(self) -> int:
        """Full windows, then always one last window (written when the image is finished; it
        holds at least one slice, so a stream filling whole windows ends with an empty one)."""
        return self.logical_size // self.geom.window_data + 1

    def window(self, w: int) -> Window:
        g = self.geom
        full = g.window_data
        if w < self.windows - 1:
            return Window(w, g.depth, g.k, w * g.full_window_bytes, w * full, g)
        rest = self.logical_size - w * full
        slots = max(1, -(-rest // g.slice))
        # a short last window of a one-window image interleaves over fewer groups (its parity
        # stays about m/k of it); after full windows it keeps the full depth, so that the burst
        # an image survives is the same everywhere
        depth = g.depth if w else min(g.depth, -(-slots // g.k))
        n = -(-slots // depth)
        return Window(w, depth, n, w * g.full_window_bytes, w * full, g)

    @property
    def last(self) -> Window:
        return self.window(self.windows - 1)

    @property
    def tail_phys(self) -> int:
        """Where the first tail copy starts."""
        last = self.last
        prev = self.geom.padded(self.geom.table_len(self.window(last.index - 1).slots)) \
            if last.index else 0
        return last.prev_table_phys + prev

    def locate(self, offset: int) -> tuple[Window, int]:
        """The window holding logical byte `offset` and its data slot there."""
        w = min(offset // self.geom.window_data, self.windows - 1)
        win = self.window(w)
        return win, (offset - win.logical) // self.geom.slice

    def to_json(self) -> dict:
        return {**self.geom.to_json(), "logical_size": self.logical_size,
                "windows": self.windows}


def pack_table(window: int, crcs: list[int], geom: Geometry) -> bytes:
    body = _TABLE_HEAD.pack(TABLE_MAGIC, window, len(crcs), geom.k, geom.m, geom.depth,
                            geom.slice) + struct.pack(f"<{len(crcs)}I", *crcs)
    return body + struct.pack("<I", slice_crc(body))


def unpack_table(buf: bytes, window: int, count: int, geom: Geometry) -> list[int]:
    """The CRC list of window `window`'s table in `buf`; raises ParityLayoutError."""
    size = _TABLE_HEAD.size + 4 * count + 4
    if len(buf) < size:
        raise ParityLayoutError("checksum table truncated")
    magic, w, n, k, m, depth, sl = _TABLE_HEAD.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, size - 4)
    if magic != TABLE_MAGIC or w != window or n != count or crc != slice_crc(buf[:size - 4]) \
            or (k, m, depth, sl) != (geom.k, geom.m, geom.depth, geom.slice):
        raise ParityLayoutError(f"checksum table of window {window} damaged")
    return list(struct.unpack_from(f"<{count}I", buf, _TABLE_HEAD.size))


def geometry_in_table(buf: bytes, pos: int) -> Geometry | None:
    """The geometry a checksum table at `pos` of `buf` names, when it is whole and its CRC
    holds; else None."""
    if pos + _TABLE_HEAD.size > len(buf):
        return None
    magic, _, n, k, m, depth, sl = _TABLE_HEAD.unpack_from(buf, pos)
    end = pos + _TABLE_HEAD.size + 4 * n
    if magic != TABLE_MAGIC or end + 4 > len(buf) or \
            struct.unpack_from("<I", buf, end)[0] != slice_crc(buf[pos:end]):
        return None
    try:
        return Geometry(k, m, depth, sl)
    except ParityLayoutError:
        return None


@dataclass(frozen=True)
class Tail:
    """What the tail holds: the layout, a copy of the header and the last window's table."""

    layout: Layout
    header: bytes
    last_table: bytes


def pack_tail(layout: Layout, header: bytes, last_table: bytes) -> bytes:
    body = json.dumps(layout.to_json(), sort_keys=True).encode()
    head = _TAIL_HEAD.pack(TAIL_MAGIC, len(body), len(header), len(last_table))
    blob = head + body + header + last_table
    return blob + struct.pack("<I", slice_crc(blob))


def unpack_tail(buf: bytes) -> Tail:
    """The tail at the start of `buf`; raises ParityLayoutError."""
    if len(buf) < _TAIL_HEAD.size + 4:
        raise ParityLayoutError("tail truncated")
    magic, jlen, hlen, tlen = _TAIL_HEAD.unpack_from(buf)
    size = _TAIL_HEAD.size + jlen + hlen + tlen
    if magic != TAIL_MAGIC or len(buf) < size + 4:
        raise ParityLayoutError("tail: bad magic or truncated")
    (crc,) = struct.unpack_from("<I", buf, size)
    if crc != slice_crc(buf[:size]):
        raise ParityLayoutError("tail: CRC-32 mismatch")
    pos = _TAIL_HEAD.size
    try:
        d = json.loads(buf[pos:pos + jlen])
        geom = Geometry.from_json(d)
        logical = d["logical_size"]
        if not isinstance(logical, int) or isinstance(logical, bool) or logical < 0:
            raise ParityLayoutError(f"tail: logical_size {logical!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise ParityLayoutError(f"tail: {err}") from err
    pos += jlen
    return Tail(Layout(geom, logical), bytes(buf[pos:pos + hlen]),
                bytes(buf[pos + hlen:pos + hlen + tlen]))


def pack_ptrailer(tail_offset: int, tail_len: int) -> bytes:
    head = _PTRAILER.pack(PTRAILER_MAGIC, tail_offset, tail_len, CONTAINER_VERSION, 0, 0)
    return head + struct.pack("<I", slice_crc(head))


def unpack_ptrailer(buf: bytes) -> tuple[int, int] | None:
    """(tail offset, tail length) from the parity trailer, or None when it is not one."""
    if len(buf) != PTRAILER_SIZE:
        return None
    magic, off, length, version, _, _ = _PTRAILER.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, _PTRAILER.size)
    if magic != PTRAILER_MAGIC or crc != slice_crc(buf[:_PTRAILER.size]) \
            or version != CONTAINER_VERSION:
        return None
    return off, length
