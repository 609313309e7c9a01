"""The routes to destroying an image or a disk, closed, on real loop devices: every path is
compared by what it is (a loop device by its backing file, a partition by its disk), never by
its name.  Each refusal is exit 2 and one line naming both paths, and changes nothing (bytes
and mtimes checked).  Also: a source that is not the parent's disk (no serial: filesystem
UUID, GPT GUID) and a source mounted read-write."""
from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from diskimg.disk import identity
from helpers import MiB, cli, compressible, run, sha256_of

pytestmark = pytest.mark.root


# --------------------------------------------------------------------------------------------
# helpers

def stamp(*paths) -> dict:
    """Content hash and mtime of files (and content of devices): what must not change."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = (sha256_of(p), st.st_mtime_ns if not str(p).startswith("/dev/") else 0)
    return out


def refused(res, *names) -> str:
    """Exit 2, one line, naming every one of `names`."""
    lines = res.err.strip().splitlines()
    assert res.rc == 2, res.err
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: "), lines
    for n in names:
        assert str(n) in lines[0], (str(n), lines[0])
    return lines[0]


def write_mbr(path: Path, parts: list[tuple[int, int, int]]) -> None:
    """An MBR partition table: (type, first sector, sectors) per partition."""
    mbr = bytearray(512)
    for i, (ptype, start, count) in enumerate(parts):
        mbr[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype,
                                                        b"\0\0\0", start, count)
    mbr[440:444] = os.urandom(4)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)


def partitioned(loops, name: str = "pdisk") -> tuple[str, Path]:
    """A 32 MiB loop device with p1 (12 MiB, ext4) and p2 (the rest)."""
    dev, backing = loops.create(32 * MiB, name)
    run("losetup", "-d", dev)
    loops.devices.remove(dev)
    write_mbr(backing, [(0x83, 2048, 24576), (0x83, 26624, 65536 - 26624)])
    dev = loops.attach(backing, "-P")
    if not os.path.exists(dev + "p2"):
        run("partx", "-a", dev, check=False)     # no udev here: ask the kernel explicitly
    if not os.path.exists(dev + "p2"):
        pytest.skip("the kernel did not create loop partitions")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev + "p1")
    return dev, backing


@pytest.fixture
def chain(tmp_path):
    """full <- inc of a 2 MiB file of random bytes: the image files are larger than the
    source, so a loop device over one of them is a target large enough for a restore."""
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(2 * MiB))
    src.write_bytes(data)
    full, inc = tmp_path / "full.dimg", tmp_path / "inc.dimg"
    assert cli("image", src, full, "--block-size", "64K", "--no-progress").rc == 0
    data[MiB:MiB + 100] = os.urandom(100)
    src.write_bytes(data)
    res = cli("image", src, inc, "--incremental", full, "--no-progress")
    assert res.rc == 0, res.err
    assert full.stat().st_size > src.stat().st_size
    return src, full, inc


# --------------------------------------------------------------------------------------------
# the identity rule on loop devices

def test_loop_device_is_identified_by_its_backing_file(loops, tmp_path):
    dev, backing = loops.create(4 * MiB, "id")
    lo, f = identity.identify(dev), identity.identify(str(backing))
    assert identity.overlap(lo, f) == f"{dev} is backed by {backing}"
    assert identity.overlap(f, lo) == f"{dev} is backed by {backing}"
    assert not identity.same(lo, f)
    assert identity.loops_backed_by(str(backing)) == [dev]
    # renamed: the path the kernel shows is stale, the inode is not
    moved = tmp_path / "renamed.img"
    os.rename(backing, moved)
    assert identity.overlap(identity.identify(dev), identity.identify(str(moved)))
    assert identity.loops_backed_by(str(moved)) == [dev]
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4 * MiB))
    assert identity.overlap(identity.identify(dev), identity.identify(str(other))) is None
    # two loop devices over one file overlap
    dev2 = loops.attach(moved)
    assert identity.overlap(identity.identify(dev), identity.identify(dev2))
    assert sorted(identity.loops_backed_by(str(moved))) == sorted([dev, dev2])


def test_partitions_are_identified_by_their_disk(loops, tmp_path):
    dev, backing = partitioned(loops)
    p1, p2 = identity.identify(dev + "p1"), identity.identify(dev + "p2")
    whole, f = identity.identify(dev), identity.identify(str(backing))
    assert identity.overlap(p1, p2) is None            # side by side on one disk
    assert identity.overlap(p1, whole) == f"{dev}p1 is a partition of {dev}"
    assert identity.overlap(f, p1) == (f"{dev}p1 lies in {backing}, the backing file of {dev}")
    # through a symlink, as /dev/disk/by-id/... would be
    link = tmp_path / "by-id-link"
    link.symlink_to(dev + "p1")
    assert identity.same(identity.identify(str(link)), p1)


# --------------------------------------------------------------------------------------------
# route 2: restoring onto the loop device of the image itself or of its chain

def test_restore_onto_the_loop_device_of_its_own_image(loops, tmp_path, chain):
    _, full, inc = chain
    before = stamp(full, inc)
    for image, backing in ((full, full), (inc, full), (inc, inc)):
        dev = loops.attach(backing)
        line = refused(cli("restore", image, dev, "--yes", "--no-progress"), dev, backing)
        assert "chain being restored" in line
        run("losetup", "-d", dev)
        loops.devices.remove(dev)
    assert stamp(full, inc) == before


def test_restore_onto_the_loop_device_of_a_renamed_image(loops, tmp_path, chain):
    """The loop device still names the old path; its inode is the image's."""
    _, full, inc = chain
    dev = loops.attach(full)
    moved = tmp_path / "monday.dimg"
    os.rename(full, moved)
    before = stamp(moved, inc)
    refused(cli("restore", inc, dev, "--yes", "--no-progress"), dev, moved)
    assert stamp(moved, inc) == before


