"""Parity on the store seam: the sink that writes an image with parity, and the reader that
heals it on read (format feature "parity", docs/FORMAT.md section 16; layout in
diskimg.format.parity).

`ParitySink` wraps a StoreSink: the image writer appends the logical stream (header, records,
index, footer, trailer) as always; the sink keeps the current window in memory, and when it is
full hands it to a background thread that computes its CRC-32s and parity (zfec releases the GIL,
so the compressing workers go on) while the next window fills.  Window after window it writes
data, parity and checksum tables; `commit` writes the short last window, the two tail copies and
the parity trailer, then commits the inner sink.

`HealingReader` wraps a StoreReader and presents the logical stream.  Its `pread` costs nothing
over a plain read (a window boundary splits it in two): the image's own checks (record CRC,
block digest, index CRCs) say when bytes are wrong, and the caller then asks `heal` for that
range.  `heal` checks every slice the range touches against its CRC-32 (an unreadable slice, EIO,
counts as bad too), rebuilds each bad slice from its group and keeps the rebuilt slices, so that
later reads of them return the healed bytes.  `scrub` checks every slice of the file (verify and
repair).  Nothing is ever written to the image here: `diskimg repair` writes a new file.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from diskimg.errors import DiskIOError, OperationFailed
from diskimg.format import parity as pf
from diskimg.store import Store, StoreReader, StoreSink, StoreStat
from diskimg.transforms import parity as rs

log = logging.getLogger(__name__)



def encode_window(win: pf.Window, data: memoryview) -> tuple[bytearray, list[int]]:
    """The parity area of window `win` (its `m * depth` parity slices in slot order) and the
    CRC-32s of all its slots, for its data slices in `data` (`win.data_bytes` long).

    Slot p is in group p mod depth, so data share i of every group lies in the run of slots
    i*depth .. (i+1)*depth - 1 and parity share j of every group in parity slots j*depth ..:
    the whole window is one encoding of `n` rows of `depth` slices into `m` rows, which is the
    parity area as it is stored."""
    g = win.geom
    row = win.depth * g.slice
    data = memoryview(data).cast("B")[:win.data_bytes]
    par = rs.encode_rows([data[i * row:(i + 1) * row] for i in range(win.n)], g.k, g.m, row)
    return par, rs.slice_crcs(data, g.slice) + rs.slice_crcs(par, g.slice)


class ParitySink(StoreSink):
    """Writes the logical stream given to `write` through `inner` with parity; see the module
    docstring.  `header` is the packed image header (its copy goes into the tail)."""

    def __init__(self, inner: StoreSink, geom: pf.Geometry, header: bytes,
                 resume: tuple[int, bytes, bytes] | None = None,
                 write_through: bool = False) -> None:
        """With `resume` (window, its data so far, the previous window's packed table: see
        resume_point), go on from where an interrupted writer left off.  With `write_through`
        (a rescue, which must find after a kill -9 every record it wrote) every byte goes to
        the inner sink at once and each window's parity is computed when it fills, not behind
        the next one."""
        self.write_through = write_through
        self.inner = inner
        self.geom = geom
        self.header = header
        self.path = inner.path
        self.partial_path = inner.partial_path
        self._win = 0                                   # index of the window being filled
        # the window being filled and the one being encoded: grown as data comes (an image
        # smaller than a window touches no more memory than it needs), then reused
        self._buf = bytearray()
        self._spare = bytearray()
        self._fill = 0
        self._flushed = 0        # bytes of this window's data already written (sync)
        self._prev_table = b""   # the previous window's packed table (its second copy)
        self._pending: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="diskimg-parity")
        if resume is not None:
            self._win, data, self._prev_table = resume
            self._buf[:len(data)] = data
            self._fill = self._flushed = len(data)

    @property
    def pos(self) -> int:
        return self._win * self.geom.window_data + self._fill

    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        cap = self.geom.window_data
        for part in parts:
            mv = memoryview(part).cast("B")
            while len(mv):
                n = min(len(mv), cap - self._fill)
                self._buf[self._fill:self._fill + n] = mv[:n]
                self._fill += n
                if self.write_through:
                    self.inner.write([mv[:n]])
                    self._flushed = self._fill
                elif self._pending is None or self._pending.done():
                    # the data goes out as it comes (the store's write-behind keeps the disk
                    # busy); only while the previous window's parity is being computed does
                    # it wait here, since that parity must come first in the file
                    self._flush_data()
                mv = mv[n:]
                if self._fill == cap:
                    self._window_full()

    def _window_full(self) -> None:
        """Hand the full window to the encoder; the next one fills meanwhile."""
        self._drain()
        layout = pf.Layout(self.geom, (self._win + 1) * self.geom.window_data + 1)
        win = layout.window(self._win)
        buf, flushed = self._buf, self._flushed
        self._pending = self._pool.submit(self._encode, win, buf, flushed)
        if self.write_through:
            self._drain()
        self._buf, self._spare = self._spare, buf
        self._win += 1
        self._fill = self._flushed = 0

    def _encode(self, win: pf.Window, buf: bytearray, flushed: int
                ) -> tuple[pf.Window, bytearray, int, bytearray, bytes]:
        par, crcs = encode_window(win, memoryview(buf)[:win.data_bytes])
        return win, buf, flushed, par, pf.pack_table(win.index, crcs, self.geom)

    def _drain(self) -> None:
        """Write the window being encoded, once its parity is ready."""
        if self._pending is None:
            return
        win, buf, flushed, par, table = self._pending.result()
        self._pending = None
        self._write_window(win, memoryview(buf)[flushed:win.data_bytes], par, table)

    def _write_window(self, win: pf.Window, data: memoryview, par: bytearray,
                      table: bytes, last: bool = False) -> None:
        g = self.geom
        parts: list = [data] if len(data) else []
        parts += [table, bytes(g.padded(len(table)) - len(table)), par]
        self.inner.write(parts)
        if win.index:
            prev = self._prev_table
            self.inner.write([prev, bytes(g.padded(len(prev)) - len(prev))])
        elif not last:
            # window 0 has no previous table: its place is kept, so that all full windows
            # are the same size
            self.inner.write([bytes(g.padded(len(table)))])
        self._prev_table = table

    def sync(self) -> None:
        """Make every byte written so far durable (its parity follows with its window)."""
        self._drain()
        self._write_data()
        self.inner.sync()

    def _flush_data(self) -> None:
        self._drain()
        if self._fill - self._flushed >= (1 << 20) or self.write_through or \
                self._fill == self.geom.window_data:
            self._write_data()

    def _write_data(self) -> None:
        if self._fill > self._flushed:
            self.inner.write([memoryview(self._buf)[self._flushed:self._fill]])
            self._flushed = self._fill

    def commit(self) -> None:
        self._drain()
        layout = pf.Layout(self.geom, self.pos)
        win = layout.last
        assert win.index == self._win
        buf = self._buf
        buf[self._fill:win.data_bytes] = bytes(win.data_bytes - self._fill)
        par, crcs = encode_window(win, memoryview(buf)[:win.data_bytes])
        table = pf.pack_table(win.index, crcs, self.geom)
        self._write_window(win, memoryview(buf)[self._flushed:win.data_bytes], par, table,
                           last=True)
        tail = pf.pack_tail(layout, self.header, table)
        self.inner.write([tail, tail, pf.pack_ptrailer(layout.tail_phys, len(tail))])
        self._pool.shutdown()
        self.inner.commit()

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self.inner.abort()

    def close(self) -> None:
        """Stop, keeping what was written (complete windows and the data of the last one)."""
        try:
            self._drain()
            self._write_data()
        finally:
            self._pool.shutdown()
            self.inner.close()

    def read_logical(self, raw: StoreReader, length: int, offset: int) -> bytes:
        """`length` logical bytes at `offset` of what was written so far: from `raw` (the
        partial file) for windows already written, from memory for the rest."""
        g = self.geom
        out = bytearray()
        while length > 0:
            w, rel = divmod(offset, g.window_data)
            n = min(length, g.window_data - rel)
            if w == self._win:
                n = min(n, self._fill - rel)
                if n <= 0:
                    break
                out += self._buf[rel:rel + n]
            elif w == self._win - 1 and self._pending is not None:
                out += self._spare[rel:rel + n]
            elif w < self._win:
                out += raw.pread(n, w * g.full_window_bytes + rel)
            else:
                break
            offset += n
            length -= n
        return bytes(out)


def partial_logical_size(geom: pf.Geometry, phys_size: int) -> int:
    """Logical bytes an unfinished file with parity of `phys_size` bytes holds: its complete
    windows, then the data written of the next one."""
    nw, rest = divmod(phys_size, geom.full_window_bytes)
    return nw * geom.window_data + min(rest, geom.window_data)


class UnfinishedReader(StoreReader):
    """The logical stream of an unfinished file with parity (an interrupted rescue's partial
    image): no tail yet, so no healing; complete windows and the data after them."""

    def __init__(self, raw: StoreReader, geom: pf.Geometry) -> None:
        self.raw, self.geom = raw, geom
        self.path = raw.path
        self.stat = StoreStat(size=partial_logical_size(geom, raw.size), mtime=raw.stat.mtime,
                              identity=raw.stat.identity, mode=raw.stat.mode)

    def pread(self, length: int, offset: int) -> bytes:
        g = self.geom
        out = []
        end = min(offset + length, self.size)
        while offset < end:
            w, rel = divmod(offset, g.window_data)
            n = min(end - offset, g.window_data - rel)
            out.append(self.raw.pread(n, w * g.full_window_bytes + rel))
            offset += n
        return b"".join(out)

    def close(self) -> None:
        self.raw.close()


REWRITE_CHUNK = 4 << 20     # bytes of the logical stream copied at a time by `rewrite`


def rewrite(store: Store, name: str, geom: pf.Geometry, header: bytes, reader: StoreReader,
            size: int, path: str) -> None:
    """Write the image `name` in `store` with its parity made afresh: `header`, then the
    logical stream `reader` (of the image `path`) from `len(header)` up to `size` (the stored
    bytes, copied as they are: no key needed).  What was written is removed if anything fails;
    the caller checks the result before renaming it over anything."""
    sink = ParitySink(store.create(name), geom, header)
    try:
        sink.write([header])
        pos = len(header)
        while pos < size:
            n = min(REWRITE_CHUNK, size - pos)
            data = reader.pread(n, pos)
            if len(data) != n:
                raise OperationFailed(f"{path}: short read at byte {pos} of the image's "
                                      f"logical stream")
            sink.write([data])
            pos += n
        sink.commit()
    except BaseException:
        sink.abort()
        raise


def resume_point(raw: StoreReader, geom: pf.Geometry, logical: int
                 ) -> tuple[int, tuple[int, bytes, bytes]]:
    """Where to cut the unfinished file `raw` to go on writing at logical offset `logical`
    (its physical offset), and ParitySink's `resume`: the window, its data before that offset
    (read back), and the previous window's table (read, or computed again when damaged)."""
    w, rel = divmod(logical, geom.window_data)
    base = w * geom.full_window_bytes
    data = raw.pread(rel, base)
    prev = b""
    if w:
        win = pf.Layout(geom, (w + 1) * geom.window_data).window(w - 1)
        try:
            size = geom.table_len(win.slots)
            packed = raw.pread(size, win.table_phys)
            pf.unpack_table(packed, w - 1, win.slots, geom)
            prev = packed
        except (DiskIOError, pf.ParityLayoutError):
            crcs = [rs.slice_crc(raw.pread(geom.slice, win.slot_phys(i)))
                    for i in range(win.slots)]
            prev = pf.pack_table(w - 1, crcs, geom)
    return base + rel, (w, data, prev)


