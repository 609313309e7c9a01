"""plan_blocks against a block-by-block reference: which blocks are read (and which bytes of
them), which are holes (ZERO) and which are free space (UNUSED)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from diskimg import format as fmt
from diskimg.ops.imaging import Read, Run, plan_blocks
from diskimg.ranges import intersect as _intersect


def ranges_strategy(size):
    return st.lists(st.integers(0, size), max_size=12).map(
        lambda cuts: _pairs(sorted(set(cuts)), size))


def _pairs(cuts, size):
    out = []
    for a, b in zip(cuts[::2], cuts[1::2]):
        if b > a:
            out.append((a, b - a))
    return out


def reference(size, bs, read, used):
    blocks = -(-size // bs)
    out = []
    for b in range(blocks):
        start, end = b * bs, min(b * bs + bs, size)
        parts = [(max(start, o) - start, min(end, o + n) - max(start, o))
                 for o, n in read if o < end and o + n > start]
        if parts:
            whole = parts == [(0, end - start)]
            out.append(("read", b, None if whole else tuple(parts)))
        elif any(o < end and o + n > start for o, n in used):
            out.append(("zero", b))
        else:
            out.append(("unused", b))
    return out


def flatten(plan):
    out = []
    for item in plan:
        if isinstance(item, Read):
            out.append(("read", item.block, item.parts))
        else:
            assert isinstance(item, Run) and item.count >= 1
            name = {fmt.ZERO: "zero", fmt.UNUSED: "unused"}[item.kind]
            out += [(name, b) for b in range(item.first, item.first + item.count)]
    return out


@given(data=st.data(), size=st.integers(1, 40 * 1024), bs=st.sampled_from([512, 1024, 4096]))
def test_plan_matches_block_by_block_reference(data, size, bs):
    used = data.draw(ranges_strategy(size))
    holes = data.draw(ranges_strategy(size))
    read = _intersect(holes, used)
    assert flatten(plan_blocks(size, bs, read, used)) == reference(size, bs, read, used)


def test_intersect():
    assert _intersect([(0, 10), (20, 10)], [(5, 20)]) == [(5, 5), (20, 5)]
    assert _intersect([(0, 100)], [(0, 100)]) == [(0, 100)]
    assert _intersect([(0, 10)], []) == []
