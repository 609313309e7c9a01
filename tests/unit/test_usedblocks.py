"""diskimg.disk.used on real filesystems made by mke2fs/mkfs.vfat/mkfs.xfs in regular files.

Every filesystem test proves the map safe the strong way: a copy with every byte outside the
used ranges zeroed (and one filled with 0xAA) must pass ``fsck -n`` and give back every file
byte for byte (read with ``debugfs rdump`` / ``mcopy``, so no root is needed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import blanked_copy, dumpe2fs_counts, dumpe2fs_used, run

from diskimg.disk.used import Region, UsedMap, scan
from diskimg.disk.used.raw import bit_runs as _bit_runs

MiB = 1 << 20

needs = {t: shutil.which(t) for t in ("mke2fs", "e2fsck", "debugfs", "dumpe2fs", "mkfs.vfat",
                                      "fsck.vfat", "mcopy", "mkfs.xfs", "sfdisk", "mkswap")}


def need(*tools: str):
    missing = [t for t in tools if not needs[t]]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# helpers

def populate(root: Path, seed: int = 1, big: int = 3 * MiB) -> Path:
    """A small tree: random files of many sizes, nested dirs, an empty file."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(4):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(12):
            n = rng.choice([0, 1, 100, 4095, 4096, 5000, 70000, 300000])
            (sub / f"f{i}.bin").write_bytes(rng.randbytes(n))
    (root / "big.bin").write_bytes(rng.randbytes(big))
    (root / "text.txt").write_text("hello\n" * 1000)
    return root


def scan_file(path: Path, **kw) -> UsedMap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan(fd, os.fstat(fd).st_size, **kw)
    finally:
        os.close(fd)


def extract_part(disk: Path, offset: int, length: int, dst: Path) -> Path:
    with open(disk, "rb") as fi, open(dst, "wb") as fo:
        fi.seek(offset)
        while length:
            chunk = fi.read(min(length, 4 * MiB))
            fo.write(chunk)
            length -= len(chunk)
    return dst


def put_at(disk: Path, offset: int, image: Path) -> None:
    with open(image, "rb") as fi, open(disk, "r+b") as fo:
        fo.seek(offset)
        shutil.copyfileobj(fi, fo, 4 * MiB)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("lost+found"):
            continue
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def ext_files(img: Path, dst: Path) -> dict[str, str]:
    dst.mkdir()
    run("debugfs", "-R", f"rdump / {dst}", str(img))
    return tree_digest(dst)


def fat_files(img: Path, dst: Path) -> dict[str, str]:
    dst.mkdir()
    run("mcopy", "-s", "-n", "-i", str(img), "::/", str(dst) + "/")
    return tree_digest(dst)


def assert_ext_roundtrip(img: Path, tmp: Path, used: UsedMap, expect: dict[str, str]) -> None:
    for fill in (0, 0xAA):
        copy = blanked_copy(img, tmp / f"copy{fill}.img", used, fill)
        run("e2fsck", "-fn", str(copy))
        assert ext_files(copy, tmp / f"out{fill}") == expect
        copy.unlink()


def assert_fat_roundtrip(img: Path, tmp: Path, used: UsedMap, expect: dict[str, str]) -> None:
    for fill in (0, 0xAA):
        copy = blanked_copy(img, tmp / f"copy{fill}.img", used, fill)
        run("fsck.vfat", "-n", str(copy))
        assert fat_files(copy, tmp / f"out{fill}") == expect
        copy.unlink()


def make_ext(img: Path, size: int, src: Path | None, *opts: str) -> Path:
    args = ["mke2fs", "-q", "-F", *opts]
    if src is not None:
        args += ["-d", str(src)]
    with open(img, "wb") as f:
        f.truncate(size)
    run(*args, str(img))
    return img


