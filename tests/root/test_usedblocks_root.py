"""The proof that used-block scanning loses nothing, on real mounted filesystems.

A filesystem is made on a loop device, mounted, filled with real files (a copy of /usr/include,
random files), some of them deleted so freed blocks hold stale data, and unmounted.  Then a copy
is written in which every byte outside :func:`diskimg.disk.used.scan`'s ranges is zero, and
another in which it is 0xAA garbage.  Both must pass ``fsck -n`` and, mounted, give back every
file byte for byte.  The used byte count is compared with partclone's and dumpe2fs's.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from helpers import blanked_copy, dumpe2fs_counts, dumpe2fs_used, need, run, scan_path

from diskimg.disk.used import UsedMap, scan

pytestmark = pytest.mark.root

MiB = 1 << 20


def kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        h.update(chunk)
                out[rel] = h.hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
    return out


def fill_with_files(mnt: Path, seed: int, random_mib: int, include_subsets: int = 1) -> None:
    """Real files, then deletions so that freed blocks hold stale data."""
    rng = random.Random(seed)
    for i in range(include_subsets):
        shutil.copytree("/usr/include", mnt / f"include{i}", symlinks=True)
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        names = sorted(p.name for p in doc.iterdir())[:60]
        for name in names:
            shutil.copytree(doc / name, mnt / "doc" / name, symlinks=True, dirs_exist_ok=True)
    big = mnt / "big"
    big.mkdir()
    left = random_mib * MiB
    i = 0
    while left > 0:
        n = min(left, rng.choice([1, 3, 8, 20]) * MiB + rng.randrange(4096))
        (big / f"r{i}.bin").write_bytes(rng.randbytes(n))
        left -= n
        i += 1
    os.sync()
    # delete every third random file and one include subtree: their blocks keep old data
    for j in range(0, i, 3):
        (big / f"r{j}.bin").unlink()
    shutil.rmtree(mnt / "include0" / "linux", ignore_errors=True)


def partclone_used(tool: str, dev: str) -> int:
    proc = run(tool, "-c", "-s", dev, "-O", "/dev/null")
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    blocks = int(re.search(r"Space in use:.*?=\s*(\d+) Blocks", text).group(1))
    bs = int(re.search(r"Block size:\s*(\d+) Byte", text).group(1))
    return blocks * bs


def mounted_tree(loops, image: Path, mnt: Path) -> dict:
    """tree_digest of `image` mounted read-only on a loop device."""
    cdev = loops.attach(image, "--read-only")
    loops.mount(cdev, mnt, "-o", "ro")
    try:
        return tree_digest(mnt)
    finally:
        loops.umount(mnt)


def check_copies_ext(loops, tmp_path: Path, dev: str, used: UsedMap, expect: dict) -> None:
    for fill in (0x00, 0xAA):
        copy = blanked_copy(dev, tmp_path / f"copy-{fill:02x}.img", used, fill)
        run("e2fsck", "-fn", str(copy))
        assert mounted_tree(loops, copy, tmp_path / f"mnt-{fill:02x}") == expect
        copy.unlink()


EXT_CASES = {
    "ext4": ("-t", "ext4"),
    "ext4-1k-32bit": ("-t", "ext4", "-b", "1024", "-O", "^64bit"),
    "ext3": ("-t", "ext3"),
    "ext2": ("-t", "ext2"),
}


@pytest.mark.parametrize("case", EXT_CASES)
def test_ext_blanked_free_space_loses_nothing(loops, tmp_path, case):
    need("mkfs.ext4", "e2fsck", "dumpe2fs")
    dev, _ = loops.create(700 * MiB + 12345 * 1024, "fs")
    run("mke2fs", "-q", "-F", *EXT_CASES[case], dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    fill_with_files(mnt, seed=len(case), random_mib=250)
    expect = tree_digest(mnt)
    loops.umount(mnt)

    used = scan_path(dev)
    assert [(r.kind, r.analysed) for r in used.regions] == [(EXT_CASES[case][1], True)]
    e2_used, fs_bytes = dumpe2fs_counts(dev)
    tail = used.size - fs_bytes     # bytes past the last whole block: kept
    assert used.used_bytes == e2_used + tail
    if shutil.which("partclone.ext4"):
        pc = partclone_used("partclone.ext4", dev)
        print(f"\n{case}: scan {used.used_bytes} bytes, partclone {pc}, dumpe2fs {e2_used}, "
              f"ratio {used.used_bytes / pc:.6f}")
        assert pc <= used.used_bytes <= pc + tail + 1024
    assert used.used_bytes < 0.8 * used.size
    check_copies_ext(loops, tmp_path, dev, used, expect)


def test_ext4_two_gib_fragmented_scan(loops, tmp_path):
    """2 GiB ext4 ~40% used and fragmented by deletions: the scan agrees with dumpe2fs.  Its
    time is printed, not asserted (speed is measured by scripts/bench)."""
    need("mkfs.ext4", "dumpe2fs")
    dev, _ = loops.create(2048 * MiB, "fs")
    run("mke2fs", "-q", "-F", "-t", "ext4", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    rng = random.Random(7)
    blob = rng.randbytes(8 * MiB)
    for i in range(3000):   # ~1.7 GiB in files of 4 KiB .. 2 MiB, then half deleted
        n = rng.choice([4096, 12288, 65536, 300000, 1 << 20, 2 << 20])
        with open(mnt / f"f{i}", "wb") as f:
            f.write(blob[i % 4096 * 1024:][:n])
    for i in range(0, 3000, 2):
        os.unlink(mnt / f"f{i}")
    loops.umount(mnt)
    fd = os.open(dev, os.O_RDONLY)
    try:
        scan(fd, 2048 * MiB)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            m = scan(fd, 2048 * MiB)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    assert m.used_bytes == dumpe2fs_used(dev)
    ratio = m.used_bytes / m.size
    print(f"\n2 GiB ext4: {ratio:.1%} used in {len(m.ranges)} ranges, scan "
          f"{min(times) * 1000:.1f} ms (best of 5)")
    assert 0.3 < ratio < 0.5


def _fat_put(img_or_dev: str, src: Path) -> None:
    run("mcopy", "-s", "-i", img_or_dev, *[str(p) for p in sorted(src.iterdir())], "::/")


def _fat_tree(img_or_dev: str, dst: Path) -> dict:
    dst.mkdir()
    run("mcopy", "-s", "-n", "-i", img_or_dev, "::/", str(dst) + "/")
    return tree_digest(dst)


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_fat_blanked_free_space_loses_nothing(loops, tmp_path, bits):
    """vfat: filled by mount when the kernel has vfat, else with mtools."""
    need("mkfs.vfat", "fsck.vfat")
    size = {12: 12 * MiB, 16: 200 * MiB, 32: 400 * MiB}[bits]
    dev, _ = loops.create(size, "fat")
    run("mkfs.vfat", "-F", str(bits), dev)
    src = tmp_path / "src"
    src.mkdir()
    # real files, but only top-level headers: FAT names are case-insensitive and
    # /usr/include has names differing only in case deeper down
    headers = sorted(p for p in Path("/usr/include").glob("*.h") if p.is_file())
    (src / "include").mkdir()
    for h in headers[:80] if bits == 12 else headers:
        shutil.copy(h, src / "include" / h.name)
    rng = random.Random(bits)
    for i in range(6):
        (src / f"r{i}.bin").write_bytes(rng.randbytes((1 if bits == 12 else 10) * MiB // (i + 1)))
    if kernel_has("vfat"):
        mnt = loops.mount(dev, tmp_path / "mnt")
        for p in sorted(src.iterdir()):
            (shutil.copytree if p.is_dir() else shutil.copy)(p, mnt / p.name)
        for i in (0, 3):
            os.unlink(mnt / f"r{i}.bin")
        expect = tree_digest(mnt)
        loops.umount(mnt)
    else:
        need("mcopy", "mdel")
        _fat_put(dev, src)
        run("mdel", "-i", dev, "::/r0.bin", "::/r3.bin")
        (src / "r0.bin").unlink()
        (src / "r3.bin").unlink()
        expect = tree_digest(src)
    used = scan_path(dev)
    assert [(r.kind, r.analysed) for r in used.regions] == [("vfat", True)]
    assert f"FAT{bits}" in used.regions[0].detail
    # exactly what fsck.fat counts: metadata, used clusters, and the sectors after the last
    # whole cluster
    out = run("fsck.vfat", "-n", "-v", dev).stdout
    used_cl, total_cl = map(int, re.search(r"(\d+)/(\d+) clusters", out).groups())
    csize = int(re.search(r"(\d+) bytes per cluster", out).group(1))
    data_start = int(re.search(r"Data area starts at byte (\d+)", out).group(1))
    tail = size - data_start - total_cl * csize
    assert used.used_bytes == data_start + used_cl * csize + tail
    if shutil.which("partclone.fat"):
        pc = partclone_used("partclone.fat", dev)
        print(f"\nFAT{bits}: scan {used.used_bytes} bytes, partclone {pc}, fsck.fat "
              f"{data_start + used_cl * csize}, ratio {used.used_bytes / pc:.6f}")
        # never less than partclone (partclone 0.3.23 counts fewer FAT12 clusters than
        # fsck.fat reports in use)
        assert used.used_bytes >= pc
    for fill in (0x00, 0xAA):
        copy = blanked_copy(dev, tmp_path / f"copy-{fill:02x}.img", used, fill)
        run("fsck.vfat", "-n", str(copy))
        if kernel_has("vfat"):
            assert mounted_tree(loops, copy, tmp_path / f"mnt-{fill:02x}") == expect
        else:
            assert _fat_tree(str(copy), tmp_path / f"out-{fill:02x}") == expect
        copy.unlink()


def partition_nodes(dev: str, count: int, tmp_path: Path) -> list[str]:
    """Paths of /dev/loopNp1.. ; without udev (containers) the nodes are made in tmp_path
    from sysfs so that nothing is left behind in /dev."""
    name = os.path.basename(dev)
    if not Path(f"/sys/class/block/{name}p1").exists() and shutil.which("partx"):
        # kernels without partition parsers: let partx add them (BLKPG)
        run("partx", "-a", dev, check=False)
    out = []
    for i in range(1, count + 1):
        path = f"{dev}p{i}"
        sysfs = Path(f"/sys/class/block/{name}p{i}/dev")
        for _ in range(50):
            if os.path.exists(path) or sysfs.exists():
                break
            time.sleep(0.1)
        if not os.path.exists(path):
            major, minor = map(int, sysfs.read_text().split(":"))
            path = str(tmp_path / f"{name}p{i}")
            os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        out.append(path)
    return out


def test_partitioned_disk_on_loop_device(loops, tmp_path):
    """GPT disk made with sfdisk, filesystems made with mkfs on the /dev/loopNpM partitions."""
    need("sfdisk", "mkfs.ext4", "mkfs.vfat", "e2fsck", "fsck.vfat")
    # the table goes into the file first: the kernel scans it when the loop device is attached
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(600 * MiB)
    run("sfdisk", "-q", str(backing), input="label: gpt\nsize=300MiB, name=root\n"
                                            "size=100MiB\nsize=50MiB\n")
    dev = loops.attach(backing, "--partscan")
    p1, p2, p3 = partition_nodes(dev, 3, tmp_path)
    run("mke2fs", "-q", "-F", "-t", "ext4", p1)
    run("mkfs.vfat", "-F", "16", p2)
    with open(p3, "wb") as f:   # opaque data: must be read whole
        f.write(random.Random(3).randbytes(50 * MiB))
    mnt = loops.mount(p1, tmp_path / "mnt")
    fill_with_files(mnt, seed=11, random_mib=100)
    expect = tree_digest(mnt)
    loops.umount(mnt)
    os.sync()

    used = scan_path(dev)
    kinds = [r.kind for r in used.regions]
    assert kinds == ["gpt", "ext4", "vfat", "unknown", "gpt-backup"]
    p1_region, p3_region = used.regions[1], used.regions[3]
    assert used.used_bytes_in(p1_region.offset, p1_region.length) == dumpe2fs_used(p1)
    assert used.used_in(p3_region.offset, p3_region.length) == [(p3_region.offset,
                                                                p3_region.length)]
    copy = blanked_copy(dev, tmp_path / "copy.img", used, 0xAA)
    cdev = loops.attach(copy, "--read-only", "--partscan")
    c1, c2, c3 = partition_nodes(cdev, 3, tmp_path)
    run("e2fsck", "-fn", c1)
    run("fsck.vfat", "-n", c2)
    with open(c3, "rb") as f:
        assert f.read() == random.Random(3).randbytes(50 * MiB)
    mnt = loops.mount(c1, tmp_path / "mnt-copy", "-o", "ro")
    assert tree_digest(mnt) == expect


def test_mounted_ext4_is_read_fully(loops, tmp_path, caplog):
    """While mounted read-write the on-disk bitmaps are not to be trusted."""
    need("mkfs.ext4")
    dev, _ = loops.create(64 * MiB, "fs")
    run("mke2fs", "-q", "-F", "-t", "ext4", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    (mnt / "f").write_bytes(b"x" * 100000)
    os.sync()
    with caplog.at_level("WARNING"):
        used = scan_path(dev)
    assert used.ranges == ((0, 64 * MiB),) and used.regions[0].kind == "unknown"
    assert "needs recovery" in caplog.text
    loops.umount(mnt)
    assert scan_path(dev).regions[0].kind == "ext4"
