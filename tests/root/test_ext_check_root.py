"""The ext cross-check against real damaged filesystems: never lose a block e2fsck would keep.

A small ext filesystem is made with mke2fs, mounted, filled with real files (a copy of
/usr/include/linux, random files, a file fragmented by punched holes so its extent tree has an
index level, an extended attribute in its own block), unmounted, and then damaged with debugfs the
ways the issue names: bits of used blocks cleared in the block bitmap with every free count
lowered to match (so that nothing but the inodes tells), a used group flagged BLOCK_UNINIT, the
resize inode's double-indirect block, an indirect block of an ext2 file, an extent index block,
the xattr block, journal blocks, an inode whose bitmap bit is cleared along with its blocks.

Oracle, as the issue states it: ``e2fsck -fy`` on a copy of the damaged original rebuilds the
bitmaps from what the inodes own; every block that copy has in use must be identical in the
restore (a copy whose unused bytes are zero, or 0xAA garbage), and ``e2fsck -fn`` must say the
same of the restore as of the original.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest

from helpers import blanked_copy, need, run, scan_path

from diskimg.disk.used import UsedMap

pytestmark = pytest.mark.root

MiB = 1 << 20


def debugfs(img: Path, *cmds: str) -> str:
    return run("debugfs", "-w", "-f", "-", str(img), input="\n".join(cmds) + "\n").stdout


def _ranges(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a)))
    return out


def groups_free(img: Path) -> dict[int, int]:
    """Free blocks of each group as its bitmap counts them (dumpe2fs's "Free blocks:")."""
    out = run("dumpe2fs", str(img)).stdout
    free: dict[int, int] = {}
    group = None
    for line in out.splitlines():
        m = re.match(r"Group (\d+):", line)
        if m:
            group = int(m.group(1))
            free[group] = 0
            continue
        m = re.match(r"\s+Free blocks: (.*)", line)
        if m and group is not None:
            free[group] = sum(b - a + 1 for a, b in _ranges(m.group(1)))
    return free


def fix_counts(img: Path) -> None:
    """Lower every free count to what the bitmaps say: the damage then shows nowhere but in
    the inodes (debugfs's freeb clears the bit only)."""
    free = groups_free(img)
    cmds = [c for g, n in free.items()
            for c in (f"set_bg {g} free_blocks_count {n}", f"set_bg {g} checksum calc")]
    cmds.append(f"ssv free_blocks_count {sum(free.values())}")
    debugfs(img, *cmds)


def kept_blocks(img: Path, tmp: Path) -> tuple[int, list[tuple[int, int]]]:
    """(block size, the in-use block ranges) of ``img`` after e2fsck has repaired a copy."""
    fixed = tmp / "fixed.img"
    shutil.copyfile(img, fixed)
    run("e2fsck", "-fy", str(fixed), check=False)
    out = run("dumpe2fs", str(fixed)).stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    blocks = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
    first = int(re.search(r"^First block:\s+(\d+)", out, re.M).group(1))
    free = sorted(r for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M)
                  for r in _ranges(m.group(1)))
    kept, pos = [], first
    for a, b in free:
        if a > pos:
            kept.append((pos, a - 1))
        pos = b + 1
    if pos < blocks:
        kept.append((pos, blocks - 1))
    fixed.unlink()
    return bs, kept


def fsck_says(img: Path) -> tuple[int, str]:
    proc = run("e2fsck", "-fn", str(img), check=False)
    return proc.returncode, (proc.stdout + proc.stderr).replace(str(img), "IMG")


