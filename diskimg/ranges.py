"""Interval arithmetic on byte ranges: sorted lists of ``(offset, length)`` pairs.

Imaging intersects the used ranges of a filesystem with the data of a sparse file, the used-block
scanner merges what its parsers collect, rescue merges its unreadable areas, and so on: one
implementation here, at the bottom layer (it imports nothing), instead of one per caller.

Every function takes and returns ranges sorted by offset; ``merge`` also accepts unsorted,
overlapping input and is what turns such a collection into the canonical form (sorted, no
overlaps, no two ranges touching) the others assume where they say so.  All work in one pass
(plus a sort in ``merge``), so that a map of a million ranges costs a million steps.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Sequence

Range = tuple[int, int]

__all__ = ["Range", "clip", "intersect", "merge", "subtract", "total"]


def merge(ranges: Iterable[Range], *, min_gap: int = 0, limit: int | None = None,
          presorted: bool = False) -> list[Range]:
    """The union of `ranges` as sorted ranges that neither overlap nor touch.

    Ranges closer than `min_gap` bytes are merged too (fewer, longer reads for a few bytes
    more); with `limit`, everything is clipped to ``[0, limit)``.  Empty ranges are dropped.
    `presorted` skips the sort when the caller knows the input is sorted by offset."""
    items = ranges if presorted else sorted(ranges)
    out: list[Range] = []
    cur_s = cur_e = -1
    for s, n in items:
        e = s + n
        if limit is not None:
            s, e = max(s, 0), min(e, limit)
        if e <= s:
            continue
        if cur_e >= 0 and (s <= cur_e or s - cur_e < min_gap):
            if e > cur_e:
                cur_e = e
            continue
        if cur_e >= 0:
            out.append((cur_s, cur_e - cur_s))
        cur_s, cur_e = s, e
    if cur_e >= 0:
        out.append((cur_s, cur_e - cur_s))
    return out


def intersect(a: Iterable[Range], b: list[Range]) -> list[Range]:
    """The bytes in both `a` and `b` (each sorted and free of overlaps), as sorted ranges."""
    out: list[Range] = []
    j = 0
    nb = len(b)
    for off, length in a:
        end = off + length
        while j < nb and b[j][0] + b[j][1] <= off:
            j += 1
        k = j
        while k < nb and b[k][0] < end:
            lo, hi = max(off, b[k][0]), min(end, b[k][0] + b[k][1])
            if hi > lo:
                out.append((lo, hi - lo))
            k += 1
    return out


def clip(ranges: Sequence[Range], offset: int, length: int) -> list[Range]:
    """The parts of `ranges` (sorted, free of overlaps) inside the window
    ``[offset, offset + length)``; found by bisection, so a small window of a long list costs
    what it holds, not what precedes it."""
    end = offset + length
    i = bisect_right(ranges, offset, key=lambda r: r[0]) - 1
    if i < 0 or ranges[i][0] + ranges[i][1] <= offset:
        i += 1
    out: list[Range] = []
    while i < len(ranges) and ranges[i][0] < end:
        lo, hi = max(ranges[i][0], offset), min(ranges[i][0] + ranges[i][1], end)
        if hi > lo:
            out.append((lo, hi - lo))
        i += 1
    return out


def subtract(a: Iterable[Range], b: list[Range]) -> list[Range]:
    """The bytes of `a` that are not in `b` (each sorted and free of overlaps)."""
    out: list[Range] = []
    j = 0
    nb = len(b)
    for off, length in a:
        pos, end = off, off + length
        while j < nb and b[j][0] + b[j][1] <= pos:
            j += 1
        k = j
        while k < nb and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0] - pos))
            pos = max(pos, b[k][0] + b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def total(ranges: Iterable[Range]) -> int:
    """How many bytes the ranges cover (counting overlaps twice: merge first if they may)."""
    return sum(n for _, n in ranges)
