"""Incremental and differential chains on loop devices (issue 3): an ext4 filesystem imaged as it
changes, each image restored to a fresh device and compared with a raw copy taken at that moment;
exactly-counted changed blocks on a raw device and `restore --only-changed`; parents missing,
swapped or of another size; damage in a parent seen from the child; a chain of ten incrementals."""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.image.imagefile import ImageReader
from helpers import (MiB, SECTOR, cli, cmp_same, compressible, dd_copy, dd_write, fill_tree,
                     flip_byte, fsck_clean, mkfs, sha256_of, tree_sha256)

pytestmark = pytest.mark.root

ODD = 3 * SECTOR
K64 = 64 * 1024


def image(dev: str, img: Path, *extra: str) -> dict:
    res = cli("image", dev, img, "--no-progress", "--json", *extra)
    assert res.rc == 0, res.err
    return res.json


def info(img: Path) -> dict:
    res = cli("info", img, "--json")
    assert res.rc == 0, res.err
    return res.json


def restore(img: Path, target: str, *extra: str) -> dict:
    res = cli("restore", img, target, "--yes", "--no-progress", "--json", *extra)
    assert res.rc == 0, res.err
    return res.json


# --------------------------------------------------------------------------------------------
# ext4: full, incremental 1, incremental 2, differential

def _change_files(mnt: Path, rnd: random.Random, step: int) -> None:
    """Add files, modify some in place, delete some, and write one large file."""
    files = sorted(p for p in mnt.rglob("*") if p.is_file() and "lost+found" not in p.parts)
    new = mnt / f"step{step}"
    new.mkdir()
    for i in range(20):
        (new / f"added{i}.txt").write_bytes(compressible(rnd, rnd.randint(100, 50_000)))
    for p in rnd.sample(files, k=10):  # in place: same inode, same blocks, new bytes
        size = p.stat().st_size
        if size:
            with open(p, "r+b") as f:
                f.seek(rnd.randrange(size))
                f.write(rnd.randbytes(min(100, size)))
    for p in rnd.sample(files, k=5):
        if p.exists():
            p.unlink()
    (new / "large.bin").write_bytes(rnd.randbytes(6 * MiB))
    os.sync()


@pytest.mark.parametrize("mode", ["all-blocks", "used-blocks"])
def test_ext4_full_incrementals_and_differential(loops, tmp_path, mode):
    """--all-blocks: each restore equals the raw copy taken with its image.  The default (only
    the blocks ext4 uses): each restore is fsck-clean and holds the same files."""
    extra = ["--all-blocks"] if mode == "all-blocks" else []
    size = 64 * MiB + ODD
    dev, _ = loops.create(size, "ext4")
    mkfs(dev, "ext4")
    rnd = random.Random(33)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, rnd, budget=10 * MiB)
    trees = [tree_sha256(mnt)]
    loops.umount(mnt)

    # (image, raw copy of the device when it was taken, its files)
    states: list[tuple[Path, Path, dict]] = []
    full = tmp_path / "full.di"
    res = image(dev, full, *extra)
    assert res["kind"] == "full"
    states.append((full, dd_copy(dev, tmp_path / "full.raw"), trees[-1]))

    parent = full
    for step in (1, 2):
        mnt = loops.mount(dev, tmp_path / "mnt")
        _change_files(mnt, rnd, step)
        trees.append(tree_sha256(mnt))
        loops.umount(mnt)
        inc = tmp_path / f"inc{step}.di"
        res = image(dev, inc, "--incremental", parent, *extra)
        assert res["kind"] == "incremental"
        assert 0 < res["changed_blocks"] < res["blocks"]
        assert res["stored_blocks"] <= res["changed_blocks"]
        assert res["parent"] == info(parent)["uuid"]
        states.append((inc, dd_copy(dev, tmp_path / f"inc{step}.raw"), trees[-1]))
        parent = inc

    diff = tmp_path / "diff.di"
    res = image(dev, diff, "--differential", tmp_path / "inc2.di", *extra)
    full_info, inc2_info, diff_info = info(full), info(tmp_path / "inc2.di"), info(diff)
    assert diff_info["kind"] == "differential"
    assert diff_info["parent"] == full_info["uuid"], "a differential's parent is the root full"
    assert diff_info["chain"] == [full_info["uuid"], diff_info["uuid"]]
    assert len(inc2_info["chain"]) == 3
    # everything changed since the full image, so at least as much as the last incremental
    assert diff_info["changed_blocks"] >= inc2_info["changed_blocks"]
    states.append((diff, tmp_path / "inc2.raw", trees[-1]))  # no change since incremental 2

    for img, raw, tree in states:
        assert cli("verify", img).rc == 0
        target, _ = loops.create(size, f"restore-{img.stem}")
        result = restore(img, target)
        assert len(result["chain"]) == len(info(img)["chain"])
        if mode == "all-blocks":
            cmp_same(target, raw)
        fsck_clean(target, "ext4")
        rmnt = loops.mount(target, tmp_path / f"check-{img.stem}", "-o", "ro")
        assert tree_sha256(rmnt) == tree, f"files restored from {img.name}"
        loops.umount(rmnt)