# --------------------------------------------------------------------------------------------
# route 3: imaging a loop device into its own backing file

def test_image_of_a_loop_device_into_its_backing_file(loops, tmp_path):
    dev, backing = loops.create(4 * MiB, "self")
    with open(backing, "r+b") as f:
        f.write(compressible(random.Random(3), 4 * MiB))
    before = stamp(backing)
    line = refused(cli("image", dev, backing, "--force", "--no-progress"), dev, backing)
    assert "would overwrite the source" in line
    # as IMAGE.partial, as the rescue mapfile, through a hard link
    partial_named = tmp_path / "x.dimg.partial"
    os.link(backing, partial_named)
    refused(cli("image", dev, tmp_path / "x.dimg", "--no-progress"), dev, partial_named)
    refused(cli("image", dev, tmp_path / "r.dimg", "--rescue", "--mapfile", backing,
                "--no-progress"), dev, backing)
    assert not (tmp_path / "x.dimg").exists() and not (tmp_path / "r.dimg.partial").exists()
    assert stamp(backing) == before


def test_force_never_replaces_the_file_of_another_loop_device(loops, tmp_path):
    """`image SRC F --force` where F backs a loop device other than the source: refused,
    whether F is a disk's file (not an image) or an image someone attached."""
    src = tmp_path / "src.raw"
    src.write_bytes(compressible(random.Random(5), 2 * MiB))
    vm = tmp_path / "vm.img"
    vm.write_bytes(compressible(random.Random(6), 4 * MiB))
    vm_dev = loops.attach(vm)
    before = stamp(vm)
    refused(cli("image", src, vm, "--force", "--no-progress"), vm, "not a diskimg image")
    assert stamp(vm) == before
    img = tmp_path / "old.dimg"
    assert cli("image", src, img, "--no-progress").rc == 0
    img_dev = loops.attach(img, "--read-only")
    before = stamp(img)
    refused(cli("image", src, img, "--force", "--no-progress"), img, img_dev, "losetup -d")
    assert stamp(img) == before
    assert vm_dev != img_dev
    # once detached, --force replaces the image
    run("losetup", "-d", img_dev)
    loops.devices.remove(img_dev)
    assert cli("image", src, img, "--force", "--no-progress").rc == 0


