"""The identity rule on files (no root needed): a path is what it reaches, not its name.
Hard links and symlinks are the same file; two files with the same content are not; a path
that does not exist yet touches nothing.  Plus the source-disk identity: which ids a source's
first sectors give (real partition tables and filesystems made by sfdisk and mkfs on files)
and how two sources are compared."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from diskimg.disk import identity
from diskimg.disk.usedblocks import content_ids


@pytest.fixture
def f(tmp_path):
    p = tmp_path / "a.dimg"
    p.write_bytes(b"x" * 4096)
    return p


def test_file_is_itself(f):
    a, b = identity.identify(str(f)), identity.identify(str(f))
    assert a.exists and identity.same(a, b)
    assert identity.overlap(a, b) == f"{f} and {f} are the same file"


def test_hard_link_is_the_same_file(f, tmp_path):
    link = tmp_path / "other-name.dimg"
    os.link(f, link)
    a, b = identity.identify(str(f)), identity.identify(str(link))
    assert identity.same(a, b)
    why = identity.overlap(a, b)
    assert why is not None and str(f) in why and str(link) in why


def test_symlink_is_the_same_file(f, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    link = sub / "via-link"
    link.symlink_to(os.path.relpath(f, sub))
    assert identity.same(identity.identify(str(f)), identity.identify(str(link)))
    assert identity.overlap(identity.identify(str(link)), identity.identify(str(f)))


def test_copy_is_another_file(f, tmp_path):
    copy = tmp_path / "copy.dimg"
    shutil.copyfile(f, copy)
    a, b = identity.identify(str(f)), identity.identify(str(copy))
    assert not identity.same(a, b)
    assert identity.overlap(a, b) is None


def test_rename_keeps_the_identity(f, tmp_path):
    before = identity.identify(str(f))
    moved = tmp_path / "moved.dimg"
    os.rename(f, moved)
    assert identity.same(before, identity.identify(str(moved)))


def test_missing_path_touches_nothing(f, tmp_path):
    missing = identity.identify(str(tmp_path / "not-yet.dimg"))
    assert not missing.exists and missing.primary is None and not missing.things
    assert identity.overlap(missing, identity.identify(str(f))) is None
    assert identity.overlap(missing, missing) is None
    assert not identity.same(missing, missing)


def test_directory_and_fifo_touch_nothing(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (tmp_path, fifo):
        ident = identity.identify(str(p))
        assert ident.exists and not ident.things


def test_a_file_backs_no_loop_device(f):
    assert identity.loops_backed_by(str(f)) == []
    assert identity.loops_backed_by(str(f) + ".missing") == []


# --------------------------------------------------------------------------------------------
# the identity of a source disk

def test_identities_compared():
    a = {"serial": "S1", "fs_uuid": "u1", "backing_file": "/x"}
    # the same serial, the same filesystem: the same disk (a moved backing file is no matter)
    assert identity.source_mismatch(a, {"serial": "S1", "fs_uuid": "u1", "backing_file": "/y"},
                                    "/dev/sdb", "p.dimg") is None
    why = identity.source_mismatch(a, {"serial": "S2", "fs_uuid": "u1"}, "/dev/sdb", "p.dimg")
    assert why == "/dev/sdb: serial S1 differs from p.dimg's source serial S2"
    # no serial on one side: the filesystem UUID is compared
    why = identity.source_mismatch(a, {"fs_uuid": "u2", "backing_file": "/x"}, "/dev/loop1",
                                   "p.dimg")
    assert why == ("/dev/loop1: filesystem UUID u1 differs from p.dimg's source filesystem "
                   "UUID u2")
    why = identity.source_mismatch({"ptable_id": "gpt:AA"}, {"ptable_id": "gpt:BB"}, "s", "p")
    assert "GPT disk GUID AA" in why and "GPT disk GUID BB" in why
    why = identity.source_mismatch({"ptable_id": "mbr:0000abcd"}, {"ptable_id": "mbr:1"},
                                   "s", "p")
    assert "MBR disk signature 0000abcd" in why


def test_a_matching_serial_does_not_hide_another_partition():
    """udev gives sda1 and sda2 the disk's serial (and WWN): `image /dev/sda2 --incremental
    sda1.dimg` is another partition, told apart by the filesystem UUID (or, for a whole disk
    made again, the partition table)."""
    sda1 = {"serial": "S1", "wwn": "0x5000", "fs_uuid": "u1"}
    sda2 = {"serial": "S1", "wwn": "0x5000", "fs_uuid": "u2"}
    why = identity.source_mismatch(sda2, sda1, "/dev/sda2", "sda1.dimg")
    assert why == ("/dev/sda2: filesystem UUID u2 differs from sda1.dimg's source filesystem "
                   "UUID u1 (the same disk by its serial: another partition, or the filesystem "
                   "was made again)")
    why = identity.source_mismatch({"serial": "S1", "ptable_id": "gpt:AA"},
                                   {"serial": "S1", "ptable_id": "gpt:BB"}, "/dev/sda", "d.dimg")
    assert "GPT disk GUID AA" in why and "GPT disk GUID BB" in why and "partition table" in why
    # the same partition again: accepted; one side without a filesystem UUID: the serial decides
    assert identity.source_mismatch(dict(sda1), sda1, "/dev/sda1", "sda1.dimg") is None
    assert identity.source_mismatch({"serial": "S1"}, sda1, "/dev/sda1", "sda1.dimg") is None
    # a different serial is reported first, whatever else agrees
    why = identity.source_mismatch({"serial": "S2", "fs_uuid": "u1"}, sda1, "/dev/sdb1", "x")
    assert "serial S2" in why and "filesystem" not in why


def test_the_backing_file_decides_only_when_nothing_else_is_shared():
    assert identity.source_mismatch({"fs_uuid": "u1", "backing_file": "/a"},
                                    {"fs_uuid": "u1", "backing_file": "/b"}, "s", "p") is None
    why = identity.source_mismatch({"backing_file": "/a"}, {"backing_file": "/b"}, "s", "p")
    assert why == "s: loop backing file /a differs from p's source loop backing file /b"


def test_old_images_without_the_new_keys_keep_working():
    old = {"path": "/dev/loop0", "model": None, "serial": None, "wwn": None}
    new = {"path": "/dev/loop1", "model": None, "serial": None, "wwn": None,
           "ptable_id": "gpt:AA", "fs_uuid": None}
    assert identity.source_mismatch(new, old, "s", "p") is None
    assert identity.source_mismatch(new, None, "s", "p") is None
    assert identity.source_mismatch({}, {}, "s", "p") is None


def _ids(path) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return content_ids(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _need(tool: str) -> None:
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")


def _blank(path, size=16 << 20):
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_content_ids_of_ext4_gpt_and_mbr(tmp_path):
    _need("mkfs.ext4")
    _need("sfdisk")
    disk = tmp_path / "d.raw"
    _blank(disk)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", "0b5a1e1c-2d3e-4f50-8a9b-0c1d2e3f4a5b",
                    str(disk)], check=True)
    assert _ids(disk) == {"fs_type": "ext", "fs_uuid": "0b5a1e1c-2d3e-4f50-8a9b-0c1d2e3f4a5b"}
    guid = "6E1A9C52-0B7D-4C1E-9F3A-2B4C6D8E0F12"
    subprocess.run(["sfdisk", "-q", str(disk)], input=f"label: gpt\nlabel-id: {guid}\n,\n",
                   text=True, check=True)
    assert _ids(disk) == {"ptable_id": f"gpt:{guid}"}
    _blank(disk)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nlabel-id: 0x1234abcd\n,\n",
                   text=True, check=True)
    assert _ids(disk) == {"ptable_id": "mbr:1234abcd"}


def test_content_ids_of_fat_and_nothing(tmp_path):
    _need("mkfs.vfat")
    disk = tmp_path / "f.raw"
    _blank(disk)
    assert _ids(disk) == {}
    subprocess.run(["mkfs.vfat", "-i", "2b3c4d5e", str(disk)], check=True, capture_output=True)
    assert _ids(disk) == {"fs_type": "vfat", "fs_uuid": "2B3C-4D5E"}
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x55" * 100)
    assert _ids(tiny) == {}


def test_mountinfo_read_only_is_the_filesystems(tmp_path):
    """A read-only bind mount of a filesystem that is read-write elsewhere is not read-only;
    the superblock options (after the separator) decide."""
    from diskimg.devices import mounts
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 25 7:3 / /mnt/rw rw,relatime shared:1 - ext4 /dev/loop3 rw\n"
        "37 25 7:4 / /mnt/ro ro,relatime shared:2 - ext4 /dev/loop4 ro\n"
        "38 25 7:3 / /mnt/bind ro,relatime shared:1 - ext4 /dev/loop3 rw,errors=remount-ro\n"
        "39 25 7:5 / /mnt/old\\040name rw master:3 - xfs /dev/loop5 rw,attr2\n")
    got = {m.mountpoint: (m.read_only, m.options, m.super_options) for m in mounts(info)}
    assert got == {
        "/mnt/rw": (False, "rw,relatime", "rw"),
        "/mnt/ro": (True, "ro,relatime", "ro"),
        "/mnt/bind": (False, "ro,relatime", "rw,errors=remount-ro"),
        "/mnt/old name": (False, "rw", "rw,attr2"),
    }
