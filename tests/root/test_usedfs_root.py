"""Used blocks of xfs, NTFS, exFAT and btrfs, proven on real filesystems.

Each filesystem is made with its own mkfs on a loop device, filled with real files through a
real driver (the kernel for xfs and btrfs, the FUSE drivers for NTFS and exFAT, which this
kernel does not mount), some deleted so freed blocks hold old data, and unmounted.  Then a copy
is written in which every byte outside :func:`diskimg.disk.used.scan`'s ranges is zero, and one
in which it is 0xAA garbage: both must pass the filesystem's own checker and give back every
file byte for byte; the used byte count must not exceed partclone's by more than a little.
Damaged or dirty filesystems must be read fully.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest

from helpers import MiB, blanked_copy, fill_tree, need, run, scan_path, tree_sha256

from diskimg.disk.used import UsedMap

pytestmark = pytest.mark.root


def partclone_used(tool: str, dev: str | Path) -> int | None:
    if not shutil.which(tool):
        return None
    proc = run(tool, "-c", "-s", str(dev), "-O", "/dev/null", check=False)
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    m = re.search(r"Space in use:.*?=\s*(\d+) Blocks", text)
    b = re.search(r"Block size:\s*(\d+) Byte", text)
    return int(m.group(1)) * int(b.group(1)) if m and b else None


def prove(loops, tmp: Path, dev: str, kind: str, fsck: list[str], expect: dict,
          mount_ro, pc_tool: str, slack: float = 0.02) -> UsedMap:
    used = scan_path(dev)
    assert [(r.kind, r.analysed) for r in used.regions] == [(kind, True)], used.regions
    assert used.used_bytes < 0.9 * used.size
    pc = partclone_used(pc_tool, dev)
    if pc is not None:
        print(f"\n{kind}: scan {used.used_bytes} bytes, {pc_tool} {pc}, "
              f"ratio {used.used_bytes / pc:.4f}")
        assert used.used_bytes <= pc * (1 + slack) + 1 * MiB
    for fill in (0x00, 0xAA):
        copy = blanked_copy(dev, tmp / f"copy-{fill:02x}.img", used, fill)
        proc = run(*fsck, str(copy), check=False)
        assert proc.returncode == 0, f"{fsck} on the copy: {proc.stdout}\n{proc.stderr}"
        cdev = loops.attach(copy)
        assert mount_ro(cdev, tmp / f"mnt-{fill:02x}") == expect
        run("losetup", "-d", cdev)
        loops.devices.remove(cdev)
        copy.unlink()
    return used


def kernel_mount_ro(loops, fstype: str):
    def mount_ro(dev: str, mnt: Path) -> dict:
        loops.mount(dev, mnt, "-t", fstype, "-o", "ro,norecovery" if fstype == "xfs" else "ro")
        try:
            return tree_sha256(mnt)
        finally:
            loops.umount(mnt)
    return mount_ro


# --------------------------------------------------------------------------------------------
# xfs

@pytest.mark.parametrize("crc", ["v5", "v4"])
def test_xfs_free_space_from_the_btrees(loops, tmp_path, crc):
    need("mkfs.xfs", "xfs_repair", "xfs_db")
    dev, _ = loops.create(320 * MiB + 3 * 512, "xfs")
    run("mkfs.xfs", "-q", "-f", *(["-m", "crc=0"] if crc == "v4" else []), dev)
    if crc == "v4" and run("mount", dev, str(tmp_path), check=False).returncode:
        pytest.skip("this kernel does not mount xfs v4 (CONFIG_XFS_SUPPORT_V4 off)")
    run("umount", str(tmp_path), check=False)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, random.Random(crc), budget=48 * MiB)
    expect = tree_sha256(mnt)
    loops.umount(mnt)
    used = prove(loops, tmp_path, dev, "xfs", ["xfs_repair", "-n", "-f"], expect,
                 kernel_mount_ro(loops, "xfs"), "partclone.xfs")
    assert used.used_bytes < 0.5 * used.size


def test_xfs_damaged_or_dirty_is_read_fully(loops, tmp_path):
    need("mkfs.xfs", "xfs_db", "xfs_io")
    dev, backing = loops.create(320 * MiB, "xfs")
    run("mkfs.xfs", "-q", "-f", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, random.Random(3), budget=16 * MiB)
    loops.umount(mnt)
    good = scan_path(dev)
    assert good.regions[0].analysed

    # a bnobt record moved onto the AG's headers (its CRC recomputed by xfs_db): the trees by
    # block and by size now disagree.  (Not a new length: the first free extent may be 1 block
    # long already, and writing 1 would change nothing.)
    run("xfs_db", "-x", "-c", "agf 1", "-c", "addr bnoroot", "-c",
        "write recs[1].startblock 0", dev)
    # xfs_db writes with O_DIRECT: drop the device's cached copy that the first scan read
    run("blockdev", "--flushbufs", dev)
    bad = scan_path(dev)
    assert bad.ranges == ((0, bad.size),)
    assert "disagree" in bad.regions[0].detail or "free-space" in bad.regions[0].detail

    # shut down while mounted: the log holds changes the trees do not show
    dev2, _ = loops.create(320 * MiB, "xfs2")
    run("mkfs.xfs", "-q", "-f", dev2)
    mnt2 = loops.mount(dev2, tmp_path / "mnt2")
    (mnt2 / "f").write_bytes(os.urandom(4 * MiB))
    os.sync()
    (mnt2 / "g").write_bytes(os.urandom(4 * MiB))
    run("xfs_io", "-x", "-c", "shutdown", str(mnt2))
    loops.umount(mnt2)
    dirty = scan_path(dev2)
    assert dirty.ranges == ((0, dirty.size),)
    assert "log" in dirty.regions[0].detail


# --------------------------------------------------------------------------------------------
# NTFS (this kernel has no NTFS driver: ntfs-3g's FUSE driver fills and reads it)

def fuse_mount_ro(loops, fstype: str):
    def mount_ro(dev: str, mnt: Path) -> dict:
        loops.mount(dev, mnt, "-t", fstype, "-o", "ro")
        try:
            return tree_sha256(mnt)
        finally:
            loops.umount(mnt)
    return mount_ro


def _ntfs_first_lcn(dev: str, inode: int) -> int:
    out = run("ntfsinfo", "-i", str(inode), "-v", dev).stdout
    return int(re.search(r"^\s+0x0\s+(0x[0-9a-f]+)\s+0x", out, re.M).group(1), 16)


def _filled_once(tmp: Path, name: str, size: int, mkfs: list[str], fstype: str,
                 fill) -> tuple[Path, dict]:
    """A filesystem image made and filled once for a module (the FUSE fills are slow); each
    test attaches its own copy."""
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    dev = run("losetup", "--find", "--show", str(img)).stdout.strip()
    mnt = tmp / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        run(*mkfs, dev)
        run("mount", "-t", fstype, dev, str(mnt))
        mounted = True
        fill(mnt)
        expect = tree_sha256(mnt)
        run("umount", str(mnt))
        mounted = False
    finally:
        if mounted:
            run("umount", "-l", str(mnt), check=False)
        run("losetup", "-d", dev, check=False)
    return img, expect


def _attached_copy(loops, tmp_path: Path, made: tuple[Path, dict]) -> tuple[str, dict]:
    img, expect = made
    copy = tmp_path / img.name
    shutil.copyfile(img, copy)
    return loops.attach(copy), expect


@pytest.fixture(scope="module")
def ntfs_made(tmp_path_factory):
    need("mkntfs", "ntfs-3g", "ntfsfix", "ntfsinfo")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")

    def fill(mnt: Path) -> None:
        fill_tree(mnt, random.Random(11), budget=40 * MiB)
        (mnt / "big.bin").write_bytes(random.Random(12).randbytes(2 * MiB))
    return _filled_once(tmp_path_factory.mktemp("ntfs"), "ntfs", 160 * MiB + 3 * 512,
                        ["mkntfs", "-q", "-F", "-Q"], "ntfs-3g", fill)


@pytest.fixture
def ntfs(loops, tmp_path, ntfs_made):
    return _attached_copy(loops, tmp_path, ntfs_made)


def test_ntfs_used_clusters_from_bitmap(loops, tmp_path, ntfs):
    dev, expect = ntfs
    used = prove(loops, tmp_path, dev, "ntfs", ["ntfsfix", "-n"], expect,
                 fuse_mount_ro(loops, "ntfs-3g"), "partclone.ntfs")
    assert used.used_bytes < 0.5 * used.size


def test_ntfs_bitmap_missing_a_files_clusters_is_repaired(loops, tmp_path, ntfs):
    """Clear the $Bitmap bits of 8 of a file's clusters: the MFT walk still finds them."""
    dev, _ = ntfs
    before = scan_path(dev)
    out = run("ntfsinfo", "-F", "/big.bin", "-v", dev).stdout
    lcn, length = (int(x, 16) for x in re.search(
        r"^\s+0x0\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out, re.M).groups())
    assert length >= 24
    bitmap_lcn = _ntfs_first_lcn(dev, 6)
    with open(dev, "r+b") as f:
        f.seek(bitmap_lcn * 4096 + lcn // 8 + 1)
        f.write(b"\0")
    after = scan_path(dev)
    assert after.regions[0].analysed and after.regions[0].repaired_blocks == 8
    assert after.ranges == before.ranges
    assert "allocation map repaired: 8 blocks" in after.regions[0].detail


def test_ntfs_unclean_log_or_bitmap_disagreement_reads_fully(loops, tmp_path, ntfs):
    dev, _ = ntfs
    cs = 4096
    # $LogFile's restart area with a client in use and no "clean" flag: what Windows leaves
    # when it hibernates or shuts down with Fast Startup
    log_lcn = _ntfs_first_lcn(dev, 2)
    page = bytearray(4096)
    page[0:4] = b"RSTR"
    page[0x18:0x1A] = (0x30).to_bytes(2, "little")
    page[0x30 + 0x0C:0x30 + 0x10] = bytes(4)       # client 0 in use, flags 0
    with open(dev, "r+b") as f:
        f.seek(log_lcn * cs)
        saved = f.read(4096)
        f.seek(log_lcn * cs)
        f.write(page)
    dirty = scan_path(dev)
    assert dirty.ranges == ((0, dirty.size),)
    assert "$LogFile is not clean" in dirty.regions[0].detail
    with open(dev, "r+b") as f:
        f.seek(log_lcn * cs)
        f.write(saved)
    assert scan_path(dev).regions[0].analysed

    # the bits of the MFT's first clusters cleared in $Bitmap
    bitmap_lcn, mft_lcn = _ntfs_first_lcn(dev, 6), _ntfs_first_lcn(dev, 0)
    with open(dev, "r+b") as f:
        f.seek(bitmap_lcn * cs + mft_lcn // 8)
        f.write(b"\0")
    bad = scan_path(dev)
    assert bad.ranges == ((0, bad.size),)
    assert "disagrees" in bad.regions[0].detail


# --------------------------------------------------------------------------------------------
# exFAT (exfatprogs makes and checks it, exfat-fuse fills and reads it)

@pytest.fixture(scope="module")
def exfat_made(tmp_path_factory):
    need("mkfs.exfat", "fsck.exfat", "mount.exfat-fuse")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    return _filled_once(tmp_path_factory.mktemp("exfat"), "exfat", 96 * MiB + 3 * 512,
                        ["mkfs.exfat"], "exfat-fuse",
                        lambda mnt: fill_tree(mnt, random.Random(13), budget=30 * MiB, fat=True))


@pytest.fixture
def exfat(loops, tmp_path, exfat_made):
    return _attached_copy(loops, tmp_path, exfat_made)


def test_exfat_used_clusters_from_the_allocation_bitmap(loops, tmp_path, exfat):
    dev, expect = exfat
    used = prove(loops, tmp_path, dev, "exfat", ["fsck.exfat", "-n"], expect,
                 fuse_mount_ro(loops, "exfat-fuse"), "partclone.exfat")
    assert used.used_bytes < 0.6 * used.size
    assert [r.repaired_blocks for r in used.regions] == [0]


def _exfat_geometry(dev: str) -> tuple[int, int, int]:
    with open(dev, "rb") as f:
        boot = f.read(512)
    bps, cs = 1 << boot[0x6C], 1 << (boot[0x6C] + boot[0x6D])
    return bps, cs, int.from_bytes(boot[0x58:0x5C], "little") * bps


def test_exfat_bitmap_missing_a_files_clusters_is_repaired(loops, tmp_path, exfat):
    """Clear the allocation-bitmap bits of a file's clusters: the directory walk still finds
    them; they are read and counted."""
    dev, expect = exfat
    before = scan_path(dev)
    bps, cs, heap = _exfat_geometry(dev)
    # the bitmap's first cluster is the heap's first (mkfs.exfat puts it there); find a byte
    # of it with all 8 clusters in use that is not the bitmap's own first byte
    with open(dev, "r+b") as f:
        f.seek(heap)
        bitmap = f.read(cs)
        k = next(i for i in range(len(bitmap) - 1, 0, -1) if bitmap[i] == 0xFF)
        f.seek(heap + k)
        f.write(b"\0")
    after = scan_path(dev)
    assert after.regions[0].analysed
    assert after.regions[0].repaired_blocks == 8
    assert after.ranges == before.ranges
    assert "allocation map repaired: 8 blocks" in after.regions[0].detail


def test_exfat_dirty_reads_fully(loops, tmp_path, exfat):
    dev, _ = exfat
    with open(dev, "r+b") as f:      # VolumeFlags: VolumeDirty (not covered by the checksum)
        f.seek(0x6A)
        f.write((2).to_bytes(2, "little"))
    dirty = scan_path(dev)
    assert dirty.ranges == ((0, dirty.size),)
    assert "dirty" in dirty.regions[0].detail


# --------------------------------------------------------------------------------------------
# btrfs

def test_btrfs_used_from_the_extent_tree(loops, tmp_path):
    need("mkfs.btrfs", "btrfs")
    dev, _ = loops.create(400 * MiB + 3 * 512, "btrfs")
    run("mkfs.btrfs", "-q", "-f", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_tree(mnt, random.Random(17), budget=48 * MiB)
    expect = tree_sha256(mnt)
    loops.umount(mnt)
    used = prove(loops, tmp_path, dev, "btrfs", ["btrfs", "check", "--readonly"], expect,
                 kernel_mount_ro(loops, "btrfs"), "")
    # partclone's "space in use" counts DUP metadata once; its image holds both copies, as
    # this scan does: compare with the image (raw blocks plus a small bitmap and checksums)
    if shutil.which("partclone.btrfs"):
        pc = tmp_path / "pc.img"
        run("partclone.btrfs", "-c", "-s", dev, "-o", str(pc))
        print(f"\nbtrfs: scan {used.used_bytes} bytes, partclone image {pc.stat().st_size}")
        assert used.used_bytes <= pc.stat().st_size * 1.02 + 2 * MiB
    assert used.used_bytes < 0.5 * used.size


def test_btrfs_every_superblock_copy_is_kept_and_damage_reads_fully(loops, tmp_path):
    need("mkfs.btrfs", "btrfs")
    dev, _ = loops.create(400 * MiB, "btrfs")
    run("mkfs.btrfs", "-q", "-f", dev)
    used = scan_path(dev)
    for at in (0x10000, 0x4000000):
        assert used.is_used(at, 4096)
    # a byte of the extent tree's root changed: its checksum no longer matches
    out = run("btrfs", "inspect-internal", "dump-tree", "-t", "root", dev).stdout
    root_logical = int(re.search(r"\(EXTENT_TREE ROOT_ITEM 0\).*?bytenr (\d+)", out, re.S)
                       .group(1))
    out = run("btrfs", "inspect-internal", "dump-tree", "-t", "chunk", dev).stdout
    phys = None
    for m in re.finditer(r"key \(FIRST_CHUNK_TREE CHUNK_ITEM (\d+)\).*?length (\d+).*?"
                         r"stripe 0 devid \d+ offset (\d+)", out, re.S):
        start, length, off = map(int, m.groups())
        if start <= root_logical < start + length:
            phys = off + root_logical - start
    assert phys is not None
    with open(dev, "r+b") as f:
        f.seek(phys + 200)
        b = f.read(1)
        f.seek(phys + 200)
        f.write(bytes([b[0] ^ 0xFF]))
    bad = scan_path(dev)
    assert bad.ranges == ((0, bad.size),)
    assert "checksum" in bad.regions[0].detail