def test_image_of_a_loop_partition_into_the_disks_backing_file(loops, tmp_path):
    dev, backing = partitioned(loops)
    before = stamp(backing)
    refused(cli("image", dev + "p1", backing, "--force", "--no-progress"), dev + "p1", backing)
    assert stamp(backing) == before


# --------------------------------------------------------------------------------------------
# route 4: restoring into the backing file of a loop device in use

def test_restore_into_the_backing_file_of_a_mounted_loop_device(loops, tmp_path, chain):
    _, full, _ = chain
    dev, backing = loops.create(4 * MiB, "busy")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    os.sync()   # what mounting wrote is in the file before it is stamped
    before = stamp(backing)
    line = refused(cli("restore", full, backing, "--yes", "--no-progress"), backing, dev, mnt)
    assert "in use" in line
    assert stamp(backing) == before
    # also under another name
    moved = tmp_path / "moved.img"
    os.rename(backing, moved)
    before = stamp(moved)
    refused(cli("restore", full, moved, "--yes", "--no-progress"), moved, dev, mnt)
    assert stamp(moved) == before


def test_restore_into_the_backing_file_of_a_loop_with_a_mounted_partition(loops, tmp_path,
                                                                          chain):
    _, full, _ = chain
    dev, backing = partitioned(loops)
    mnt = loops.mount(dev + "p1", tmp_path / "mnt")
    os.sync()
    before = stamp(backing)
    refused(cli("restore", full, backing, "--yes", "--no-progress"), backing, dev, mnt)
    assert stamp(backing) == before


def test_restore_onto_a_loop_device_whose_file_another_mounted_loop_reads(loops, tmp_path,
                                                                          chain):
    _, full, _ = chain
    dev, backing = loops.create(4 * MiB, "twice")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    other = loops.attach(backing)
    mnt = loops.mount(other, tmp_path / "mnt")
    os.sync()
    before = stamp(backing)
    refused(cli("restore", full, dev, "--yes", "--no-progress"), dev, other, mnt)
    # and it is no consistent source either
    refused(cli("image", dev, tmp_path / "x.dimg", "--no-progress"), dev, mnt)
    assert stamp(backing) == before
    assert not (tmp_path / "x.dimg").exists()


