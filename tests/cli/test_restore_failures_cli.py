"""What a restore does when it fails, on regular files (no root): the error says what was left on
the target, a file the restore created is removed unless --keep-partial, --salvage restores past
damage and a truncated image's lost tail, --verify reads back, and the overwrite question shows
what is on the target before any progress bar."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.errors import RestoreFailed
from diskimg.image.imagefile import ImageReader
from diskimg.ops.restore import describe_target, restore_image
from helpers import PYTHON, REPO, cli, compressible, flip_byte, run

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
NBLOCKS = 20
SIZE = NBLOCKS * BS + 3000          # a short last block
ZERO_BLOCKS = (4, 5, 6)
PATTERN = b"\xaa"


def make_source(path: Path, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = bytearray()
    for b in range(-(-SIZE // BS)):
        n = min(BS, SIZE - b * BS)
        data += bytes(n) if b in ZERO_BLOCKS else compressible(rnd, n)
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture
def src(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "source.raw"
    return path, make_source(path)


@pytest.fixture
def image(tmp_path, src) -> Path:
    img = tmp_path / "full.img"
    assert cli("image", src[0], img, "--block-size", "64K", "--all-blocks").rc == 0
    return img


def damage(image: Path, block: int) -> None:
    """Flip a byte in the middle of a block's stored data."""
    with ImageReader(str(image)) as r:
        e = r.entry(block)
    assert e.kind == fmt.DATA
    flip_byte(image, e.offset + fmt.RECORD_HEADER_SIZE + e.stored_len // 2)


def one_error_line(res) -> str:
    assert len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("diskimg: error: ") and "Traceback" not in res.err
    return res.err_lines[0]


# --------------------------------------------------------------------------------------------
# what was left

def test_bad_block_says_which_blocks_were_restored(tmp_path, image, src):
    bad = 9
    damage(image, bad)
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    res = cli("restore", image, target, "--yes")
    assert res.rc == 1
    line = one_error_line(res)
    assert f"block {bad}" in line
    assert line.endswith(f"{target} partially written: blocks 0-{bad - 1} restored, "
                         f"the rest unchanged"), line
    got = target.read_bytes()
    assert got[:bad * BS] == src[1][:bad * BS]            # zero blocks 4-6 included
    assert got[bad * BS:] == PATTERN * (SIZE - bad * BS)


def test_zero_run_before_the_bad_block_is_restored_too(tmp_path, image, src):
    """The zero blocks just before a bad block are pending when it is found: they are written
    before the error is reported, so that 'blocks 0-6 restored' is true."""
    damage(image, 7)
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    res = cli("restore", image, target, "--yes")
    assert res.rc == 1
    assert "blocks 0-6 restored, the rest unchanged" in one_error_line(res)
    assert target.read_bytes()[:7 * BS] == src[1][:7 * BS]


def test_bad_first_block_leaves_target_unchanged(tmp_path, image):
    damage(image, 0)
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    res = cli("restore", image, target, "--yes")
    assert res.rc == 1
    assert one_error_line(res).endswith(f"; {target} unchanged")
    assert target.read_bytes() == PATTERN * SIZE


def test_only_changed_counts_what_was_written(tmp_path, image, src):
    target = tmp_path / "target.raw"
    data = bytearray(src[1])
    data[2 * BS + 10] ^= 1                                # one block differs before the bad one
    data[11 * BS + 10] ^= 1                               # and the bad one: it must be read
    target.write_bytes(bytes(data))
    damage(image, 11)
    res = cli("restore", image, target, "--yes", "--only-changed")
    assert res.rc == 1
    assert ("blocks 0-10 restored (1 written, the others already identical), the rest "
            "unchanged") in one_error_line(res)


def test_library_error_carries_typed_fields(tmp_path, image):
    damage(image, 3)
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    with pytest.raises(RestoreFailed) as info:
        restore_image(str(image), str(target), confirm=lambda q: True)
    err = info.value
    assert err.exit_code == 1 and err.cause.exit_code == 1
    assert err.to_dict() == {"target": str(target), "restored_blocks": [[0, 2]],
                             "written_blocks": 3, "block_size": BS, "torn_block": None,
                             "target_unchanged": False, "created": False, "removed": False}


def test_target_unchanged_only_when_nothing_was_written(tmp_path, image):
    """`target_unchanged` means the target was not changed at all: false once blocks 0-2 were
    written (above), true when the very first block is bad; the JSON error carries the keys
    flat in `error`."""
    damage(image, 0)
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    res = cli("restore", image, target, "--yes", "--json")
    assert res.rc == 1
    error = res.json["error"]
    assert error["target_unchanged"] is True and error["written_blocks"] == 0
    assert error["restored_blocks"] == [] and error["target"] == str(target)
    assert "partial" not in error and "unchanged" not in error
    assert target.read_bytes() == PATTERN * SIZE


# --------------------------------------------------------------------------------------------
# a file the restore created

def test_created_file_is_removed_on_failure(tmp_path, image):
    damage(image, 9)
    out = tmp_path / "new.raw"
    res = cli("restore", image, out)
    assert res.rc == 1
    assert one_error_line(res).endswith(f"{out} removed (this restore created it; "
                                        f"--keep-partial keeps it)")
    assert not out.exists()


def test_keep_partial_keeps_it(tmp_path, image, src):
    damage(image, 9)
    out = tmp_path / "new.raw"
    res = cli("restore", image, out, "--keep-partial")
    assert res.rc == 1
    assert one_error_line(res).endswith(f"{out} partially written: blocks 0-8 restored, the "
                                        f"rest reads as zeros (a new file)")
    got = out.read_bytes()
    assert got[:9 * BS] == src[1][:9 * BS] and got[9 * BS:] == bytes(SIZE - 9 * BS)


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _restore_limited(image: Path, target: Path, limit: int, *extra: str):
    return subprocess.run([PYTHON, "-m", "diskimg", "restore", str(image), str(target),
                           "--no-progress", *extra], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=_limit_file_size(limit))


def test_write_error_exit_3_says_what_was_left(tmp_path, image, src):
    """A write that fails (EFBIG past RLIMIT_FSIZE, as a full or failing disk would) exits 3;
    the block whose write failed is named as possibly torn, the blocks before it restored."""
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    limit = 3 * BS + 100                    # block 3's write is cut short
    proc = _restore_limited(image, target, limit, "--yes", "--threads", "1")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: "), proc.stderr
    assert lines[0].endswith(f"{target} partially written: blocks 0-2 restored, block 3 may be "
                             f"partly written, the rest unchanged"), lines[0]
    got = target.read_bytes()
    assert got[:3 * BS] == src[1][:3 * BS] and got[4 * BS:] == PATTERN * (SIZE - 4 * BS)


def test_write_error_removes_created_file(tmp_path, image):
    out = tmp_path / "new.raw"
    proc = _restore_limited(image, out, 2 * BS)
    assert proc.returncode == 3, proc.stderr      # (here: it cannot even be made that large)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# --salvage

def test_salvage_restores_past_a_bad_block(tmp_path, image, src):
    damage(image, 9)
    damage(image, 10)
    damage(image, 13)
    out = tmp_path / "out.raw"
    res = cli("restore", image, out, "--salvage", "--json")
    assert res.rc == 1, res.err
    salvaged = res.json["salvaged"]
    assert [(s["block"], s["last_block"], s["offset"], s["length"]) for s in salvaged] == \
        [(9, 10, 9 * BS, 2 * BS), (13, 13, 13 * BS, BS)]
    assert all("does not decompress" in s["reason"] or "checksum mismatch" in s["reason"]
               for s in salvaged), salvaged
    expected = bytearray(src[1])
    for b in (9, 10, 13):
        expected[b * BS:(b + 1) * BS] = bytes(BS)
    assert out.read_bytes() == bytes(expected)
    text = cli("restore", image, out, "--salvage", "--yes")
    assert text.rc == 1
    assert (f"salvaged as zeros: blocks 9-10, bytes {9 * BS}-{11 * BS - 1} ({2 * BS} bytes): "
            ) in text.out
    assert "SALVAGED:" in text.out


def test_salvage_damaged_index_segment(tmp_path, image):
    with ImageReader(str(image)) as r:
        (off, length), = r.segments
    flip_byte(image, off + fmt.SEGMENT_HEADER_SIZE + (length - fmt.SEGMENT_HEADER_SIZE) // 2)
    out = tmp_path / "out.raw"
    res = cli("restore", image, out, "--salvage", "--json")
    assert res.rc == 1, res.err
    (s,) = res.json["salvaged"]
    assert (s["block"], s["length"]) == (0, SIZE) and "index segment" in s["reason"]
    assert out.read_bytes() == bytes(SIZE)


def test_salvage_truncated_image_restores_what_survived(tmp_path, image, src):
    """An image cut in the middle of block 12's record: blocks 0-11 are restored from their
    records (the zero blocks, which have none, read as zeros and are listed as unknown), block
    12 on are lost and listed."""
    with ImageReader(str(image)) as r:
        e = r.entry(12)
    os.truncate(image, e.offset + fmt.RECORD_HEADER_SIZE + e.stored_len // 2)
    assert cli("restore", image, tmp_path / "x.raw").rc == 1       # refused without --salvage
    out = tmp_path / "out.raw"
    res = cli("restore", image, out, "--salvage", "--json")
    assert res.rc == 1, res.err
    assert res.json["truncated"] is True
    ranges = [(s["block"], s["last_block"]) for s in res.json["salvaged"]]
    assert ranges == [(4, 6), (12, NBLOCKS)]
    assert all("truncated" in s["reason"] for s in res.json["salvaged"])
    got = out.read_bytes()
    assert got[:12 * BS] == src[1][:12 * BS]
    assert got[12 * BS:] == bytes(SIZE - 12 * BS)


def test_salvage_truncated_image_skips_over_damage(tmp_path, image, src):
    """A damaged record in a truncated image: the records after it are found again."""
    with ImageReader(str(image)) as r:
        e3, e15 = r.entry(3), r.entry(15)
    os.truncate(image, e15.offset + 10)
    flip_byte(image, e3.offset + 5)                  # record header of block 3
    out = tmp_path / "out.raw"
    res = cli("restore", image, out, "--salvage", "--json")
    assert res.rc == 1, res.err
    assert [(s["block"], s["last_block"]) for s in res.json["salvaged"]] == \
        [(3, 6), (15, NBLOCKS)]
    got = out.read_bytes()
    assert got[7 * BS:15 * BS] == src[1][7 * BS:15 * BS]


def test_salvage_truncated_incremental_does_not_use_its_parent(tmp_path, image, src):
    """Blocks a truncated incremental has no record of are zeros, never the parent's: nothing
    says whether the child had changed them."""
    changed = bytearray(src[1])
    for b in (2, 8, 16):
        changed[b * BS + 5] ^= 0x55
    src[0].write_bytes(bytes(changed))
    inc = tmp_path / "inc.img"
    # --no-delta: blocks stored whole (a delta record needs its parent, so it does not survive
    # on its own; salvage skips it, like any other block it has no record of)
    assert cli("image", src[0], inc, "--incremental", image, "--all-blocks",
               "--no-delta").rc == 0
    with ImageReader(str(inc)) as r:
        e16 = r.entry(16)
    os.truncate(inc, e16.offset + 20)                # block 16's record is lost
    out = tmp_path / "out.raw"
    res = cli("restore", inc, out, "--salvage", "--json")
    assert res.rc == 1, res.err
    assert res.json["chain_paths"] == [str(inc)]
    got = out.read_bytes()
    for b in (2, 8):
        assert got[b * BS:(b + 1) * BS] == changed[b * BS:(b + 1) * BS]
    assert got[16 * BS:17 * BS] == bytes(BS)
    assert got[0:BS] == bytes(BS)                    # unchanged block: the parent's, unused
    ranges = [(s["block"], s["last_block"]) for s in res.json["salvaged"]]
    assert ranges == [(0, 1), (3, 7), (9, NBLOCKS)]


def test_salvage_still_needs_the_parent(tmp_path, image, src):
    changed = bytearray(src[1])
    changed[5] ^= 1
    src[0].write_bytes(bytes(changed))
    inc = tmp_path / "inc.img"
    assert cli("image", src[0], inc, "--incremental", image).rc == 0
    (tmp_path / "elsewhere").mkdir()
    image.rename(tmp_path / "elsewhere" / "full.img")
    res = cli("restore", inc, tmp_path / "out.raw", "--salvage")
    assert res.rc == 2
    assert "not found" in one_error_line(res)


# --------------------------------------------------------------------------------------------
# --verify on a file (the lying device is in tests/root/test_restore_failures.py)

def test_verify_reads_back_a_good_restore(tmp_path, image, src):
    out = tmp_path / "out.raw"
    res = cli("restore", image, out, "--verify", "--json")
    assert res.rc == 0, res.err
    assert res.json["verified"] is True and res.json["verify_errors"] == []
    assert res.json["verified_blocks"] == NBLOCKS + 1
    text = cli("restore", image, out, "--verify", "--yes")
    assert text.rc == 0 and "all identical to the image" in text.out


# --------------------------------------------------------------------------------------------
# the overwrite question

def test_question_describes_a_file_target(tmp_path, image, monkeypatch):
    if not shutil.which("mkfs.ext4") or not shutil.which("blkid"):
        pytest.skip("mkfs.ext4 and blkid needed")
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE + 10 * BS)
    run("mkfs.ext4", "-q", "-F", "-L", "oldlabel", target)
    d = describe_target(str(target), False, target.stat().st_size)
    assert [(c.fstype, c.label) for c in d.contents] == [("ext4", "oldlabel")]
    before = target.read_bytes()
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))      # not a terminal
    res = cli("restore", image, target)
    assert res.rc == 2
    assert "refusing without --yes" in res.err
    assert 'ext4, label "oldlabel"' in res.err
    assert res.err_lines[-1].startswith("diskimg: error: ")
    assert target.read_bytes() == before


def _stderr_on_terminal(cmd) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=REPO)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    proc.wait()
    return out.decode(errors="replace")


def test_question_comes_before_any_progress_bar(tmp_path, image):
    """On a terminal the bar used to be drawn (0%) before the question; now it starts with the
    first block written, after the answer."""
    target = tmp_path / "target.raw"
    target.write_bytes(PATTERN * SIZE)
    err = _stderr_on_terminal([PYTHON, "-m", "diskimg", "restore", str(image), str(target)])
    assert "will be overwritten" in err
    assert "restoring" not in err and "%" not in err, err
    err = _stderr_on_terminal([PYTHON, "-m", "diskimg", "restore", str(image), str(target),
                               "--yes"])
    assert "restoring" in err and "100%" in err


def test_describe_target_shows_a_label_with_a_space(tmp_path):
    """blkid -o export escapes the space ("my\\ disk"): the question shows the label as it is."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 not installed")
    target = tmp_path / "fs.img"
    with open(target, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "my disk", str(target)], check=True)
    desc = describe_target(str(target), False, target.stat().st_size)
    assert [(c.fstype, c.label) for c in desc.contents] == [("ext4", "my disk")]
