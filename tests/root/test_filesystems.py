"""Real filesystems on loop devices: ext4, xfs and vfat made with mkfs, filled with real files,
imaged, restored to another loop device and compared byte for byte, with fsck and file by file;
plus all-zero and random devices, and the targets a restore must refuse (mounted, holding a
mounted partition, too small, the source's own filesystem) and a full disk (exit 3)."""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from diskimg.disk.blockdev import open_target, stat_target
from diskimg.disk.used import scan
from helpers import (MiB, SECTOR, blanked_copy, cli, cmp_same, compressible, device_size,
                     fill_tree,
                     fsck_clean, mkfs, run, sha256_of, tree_sha256)

pytestmark = pytest.mark.root

ODD = 3 * SECTOR  # sizes that are not a multiple of the 1 MiB default block size
FS_SIZES = {"ext4": 64 * MiB + ODD, "vfat": 64 * MiB + ODD, "xfs": 300 * MiB + ODD}


def image_and_check_source(dev: str, img: Path, *extra: str) -> dict:
    """`diskimg image DEV IMG` leaves DEV unchanged; returns the --json result."""
    before = sha256_of(dev)
    res = cli("image", dev, img, "--no-progress", "--json", *extra)
    assert res.rc == 0, res.err
    assert sha256_of(dev) == before, "imaging changed the source"
    assert not Path(str(img) + ".partial").exists()
    return res.json


def restore_to(img: Path, target: str, *extra: str) -> dict:
    res = cli("restore", img, target, "--yes", "--no-progress", "--json", *extra)
    assert res.rc == 0, res.err
    return res.json


def wait_for(path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def kernel_mounts(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


def mtools_fill(dev: str, staging: Path, rnd: random.Random) -> dict[str, str]:
    """Without kernel vfat: fill `staging` with files, mcopy them onto the vfat on `dev`, then
    delete a few there (so freed clusters hold old data).  Returns the tree's hashes."""
    files = fill_tree(staging, rnd, fat=True)
    run("mcopy", "-s", "-i", dev, *sorted(str(p) for p in staging.iterdir()), "::/",
        env=MTOOLS_ENV)
    for victim in rnd.sample(files, k=5):
        run("mdel", "-i", dev, "::/" + str(victim.relative_to(staging)), env=MTOOLS_ENV)
        victim.unlink()
    run("blockdev", "--flushbufs", dev)
    return tree_sha256(staging)


def mtools_tree(dev: str, out: Path) -> dict[str, str]:
    out.mkdir()
    run("mcopy", "-s", "-n", "-i", dev, "::*", str(out) + "/", env=MTOOLS_ENV)
    return tree_sha256(out)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "vfat"])