class PartialParityReader(StoreReader):
    """The logical stream of an image with parity still being written (rescue reads back the
    records it stored)."""

    def __init__(self, raw: StoreReader, sink: ParitySink) -> None:
        self.raw, self.sink = raw, sink
        self.path = raw.path
        self.stat = raw.stat

    def pread(self, length: int, offset: int) -> bytes:
        return self.sink.read_logical(self.raw, length, offset)

    def close(self) -> None:
        self.raw.close()


# -- reading ---------------------------------------------------------------------------------

def read_tolerant(raw: StoreReader, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`, unreadable pieces (EIO, or a short read running into a bad
    sector) as zeros: for looking for a structure by its magic in damaged parts of a file."""
    try:
        buf = raw.pread(length, offset)
        if len(buf) == length or offset + len(buf) >= raw.size:
            return buf
    except DiskIOError:
        pass
    out = bytearray()
    piece = 4096
    for pos in range(offset, offset + length, piece):
        n = min(piece, offset + length - pos)
        try:
            got = raw.pread(n, pos)
        except DiskIOError:
            got = b""
        out += got + bytes(n - len(got))
    return bytes(out)


def find_tail(raw: StoreReader, damage: list[str] | None = None) -> pf.Tail | None:
    """The parity tail of the file `raw`, or None when it is not an image with parity (or both
    tail copies are gone).  Found through the parity trailer; when that is damaged, by looking
    for a tail copy's magic in the last few MiB.  A tail counts only where its layout puts it."""
    size = raw.size
    candidates: list[int] = []
    if size >= pf.PTRAILER_SIZE:
        try:
            loc = pf.unpack_ptrailer(raw.pread(pf.PTRAILER_SIZE, size - pf.PTRAILER_SIZE))
        except DiskIOError:
            loc = None
        if loc is not None:
            off, length = loc
            candidates += [off, off + length]
    for i, off in enumerate(candidates):
        tail = _tail_at(raw, off, size)
        if tail is not None:
            if i and damage is not None:
                damage.append("parity tail: its first copy is damaged, the second is intact")
            elif damage is not None and _tail_at(raw, candidates[1], size) is None:
                damage.append("parity tail: its second copy is damaged, the first is intact")
            return tail
    if damage is not None:
        damage.append("parity trailer damaged (the tail was found by its magic)")
    start = max(0, size - pf.TAIL_SCAN)
    buf = read_tolerant(raw, size - start, start)
    i = len(buf)
    while True:
        i = buf.rfind(pf.TAIL_MAGIC, 0, i)
        if i < 0:
            return None
        tail = _tail_at(raw, start + i, size)
        if tail is not None:
            return tail


def geometry_from_tables(raw: StoreReader, limit: int = 72 << 20) -> pf.Geometry | None:
    """The geometry named by the checksum table nearest the end of the file (the last window's,
    which lies before its parity, or the one after that parity), looking back at most `limit`
    bytes; None when there is none."""
    size = raw.size
    chunk = 1 << 20
    end = size
    while end > 0 and size - end < limit:
        start = max(0, end - chunk)
        # a little past `end`, so that a table starting just before it is whole
        buf = read_tolerant(raw, min(size, end + (64 << 10)) - start, start)
        i = end - start
        while True:
            i = buf.rfind(pf.TABLE_MAGIC, 0, i)
            if i < 0:
                break
            geom = pf.geometry_in_table(buf, i)
            if geom is None:
                try:
                    geom = _table_geometry_at(raw, start + i)
                except DiskIOError:
                    geom = None
            if geom is not None:
                return geom
        end = start
    return None


def _table_geometry_at(raw: StoreReader, pos: int) -> pf.Geometry | None:
    """The geometry of a table too long for the piece read around it."""
    head = raw.pread(16, pos)
    if len(head) < 16:
        return None
    n = int.from_bytes(head[12:16], "little")
    if n > 1 << 20:
        return None
    return pf.geometry_in_table(raw.pread(28 + 4 * n + 4, pos), 0)


def recover_layout(raw: StoreReader, geom: pf.Geometry, trailer_crc: Callable[[bytes], int]
                   ) -> pf.Tail | None:
    """The layout of an image with parity whose two tail copies are both lost, from the
    geometry its header gives and the image trailer (`DIMGEND`, checked with `trailer_crc`) at
    the end of its logical stream, found by looking backwards from the end of the file; None
    when it cannot be found.  The tail's copies (header, last window's table) are then
    missing."""
    size = raw.size
    wfull, cap = geom.full_window_bytes, geom.window_data
    start = max(0, size - wfull - pf.TAIL_SCAN)
    buf = read_tolerant(raw, size - start, start)
    i = len(buf)
    while True:
        i = buf.rfind(b"DIMGEND\x00", 0, i)
        if i < 0:
            return None
        p = start + i
        tr = buf[i:i + 32]
        if len(tr) < 32 or int.from_bytes(tr[28:32], "little") != trailer_crc(tr[:28]):
            continue
        w = p // wfull
        logical = w * cap + (p - w * wfull) + 32
        f_off = int.from_bytes(tr[8:16], "little")
        f_len = int.from_bytes(tr[16:20], "little")
        if f_off + f_len + 32 != logical or p - w * wfull >= cap:
            continue
        layout = pf.Layout(geom, logical)
        if layout.tail_phys <= size:
            return pf.Tail(layout, b"", b"")


def _tail_at(raw: StoreReader, off: int, size: int) -> pf.Tail | None:
    try:
        head = raw.pread(20, off)
        if len(head) < 20 or head[:8] != pf.TAIL_MAGIC:
            return None
        jlen, hlen, tlen = (int.from_bytes(head[i:i + 4], "little") for i in (8, 12, 16))
        if off + 24 + jlen + hlen + tlen > size:
            return None
        tail = pf.unpack_tail(raw.pread(24 + jlen + hlen + tlen, off))
    except (DiskIOError, pf.ParityLayoutError):
        return None
    t = tail.layout.tail_phys
    tlen_all = 24 + jlen + hlen + tlen
    if off not in (t, t + tlen_all) or t + 2 * tlen_all + pf.PTRAILER_SIZE != size:
        return None
    return tail


@dataclass
class ParityRepairs:
    """What a reader found damaged and rebuilt, or could not: (window, slot) pairs."""

    repaired: set = field(default_factory=set)     # data and parity slots rebuilt
    lost: set = field(default_factory=set)         # data slots beyond repair
    tables: set = field(default_factory=set)       # windows whose own table copy was bad
    lost_tables: set = field(default_factory=set)  # windows with both table copies bad
    checked: set = field(default_factory=set)      # groups (window, group) checked whole


class HealingReader(StoreReader):
    """The logical stream of an image with parity, healed on demand; see the module
    docstring."""

    def __init__(self, raw: StoreReader, tail: pf.Tail) -> None:
        self.raw = raw
        self.tail = tail
        self.layout = tail.layout
        self.geom = tail.layout.geom
        self.path = raw.path
        st = raw.stat
        self.stat = StoreStat(size=self.layout.logical_size, mtime=st.mtime,
                              identity=st.identity, mode=st.mode)
        self._tables: dict[int, list[int] | None] = {}
        self._fixed: dict[tuple[int, int], bytes] = {}   # (window, data slot) -> healed slice
        self.repairs = ParityRepairs()
        self.tail_damage: list[str] = []    # what is wrong with the tail copies and trailer
        self._lock = threading.RLock()

    # -- plain reads ---------------------------------------------------------------------------

    def _pieces(self, length: int, offset: int) -> Iterable[tuple[pf.Window, int, int, int]]:
        """(window, offset in the window's data, logical offset, length) of a logical range."""
        end = min(offset + length, self.layout.logical_size)
        while offset < end:
            win, _ = self.layout.locate(offset)
            rel = offset - win.logical
            n = min(end - offset, win.data_bytes - rel)
            yield win, rel, offset, n
            offset += n

    def pread(self, length: int, offset: int) -> bytes:
        want = max(0, min(offset + length, self.layout.logical_size) - offset)
        try:
            parts = [self.raw.pread(n, win.phys + rel)
                     for win, rel, _, n in self._pieces(length, offset)]
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        except DiskIOError:
            data = None
        if data is None or len(data) != want:
            # unreadable (EIO, or a short read running into a bad sector): heal what can be
            self.heal(offset, length)
            data = b"".join(self._read_healed(win, rel, n)
                            for win, rel, _, n in self._pieces(length, offset))
        if self._fixed:
            data = self._patch(data, length, offset)
        return data

    def _read_healed(self, win: pf.Window, rel: int, n: int) -> bytes:
        """A piece of one window, slice by slice, healed slices from memory and unreadable ones
        (beyond repair) as zeros."""
        s = self.geom.slice
        out = bytearray()
        pos = rel
        while pos < rel + n:
            slot, off = divmod(pos, s)
            take = min(s - off, rel + n - pos)
            fixed = self._fixed.get((win.index, slot))
            if fixed is not None:
                out += fixed[off:off + take]
            else:
                try:
                    got = self.raw.pread(take, win.phys + pos)
                except DiskIOError:
                    got = b""
                out += got + bytes(take - len(got))     # beyond repair: zeros, the checks fail
            pos += take
        return bytes(out)

    def _patch(self, data: bytes, length: int, offset: int) -> bytes:
        s = self.geom.slice
        buf = None
        for win, rel, logical, n in self._pieces(length, offset):
            for slot in range(rel // s, (rel + n - 1) // s + 1):
                fixed = self._fixed.get((win.index, slot))
                if fixed is None:
                    continue
                if buf is None:
                    buf = bytearray(data)
                lo = max(rel, slot * s)
                hi = min(rel + n, (slot + 1) * s)
                at = logical - offset + (lo - rel)
                buf[at:at + hi - lo] = fixed[lo - slot * s:hi - slot * s]
        return data if buf is None else bytes(buf)

    def close(self) -> None:
        self.raw.close()

    # -- healing -------------------------------------------------------------------------------

    def table(self, w: int) -> list[int] | None:
        """Window `w`'s slot CRCs, from its own copy or the second one, or else pieced together
        from the two, slice by slice (damage in different places of each); None when that
        fails too."""
        with self._lock:
            if w in self._tables:
                return self._tables[w]
            win = self.layout.window(w)
            size = self.geom.table_len(win.slots)
            own = self._read_table(size, win.table_phys)
            if w == self.layout.windows - 1:
                second = self.tail.last_table or None
            else:
                second = self._read_table(size, self.layout.window(w + 1).prev_table_phys)
            crcs = None
            for i, copy in enumerate((own, second)):
                try:
                    crcs = pf.unpack_table(bytes(copy or b""), w, win.slots,
                                           self.geom)
                    break
                except pf.ParityLayoutError:
                    if i == 0:
                        self.repairs.tables.add(w)
            if crcs is None and own is not None and second is not None:
                crcs = self._merge_tables(own, second, w, win.slots)
            if crcs is None:
                self.repairs.lost_tables.add(w)
            self._tables[w] = crcs
            return crcs

    def _read_table(self, size: int, offset: int) -> bytearray | None:
        """A table copy, slice by slice where the whole cannot be read (unreadable slices as
        zeros); None when nothing of it can be read."""
        try:
            return bytearray(self.raw.pread(size, offset))
        except DiskIOError:
            pass
        out, s, got = bytearray(), self.geom.slice, False
        for pos in range(0, size, s):
            n = min(s, size - pos)
            try:
                out += self.raw.pread(n, offset + pos)
                got = True
            except DiskIOError:
                out += bytes(n)
        return out if got else None

    def _merge_tables(self, a: bytearray, b: bytearray | bytes, w: int,
                      count: int) -> list[int] | None:
        """A table from two damaged copies: where their slices differ, each combination is tried
        against the table's CRC (up to 2^12 of them)."""
        s = self.geom.slice
        size = min(len(a), len(b))
        diff = [pos for pos in range(0, size, s) if a[pos:pos + s] != b[pos:pos + s]]
        if not diff or len(diff) > 12:
            return None
        for mask in range(1, 1 << len(diff)):
            trial = bytearray(a)
            for bit, pos in enumerate(diff):
                if mask >> bit & 1:
                    trial[pos:pos + s] = b[pos:pos + s]
            try:
                return pf.unpack_table(bytes(trial), w, count, self.geom)
            except pf.ParityLayoutError:
                continue
        return None

    def _slot(self, win: pf.Window, slot: int) -> bytes | None:
        """Slot `slot` of `win` as stored, or None when it cannot be read."""
        try:
            data = self.raw.pread(self.geom.slice, win.slot_phys(slot))
        except DiskIOError:
            return None
        return data if len(data) == self.geom.slice else None

    def heal(self, offset: int, length: int) -> None:
        """Check every slice of the logical range against its CRC-32 and rebuild the bad ones
        that parity can (kept for later reads); the others are noted in `repairs.lost`."""
        s = self.geom.slice
        for win, rel, _, n in self._pieces(length, offset):
            for group in sorted({slot % win.depth for slot in range(rel // s,
                                                                    (rel + n - 1) // s + 1)}):
                self.heal_group(win, group)

    def heal_group(self, win: pf.Window, group: int) -> bool:
        """Check group `group` of `win` whole and rebuild its bad data slices.  True when every
        data slice of the group is good or rebuilt."""
        key = (win.index, group)
        with self._lock:
            if key in self.repairs.checked:
                return not any((win.index, sl) in self.repairs.lost
                               for sl in win.group_slots(group)[0])
        g = self.geom
        crcs = self.table(win.index)
        data_slots, parity_slots = win.group_slots(group)
        if crcs is None:
            # the damage cannot be located: the record checks say whether the data is good
            with self._lock:
                self.repairs.checked.add(key)
            return False
        shares: dict[int, bytes] = {}
        bad: list[int] = []
        for i, slot in enumerate(data_slots + parity_slots):
            buf = self._slot(win, slot)
            share = i if i < win.n else g.k + (i - win.n)
            if buf is None or rs.slice_crc(buf) != crcs[slot]:
                bad.append(slot)
            else:
                shares[share] = buf
        with self._lock:
            self.repairs.checked.add(key)
            if not bad:
                return True
            for i in range(win.n, g.k):
                shares[i] = bytes(g.slice)
            bad_data = [sl for sl in bad if sl < win.data_slots]
            if len(shares) < g.k:
                self.repairs.lost.update((win.index, sl) for sl in bad_data)
                log.info("%s: window %d group %d: %d slices damaged, parity repairs %d",
                            self.path, win.index, group, len(bad), g.m)
                return False
            if bad_data:
                rebuilt = rs.decode(g.k, g.m, shares)
                for sl in bad_data:
                    self._fixed[(win.index, sl)] = rebuilt[(sl - group) // win.depth]
            self.repairs.repaired.update((win.index, sl) for sl in bad)
            return True

    def scrub(self, progress: Callable[[int], None] | None = None) -> ParityRepairs:
        """Check every slot of the file against its CRC-32 (reading each window in large
        pieces) and rebuild what parity can; returns `repairs`."""
        s = self.geom.slice
        for w in range(self.layout.windows):
            win = self.layout.window(w)
            crcs = self.table(w)     # None: both copies lost, damage there cannot be located
            bad_groups: set[int] = set()
            first = 0
            while first < win.slots:
                # data and parity are two runs of slots: one read per chunk of either
                count = min(256, win.slots - first)
                if first < win.data_slots:
                    count = min(count, win.data_slots - first)
                phys = win.slot_phys(first)
                try:
                    buf = self.raw.pread(count * s, phys)
                except DiskIOError:
                    buf = None
                if crcs is not None and buf is not None and len(buf) == count * s:
                    # the whole chunk read: its checksums in one go
                    got = rs.slice_crcs(buf, s)
                    bad_groups.update((first + j) % win.depth for j in range(count)
                                      if got[j] != crcs[first + j])
                elif crcs is not None:
                    for j in range(count):
                        slot = first + j
                        piece = buf[j * s:(j + 1) * s] if buf is not None else None
                        if piece is None or len(piece) != s:
                            piece = self._slot(win, slot)
                        if piece is None or len(piece) != s or rs.slice_crc(piece) != crcs[slot]:
                            bad_groups.add(slot % win.depth)
                first += count
                if progress:
                    progress(count * s)
            for grp in sorted(bad_groups):
                self.heal_group(win, grp)
        return self.repairs

    # -- what damage means for the logical stream ----------------------------------------------

    def slot_ranges(self, slots: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Logical (offset, length) ranges of data slots, merged and sorted; parity slots left
        out."""
        s = self.geom.slice
        out: list[tuple[int, int]] = []
        for w, slot in sorted(slots):
            win = self.layout.window(w)
            if slot >= win.data_slots:
                continue
            start = win.logical + slot * s
            end = min(start + s, self.layout.logical_size)
            if start >= end:
                continue
            if out and out[-1][0] + out[-1][1] >= start:
                o, n = out[-1]
                out[-1] = (o, max(n, end - o))
            else:
                out.append((start, end - start))
        return out


def open_healing(raw: StoreReader, geom: pf.Geometry | None = None,
                 trailer_crc: Callable[[bytes], int] | None = None) -> HealingReader | None:
    """A healing reader of `raw` when it is an image with parity (found by its tail; with both
    tail copies lost, by `geom` from its header, see recover_layout), else None."""
    damage: list[str] = []
    tail = find_tail(raw, damage)
    if tail is None and geom is None and trailer_crc is not None:
        geom = geometry_from_tables(raw)     # the header is damaged too
    if tail is None and geom is not None and trailer_crc is not None:
        tail = recover_layout(raw, geom, trailer_crc)
        if tail is not None:
            damage = ["parity tail: both copies damaged (the layout was found from the header "
                      "and the image trailer)"]
            log.warning("%s: both copies of the parity tail are damaged; found the layout "
                        "from the header", raw.path)
    if tail is None:
        return None
    reader = HealingReader(raw, tail)
    reader.tail_damage = damage
    return reader
