"""Reading a source's structures safely, for the parsers of the used-block scanner.

Every parser reads through :class:`SourceReader`, which turns a read outside the source, a short
read or an I/O error into :class:`Unrecognised` ("cannot analyse: read fully"), so that no parser
has to think about it.  The decoding helpers (little-endian fields, bitmap runs, CRCs) run at C
speed (``re`` over bytes, ``int.from_bytes``/``bit_count``); :class:`RangeCollector` gathers the
used ranges as the parsers find them, merging in-order ones on the fly so that memory follows
the result.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import crcmod

from diskimg import ranges


class Unrecognised(Exception):
    """This area is not something we can analyse safely; the message says why."""


class NotThisFilesystem(Unrecognised):
    """No signature of this parser's filesystem at all: ordinary, not worth a warning (unlike
    a filesystem that was recognised and then failed a check)."""


class SourceReader:
    """pread within ``[0, size)``; a short read or an I/O error means "cannot analyse"."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Unrecognised(f"structure at byte {offset} (+{length}) lies outside the source "
                               f"({self.size} bytes)")
        parts = []
        done = 0
        while done < length:
            try:
                chunk = os.pread(self.fd, length - done, offset + done)
            except OSError as err:
                raise Unrecognised(f"read error at byte {offset + done}: {err}") from err
            if not chunk:
                raise Unrecognised(f"source ends at byte {offset + done}, before its stated size")
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def will_need(self, spans: list[tuple[int, int]]) -> None:
        """Tell the kernel which (offset, length) spans are read next, so that it reads them
        all at once instead of one by one as the parser asks (a hint: errors are ignored,
        the reads themselves still check everything)."""
        for offset, length in spans:
            if 0 <= offset < self.size and length > 0:
                try:
                    os.posix_fadvise(self.fd, offset, min(length, self.size - offset),
                                     os.POSIX_FADV_WILLNEED)
                except OSError:
                    return


class RangeCollector:
    """Collects byte ranges; merges in-order ones on the fly so memory follows the result."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []   # [start, end] in increasing order
        self._stray: list[tuple[int, int]] = []

    def add(self, start: int, length: int) -> None:
        if length <= 0:
            return
        end = start + length
        runs = self._runs
        if runs and start >= runs[-1][0]:
            last = runs[-1]
            if start <= last[1]:
                if end > last[1]:
                    last[1] = end
                return
            runs.append([start, end])
        elif not runs:
            runs.append([start, end])
        else:
            self._stray.append((start, end))

    def merged(self, size: int, min_gap: int = 0) -> tuple[tuple[int, int], ...]:
        """The collected ranges merged (and clipped to ``[0, size)``), see ranges.merge."""
        items = [(s, e - s) for s, e in self._runs]
        if self._stray:
            items += [(s, e - s) for s, e in self._stray]
        return tuple(ranges.merge(items, min_gap=min_gap, limit=size,
                                  presorted=not self._stray))


NONZERO_RUNS = re.compile(rb"[^\x00]+")   # runs of non-zero bytes
_ONES = re.compile(r"1+")


def bit_runs(bitmap: bytes) -> Iterator[tuple[int, int]]:
    """(first bit, count) of every run of set bits, bit i being ``bitmap[i // 8] >> (i % 8)``.

    Zero bytes are skipped by the regex engine, all-0xFF stretches become one run at once, and
    only stretches with mixed bytes are expanded to a bit string (``bin`` is C code too)."""
    for m in NONZERO_RUNS.finditer(bitmap):
        s, e = m.span()
        chunk = m.group()
        if chunk.count(0xFF) == len(chunk):
            yield s * 8, (e - s) * 8
            continue
        bits = bin(int.from_bytes(chunk, "little"))[:1:-1]   # character i is bit i
        base = s * 8
        for r in _ONES.finditer(bits):
            yield base + r.start(), r.end() - r.start()


def popcount(data: bytes) -> int:
    return int.from_bytes(data, "little").bit_count()


crc32c_raw = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0xFFFFFFFF, rev=True, xorOut=0)
crc16_raw = crcmod.mkCrcFun(0x18005, initCrc=0xFFFF, rev=True, xorOut=0)
# Pure-Python crcmod would make checking every bitmap's CRC slow on a big filesystem; the
# descriptor and superblock CRCs are checked either way.
FAST_CRC = bool(getattr(crcmod, "_usingExtension", False))


def u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "little")


def u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "little")


def u64(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 8], "little")