def test_restore_into_the_backing_file_of_an_idle_loop_device(loops, tmp_path, chain):
    """Attached but not in use: allowed, with a warning (nothing reads it meanwhile)."""
    src, full, _ = chain
    dev, backing = loops.create(4 * MiB, "idle")
    res = cli("restore", full, backing, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert f"backs {dev}" in res.err
    full_state = cli("restore", full, tmp_path / "check.raw", "--no-progress")
    assert full_state.rc == 0
    assert backing.read_bytes()[:2 * MiB] == (tmp_path / "check.raw").read_bytes()


# --------------------------------------------------------------------------------------------
# a source that is not the disk the parent came from

def _ext4(loops, name: str) -> str:
    dev, _ = loops.create(16 * MiB, name)
    run("mkfs.ext4", "-q", dev)
    return dev


def test_incremental_of_another_disk_without_serial(loops, tmp_path):
    a, b = _ext4(loops, "a"), _ext4(loops, "b")
    full = tmp_path / "a-full.dimg"
    assert cli("image", a, full, "--no-progress").rc == 0
    src_ids = cli("info", full, "--json").json["source"]
    assert src_ids["fs_uuid"] and src_ids["serial"] is None
    inc = tmp_path / "b-inc.dimg"
    line = refused(cli("image", b, inc, "--incremental", full, "--no-progress"), b, full)
    assert "filesystem UUID" in line and src_ids["fs_uuid"] in line and "--force" in line
    assert not inc.exists() and not Path(str(inc) + ".partial").exists()
    refused(cli("image", b, inc, "--differential", full, "--no-progress"), b, full)
    res = cli("image", b, inc, "--incremental", full, "--force", "--no-progress")
    assert res.rc == 0, res.err
    # the same disk is accepted, changed or not
    run("mkdir", "-p", str(tmp_path / "m"))
    mnt = loops.mount(a, tmp_path / "m")
    (mnt / "new").write_bytes(os.urandom(100000))
    loops.umount(mnt)
    res = cli("image", a, tmp_path / "a-inc.dimg", "--incremental", full, "--no-progress",
              "--json")
    assert res.rc == 0, res.err
    assert res.json["changed_blocks"] > 0


def test_incremental_of_another_gpt_disk(loops, tmp_path):
    devs = []
    for name, guid in (("g1", "11111111-2222-4333-8444-555555555555"),
                       ("g2", "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE")):
        dev, backing = loops.create(8 * MiB, name)
        run("sfdisk", "-q", str(backing), input=f"label: gpt\nlabel-id: {guid}\n,\n")
        devs.append(dev)
    full = tmp_path / "g1.dimg"
    assert cli("image", devs[0], full, "--no-progress").rc == 0
    line = refused(cli("image", devs[1], tmp_path / "g2.dimg", "--incremental", full,
                       "--no-progress"), devs[1], full)
    assert "GPT disk GUID AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE" in line
    assert "11111111-2222-4333-8444-555555555555" in line
    assert cli("image", devs[0], tmp_path / "g1-inc.dimg", "--incremental", full,
               "--no-progress").rc == 0


# --------------------------------------------------------------------------------------------
# a mounted read-write filesystem as source

def test_mounted_read_write_source(loops, tmp_path):
    dev = _ext4(loops, "rw")
    mnt = loops.mount(dev, tmp_path / "mnt")
    (mnt / "f").write_bytes(os.urandom(50000))
    img = tmp_path / "rw.dimg"
    line = refused(cli("image", dev, img, "--no-progress"), dev, mnt)
    assert "remount,ro" in line and "fsfreeze" in line and "snapshot" in line
    assert not img.exists() and not Path(str(img) + ".partial").exists()
    # the same through the loop device's backing file
    backing = tmp_path / "rw.img"
    refused(cli("image", backing, img, "--no-progress"), backing, mnt)
    # and as a rescue (a failing disk may well be mounted)
    refused(cli("image", dev, img, "--rescue", "--no-progress"), dev, mnt)
    assert not img.exists() and not Path(str(img) + ".partial").exists()
    assert not Path(str(img) + ".map").exists()
    # --force images it, and the image says so
    res = cli("image", dev, img, "--force", "--no-progress")
    assert res.rc == 0, res.err
    info = cli("info", img, "--json").json
    assert info["source_mounted_rw"] == [str(mnt)]
    text = cli("info", img).out
    assert f"mounted read-write on {mnt}" in text
    # read-only is fine
    run("mount", "-o", "remount,ro", str(mnt))
    ro = tmp_path / "ro.dimg"
    res = cli("image", dev, ro, "--no-progress")
    assert res.rc == 0, res.err
    assert cli("info", ro, "--json").json["source_mounted_rw"] == []
    assert "read-write" not in cli("info", ro).out


def test_whole_disk_with_a_partition_mounted_read_write(loops, tmp_path):
    dev, _ = partitioned(loops)
    mnt = loops.mount(dev + "p1", tmp_path / "mnt")
    img = tmp_path / "d.dimg"
    refused(cli("image", dev, img, "--no-progress"), dev, mnt)
    refused(cli("image", dev + "p1", img, "--no-progress"), dev + "p1", mnt)
    # the other partition is not mounted: fine
    assert cli("image", dev + "p2", img, "--no-progress").rc == 0
    assert not Path(str(img) + ".partial").exists()


def test_rescue_of_a_mounted_read_write_disk_with_force(loops, tmp_path):
    dev = _ext4(loops, "rescue")
    mnt = loops.mount(dev, tmp_path / "mnt")
    img = tmp_path / "r.dimg"
    res = cli("image", dev, img, "--rescue", "--force", "--no-progress")
    assert res.rc == 0, res.err
    assert cli("info", img, "--json").json["source_mounted_rw"] == [str(mnt)]