def make_fat(img: Path, size: int, bits: int, src: Path | None, *opts: str) -> Path:
    with open(img, "wb") as f:
        f.truncate(size)
    run("mkfs.vfat", "-F", str(bits), *opts, str(img))
    if src is not None:
        names = [str(p) for p in sorted(src.iterdir())]
        run("mcopy", "-s", "-i", str(img), *names, "::/")
    return img


# --------------------------------------------------------------------------------------------
# UsedMap and the bitmap run finder

def test_usedmap_queries():
    m = UsedMap(100, ((10, 10), (30, 5), (90, 10)), (Region(0, 100, "unknown", ""),))
    assert m.used_bytes == 25
    assert not m.is_used(0, 10) and m.is_used(0, 11) and m.is_used(19, 1)
    assert not m.is_used(20, 10) and m.is_used(20, 11) and not m.is_used(35, 55)
    assert m.is_used(99, 5) and not m.is_used(50, 0)
    assert m.used_in(0, 100) == [(10, 10), (30, 5), (90, 10)]
    assert m.used_in(15, 20) == [(15, 5), (30, 5)]
    assert m.used_in(32, 2) == [(32, 2)]
    assert m.used_in(36, 50) == []
    assert m.used_bytes_in(0, 32) == 12


def _naive_runs(bitmap: bytes):
    runs, start = [], None
    for i in range(len(bitmap) * 8):
        bit = bitmap[i // 8] >> (i % 8) & 1
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(bitmap) * 8 - start))
    return runs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 0xFF, 0x01, 0x80, 0xAA, 0x0F, 0xF0, 0x7E]) | st.integers(0, 255),
                max_size=64))
def test_bit_runs_match_naive(values):
    bitmap = bytes(values)
    assert list(_bit_runs(bitmap)) == _naive_runs(bitmap)


# --------------------------------------------------------------------------------------------
# ext2/3/4

EXT_VARIANTS = {
    "ext2": ("-t", "ext2"),
    "ext2-no-sparse-super": ("-t", "ext2", "-O", "^sparse_super,^resize_inode"),
    "ext3": ("-t", "ext3"),
    "ext4": ("-t", "ext4"),
    "ext4-32bit": ("-t", "ext4", "-O", "^64bit"),
    "ext4-no-flex_bg": ("-t", "ext4", "-O", "^flex_bg"),
    "ext4-1k-blocks": ("-t", "ext4", "-b", "1024"),
    "ext4-uninit_bg": ("-t", "ext4", "-O", "^metadata_csum,uninit_bg"),
    "ext4-meta_bg": ("-t", "ext4", "-O", "meta_bg,^resize_inode"),
    "ext4-sparse_super2": ("-t", "ext4", "-O", "sparse_super2"),
    "ext4-bigalloc": ("-t", "ext4", "-O", "bigalloc", "-C", "16384"),
    "ext4-2k-128-inode": ("-t", "ext4", "-b", "2048", "-I", "128"),
}


@need("mke2fs", "e2fsck", "debugfs", "dumpe2fs")
@pytest.mark.parametrize("variant", EXT_VARIANTS)
def test_ext_variants(tmp_path, variant):
    opts = EXT_VARIANTS[variant]
    # 300 MiB + 123 KiB: not a multiple of the group size, so the last group is short
    size = 300 * MiB + 123 * 1024 + 512
    src = populate(tmp_path / "src")
    img = make_ext(tmp_path / "fs.img", size, src, *opts)
    expect = tree_digest(src)
    m = scan_file(img)
    kind = opts[1]
    assert [(r.kind, r.analysed) for r in m.regions] == [(kind, True)]
    used, fs_bytes = dumpe2fs_counts(img)
    # Exactly what e2fsprogs counts as used, plus the bytes past the last whole block
    assert m.used_bytes == used + (size - fs_bytes)
    assert m.used_bytes < size // 4
    assert_ext_roundtrip(img, tmp_path, m, expect)


