"""The ext cross-check on real damaged filesystems from e2fsprogs' own test suite
(fixtures/e2fsprogs, GPL-2, see its README): no block an inode owns is left out, and e2fsck
says the same of a restore (free space zeroed, or garbage) as of the original."""
from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import pytest

from helpers import REPO, blanked_copy, run

from diskimg.disk.used import scan

FIXTURES = REPO / "fixtures" / "e2fsprogs"
# image: blocks the cross-check reads although the bitmap marks them free; None: read fully
EXPECT = {
    "f_uninit_blk_used_not_set": 193,
    "f_uninit_set_inode_not_set": 4893,
    "f_dup_ba": 4,
    "f_invalid_bad_inode": 1,
    "f_toobig_extent_dir": 1,
    "f_hugedir_blocks": 1,
    "f_resize_inode_meta_bg": None,
}

pytestmark = pytest.mark.skipif(not (shutil.which("debugfs") and shutil.which("e2fsck")),
                                reason="needs debugfs and e2fsck (e2fsprogs)")


def fsck_says(img: Path) -> tuple[int, str]:
    proc = run("e2fsck", "-fn", str(img), check=False)
    text = (proc.stdout + proc.stderr).replace(str(img), "IMG")
    return proc.returncode, re.sub(r"0x[0-9a-f]{6,}", "ADDR", text)   # e2fsck's crash dumps


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_no_owned_block_left_out(tmp_path, name):
    img = tmp_path / "fs.img"
    with gzip.open(FIXTURES / f"{name}.img.gz") as f, open(img, "wb") as out:
        shutil.copyfileobj(f, out)
    fd = os.open(img, os.O_RDONLY)
    try:
        used = scan(fd, os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)
    region = used.regions[0]
    if EXPECT[name] is None:
        assert used.ranges == ((0, used.size),) and not region.analysed
        return
    assert region.analysed and region.repaired_blocks == EXPECT[name]
    bs = region.block_size
    blocks = int(re.search(r"^Block count:\s+(\d+)", run("dumpe2fs", "-h", str(img)).stdout,
                           re.M).group(1))
    free, pos = [], 0
    for off, n in (*used.ranges, (blocks * bs, 0)):
        free += range(pos // bs, off // bs)
        pos = off + n
    owned = []
    for i in range(0, len(free), 2000):
        out = run("debugfs", "-R", "icheck " + " ".join(map(str, free[i:i + 2000])),
                  str(img)).stdout
        owned += [ln.split()[0] for ln in out.splitlines()[1:]
                  if len(ln.split()) > 1 and ln.split()[1].isdigit()]
    assert not owned, f"blocks owned by inodes but left out: {owned[:10]}"
    before = fsck_says(img)
    for fill in (0x00, 0xAA):
        copy = blanked_copy(img, tmp_path / f"copy-{fill:02x}.img", used, fill)
        assert fsck_says(copy) == before