def test_filesystem_round_trip(loops, tmp_path, fstype):
    size = FS_SIZES[fstype]
    src, _ = loops.create(size, "src")
    mkfs(src, fstype)
    rnd = random.Random(fstype)
    mountable = kernel_mounts(fstype)
    if mountable:
        mnt = loops.mount(src, tmp_path / "mnt")
        files = fill_tree(mnt, rnd, fat=fstype == "vfat")
        assert len(files) > 50
        original = tree_sha256(mnt)
        loops.umount(mnt)
    elif fstype == "vfat" and shutil.which("mcopy"):
        original = mtools_fill(src, tmp_path / "staging", rnd)  # this kernel has no vfat
    else:
        pytest.skip(f"the kernel cannot mount {fstype} and there is no other way to fill it")
    assert sum(v != "dir" for v in original.values()) > 50

    def check_files(dev: str, name: str, expected: dict[str, str]) -> None:
        """Every file on `dev` is the same as on the original filesystem."""
        if mountable:
            mnt = loops.mount(dev, tmp_path / f"restored-{name}", "-o", "ro")
            assert tree_sha256(mnt) == expected
            loops.umount(mnt)
        else:
            assert mtools_tree(dev, tmp_path / f"restored-{name}") == expected

    # --all-blocks: an exact copy, free space included
    exact = tmp_path / f"{fstype}-all.di"
    result = image_and_check_source(src, exact, "--all-blocks")
    assert result["size"] == size and result["blocks"] == size // MiB + 1
    assert result["unused_blocks"] == 0
    assert result["stored_blocks"] + result["zero_blocks"] == result["blocks"]
    assert cli("verify", exact).rc == 0
    dst, _ = loops.create(size, "dst")
    restored = restore_to(exact, dst)
    assert restored["size"] == size
    cmp_same(src, dst)
    fsck_clean(dst, fstype)
    check_files(dst, "exact", original)

    # the default reads only what the filesystem uses; restored onto a device full of garbage,
    # the free space must not matter: fsck clean, every file the same
    used = tmp_path / f"{fstype}.di"
    result = image_and_check_source(src, used)
    assert result["stored_blocks"] + result["zero_blocks"] + result["unused_blocks"] \
        == result["blocks"]
    if fstype in ("ext4", "vfat", "xfs"):
        assert result["unused_blocks"] > 0, "free space of a recognised filesystem was read"
    assert cli("verify", used).rc == 0
    garbage = tmp_path / "garbage.img"
    with open(garbage, "wb") as f:
        for _ in range(size // MiB + 1):
            f.write(os.urandom(MiB))
        f.truncate(size)
    dst2 = loops.attach(garbage)
    restored = restore_to(used, dst2)
    assert restored["zeroed_blocks"] >= result["unused_blocks"]
    fsck_clean(dst2, fstype)
    check_files(dst2, "used", original)


def random_file(path: Path, size: int, seed: int) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rnd.randbytes(MiB))
        f.write(rnd.randbytes(size % MiB))
    return path


@pytest.mark.parametrize("block_size", ["1M", "64K"])
def test_used_blocks_restore_to_exactly_the_used_bytes(loops, tmp_path, block_size):
    """Free space full of old data, on a device and inside the blocks that are read: the
    restore holds the source's bytes in every used range and zeros everywhere else, byte for
    byte, whatever data the reused read buffers held before."""
    size = 96 * MiB + ODD
    src = loops.attach(random_file(tmp_path / "src.img", size, seed=11))
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", src)   # keeps the junk in free blocks
    mnt = loops.mount(src, tmp_path / "mnt")
    fill_tree(mnt, random.Random(3), budget=40 * MiB)     # and deletes some files
    loops.umount(mnt)
    fd = os.open(src, os.O_RDONLY)
    try:
        used = scan(fd, size)
    finally:
        os.close(fd)
    assert 0.2 * size < used.used_bytes < 0.8 * size
    img = tmp_path / "used.di"
    result = image_and_check_source(src, img, "--block-size", block_size, "--threads", "2")
    assert result["unused_blocks"] > 0
    dst = loops.attach(random_file(tmp_path / "garbage.img", size, seed=12))
    restore_to(img, dst)
    cmp_same(blanked_copy(src, tmp_path / "expected.img", used, 0), dst)
    fsck_clean(dst, "ext4")


