"""The logical stream of an image with parity read front to back from a stream (`diskimg
restore -`), with healing.

An image with parity (docs/FORMAT.md section 16) stores its logical stream in windows: each
window's data (C = k * D * S logical bytes), then its checksum table, its parity and the previous
window's table again; a tail (holding the logical size) ends the file.  Logical byte x lies at
file offset ``(x // C) * W + x % C`` (W: a full window's bytes) whatever the logical size, so the
records can be read as they arrive, the tables and parity skipped as they pass; the logical size
(where the image's own trailer is) comes with the tail, read at the end.

Healing needs the window's parity, which comes after its data: the bytes of the current window
are kept (``release`` lets go of whole windows only: at most one window, about 32 MiB, plus the
record being read), and when a record fails its check the stream is read on to the end of that
window and the next one (or to its end), the window's groups checked against its table and the
damaged slices rebuilt by the same code that heals an image file
(diskimg.image.parity.HealingReader).  A window that ends before the stream is more than two
windows further is the last one: its layout then comes from the tail.
"""
from __future__ import annotations

import errno

from diskimg.errors import DiskIOError
from diskimg.format import parity as pf
from diskimg.image.parity import HealingReader, find_tail, partial_logical_size
from diskimg.store import StoreReader, StoreStat
from diskimg.store.stream import ForwardReader


class _Physical(StoreReader):
    """The stream's bytes, as the parity code reads a file: what was let go of reads as an
    I/O error (the healing code treats it as an unreadable slice), `size` is what has arrived
    (the whole stream once it ended)."""

    def __init__(self, fwd: ForwardReader) -> None:
        self.fwd = fwd
        self.path = fwd.path

    @property
    def stat(self) -> StoreStat:  # type: ignore[override]
        return StoreStat(size=self.fwd.size)

    @property
    def size(self) -> int:
        return self.fwd.size

    def pread(self, length: int, offset: int) -> bytes:
        if offset < self.fwd.base:
            raise DiskIOError(self.path, "read", OSError(errno.ESPIPE, "already passed in the "
                                                                      "stream"), offset)
        return self.fwd.pread(length, offset)

    def close(self) -> None:
        """The stream stays the caller's."""


class ParityStreamReader:
    """What stream_restore reads an image with parity through: ``pread`` and ``release`` at
    logical offsets, ``read_all`` (which reads the tail: the logical `size` is then exact),
    ``heal``.  `repaired`: the slices rebuilt so far."""

    def __init__(self, fwd: ForwardReader, geom: pf.Geometry) -> None:
        self.fwd = fwd
        self.geom = geom
        self.path = fwd.path
        self.phys = _Physical(fwd)
        self.tail: pf.Tail | None = None
        self.repaired = 0
        self.lost = 0
        self._fixed: dict[tuple[int, int], bytes] = {}   # (window, data slot) -> healed slice

    @property
    def eof(self) -> bool:
        return self.fwd.eof

    @property
    def size(self) -> int:
        """Logical bytes: all of them once the tail was read, else those arrived so far."""
        if self.tail is not None:
            return self.tail.layout.logical_size
        return partial_logical_size(self.geom, self.fwd.size)

    def _phys(self, offset: int) -> tuple[int, int, int]:
        """(window, offset in its data, file offset) of logical byte `offset`."""
        w, rel = divmod(offset, self.geom.window_data)
        return w, rel, w * self.geom.full_window_bytes + rel

    def pread(self, length: int, offset: int) -> bytes:
        end = offset + length
        if self.tail is not None:
            end = min(end, self.tail.layout.logical_size)
        parts = []
        pos = offset
        while pos < end:
            w, rel, phys = self._phys(pos)
            n = min(end - pos, self.geom.window_data - rel)
            got = self.fwd.pread(n, phys)
            parts.append(got)
            pos += len(got)
            if len(got) < n:
                break
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._patch(data, offset) if self._fixed else data

    def _patch(self, data: bytes, offset: int) -> bytes:
        s = self.geom.slice
        buf = None
        pos, end = offset, offset + len(data)
        while pos < end:
            w, rel, _ = self._phys(pos)
            slot, off = divmod(rel, s)
            take = min(s - off, end - pos)
            fixed = self._fixed.get((w, slot))
            if fixed is not None:
                if buf is None:
                    buf = bytearray(data)
                buf[pos - offset:pos - offset + take] = fixed[off:off + take]
            pos += take
        return data if buf is None else bytes(buf)

    def release(self, upto: int) -> None:
        """Let go of the windows wholly before logical byte `upto` (the current one is kept
        for healing)."""
        w = upto // self.geom.window_data
        self.fwd.release(w * self.geom.full_window_bytes)

    def read_all(self) -> None:
        """Read on to the end of the stream and its parity tail.  Raises ValueError when the
        tail is missing or damaged (both copies)."""
        self.fwd.read_all()
        if self.tail is None:
            tail = find_tail(self.phys)
            if tail is None:
                raise ValueError("no valid parity tail at the end of the stream")
            self.tail = tail

    def _layout_for(self, w: int) -> pf.Tail:
        """A layout that places window `w` and the next one where they are: full windows when
        the stream goes on for more than two windows after `w` starts, else the tail's."""
        W = self.geom.full_window_bytes
        self.fwd.pread(1, (w + 2) * W)          # read on that far (or to the end)
        if self.tail is None and self.fwd.size > (w + 2) * W:
            # the last window and the tail take less than two windows: `w` and `w + 1` are full
            return pf.Tail(pf.Layout(self.geom, (w + 2) * self.geom.window_data + 1), b"", b"")
        self.read_all()
        assert self.tail is not None
        return self.tail

    def heal(self, offset: int, length: int) -> bool:
        """Check the groups of the windows holding logical bytes [offset, offset + length)
        against their tables and rebuild their damaged slices; True when a slice there was
        rebuilt (a read of the range then returns the healed bytes)."""
        before = len(self._fixed)
        last = max(offset, offset + length - 1)
        for w in range(offset // self.geom.window_data, last // self.geom.window_data + 1):
            try:
                tail = self._layout_for(w)
            except ValueError:
                return False
            healer = HealingReader(self.phys, tail)
            lo = max(offset, w * self.geom.window_data)
            hi = min(last + 1, (w + 1) * self.geom.window_data)
            healer.heal(lo, hi - lo)
            self._fixed.update(healer._fixed)
            self.repaired += len(healer.repairs.repaired)
            self.lost += len(healer.repairs.lost)
        return len(self._fixed) > before
