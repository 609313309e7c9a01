"""The FAT cross-check: clusters reachable from the directories but marked free in the FAT are
read all the same; a chain that cannot be followed means "read fully".

Real FAT images made with mkfs.vfat and filled with mtools, damaged by zeroing FAT entries (in
every copy, so that the copies still agree and only the directories tell).  Oracle: the
damaged clusters are identical in a copy whose unused bytes are zero or 0xAA garbage, and
``fsck.fat -n`` says the same of both copies as of the original.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from helpers import blanked_copy, need, run, scan_path

from diskimg.disk.used import UsedMap


def clusters_of(img: Path, name: str) -> list[int]:
    out = run("mshowfat", "-i", str(img), f"::/{name}").stdout
    got = []
    for a, b in re.findall(r"(\d+)(?:-(\d+))?", out.split("<", 1)[1]):
        got += range(int(a), int(b or a) + 1)
    return got


def zero_entry(img: Path, bits: int, cluster: int) -> None:
    with open(img, "r+b") as f:
        boot = f.read(512)
        bps, reserved, nfats = struct.unpack_from("<H", boot, 11)[0], \
            struct.unpack_from("<H", boot, 14)[0], boot[16]
        fatsz = struct.unpack_from("<H", boot, 22)[0] or struct.unpack_from("<I", boot, 36)[0]
        for k in range(nfats):
            off = (reserved + k * fatsz) * bps + cluster * bits // 8
            f.seek(off)
            f.write(bytes(bits // 8))


def fsck_says(img: Path) -> tuple[int, str]:
    proc = run("fsck.fat", "-n", str(img), check=False)
    return proc.returncode, (proc.stdout + proc.stderr).replace(str(img), "IMG")


@pytest.fixture(scope="module", params=[16, 32])
def fat_image(request, tmp_path_factory):
    need("mkfs.vfat", "mcopy", "mshowfat", "fsck.fat")
    bits = request.param
    tmp = tmp_path_factory.mktemp(f"fat{bits}")
    img = tmp / "fat.img"
    run("mkfs.vfat", "-C", "-F", str(bits), "-s", "4" if bits == 16 else "1", str(img),
        str(64 * 1024))
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(10000))
    (src / "b.bin").write_bytes(os.urandom(30000))
    (src / "sub" / "small.txt").write_bytes(b"one cluster\n" * 20)
    run("mcopy", "-s", "-i", str(img), *map(str, sorted(src.iterdir())), "::/")
    return bits, img


def _check(img: Path, tmp: Path, clusters: list[int]) -> UsedMap:
    used = scan_path(img)
    before = fsck_says(img)
    boot = img.read_bytes()[:512]
    bps, spc = struct.unpack_from("<H", boot, 11)[0], boot[13]
    reserved, nfats = struct.unpack_from("<H", boot, 14)[0], boot[16]
    fatsz = struct.unpack_from("<H", boot, 22)[0] or struct.unpack_from("<I", boot, 36)[0]
    root = -(-struct.unpack_from("<H", boot, 17)[0] * 32 // bps)
    data = (reserved + nfats * fatsz + root) * bps
    cs = spc * bps
    orig = img.read_bytes()
    for fill in (0x00, 0xAA):
        copy = blanked_copy(img, tmp / f"copy-{fill:02x}.img", used, fill).read_bytes()
        for c in clusters:
            at = data + (c - 2) * cs
            assert copy[at:at + cs] == orig[at:at + cs], f"cluster {c} lost"
        assert fsck_says(tmp / f"copy-{fill:02x}.img") == before
    return used


def test_free_entries_reachable_from_directories_are_read(fat_image, tmp_path):
    bits, pristine = fat_image
    img = tmp_path / "d.img"
    shutil.copyfile(pristine, img)
    a = clusters_of(img, "a.bin")
    small = clusters_of(img, "sub/small.txt")
    zero_entry(img, bits, a[-1])        # the end of a chain
    zero_entry(img, bits, small[0])     # a file's only cluster
    used = _check(img, tmp_path, [a[-1], small[0]])
    assert [(r.kind, r.repaired_blocks) for r in used.regions] == [("vfat", 2)]
    assert "allocation map repaired: 2 blocks" in used.regions[0].detail


def test_undamaged_needs_no_repair(fat_image, tmp_path):
    _, img = fat_image
    used = _check(img, tmp_path, [])
    assert [(r.kind, r.repaired_blocks) for r in used.regions] == [("vfat", 0)]


def test_broken_chain_reads_fully(fat_image, tmp_path):
    """A free entry in the middle of a chain: where the rest of the file is, nothing says."""
    bits, pristine = fat_image
    img = tmp_path / "d.img"
    shutil.copyfile(pristine, img)
    b = clusters_of(img, "b.bin")
    zero_entry(img, bits, b[0])
    used = scan_path(img)
    assert used.ranges == ((0, used.size),)
    assert "shorter than its size" in used.regions[0].detail
