"""Delta records (issue 19, format feature "delta"): chains on loop devices whose changed blocks
are stored as their changed 4 KiB pages.  Raw data: scattered 4 KiB writes, writes that straddle
pages, a block changed entirely, a block changed back to its parent's content, a delta on a delta
on a full, a differential (deltas against the full); every point restores byte-identical; a
damaged page of a parent block is named by verify.  ext4: files changed in place, every point
restores byte-identical and fsck-clean with the same files."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.image.imagefile import ImageReader
from helpers import (MiB, SECTOR, cli, cmp_same, compressible, dd_copy, fill_tree, fsck_clean,
                     flip_byte, mkfs, run, tree_sha256)

# damage is put at places of the layout of images without parity (tests/*/test_parity*.py
# test images with parity)
pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_default_parity")]

PAGE = 4096
SIZE = 16 * MiB + 3 * SECTOR     # a short last block


def image(dev: str, img: Path, *extra: str) -> dict:
    res = cli("image", dev, img, "--no-progress", "--json", *extra)
    assert res.rc == 0, res.err
    return res.json


def info(img: Path) -> dict:
    res = cli("info", img, "--json")
    assert res.rc == 0, res.err
    return res.json


def write(dev: str, offset: int, data: bytes) -> None:
    """Write through the page cache (any offset and length) and flush: imaging reads the device
    with O_DIRECT, which writes dirty pages back first."""
    fd = os.open(dev, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def kinds(img: Path) -> dict[int, int]:
    """block -> index kind"""
    with ImageReader(str(img)) as r:
        return {b: e.kind for b, e in r.iter_entries()}


@pytest.fixture(scope="module")
def raw_chain(tmp_path_factory):
    """A raw device imaged at five points: full, inc1, inc2, diff (against the full), inc3;
    with a raw copy of the device at each point and what changed where."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup: loop devices")
    tmp = tmp_path_factory.mktemp("delta")
    backing = tmp / "raw.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    # shared by the module's tests (the `loops` fixture is per test): attached and always
    # detached here
    dev = run("losetup", "--find", "--show", str(backing)).stdout.strip()
    try:
        rnd = random.Random(19)
        # half incompressible, half compressible, so that deltas go through zstd and raw
        write(dev, 0, rnd.randbytes(8 * MiB) + compressible(rnd, SIZE - 8 * MiB))
        points: list[tuple[Path, Path, dict]] = []

        def take(name: str, *extra: str) -> None:
            img = tmp / f"{name}.di"
            res = image(dev, img, *extra)
            points.append((img, dd_copy(dev, tmp / f"{name}.raw"), res))

        take("full")
        # inc1: scattered aligned 4 KiB writes, one byte, writes straddling pages
        for b in range(0, 12):
            write(dev, b * MiB + rnd.randrange(256) * PAGE, rnd.randbytes(PAGE))
        write(dev, 12 * MiB + 777, b"\x01")
        for b in (13, 14):
            write(dev, b * MiB + 5 * PAGE - 100, rnd.randbytes(300))      # straddles 4|5
            write(dev, b * MiB + 9 * PAGE + 10, rnd.randbytes(2 * PAGE))  # pages 9, 10, 11
        write(dev, SIZE - 700, rnd.randbytes(700))   # the short last block
        original7 = read(dev, 7 * MiB, MiB)
        take("inc1", "--incremental", tmp / "full.di")
        # inc2: block 3 rewritten entirely; block 7 changed and changed back (unchanged);
        # block 0 reverted to the full's content (a delta against inc1's delta); more pages of
        # blocks already deltas (delta on delta on full)
        write(dev, 3 * MiB, rnd.randbytes(MiB))
        write(dev, 7 * MiB + 5, b"changed")
        write(dev, 7 * MiB, original7)
        write(dev, 0, (tmp / "full.raw").read_bytes()[:MiB])
        for b in (1, 2, 13):
            write(dev, b * MiB + rnd.randrange(256) * PAGE + 1234, rnd.randbytes(PAGE))
        take("inc2", "--incremental", tmp / "inc1.di")
        take("diff", "--differential", tmp / "inc2.di")
        for b in (1, 2, 5):
            write(dev, b * MiB + rnd.randrange(250) * PAGE, rnd.randbytes(3 * PAGE))
        take("inc3", "--incremental", tmp / "inc2.di")
        yield tmp, points
    finally:
        run("losetup", "-d", dev, check=False)