@need("mke2fs", "e2fsck", "debugfs", "dumpe2fs")
def test_ext_tail_after_filesystem_is_read(tmp_path):
    img = make_ext(tmp_path / "fs.img", 64 * MiB, None, "-t", "ext4")
    with open(img, "r+b") as f:
        f.truncate(80 * MiB)
    m = scan_file(img)
    assert m.used_bytes == dumpe2fs_used(img) + 16 * MiB
    assert m.used_in(64 * MiB, 16 * MiB) == [(64 * MiB, 16 * MiB)]


@need("mke2fs", "e2fsck", "debugfs", "dumpe2fs")
def test_ext4_two_gib_scan(tmp_path):
    """2 GiB ext4 about 40% full: the scan agrees with dumpe2fs.  Its time is printed, not
    asserted (speed is measured by scripts/bench)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    block = rng.randbytes(MiB)
    for i in range(40):   # 800 MiB in 40 files of 20 MiB
        with open(src / f"f{i}", "wb") as f:
            for _ in range(20):
                f.write(block)
    img = make_ext(tmp_path / "fs.img", 2048 * MiB, src, "-t", "ext4")
    shutil.rmtree(src)
    fd = os.open(img, os.O_RDONLY)
    try:
        scan(fd, 2048 * MiB)   # warm the page cache: we time the parsing, not the disk
        best = min(_timed(lambda: scan(fd, 2048 * MiB)) for _ in range(5))
        m = scan(fd, 2048 * MiB)
    finally:
        os.close(fd)
    assert 0.35 < m.used_bytes / (2048 * MiB) < 0.45
    assert m.used_bytes == dumpe2fs_used(img)
    print(f"\n2 GiB ext4: scan {best * 1000:.1f} ms (best of 5, warm cache)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------
# FAT

FAT_VARIANTS = {
    "fat12": (12, 4 * MiB, ()),
    "fat16": (16, 64 * MiB, ()),
    "fat16-1-fat": (16, 64 * MiB, ("-f", "1")),
    "fat32": (32, 300 * MiB, ()),
    "fat32-odd-size": (32, 100 * MiB + 7 * 512, ("-s", "1")),
}


@need("mkfs.vfat", "fsck.vfat", "mcopy")
@pytest.mark.parametrize("variant", FAT_VARIANTS)
def test_fat_variants(tmp_path, variant):
    bits, size, opts = FAT_VARIANTS[variant]
    src = populate(tmp_path / "src", big=1 * MiB if bits == 12 else 3 * MiB)
    img = make_fat(tmp_path / "fs.img", size, bits, src, *opts)
    # delete a few files so their clusters are free but still hold their old bytes
    run("mdel", "-i", str(img), "::/dir0/nested/f1.bin", "::/dir1/nested/f2.bin")
    (src / "dir0/nested/f1.bin").unlink()
    (src / "dir1/nested/f2.bin").unlink()
    expect = tree_digest(src)
    m = scan_file(img)
    assert [(r.kind, r.analysed) for r in m.regions] == [("vfat", True)]
    assert f"FAT{bits}" in m.regions[0].detail
    # fsck.vfat -v: "N files, used/total clusters"
    out = run("fsck.vfat", "-n", "-v", str(img)).stdout
    used_cl, total_cl = map(int, re.search(r"(\d+)/(\d+) clusters", out).groups())
    csize = int(re.search(r"(\d+) bytes per cluster", out).group(1))
    data_start = int(re.search(r"Data area starts at byte (\d+)", out).group(1))
    tail = size - data_start - total_cl * csize
    assert m.used_bytes == data_start + used_cl * csize + tail
    assert_fat_roundtrip(img, tmp_path, m, expect)


# --------------------------------------------------------------------------------------------
# unrecognised content is read fully

@need("mkfs.xfs")
def test_fresh_xfs_is_analysed_and_a_dirty_log_reads_fully(tmp_path, caplog):
    """A new xfs: its free space comes from the AG B+trees (the log and metadata are kept);
    the same filesystem with its log's unmount record overwritten is read fully."""
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(300 * MiB)
    run("mkfs.xfs", "-q", "-f", str(img))
    m = scan_file(img)
    assert [(r.kind, r.analysed) for r in m.regions] == [("xfs", True)]
    assert m.used_bytes < 0.3 * m.size
    if shutil.which("partclone.xfs"):
        proc = run("partclone.xfs", "-c", "-s", str(img), "-O", "/dev/null")
        text = (proc.stdout + proc.stderr).replace("\r", "\n")
        pc = int(re.search(r"Space in use:.*?=\s*(\d+) Blocks", text).group(1)) * 4096
        assert pc <= m.used_bytes <= pc * 1.01
    out = run("xfs_db", "-r", "-c", "sb 0", "-c", "print logstart", str(img)).stdout
    logstart = int(out.split("=")[1])
    out = run("xfs_db", "-r", "-c", f"convert fsb {logstart} byte", str(img)).stdout
    log_byte = int(out.split()[0], 16)      # "0x9606000 (157310976)"
    with open(img, "r+b") as f:         # the whole log of cycle 1: no unmount record anywhere
        f.seek(log_byte)
        f.write((b"\0\0\0\1" + bytes(508)) * 2048)
    with caplog.at_level(logging.INFO, logger="diskimg.disk.used"):
        m = scan_file(img)
    assert m.ranges == ((0, 300 * MiB),)
    assert [(r.kind, r.analysed) for r in m.regions] == [("unknown", False)]
    assert "xfs log" in caplog.text and "read fully" in caplog.text