def block_device_cache() -> int:
    """Bytes of block-device pages in the page cache ("Buffers" in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Buffers:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Buffers line in /proc/meminfo")


def test_imaging_and_restoring_a_device_leave_the_page_cache_alone(loops, tmp_path):
    """A device is read and written with O_DIRECT: 128 MiB of random data imaged from one loop
    device and restored to another add (nearly) nothing to the block-device page cache, where
    `dd` through the cache adds all of it."""
    size = 128 * MiB
    src = loops.attach(random_file(tmp_path / "src.img", size, seed=14))
    dst, _ = loops.create(size, "dst")
    img = tmp_path / "src.di"
    # held open here: the kernel drops a device's cache when its last opener closes it
    held = [os.open(dev, os.O_RDONLY) for dev in (src, dst)]
    try:
        run("sync")
        run("sh", "-c", "echo 1 > /proc/sys/vm/drop_caches")
        before = block_device_cache()
        assert cli("image", src, img, "--no-progress").rc == 0
        restore_to(img, dst)
        grown = block_device_cache() - before
        run("dd", f"if={src}", "of=/dev/null", "bs=4M", "status=none")   # the contrast
        grown_by_dd = block_device_cache() - before - grown
    finally:
        for fd in held:
            os.close(fd)
    cmp_same(src, dst)
    print(f"\nblock-device cache: +{grown} bytes by image and restore, +{grown_by_dd} by dd")
    assert grown < size // 32, f"the block-device cache grew by {grown} bytes"
    assert grown_by_dd > size // 2


def test_restore_writes_a_device_with_o_direct(loops, tmp_path):
    dev, _ = loops.create(4 * MiB)
    exists, is_block, _ = stat_target(dev)
    tgt = open_target(dev, 4 * MiB, exists, is_block)
    try:
        assert tgt.direct_fd is not None and tgt.sector == 512
    finally:
        tgt.close()


def test_restore_of_an_image_not_a_whole_number_of_sectors(loops, tmp_path):
    """The last block of an image of a 5 MiB + 100 bytes file ends mid-sector: O_DIRECT cannot
    write it, the page cache does; the bytes after it on the device stay as they were."""
    size = 5 * MiB + 100
    src = random_file(tmp_path / "odd.raw", size, seed=13)
    img = tmp_path / "odd.di"
    assert cli("image", src, img, "--no-progress").rc == 0
    backing = tmp_path / "target.img"
    backing.write_bytes(b"\x5a" * (6 * MiB))
    dst = loops.attach(backing)
    restore_to(img, dst)
    cmp_same(src, dst, n=size)
    with open(dst, "rb") as f:
        f.seek(size)
        assert f.read() == b"\x5a" * (6 * MiB - size)


def test_all_zero_device(loops, tmp_path):
    size = 32 * MiB + ODD
    src, _ = loops.create(size, "zero")
    img = tmp_path / "zero.di"
    result = image_and_check_source(src, img)
    assert result["stored_blocks"] == 0
    assert result["zero_blocks"] == result["blocks"] == 33
    assert img.stat().st_size < 64 * 1024
    # a target full of random data must end up all zero
    backing = tmp_path / "dirty.img"
    with open(backing, "wb") as f:
        for _ in range(33):
            f.write(os.urandom(MiB))
        f.truncate(size)
    dst = loops.attach(backing)
    restored = restore_to(img, dst)
    assert restored["zeroed_blocks"] == 33 and restored["written_blocks"] == 0
    cmp_same(src, dst)


def test_random_device(loops, tmp_path):
    size = 32 * MiB + ODD
    backing = tmp_path / "random.img"
    backing.write_bytes(os.urandom(size))
    src = loops.attach(backing)
    img = tmp_path / "random.di"
    result = image_and_check_source(src, img, "--block-size", "256K")
    assert result["stored_blocks"] == result["blocks"] == -(-size // (256 * 1024))
    dst, _ = loops.create(size, "dst")
    restore_to(img, dst)
    cmp_same(src, dst)


@pytest.fixture
def small_image(loops, tmp_path):
    """A 16 MiB + 3 sectors loop device of mixed content and its image."""
    size = 16 * MiB + ODD
    rnd = random.Random(5)
    backing = tmp_path / "small.img"
    half = size // 2
    backing.write_bytes(compressible(rnd, half) + bytes(MiB) + rnd.randbytes(size - half - MiB))
    src = loops.attach(backing)
    img = tmp_path / "small.di"
    image_and_check_source(src, img)
    return src, img, size


def test_restore_to_larger_device(loops, tmp_path, small_image):
    src, img, size = small_image
    backing = tmp_path / "larger.img"
    backing.write_bytes(b"\x5a" * (size + 8 * MiB))
    dst = loops.attach(backing)
    res = cli("restore", img, dst, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert "larger than the image" in res.out and dst in res.out
    cmp_same(src, dst, n=size)
    with open(dst, "rb") as f:
        f.seek(size)
        assert f.read() == b"\x5a" * 8 * MiB


def test_too_small_device_refused(loops, tmp_path, small_image):
    _, img, size = small_image
    dst, _ = loops.create(size - SECTOR, "tiny")
    before = sha256_of(dst)
    res = cli("restore", img, dst, "--yes")
    assert res.rc == 2
    assert len(res.err_lines) == 1 and dst in res.err and "too small" in res.err
    assert sha256_of(dst) == before


def test_mounted_target_refused(loops, tmp_path, small_image):
    _, img, size = small_image
    dst, _ = loops.create(size, "mounted")
    mkfs(dst, "ext4")
    mnt = loops.mount(dst, tmp_path / "busy")
    (mnt / "keep.txt").write_text("still here")
    res = cli("restore", img, dst, "--yes")
    assert res.rc == 2
    assert len(res.err_lines) == 1
    assert dst in res.err and str(mnt) in res.err and "mounted" in res.err
    assert (mnt / "keep.txt").read_text() == "still here"
    loops.umount(mnt)
    fsck_clean(dst, "ext4")


def test_target_with_mounted_partition_refused(loops, tmp_path, small_image):
    _, img, size = small_image
    backing = tmp_path / "parted.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    run("sfdisk", "-q", str(backing), input="2048,20480,83\n")
    dst = loops.attach(backing, "-P")
    part = dst + "p1"
    if not os.path.exists(part):
        run("partx", "-a", dst, check=False)  # no udev here: ask the kernel explicitly
    wait_for(part)
    mkfs(part, "ext4")
    mnt = loops.mount(part, tmp_path / "part")
    res = cli("restore", img, dst, "--yes")
    assert res.rc == 2
    assert len(res.err_lines) == 1
    assert dst in res.err and part in res.err and str(mnt) in res.err
    loops.umount(mnt)
    fsck_clean(part, "ext4")


def test_image_onto_the_source_filesystem_refused(loops, tmp_path):
    src, _ = loops.create(64 * MiB + ODD, "self")
    mkfs(src, "ext4")
    mnt = loops.mount(src, tmp_path / "self")
    res = cli("image", src, mnt / "self.img")
    assert res.rc == 2
    assert len(res.err_lines) == 1
    assert str(mnt / "self.img") in res.err and src in res.err
    assert sorted(p.name for p in mnt.iterdir()) == ["lost+found"]


def small_tmpfs(loops, path: Path) -> Path:
    """A 2 MiB tmpfs at `path`, unmounted by the loops fixture even when the test fails."""
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(path))
    loops.mounts.append(str(path))
    return path


def test_disk_full_exit_3(loops, tmp_path):
    size = 8 * MiB + ODD
    backing = tmp_path / "full.img"
    backing.write_bytes(os.urandom(size))
    src = loops.attach(backing)
    small = small_tmpfs(loops, tmp_path / "tmpfs")
    img = small / "x.img"
    res = cli("image", src, img, "--no-progress")
    assert res.rc == 3, res.err
    assert len(res.err_lines) == 1 and res.err.startswith("diskimg: error: ")
    assert str(img) in res.err and "No space left" in res.err
    assert list(small.iterdir()) == []
    assert device_size(src) == size


def test_restore_disk_full_exit_3(loops, tmp_path, small_image):
    _, img, _ = small_image
    small = small_tmpfs(loops, tmp_path / "tmpfs")
    target = small / "out.raw"
    res = cli("restore", img, target, "--no-progress")
    assert res.rc == 3, res.err
    assert len(res.err_lines) == 1 and res.err.startswith("diskimg: error: ")
    assert str(target) in res.err and "No space left" in res.err