def test_every_point_restores_byte_identical(raw_chain, tmp_path):
    tmp, points = raw_chain
    for img, raw, _ in points:
        res = cli("verify", img)
        assert res.rc == 0, res.out + res.err
        target = tmp_path / f"{img.stem}.out"
        res = cli("restore", img, target, "--yes", "--no-progress")
        assert res.rc == 0, res.err
        cmp_same(target, raw)
        target.unlink()


def test_few_pages_changed_are_stored_as_deltas(raw_chain):
    tmp, points = raw_chain
    res = {img.stem: r for img, _, r in points}
    full, inc1, inc2, diff, inc3 = (res[n] for n in ("full", "inc1", "inc2", "diff", "inc3"))
    assert full["delta_blocks"] == 0 and full["page_hash_bytes"] > 0
    # 16 changed blocks; 15 hold a few changed pages among 256: deltas; the short last block
    # is one page, all of it changed: stored whole
    assert inc1["changed_blocks"] == inc1["stored_blocks"] == 16
    assert inc1["delta_blocks"] == 15
    assert kinds(tmp / "inc1.di")[16] == fmt.DATA
    assert inc1["stored_bytes"] < 16 * 4 * PAGE + 16 * 1024, inc1
    assert inc1["delta_saved_bytes"] > 14 * MiB
    k = kinds(tmp / "inc2.di")
    assert k[3] == fmt.DATA, "a block changed entirely is stored whole"
    assert k[7] == fmt.PARENT, "a block changed back to its parent's content is unchanged"
    assert k[0] == fmt.DELTA and k[1] == fmt.DELTA and k[13] == fmt.DELTA
    assert inc2["delta_blocks"] == inc2["stored_blocks"] - 1
    # the differential stores deltas against the full: every changed block but block 3 and
    # the one-page last block
    kd = kinds(tmp / "diff.di")
    assert kd[3] == kd[16] == fmt.DATA and kd[1] == kd[13] == fmt.DELTA
    assert kd[0] == fmt.PARENT, "block 0 is the full's content again"
    assert diff["delta_blocks"] == diff["stored_blocks"] - 2
    i = info(tmp / "inc3.di")
    assert i["features"] == ["delta"] and i["format_version"] == 3
    assert i["delta_blocks"] == 3 and i["whole_blocks"] == 0
    assert i["delta_saved_bytes"] > 2 * MiB
    f = info(tmp / "full.di")
    assert f["features"] == [] and f["format_version"] == 2, \
        "page hashes alone need no feature: old readers read the full image"
    # the space page hashes cost: 2 KiB per 1 MiB block, plus a record header
    assert f["page_hash_bytes"] <= f["stored_blocks"] * (2048 + 60 + 64)
    text = cli("info", tmp / "inc3.di").out
    assert "3 as deltas" in text and "page hashes:" in text


