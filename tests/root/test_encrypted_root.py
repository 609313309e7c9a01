"""Encrypted chains of a real ext4 filesystem on a loop device (issue 12): full, incremental and
differential images with a key file and with a passphrase file, each restored to a fresh
device byte-identical to a raw copy taken with its image; no image holds the marker written
into a file on the filesystem (nor the file's name); a child with another key is refused."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from helpers import MiB, cli, cmp_same, compressible, dd_copy, fill_tree, fsck_clean, mkfs

pytestmark = pytest.mark.root

MARKER = b"diskimg-encryption-marker-Q9x2"
SIZE = 32 * MiB


def _image(dev, img, *extra) -> dict:
    res = cli("image", dev, img, "--no-progress", "--json", "--all-blocks", *extra)
    assert res.rc == 0, res.err
    return res.json


@pytest.mark.parametrize("how", ["key-file", "passphrase-file"])
def test_ext4_encrypted_chain(loops, tmp_path, how):
    secret = tmp_path / "secret"
    if how == "key-file":
        secret.write_bytes(os.urandom(32))
    else:
        secret.write_text("a long passphrase for the offsite disk\n")
    key = [f"--{how}", secret]
    dev, _ = loops.create(SIZE, "ext4")
    mkfs(dev, "ext4")
    rnd = random.Random(12)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, rnd, budget=4 * MiB)
    (mnt / "marker-file-name-Zq7.txt").write_bytes((MARKER + b"\n") * 2000)
    loops.umount(mnt)

    states = []
    full = tmp_path / "full.di"
    res = _image(dev, full, "--encrypt", *key)
    states.append((full, dd_copy(dev, tmp_path / "full.raw")))
    for step, kind, parent in ((1, "--incremental", full), (2, "--differential", full)):
        mnt = loops.mount(dev, tmp_path / "mnt")
        (mnt / f"step{step}.bin").write_bytes(compressible(rnd, 2 * MiB) + MARKER * 500)
        with open(mnt / "marker-file-name-Zq7.txt", "ab") as f:
            f.write(MARKER * 100)
        loops.umount(mnt)
        img = tmp_path / f"child{step}.di"
        res = _image(dev, img, kind, states[-1][0] if step == 1 else parent, *key)
        assert 0 < res["stored_blocks"] < res["blocks"]
        states.append((img, dd_copy(dev, tmp_path / f"child{step}.raw")))

    assert MARKER in (tmp_path / "full.raw").read_bytes()
    for img, raw in states:
        data = img.read_bytes()
        assert MARKER not in data and b"marker-file-name" not in data, img
        target, _ = loops.create(SIZE, f"restore-{img.stem}")
        res = cli("restore", img, target, "--yes", "--no-progress", "--json", *key)
        assert res.rc == 0, res.err
        cmp_same(target, raw)
        fsck_clean(target, "ext4")

    # a child made with another key is refused before anything is written
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    bad = tmp_path / "bad.di"
    res = cli("image", dev, bad, "--incremental", states[-1][0], "--key-file", other,
              "--no-progress")
    assert res.rc == 2 and "opens none of its" in res.err
    assert not bad.exists() and not Path(f"{bad}.partial").exists()
