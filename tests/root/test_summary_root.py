"""Summaries of images of real loop devices: the counts add up with unused blocks (ext4) and
unreadable ones (a rescue of a faulty device), and `info` names the loop device's backing file."""
from __future__ import annotations

import os
import random
import re

import pytest
from helpers import MiB, cli, run

pytestmark = pytest.mark.root

KINDS = ("stored_blocks", "zero_blocks", "unused_blocks", "unchanged_blocks")


def test_ext4_full_and_incremental_add_up(loops, tmp_path):
    dev, backing = loops.create(32 * MiB, "ext")
    run("mkfs.ext4", "-q", "-F", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    (mnt / "a").write_bytes(random.Random(1).randbytes(3 * MiB))
    loops.umount(mnt)
    full = cli("image", dev, tmp_path / "full.img", "--block-size", "64K", "--json")
    assert full.rc == 0, full.err
    mnt = loops.mount(dev, tmp_path / "mnt")
    (mnt / "b").write_bytes(random.Random(2).randbytes(2 * MiB))
    (mnt / "a").unlink()
    loops.umount(mnt)
    text = cli("image", dev, tmp_path / "inc.img", "--incremental", tmp_path / "full.img")
    assert text.rc == 0, text.err
    info = cli("info", tmp_path / "inc.img", "--json").json
    for d in (full.json, info):
        assert d["unused_blocks"] > 0
        assert sum(d[k] for k in KINDS) == d["blocks"]
    assert info["changed_blocks"] == info["blocks"] - info["unchanged_blocks"] \
        - info["unchanged_zero_blocks"]
    assert info["source"]["backing_file"] == str(backing)
    out = cli("info", tmp_path / "inc.img").out
    assert f"loop device backed by {backing}" in out
    m = re.search(r"= stored (\d+) \+ zero (\d+) \+ unused (\d+) \+ unchanged (\d+)", text.out)
    assert sum(map(int, m.groups())) == info["blocks"]


def test_rescue_with_unreadable_blocks_adds_up(faulty, tmp_path):
    backing = tmp_path / "disk.img"
    data = random.Random(3).randbytes(4 * MiB) + bytes(2 * MiB)
    backing.write_bytes(data)
    device = faulty(backing, [(MiB + 4096, 512), (5 * MiB, 1024)])  # one in data, one in zeros
    img = tmp_path / "r.img"
    res = cli("image", device.dev, img, "--rescue", "--block-size", "256K", "--json")
    assert res.rc == 1, res.err
    info = cli("info", img, "--json").json
    for d in (res.json, info):
        assert sum(d[k] for k in KINDS) == d["blocks"]
        assert d["unreadable_blocks"] == 2
    text = cli("info", img).out
    assert "2 of them hold unreadable sectors" in text
    assert info["rescue"] is True and os.path.getsize(img) > 0