def test_random_bytes_and_tiny_sources(tmp_path):
    img = tmp_path / "rnd.img"
    img.write_bytes(random.Random(3).randbytes(3 * MiB + 17))
    m = scan_file(img)
    assert m.ranges == ((0, 3 * MiB + 17),) and m.regions[0].kind == "unknown"
    for n in (0, 1, 511, 1500):
        (tmp_path / "t").write_bytes(b"\x01" * n)
        m = scan_file(tmp_path / "t")
        assert m.used_bytes == n


@need("mkswap")
def test_swap_is_named_and_read_fully(tmp_path):
    img = tmp_path / "swap.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    run("mkswap", str(img))
    m = scan_file(img)
    assert m.ranges == ((0, 8 * MiB),) and m.regions[0].kind == "swap"


# --------------------------------------------------------------------------------------------
# partition tables

def _sfdisk(disk: Path, script: str) -> list[tuple[int, int]]:
    run("sfdisk", "-q", str(disk), input=script)
    out = run("sfdisk", "-J", str(disk)).stdout

    parts = json.loads(out)["partitiontable"]["partitions"]
    return [(p["start"] * 512, p["size"] * 512) for p in parts]


@need("sfdisk", "mke2fs", "e2fsck", "debugfs", "dumpe2fs", "mkfs.vfat", "fsck.vfat", "mcopy")
def test_gpt_disk(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(200 * MiB)
    parts = _sfdisk(disk, "label: gpt\nsize=64MiB, name=root\nsize=48MiB\nsize=16MiB\n"
                          "start=140MiB, size=40MiB\n")
    src = populate(tmp_path / "src")
    ext = make_ext(tmp_path / "p1.img", parts[0][1], src, "-t", "ext4")
    fat = make_fat(tmp_path / "p2.img", parts[1][1], 16, src)
    put_at(disk, parts[0][0], ext)
    put_at(disk, parts[1][0], fat)
    with open(disk, "r+b") as f:   # partition 3: opaque data; partition 4: ext2, empty
        f.seek(parts[2][0])
        f.write(random.Random(9).randbytes(parts[2][1]))
    e2 = make_ext(tmp_path / "p4.img", parts[3][1], None, "-t", "ext2")
    put_at(disk, parts[3][0], e2)
    m = scan_file(disk)
    kinds = [(r.kind, r.offset, r.length) for r in m.regions]
    assert kinds == [("gpt", 0, parts[0][0]),
                     ("ext4", *parts[0]), ("vfat", *parts[1]), ("unknown", *parts[2]),
                     ("gap", parts[2][0] + parts[2][1], parts[3][0] - parts[2][0] - parts[2][1]),
                     ("ext2", *parts[3]),
                     ("gpt-backup", parts[3][0] + parts[3][1], 200 * MiB - parts[3][0] - parts[3][1])]
    assert "root" in m.regions[1].detail
    # within each partition, exactly what the standalone filesystem's scan says
    for (off, length), img in ((parts[0], ext), (parts[1], fat), (parts[3], e2)):
        alone = scan_file(img)
        assert m.used_in(off, length) == [(off + s, n) for s, n in alone.ranges]
    assert m.used_in(*parts[2]) == [parts[2]]
    assert m.is_used(0, 1) and m.is_used(200 * MiB - 512, 512)
    assert m.used_bytes < 200 * MiB // 2
    # the blanked disk still holds intact filesystems
    for fill in (0, 0xAA):
        copy = blanked_copy(disk, tmp_path / "copy.img", m, fill)
        p1 = extract_part(copy, *parts[0], tmp_path / "c1.img")
        run("e2fsck", "-fn", str(p1))
        assert ext_files(p1, tmp_path / f"o1-{fill}") == tree_digest(src)
        p2 = extract_part(copy, *parts[1], tmp_path / "c2.img")
        run("fsck.vfat", "-n", str(p2))
        assert fat_files(p2, tmp_path / f"o2-{fill}") == tree_digest(src)
        run("sfdisk", "--verify", str(copy))


@need("sfdisk", "mke2fs", "e2fsck", "debugfs", "dumpe2fs", "mkfs.vfat", "mcopy")
def test_mbr_disk_with_logical_partitions(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(200 * MiB)
    parts = _sfdisk(disk, "label: dos\nsize=40MiB, type=83\ntype=5\n"
                          "size=40MiB, type=c\nsize=20MiB, type=83\nsize=20MiB, type=83\n")
    # parts: 1 primary, 2 extended, 5, 6, 7 logical
    p1, ext_container, l5, l6, l7 = parts
    src = populate(tmp_path / "src", big=MiB)
    put_at(disk, p1[0], make_ext(tmp_path / "a.img", p1[1], src, "-t", "ext3"))
    put_at(disk, l5[0], make_fat(tmp_path / "b.img", l5[1], 32, src, "-s", "1"))
    put_at(disk, l6[0], make_ext(tmp_path / "c.img", l6[1], src, "-t", "ext4", "-b", "1024"))
    m = scan_file(disk)
    analysed = [(r.kind, r.detail.split(",")[0], r.offset, r.length) for r in m.regions
                if r.kind not in ("mbr", "ebr", "gap")]
    assert analysed == [("ext3", "partition 1", *p1), ("vfat", "partition 5", *l5),
                        ("ext4", "partition 6", *l6),
                        ("unknown", "partition 7: read fully: no filesystem whose used blocks "
                                    "are known (unknown)", *l7)]
    # EBRs (the sector before each logical partition) are read
    for lp in (l5, l6, l7):
        assert m.is_used(lp[0] - 512, 512)
    assert m.used_in(*l7) == [l7]   # all zeros, but unknown: read
    for (off, length), name in ((p1, "a"), (l6, "c")):
        copy = blanked_copy(disk, tmp_path / "copy.img", m, 0xAA)
        part = extract_part(copy, off, length, tmp_path / f"x{name}.img")
        run("e2fsck", "-fn", str(part))
        assert ext_files(part, tmp_path / f"o{name}") == tree_digest(src)


# --------------------------------------------------------------------------------------------
# anything inconsistent is read fully

def _patch(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _whole(m: UsedMap) -> bool:
    return m.ranges == ((0, m.size),)


@need("mke2fs", "debugfs", "dumpe2fs")
class TestExtFallsBack:
    def _ext(self, tmp_path, *opts):
        return make_ext(tmp_path / "fs.img", 32 * MiB, populate(tmp_path / "src", big=MiB), "-b",
                        "4096", *opts)

    def test_descriptor_checksum(self, tmp_path, caplog):
        img = self._ext(tmp_path, "-t", "ext4")
        _patch(img, 4096 + 64 * 0 + 0x0C, b"\x00\x00")   # group 0 free count, csum now wrong
        with caplog.at_level(logging.WARNING):
            m = scan_file(img)
        assert _whole(m) and m.regions[0].kind == "unknown"
        assert "descriptor checksum" in caplog.text

    def test_free_count_disagrees_with_bitmap(self, tmp_path, caplog):
        img = self._ext(tmp_path, "-t", "ext2")
        with open(img, "rb") as f:
            f.seek(4096 + 0xC)
            free = struct.unpack("<H", f.read(2))[0]
        _patch(img, 4096 + 0xC, struct.pack("<H", free + 1))
        with caplog.at_level(logging.WARNING):
            assert _whole(scan_file(img))
        assert "bitmap has" in caplog.text

    def test_zeroed_bitmap(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext2")
        with open(img, "rb") as f:
            f.seek(4096)
            bb = struct.unpack("<I", f.read(4))[0]
        _patch(img, bb * 4096, bytes(4096))
        assert _whole(scan_file(img))

    def test_bitmap_checksum(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext4")
        with open(img, "rb") as f:
            f.seek(4096)
            bb = struct.unpack("<I", f.read(4))[0]
        with open(img, "rb") as f:
            f.seek(bb * 4096 + 100)
            b = f.read(1)[0]
        _patch(img, bb * 4096 + 100, bytes([b ^ 0x10]))
        assert _whole(scan_file(img))

    def test_superblock_free_count(self, tmp_path, caplog):
        img = self._ext(tmp_path, "-t", "ext2")
        with open(img, "rb") as f:
            f.seek(1024 + 0xC)
            free = struct.unpack("<I", f.read(4))[0]
        _patch(img, 1024 + 0xC, struct.pack("<I", free - 5))
        with caplog.at_level(logging.WARNING):
            assert _whole(scan_file(img))
        assert "superblock says" in caplog.text

    def test_superblock_checksum(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext4")
        _patch(img, 1024 + 0x88, b"/somewhere")   # s_last_mounted, checksum not updated
        assert _whole(scan_file(img))

    @pytest.mark.parametrize("command,expect", [
        ("feature needs_recovery", "needs recovery"),
        ("ssv state 0", "not cleanly unmounted"),
        ("ssv state 3", "errors"),
    ])
    def test_unclean_states(self, tmp_path, caplog, command, expect):
        img = self._ext(tmp_path, "-t", "ext4")
        run("debugfs", "-w", "-R", command, str(img))
        with caplog.at_level(logging.WARNING):
            assert _whole(scan_file(img))
        assert expect in caplog.text

    def test_truncated_image(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext4")
        with open(img, "r+b") as f:
            f.truncate(20 * MiB)
        assert _whole(scan_file(img))

    def test_garbage_descriptor_pointer(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext2")
        _patch(img, 4096 + 8, struct.pack("<I", 0xFFFFFF))   # group 0 inode table
        assert _whole(scan_file(img))

    def test_corrupt_magic_is_plain_unknown(self, tmp_path):
        img = self._ext(tmp_path, "-t", "ext4")
        _patch(img, 1024 + 0x38, b"\0\0")
        m = scan_file(img)
        assert _whole(m) and m.regions[0].kind == "unknown"


@need("mkfs.vfat", "mcopy")
class TestFatFallsBack:
    def _fat(self, tmp_path, bits=16, size=64 * MiB):
        return make_fat(tmp_path / "fs.img", size, bits, populate(tmp_path / "src", big=MiB))

    def test_dirty_flag(self, tmp_path, caplog):
        img = self._fat(tmp_path)
        _patch(img, 0x25, b"\x01")
        with caplog.at_level(logging.WARNING):
            assert _whole(scan_file(img))
        assert "dirty" in caplog.text

    def test_fat32_clean_bit(self, tmp_path):
        img = self._fat(tmp_path, 32, 100 * MiB)
        with open(img, "rb") as f:
            data = f.read(512)
        reserved = struct.unpack_from("<H", data, 0x0E)[0]
        _patch(img, reserved * 512 + 7, b"\x07")   # FAT[1] bit 27 cleared
        assert _whole(scan_file(img))

    def test_fat_copies_differ(self, tmp_path, caplog):
        img = self._fat(tmp_path)
        with open(img, "rb") as f:
            data = f.read(512)
        reserved, fatsz = struct.unpack_from("<H", data, 0x0E)[0], struct.unpack_from("<H", data, 0x16)[0]
        _patch(img, (reserved + fatsz) * 512 + 200, b"\x00\x00")
        with caplog.at_level(logging.WARNING):
            assert _whole(scan_file(img))
        assert "differ" in caplog.text

    def test_media_byte_mismatch(self, tmp_path):
        img = self._fat(tmp_path)
        _patch(img, 0x15, b"\xf0")
        assert _whole(scan_file(img))


@need("sfdisk", "mke2fs", "dumpe2fs")
class TestPartitionTablesFallBack:
    def _gpt(self, tmp_path):
        disk = tmp_path / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 * MiB)
        parts = _sfdisk(disk, "label: gpt\nsize=40MiB\n")
        put_at(disk, parts[0][0], make_ext(tmp_path / "p.img", parts[0][1], None, "-t", "ext4"))
        return disk, parts

    def test_bad_primary_gpt_uses_backup(self, tmp_path, caplog):
        disk, parts = self._gpt(tmp_path)
        good = scan_file(disk)
        _patch(disk, 512 + 40, b"\xff")   # first usable LBA: header CRC now wrong
        with caplog.at_level(logging.WARNING):
            m = scan_file(disk)
        assert "backup GPT" in caplog.text
        assert m.ranges == good.ranges

    def test_both_gpts_bad(self, tmp_path):
        disk, parts = self._gpt(tmp_path)
        _patch(disk, 512 + 40, b"\xff")
        _patch(disk, 64 * MiB - 512 + 40, b"\xff")
        assert _whole(scan_file(disk))

    def test_bad_entry_array_crc(self, tmp_path):
        disk, parts = self._gpt(tmp_path)
        _patch(disk, 1024 + 56, b"x\0")       # primary: partition name changed
        _patch(disk, 64 * MiB - 33 * 512 + 56, b"x\0")   # backup entries too
        assert _whole(scan_file(disk))

    def test_stale_ext_under_mbr_is_ambiguous(self, tmp_path):
        disk = make_ext(tmp_path / "disk.img", 64 * MiB, None, "-t", "ext4")
        run("sfdisk", "-q", "--wipe", "never", str(disk), input="label: dos\nsize=30MiB\n")
        m = scan_file(disk)
        assert _whole(m)

    def test_overlapping_mbr_partitions(self, tmp_path):
        disk = tmp_path / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 * MiB)
        mbr = bytearray(512)
        for i, (lba, n) in enumerate([(2048, 40000), (30000, 20000)]):
            mbr[446 + 16 * i:446 + 16 * (i + 1)] = struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x83,
                                                               b"\0" * 3, lba, n)
        mbr[510:512] = b"\x55\xaa"
        _patch(disk, 0, bytes(mbr))
        assert _whole(scan_file(disk))


def test_min_gap_merges_small_holes():
    from diskimg.disk.used.raw import RangeCollector
    r = RangeCollector()
    for s in (0, 100, 40, 1000, 110):
        r.add(s, 10)
    assert r.merged(2000) == ((0, 10), (40, 10), (100, 20), (1000, 10))
    assert r.merged(2000, min_gap=40) == ((0, 50), (100, 20), (1000, 10))
    assert r.merged(2000, min_gap=51) == ((0, 120), (1000, 10))
    assert r.merged(1005) == ((0, 10), (40, 10), (100, 20), (1000, 5))


# --------------------------------------------------------------------------------------------
# the early scan (disk/prescan.py): a head start that is used only for the very same source

@need("mke2fs")
def test_early_scan_hands_over_the_same_map_only_for_the_same_source(tmp_path):
    from diskimg.disk.blockdev import open_source
    from diskimg.disk.prescan import EarlyScan

    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(b"")
        os.truncate(p, 32 * MiB)
        run("mke2fs", "-q", "-F", "-t", "ext4", str(p))
    early = EarlyScan(str(a))
    src = open_source(str(a))
    try:
        got = early.take(src)
        early.close()
        assert got is not None and got == scan(src.fd, src.size)
        assert early.take(src) is got                 # taken twice: the same map
    finally:
        src.close()
    other = open_source(str(b))                       # same size, same filesystem kind
    try:
        assert EarlyScan(str(a)).take(other) is None
    finally:
        other.close()
    grown = EarlyScan(str(a))
    grown._thread.join()
    os.truncate(a, 33 * MiB)                          # the file changed size since
    src = open_source(str(a))
    try:
        assert grown.take(src) is None
    finally:
        src.close()


def test_early_scan_never_opens_a_pipe_or_a_missing_source(tmp_path):
    from diskimg.disk.prescan import EarlyScan

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path / "missing", tmp_path, "/dev/null"):
        early = EarlyScan(str(path))          # an open of the fifo would block here forever
        assert early._thread is None
        early.close()


@need("mke2fs", "debugfs")
def test_early_scan_says_what_it_found_only_when_its_map_is_taken(tmp_path, caplog):
    """A refused command (a mounted source, an image on the source) must not first print what
    the early scan found: its log lines wait for `take`, and are dropped with an unused scan."""
    from diskimg.disk.blockdev import open_source
    from diskimg.disk.prescan import EarlyScan

    img = make_ext(tmp_path / "fs.img", 32 * MiB, populate(tmp_path / "src", big=MiB), "-t",
                   "ext4")
    run("debugfs", "-w", "-R", "feature needs_recovery", str(img))
    with caplog.at_level(logging.WARNING):
        dropped = EarlyScan(str(img))
        thread = dropped._thread
        dropped.close()                   # refused before imaging scans: nothing said
        thread.join()
        assert "needs recovery" not in caplog.text and dropped._source is None
        early = EarlyScan(str(img))
        early._thread.join()
        assert "needs recovery" not in caplog.text
        src = open_source(str(img))
        try:
            assert _whole(early.take(src))
        finally:
            src.close()
    assert caplog.text.count("needs recovery") == 1


def test_closing_an_early_scan_does_not_wait_for_it(tmp_path, monkeypatch):
    """A command refused (or interrupted) before imaging returns at once: the scan, here held
    up on purpose, finishes on its own thread, which then lets go of the source."""
    import threading
    from diskimg.disk import used
    from diskimg.disk.prescan import EarlyScan

    src = tmp_path / "a.raw"
    src.write_bytes(b"\0" * MiB)
    release, started = threading.Event(), threading.Event()
    real = used.scan

    def held_up(*a, **kw):
        started.set()
        release.wait()
        return real(*a, **kw)
    monkeypatch.setattr(used, "scan", held_up)
    early = EarlyScan(str(src))
    assert started.wait(30)
    early.close()                           # returns although the scan is still running
    assert early._source is not None and early._thread.is_alive()
    release.set()
    early._thread.join()
    assert early._source is None            # the thread closed the descriptor itself
