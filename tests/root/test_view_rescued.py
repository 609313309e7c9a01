"""The block view over a rescued image: the ranges a failing device (a loop device over faultfs,
tests/faulty.py, with real EIO) could not give read as zeros, as restore writes them, and every
other byte reads as on the device."""
from __future__ import annotations

import mmap
import random

import pytest
from faulty import blank, merged, missing_requirements

from diskimg.image.chain import open_chain
from diskimg.image.view import BlockView
from helpers import cli

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
BS = 256 * KiB
SIZE = 4 * MiB + 3 * SECTOR          # a short last block
BAD = [(0, SECTOR), (BS - SECTOR, 2 * SECTOR), (MiB + 7 * SECTOR, 9 * SECTOR),
       (SIZE - SECTOR, SECTOR)]


def test_unreadable_ranges_read_as_zeros(faulty, tmp_path):
    backing = tmp_path / "disk.raw"
    data = random.Random(7).randbytes(SIZE)
    backing.write_bytes(data)
    device = faulty(backing, BAD)
    image = tmp_path / "rescued.img"
    res = cli("image", device.dev, image, "--rescue", "--block-size", "256K", "--no-progress")
    assert res.rc == 1, res.err            # exit 1: some of it was unreadable
    want = blank(data, merged(BAD))
    with open_chain(str(image)) as chain, mmap.mmap(-1, BS) as out:
        assert [tuple(r) for r in chain.leaf.footer.unreadable] == merged(BAD)
        view = BlockView(chain)
        for n in range(view.blocks):
            assert bytes(view.read_block(n, out)) == want[n * BS:(n + 1) * BS], f"block {n}"
        for start, length in merged(BAD):
            lo = max(0, start - 100)
            assert view.read(lo, start + length + 100 - lo) == want[lo:start + length + 100]
            assert view.read(start, length) == bytes(length)
        assert view.read(0, SIZE) == want
