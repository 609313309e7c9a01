"""diskimg.ranges against a byte-set reference: any sorted, disjoint ranges, any sizes."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from diskimg.ranges import intersect, merge, subtract, total


def _bytes(ranges) -> set[int]:
    return {b for off, n in ranges for b in range(off, off + n)}


def _canonical(byte_set: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(byte_set):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


raw_ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=12)
disjoint = raw_ranges.map(lambda r: merge(r))


@given(raw_ranges)
def test_merge_is_the_canonical_union(r):
    got = merge(r)
    assert got == _canonical(_bytes(r))
    assert total(got) == len(_bytes(r))


@given(raw_ranges, st.integers(0, 30), st.integers(0, 400))
def test_merge_min_gap_and_limit(r, gap, limit):
    got = merge(r, min_gap=gap, limit=limit)
    want = _canonical({b for b in _bytes(r) if b < limit})
    # gaps shorter than min_gap are filled in, longer ones stay
    filled: list[tuple[int, int]] = []
    for off, n in want:
        if filled and off - (filled[-1][0] + filled[-1][1]) < gap:
            filled[-1] = (filled[-1][0], off + n - filled[-1][0])
        else:
            filled.append((off, n))
    assert got == filled


@given(disjoint, disjoint)
def test_intersect_and_subtract(a, b):
    assert intersect(a, b) == _canonical(_bytes(a) & _bytes(b))
    assert subtract(a, b) == _canonical(_bytes(a) - _bytes(b))
    assert _bytes(intersect(a, b)) | _bytes(subtract(a, b)) == _bytes(a)


def test_examples():
    assert intersect([(0, 10), (20, 10)], [(5, 20)]) == [(5, 5), (20, 5)]
    assert subtract([(0, 30)], [(5, 5), (20, 20)]) == [(0, 5), (10, 10)]
    assert merge([(100, 10), (0, 10), (10, 5), (50, 0)]) == [(0, 15), (100, 10)]


@given(disjoint, st.integers(0, 350), st.integers(0, 80))
def test_clip_is_intersect_with_one_window(r, offset, length):
    from diskimg.ranges import clip
    assert clip(r, offset, length) == intersect(r, [(offset, length)] if length else [])