def test_damaged_parent_page_is_named(raw_chain, tmp_path):
    """A flipped byte in page 9 of block 2 of the full image: verify of the last incremental
    names that block and page in the full, and every delta on it (inc1, inc2, inc3); restore stops there."""
    tmp, points = raw_chain
    work = tmp_path / "copy"
    work.mkdir()
    for img, _, _ in points:
        (work / img.name).write_bytes(img.read_bytes())
    with ImageReader(str(work / "full.di")) as r:
        e = r.entry(2)
        assert e.kind == fmt.DATA
        if e.codec == fmt.CODEC_RAW:
            pos = e.offset + fmt.RECORD_HEADER_SIZE + 9 * PAGE + 17
        else:
            pytest.skip("block 2 was compressed: a flipped byte breaks the frame")
    flip_byte(work / "full.di", pos)
    res = cli("verify", work / "inc3.di")
    assert res.rc == 1
    lines = [ln for ln in res.out.splitlines() if ln.startswith("BAD")]
    assert any("full.di: block 2 " in ln and "page 9 (bytes" in ln for ln in lines), res.out
    assert any("inc1.di: block 2 " in ln and "a delta on a damaged parent block" in ln
               for ln in lines), res.out
    res = cli("restore", work / "inc3.di", tmp_path / "out", "--yes", "--no-progress")
    assert res.rc == 1 and "page 9 (bytes" in res.err
    assert not (tmp_path / "out").exists()


def test_damaged_delta_record_is_its_own_block(raw_chain, tmp_path):
    """Damage in a delta record is reported against the incremental that holds it, not its
    parent: the parent's block checks out, the delta applied to it does not."""
    tmp, points = raw_chain
    work = tmp_path / "copy"
    work.mkdir()
    for img, _, _ in points[:2]:
        (work / img.name).write_bytes(img.read_bytes())
    with ImageReader(str(work / "inc1.di")) as r:
        e = r.entry(4)
        assert e.kind == fmt.DELTA
    flip_byte(work / "inc1.di", e.offset + fmt.RECORD_HEADER_SIZE + e.stored_len - 5)
    res = cli("verify", work / "inc1.di")
    assert res.rc == 1
    bad = [ln for ln in res.out.splitlines() if ln.startswith("BAD")]
    assert len(bad) == 1 and "inc1.di: block 4 " in bad[0], res.out


def test_ext4_files_changed_in_place(loops, tmp_path):
    """ext4 (--all-blocks): files rewritten in place a few pages at a time; the incrementals
    hold deltas, each point restores byte-identical, fsck-clean, with the same files."""
    size = 48 * MiB
    dev, _ = loops.create(size, "ext4")
    mkfs(dev, "ext4")
    rnd = random.Random(1919)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, rnd, budget=8 * MiB)
    big = mnt / "db.bin"
    big.write_bytes(rnd.randbytes(12 * MiB))
    os.sync()
    trees = [tree_sha256(mnt)]
    loops.umount(mnt)
    points = [(tmp_path / "full.di", dd_copy(dev, tmp_path / "full.raw"), trees[0])]
    image(dev, points[0][0], "--all-blocks")
    for step in (1, 2):
        mnt = loops.mount(dev, tmp_path / "mnt")
        with open(mnt / "db.bin", "r+b") as f:      # a database's page writes
            for _ in range(60):
                f.seek(rnd.randrange(12 * MiB // PAGE) * PAGE)
                f.write(rnd.randbytes(PAGE))
        (mnt / f"new{step}.txt").write_bytes(compressible(rnd, 20_000))
        os.sync()
        tree = tree_sha256(mnt)
        loops.umount(mnt)
        img = tmp_path / f"inc{step}.di"
        res = image(dev, img, "--all-blocks", "--incremental", points[-1][0])
        assert res["delta_blocks"] >= res["stored_blocks"] // 2, res
        assert res["stored_bytes"] < 3 * MiB
        points.append((img, dd_copy(dev, tmp_path / f"inc{step}.raw"), tree))
    for img, raw, tree in points:
        assert cli("verify", img).rc == 0
        target, _ = loops.create(size, f"restore-{img.stem}")
        res = cli("restore", img, target, "--yes", "--no-progress")
        assert res.rc == 0, res.err
        cmp_same(target, raw)
        fsck_clean(target, "ext4")
        rmnt = loops.mount(target, tmp_path / f"check-{img.stem}", "-o", "ro")
        assert tree_sha256(rmnt) == tree
        loops.umount(rmnt)