# --------------------------------------------------------------------------------------------
# exactly counted changed blocks on a raw device

BLOCKS = 200
RAW_SIZE = BLOCKS * K64 + ODD          # 201 blocks of 64K, the last one short
CHANGED = (3, 17, 40, 77, 120, 151, 199)


@pytest.fixture
def raw_pair(loops, tmp_path):
    """A raw loop device (no filesystem) with random data, its full 64K-block image, and the
    state before and after dd wrote exactly the CHANGED blocks."""
    backing = tmp_path / "raw.img"
    rnd = random.Random(7)
    backing.write_bytes(rnd.randbytes(RAW_SIZE // 2) + compressible(rnd, RAW_SIZE - RAW_SIZE // 2))
    dev = loops.attach(backing)
    full = tmp_path / "full.di"
    image(dev, full, "--block-size", "64K")
    before = dd_copy(dev, tmp_path / "before.raw")
    for b in CHANGED:
        dd_write(dev, b * K64, rnd.randbytes(K64))
    after = dd_copy(dev, tmp_path / "after.raw")
    return dev, full, before, after


def test_incremental_stores_exactly_the_changed_blocks(loops, tmp_path, raw_pair):
    dev, full, before, after = raw_pair
    inc = tmp_path / "inc.di"
    res = image(dev, inc, "--block-size", "64K", "--incremental", full)
    assert (res["changed_blocks"], res["stored_blocks"]) == (7, 7)
    i = info(inc)
    assert (i["changed_blocks"], i["stored_blocks"], i["blocks"]) == (7, 7, BLOCKS + 1)
    with ImageReader(str(inc)) as r:
        stored = [b for b, e in r.iter_entries() if e.kind == fmt.DATA]
    assert stored == list(CHANGED)

    # --only-changed onto a device holding the earlier state writes exactly those 7 blocks
    old_backing = tmp_path / "old.img"
    shutil.copyfile(before, old_backing)
    target = loops.attach(old_backing)
    result = restore(inc, target, "--only-changed")
    assert result["written_blocks"] == 7
    assert result["skipped_blocks"] == BLOCKS + 1 - 7
    assert result["read_target_blocks"] == BLOCKS + 1
    cmp_same(target, after)
    # and once more: nothing left to write
    again = restore(inc, target, "--only-changed")
    assert again["written_blocks"] == 0 and again["skipped_blocks"] == BLOCKS + 1
    cmp_same(target, after)


def test_only_changed_restore_of_the_full_image_rolls_back(loops, tmp_path, raw_pair):
    dev, full, before, after = raw_pair
    newer = tmp_path / "newer.img"
    shutil.copyfile(after, newer)
    target = loops.attach(newer)
    result = restore(full, target, "--only-changed")
    assert result["written_blocks"] == 7
    cmp_same(target, before)


# --------------------------------------------------------------------------------------------
# chains that do not fit: missing parent, swapped parent, another size

def test_missing_parent(loops, tmp_path, raw_pair):
    dev, full, _, after = raw_pair
    inc = tmp_path / "inc.di"
    image(dev, inc, "--block-size", "64K", "--incremental", full)
    uuid = info(full)["uuid"]
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.move(full, hidden / "full.di")
    target, _ = loops.create(RAW_SIZE, "target")
    before = sha256_of(target)
    res = cli("restore", inc, target, "--yes")
    assert res.rc == 2
    assert len(res.err_lines) == 1
    assert uuid in res.err and "full.di" in res.err and str(tmp_path) in res.err
    assert sha256_of(target) == before
    res = cli("image", dev, tmp_path / "inc2.di", "--incremental", inc)
    assert res.rc == 2 and uuid in res.err
    assert not (tmp_path / "inc2.di").exists()
    # found again with --search
    restore(inc, target, "--search", str(hidden))
    cmp_same(target, after)


def test_swapped_parent(loops, tmp_path, raw_pair):
    dev, full, _, _ = raw_pair
    inc = tmp_path / "inc.di"
    image(dev, inc, "--block-size", "64K", "--incremental", full)
    old_uuid = info(full)["uuid"]
    # another image under the same name (moved there: --force never replaces a parent)
    image(dev, tmp_path / "other.di", "--block-size", "64K")
    os.replace(tmp_path / "other.di", full)
    target, _ = loops.create(RAW_SIZE, "target")
    before = sha256_of(target)
    for args in (["verify", inc], ["restore", inc, target, "--yes"]):
        res = cli(*args)
        assert res.rc == 2
        assert len(res.err_lines) == 1
        assert old_uuid in res.err and str(full) in res.err and "replaced" in res.err
    assert sha256_of(target) == before


def test_different_size_source(loops, tmp_path, raw_pair):
    _, full, _, _ = raw_pair
    other, _ = loops.create(RAW_SIZE + K64, "other")
    res = cli("image", other, tmp_path / "inc.di", "--block-size", "64K", "--incremental", full)
    assert res.rc == 2
    assert len(res.err_lines) == 1
    assert other in res.err and str(RAW_SIZE) in res.err and str(RAW_SIZE + K64) in res.err
    assert not (tmp_path / "inc.di").exists() and not (tmp_path / "inc.di.partial").exists()


def test_damaged_parent_block_reported_from_child(loops, tmp_path, raw_pair):
    """Without parity (an image with parity heals a flipped byte: tests/unit/test_parity.py)."""
    dev, _, _, _ = raw_pair
    full = tmp_path / "plain.di"
    image(dev, full, "--block-size", "64K", "--parity", "0")
    inc = tmp_path / "inc.di"
    image(dev, inc, "--block-size", "64K", "--incremental", full)
    bad = 50  # unchanged since the full image: the child refers to the parent for it
    with ImageReader(str(inc)) as r:
        assert r.entry(bad).kind == fmt.PARENT
    with ImageReader(str(full)) as r:
        e = r.entry(bad)
    assert e.kind == fmt.DATA
    flip_byte(full, e.offset + fmt.RECORD_HEADER_SIZE + e.stored_len // 3)
    res = cli("verify", inc, "--json")
    assert res.rc == 1
    errors = res.json["errors"]
    assert [(x["image"], x["block"], x["offset"]) for x in errors] == \
        [(info(full)["uuid"], bad, bad * K64)]
    assert errors[0]["path"] == str(full)
    target, _ = loops.create(RAW_SIZE, "target")
    res = cli("restore", inc, target, "--yes")
    assert res.rc == 1
    assert len(res.err_lines) == 1 and f"block {bad}" in res.err and str(full) in res.err
    with open(target, "rb") as f:
        f.seek(bad * K64)
        assert f.read(RAW_SIZE - bad * K64) == bytes(RAW_SIZE - bad * K64)


# --------------------------------------------------------------------------------------------
# a chain of ten incrementals

def test_chain_of_ten_incrementals(loops, tmp_path):
    size = 128 * MiB + ODD
    rnd = random.Random(10)
    backing = tmp_path / "ten.img"
    with open(backing, "wb") as f:
        for i in range(128):
            kind = i % 6  # compressible, random and zero blocks
            f.write(bytes(MiB) if kind == 0 else rnd.randbytes(MiB) if kind == 3
                    else compressible(rnd, MiB))
        f.write(rnd.randbytes(ODD))
    dev = loops.attach(backing)
    images = [tmp_path / "0.di"]
    image(dev, images[0])
    raws = [dd_copy(dev, tmp_path / "0.raw")]
    blocks = -(-size // MiB)
    for i in range(1, 11):
        changed = set()
        for _ in range(rnd.randint(2, 5)):
            off = rnd.randrange(0, size - 64 * 1024) // SECTOR * SECTOR
            n = rnd.choice([SECTOR, 8 * SECTOR, 64 * 1024])
            dd_write(dev, off, bytes(n) if rnd.random() < 0.2 else rnd.randbytes(n))
            changed |= {off // MiB, (off + n - 1) // MiB}
        img = tmp_path / f"{i}.di"
        res = image(dev, img, "--incremental", images[-1])
        images.append(img)
        raws.append(dd_copy(dev, tmp_path / f"{i}.raw"))
        prev, now = raws[-2].read_bytes(), raws[-1].read_bytes()
        really = [b for b in range(blocks)
                  if prev[b * MiB:(b + 1) * MiB] != now[b * MiB:(b + 1) * MiB]]
        assert set(really) <= changed
        assert res["changed_blocks"] == len(really), f"incremental {i}"
    assert len(info(images[-1])["chain"]) == 11

    target, _ = loops.create(size, "target")
    for img, raw in zip(images, raws):
        restore(img, target)
        cmp_same(target, raw)

    final_full = tmp_path / "final-full.di"
    image(dev, final_full)

    def best_of_3(img: Path) -> float:
        times = []
        for _ in range(3):
            started = time.monotonic()
            restore(img, target)
            times.append(time.monotonic() - started)
            cmp_same(target, raws[-1])
        return min(times)

    chain_seconds, full_seconds = best_of_3(images[-1]), best_of_3(final_full)
    print(f"\nrestore of a {size // MiB} MiB device ({blocks} blocks of 1 MiB), best of 3: "
          f"10th incremental (chain of 11 images) {chain_seconds:.3f} s, full image of the same "
          f"state {full_seconds:.3f} s, ratio {chain_seconds / full_seconds:.2f}")
