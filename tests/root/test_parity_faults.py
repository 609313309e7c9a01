"""Real bad sectors in an image with parity: the image file served by faultfs (tests/faultfs.py),
whose configured byte ranges fail with EIO as a dying disk's would, and restore, verify and
incrementals reading through them with parity filling the unreadable ranges.

Windows are made small (1 MiB of data, depth 8 at the default 32+2: a burst of up to 15 slices
of 4 KiB per window is within capacity) so that a few-MiB image spans several windows."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from faulty import missing_requirements
from helpers import cli

from diskimg.format import parity as pf
from diskimg.image.parity import find_tail
from diskimg.store.local import LocalStore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

S = pf.SLICE
SIZE = 5 * 1024 * 1024 + 777


@pytest.fixture(scope="module")
def small_windows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf, "WINDOW_DATA", 1 << 20)
        yield


@pytest.fixture(scope="module")
def made(small_windows, tmp_path_factory) -> tuple[Path, Path, pf.Layout]:
    work = tmp_path_factory.mktemp("parity-faults")
    src = work / "disk.raw"
    rnd = random.Random(5)
    src.write_bytes(rnd.randbytes(SIZE - 100000) + b"text\n" * 20000)
    img = work / "full.img"
    assert cli("image", src, img, "--block-size", "64K", "--no-progress").rc == 0
    with LocalStore(str(work)).open(img.name) as raw:
        layout = find_tail(raw).layout
    return src, img, layout


def test_restore_fills_unreadable_sectors_from_parity(faulty, made, tmp_path):
    src, img, layout = made
    w1, w3 = layout.window(1), layout.window(3)
    bad = [(0, S),                                   # the header's sector
           (w1.slot_phys(7) + 512, 1024),            # part of a sector in window 1
           (w3.phys + 3 * S, 14 * S),                # a burst of 14 sectors in window 3
           (layout.tail_phys, 2 * S)]                # both tail copies: the layout is found
                                                     # from the checksum tables
    device = faulty(img, bad)
    res = cli("verify", device.fuse_file, "--json", "--no-progress")
    assert res.rc == 1, res.err
    errors = json.loads(res.out)["errors"]
    assert errors and all(e["repairable"] for e in errors), errors
    target = tmp_path / "restored.raw"
    res = cli("restore", device.fuse_file, target, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert "REPAIRED on the fly by parity" in res.out
    assert target.read_bytes() == src.read_bytes()
    assert any(r == "EIO" for _, _, r in device.reads())    # the errors were real


def test_incremental_heals_its_parent_through_eio(faulty, made, tmp_path):
    src, img, layout = made
    w2 = layout.window(2)
    device = faulty(img, [(w2.phys, 4 * S), (w2.slot_phys(9), S)])
    changed = tmp_path / "changed.raw"
    data = bytearray(src.read_bytes())
    data[100:200] = b"x" * 100
    changed.write_bytes(bytes(data))
    inc = tmp_path / "inc.img"
    res = cli("image", changed, inc, "--incremental", device.fuse_file, "--no-progress")
    assert res.rc == 0, res.err
    target = tmp_path / "restored.raw"
    res = cli("restore", inc, target, "--yes", "--no-progress",
              "--search", str(device.fuse_file.parent))
    assert res.rc == 0, res.err
    assert target.read_bytes() == bytes(data)


def test_unreadable_beyond_capacity_names_the_blocks(faulty, made, tmp_path):
    src, img, layout = made
    win = layout.window(1)
    group = win.group_slots(2)[0][:layout.geom.m + 1]
    device = faulty(img, [(win.slot_phys(sl), S) for sl in group])
    res = cli("verify", device.fuse_file, "--json", "--no-progress")
    lost = [e for e in json.loads(res.out)["errors"] if e["repairable"] is False]
    assert lost and all(e["block"] is not None for e in lost)
    res = cli("restore", device.fuse_file, tmp_path / "t.raw", "--yes", "--no-progress")
    assert res.rc == 1
    assert f"block {lost[0]['block']} " in res.err and "beyond what parity repairs" in res.err