def assert_keeps(img: Path, tmp: Path) -> UsedMap:
    used = scan_path(img)
    bs, kept = kept_blocks(img, tmp)
    before = fsck_says(img)
    for fill in (0x00, 0xAA):
        copy = blanked_copy(img, tmp / f"restore-{fill:02x}.img", used, fill)
        lost = []
        with open(img, "rb") as a, open(copy, "rb") as b:
            for lo, hi in kept:
                a.seek(lo * bs)
                b.seek(lo * bs)
                for blk in range(lo, hi + 1):
                    if a.read(bs) != b.read(bs):
                        lost.append(blk)
        assert not lost, f"{len(lost)} blocks e2fsck keeps were lost, first {lost[:10]}"
        assert fsck_says(copy) == before
        copy.unlink()
    return used


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(ext4 with 1 KiB blocks, ext2 with indirect blocks) images, filled and unmounted."""
    need("mke2fs", "debugfs", "e2fsck", "dumpe2fs", "fallocate")
    tmp = tmp_path_factory.mktemp("extcheck")
    made = {}
    for name, opts in (("ext4", ("-t", "ext4", "-b", "1024", "-I", "128")),
                       ("ext2", ("-t", "ext2", "-b", "1024"))):
        img = tmp / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(32 * MiB)
        run("mke2fs", "-q", "-F", *opts, str(img))
        mnt = tmp / f"mnt-{name}"
        mnt.mkdir()
        run("mount", "-o", "loop", str(img), str(mnt))
        try:
            shutil.copytree("/usr/include/linux", mnt / "linux", symlinks=True)
            rng = random.Random(18)
            for i in range(3):
                (mnt / f"r{i}.bin").write_bytes(rng.randbytes((i + 1) * MiB + 1234))
            frag = mnt / "frag.bin"
            frag.write_bytes(rng.randbytes(2 * MiB))
            os.sync()
            for k in range(1, 2 * MiB // 4096, 2):    # 256 extents: an index level
                run("fallocate", "-p", "-o", str(k * 4096), "-l", "4096", str(frag))
            (mnt / "xattr.txt").write_text("has an attribute block\n")
        finally:
            run("umount", str(mnt))
        # a 128-byte inode has no room in itself: the attribute goes to a block of its own
        debugfs(img, "ea_set /xattr.txt user.note " + "x" * 300)
        made[name] = img
    return made


def _blocks_of(img: Path, path: str) -> str:
    return run("debugfs", "-R", f"stat {path}", str(img)).stdout


def _damaged(pristine, tmp_path: Path, name: str, *cmds: str, fix: bool = True) -> Path:
    img = tmp_path / "damaged.img"
    shutil.copyfile(pristine[name], img)
    debugfs(img, *cmds)
    if fix:
        fix_counts(img)
    return img


def _first_extent(stat: str) -> tuple[int, int]:
    m = re.search(r"\(\d+(?:-\d+)?\):(\d+)(?:-(\d+))?", stat.split("EXTENTS:")[1])
    return int(m.group(1)), int(m.group(2) or m.group(1))


def test_cleared_bitmap_bits_are_read(pristine, tmp_path):
    lo, hi = _first_extent(_blocks_of(pristine["ext4"], "/r2.bin"))
    n = min(154, hi - lo + 1)
    img = _damaged(pristine, tmp_path, "ext4", f"freeb {lo} {n}")
    assert "Block bitmap differences" in fsck_says(img)[1]
    used = assert_keeps(img, tmp_path)
    assert sum(r.repaired_blocks for r in used.regions) == n
    assert "allocation map repaired: 154 blocks" in used.regions[0].detail


def test_block_uninit_on_a_used_group(pristine, tmp_path):
    stat = _blocks_of(pristine["ext4"], "/r2.bin")
    lo, _ = _first_extent(stat)
    group = (lo - 1) // 8192
    img = _damaged(pristine, tmp_path, "ext4", f"set_bg {group} flags 2",
                   f"set_bg {group} checksum calc", fix=False)
    used = assert_keeps(img, tmp_path)
    assert sum(r.repaired_blocks for r in used.regions) > 1000


def test_extent_index_xattr_journal_and_resize_inode(pristine, tmp_path):
    img0 = pristine["ext4"]
    index = int(re.search(r"\(ETB0\):(\d+)", _blocks_of(img0, "/frag.bin")).group(1))
    acl = int(re.search(r"File ACL: (\d+)", _blocks_of(img0, "/xattr.txt")).group(1))
    dind = int(re.search(r"\(DIND\):(\d+)", _blocks_of(img0, "<7>")).group(1))
    jlo, _ = _first_extent(_blocks_of(img0, "<8>"))
    img = _damaged(pristine, tmp_path, "ext4", f"freeb {index}", f"freeb {acl}",
                   f"freeb {dind}", f"freeb {jlo + 10} 50")
    used = assert_keeps(img, tmp_path)
    assert sum(r.repaired_blocks for r in used.regions) == 53


def test_inode_bitmap_bit_cleared_with_its_blocks(pristine, tmp_path):
    stat = _blocks_of(pristine["ext4"], "/r0.bin")
    lo, hi = _first_extent(stat)
    img = _damaged(pristine, tmp_path, "ext4", "freei /r0.bin", f"freeb {lo} {hi - lo + 1}")
    used = assert_keeps(img, tmp_path)
    assert sum(r.repaired_blocks for r in used.regions) == hi - lo + 1


def test_ext2_indirect_blocks(pristine, tmp_path):
    stat = _blocks_of(pristine["ext2"], "/r1.bin")
    ind = int(re.search(r"\(IND\):(\d+)", stat).group(1))
    dind = int(re.search(r"\(DIND\):(\d+)", stat).group(1))
    data = int(re.search(r"\(0(?:-\d+)?\):(\d+)", stat).group(1))
    img = _damaged(pristine, tmp_path, "ext2", f"freeb {ind}", f"freeb {dind}",
                   f"freeb {data} 5")
    used = assert_keeps(img, tmp_path)
    assert sum(r.repaired_blocks for r in used.regions) == 7


def test_undamaged_needs_no_repair(pristine, tmp_path):
    for name in ("ext4", "ext2"):
        used = assert_keeps(pristine[name], tmp_path)
        assert [r.repaired_blocks for r in used.regions] == [0]


def test_unparseable_inode_reads_fully(pristine, tmp_path):
    """An extent header without its magic: no bitmap union can be trusted, read it all."""
    img = _damaged(pristine, tmp_path, "ext4", "sif /r1.bin block[0] 0x1234", fix=False)
    used = scan_path(img)
    assert used.ranges == ((0, used.size),)
    assert "needs fsck" in used.regions[0].detail


def test_image_records_the_repair_and_info_shows_it(pristine, tmp_path):
    """End to end: `diskimg image` of the damaged filesystem, `info` names the repair (text and
    JSON), and the restore keeps every block e2fsck keeps."""
    from helpers import cli

    lo, hi = _first_extent(_blocks_of(pristine["ext4"], "/r2.bin"))
    img = _damaged(pristine, tmp_path, "ext4", f"freeb {lo} 154")
    image = tmp_path / "d.dimg"
    made = cli("image", img, image, "--block-size", "64K", "--no-progress")
    assert made.rc == 0
    # said at once, on stderr, as well as recorded
    assert "154 blocks owned by inodes are marked free in the block bitmaps" in made.err
    info = cli("info", image)
    assert info.rc == 0
    assert ("allocation map repaired: 154 blocks owned by inodes but marked free"
            in info.out), info.out
    rep = cli("info", image, "--json").json["allocation_repaired"]
    assert [(r["kind"], r["blocks"], r["block_size"]) for r in rep] == [("ext4", 154, 1024)]
    target = tmp_path / "restored.img"
    with open(target, "wb") as f:
        f.truncate(32 * MiB)
    assert cli("restore", image, target, "--yes", "--no-progress").rc == 0
    bs, kept = kept_blocks(img, tmp_path)
    with open(img, "rb") as a, open(target, "rb") as b:
        for s, e in kept:
            a.seek(s * bs)
            b.seek(s * bs)
            assert a.read((e - s + 1) * bs) == b.read((e - s + 1) * bs), f"blocks {s}-{e}"
    assert fsck_says(target) == fsck_says(img)
