"""Restore failures on real devices: read-only targets refused before anything is written, the
overwrite question describing a real loop device, --verify catching a device that lies about
its writes (a loop device over faultfs in writable mode), and Ctrl-C saying what was left."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from diskimg.errors import EXIT_PERMISSION, UnsafeTarget
from diskimg.ops.restore import describe_target, restore_image
from helpers import MiB, PYTHON, REPO, cli, cmp_same, compressible, read_at, run, sha256_of

pytestmark = pytest.mark.root

BS = 64 * 1024
SIZE = 4 * MiB


@pytest.fixture
def image(tmp_path) -> tuple[Path, bytes]:
    rnd = random.Random(11)
    data = b"".join(compressible(rnd, BS) if b % 5 else bytes(BS) for b in range(SIZE // BS))
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = tmp_path / "src.img"
    assert cli("image", src, img, "--block-size", "64K", "--all-blocks").rc == 0
    return img, data


def _one_line(res) -> str:
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("diskimg: error: "), res.err
    return res.err_lines[0]


@pytest.mark.parametrize("how", ["losetup -r", "blockdev --setro"])
def test_read_only_device_refused_before_writing(loops, tmp_path, image, how):
    backing = tmp_path / "ro.img"
    backing.write_bytes(b"\x5a" * SIZE)
    if how == "losetup -r":
        dev = loops.attach(backing, "--read-only")
    else:
        dev = loops.attach(backing)
        run("blockdev", "--setro", dev)
    asked = []
    try:
        res = cli("restore", image[0], dev, "--yes")
        # refused before the overwrite question, not after the user said yes
        with pytest.raises(UnsafeTarget, match="read-only"):
            restore_image(str(image[0]), dev, confirm=lambda q: asked.append(q) or True)
    finally:
        run("blockdev", "--setrw", dev, check=False)   # the flag outlives the attachment
    assert asked == []
    assert res.rc == 2, res.err
    assert "read-only" in _one_line(res) and dev in res.err
    assert backing.read_bytes() == b"\x5a" * SIZE


def test_immutable_file_refused_before_writing(tmp_path, image):
    target = tmp_path / "immutable.raw"
    target.write_bytes(b"\x5a" * SIZE)
    if run("chattr", "+i", target, check=False).returncode != 0:
        pytest.skip("chattr +i not supported on this filesystem")
    try:
        res = cli("restore", image[0], target, "--yes")
    finally:
        run("chattr", "-i", target, check=False)
    assert res.rc == EXIT_PERMISSION, res.err     # the system refuses: one code for all such
    assert "permission denied" in _one_line(res) and "chattr -i" in _one_line(res)
    assert target.read_bytes() == b"\x5a" * SIZE


def test_describe_target_of_a_loop_device(loops, tmp_path, image):
    dev, _ = loops.create(SIZE * 4, "labelled")
    run("mkfs.ext4", "-q", "-F", "-L", "mydata", dev)
    mnt = loops.mount(dev, tmp_path / "mnt")
    d = describe_target(dev, True, SIZE * 4)
    assert d.is_block and d.size == SIZE * 4
    # the filesystem on the device itself (a kernel may still list partitions another test
    # added to this loop device number; they are shown too, and are not what is checked here)
    (c,) = [c for c in d.contents if c.name == os.path.basename(dev)]
    assert (c.fstype, c.label, c.mountpoints) == ("ext4", "mydata", (str(mnt),))
    loops.umount(mnt)
    res = cli("restore", image[0], dev)           # stdin is not a terminal: refused
    assert res.rc == 2
    assert f"{dev} (block device" in res.err and 'ext4, label "mydata"' in res.err


def test_verify_names_the_blocks_a_lying_device_garbled(faulty, tmp_path, image):
    img, data = image
    backing = tmp_path / "lying.raw"
    backing.write_bytes(bytes(SIZE))
    bad = [(3 * BS + 100, 10), (40 * BS, 1)]        # block 3 (data) and 40 (a zero block)
    dev = faulty(backing, corrupt_writes=bad).dev
    plain = cli("restore", img, dev, "--yes", "--no-progress")
    assert plain.rc == 0, plain.err                 # the device said every write went well
    assert backing.read_bytes() != data             # and it lied
    res = cli("restore", img, dev, "--yes", "--verify", "--json")
    assert res.rc == 1, res.err
    errs = res.json["verify_errors"]
    assert [(e["block"], e["offset"]) for e in errs] == [(3, 3 * BS), (40, 40 * BS)]
    import blake3   # the image's block digest (a new image: BLAKE3, FORMAT.md section 3.2)
    assert errs[0]["expected"] == blake3.blake3(data[3 * BS:4 * BS]).hexdigest()
    assert errs[0]["actual"] == blake3.blake3(read_at(backing, 3 * BS, BS)).hexdigest()
    assert res.json["verify_direct"] is True
    text = cli("restore", img, dev, "--yes", "--verify")
    assert text.rc == 1
    assert f"VERIFY FAILED: block 3 (byte {3 * BS}" in text.out
    assert "VERIFY FAILED: 2 of 64 blocks" in text.out


def test_verify_a_device_that_drops_writes(faulty, tmp_path, image):
    img, data = image
    backing = tmp_path / "dropping.raw"
    backing.write_bytes(b"\x11" * SIZE)
    dev = faulty(backing, drop_writes=[(7 * BS, 2 * BS)]).dev
    res = cli("restore", img, dev, "--yes", "--verify", "--json")
    assert res.rc == 1
    assert [e["block"] for e in res.json["verify_errors"]] == [7, 8]


def test_verify_on_an_honest_loop_device(loops, image):
    img, data = image
    dev, backing = loops.create(SIZE, "honest")
    res = cli("restore", img, dev, "--yes", "--verify", "--json")
    assert res.rc == 0, res.err
    assert res.json["verify_errors"] == [] and res.json["verify_direct"] is True
    cmp_same(dev, backing)
    assert sha256_of(backing) == sha256_of(img.with_suffix(".raw"))


def test_ctrl_c_says_what_was_left(faulty, tmp_path):
    """SIGINT in the middle of a restore to a slow device: exit 130, one line saying which
    blocks were restored, and they were."""
    rnd = random.Random(5)
    size = 48 * MiB
    data = b"".join(compressible(rnd, MiB) for _ in range(size // MiB))
    src = tmp_path / "big.raw"
    src.write_bytes(data)
    img = tmp_path / "big.img"
    assert cli("image", src, img, "--block-size", "1M", "--all-blocks").rc == 0
    backing = tmp_path / "slow.raw"
    backing.write_bytes(b"\x33" * size)
    fd = faulty(backing, writable=True)
    proc = subprocess.Popen([PYTHON, "-m", "diskimg", "restore", str(img), fd.dev, "--yes",
                             "--no-progress", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while read_at(backing, 0, 16) == b"\x33" * 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the restore finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"diskimg: error: interrupted; {fd.dev} partially written: blocks 0-")
    assert line.endswith("restored, the rest unchanged"), line
    last = int(line.split("blocks 0-")[1].split(" ")[0])
    got = backing.read_bytes()
    assert got[:(last + 1) * MiB] == data[:(last + 1) * MiB]
    assert got[(last + 2) * MiB:] == b"\x33" * (size - (last + 2) * MiB)
    assert os.path.exists(fd.dev)


def test_salvage_of_a_truncated_image_with_an_unreadable_record(faulty, tmp_path):
    """A truncated image on a disk with a bad sector inside one record's data: the read error
    names the image and is salvaged like any damaged block (no bare "Input/output error")."""
    from diskimg import format as fmt
    from diskimg.image.imagefile import scan_records
    from diskimg.store import open_store
    src = tmp_path / "src.raw"
    data = os.urandom(8 * BS)
    src.write_bytes(data)
    img = tmp_path / "cut.img"
    assert cli("image", src, img, "--block-size", "64K", "--all-blocks").rc == 0
    store, name = open_store(str(img))
    with store.open(name) as reader:
        header, start = fmt.read_header(reader, str(img))
        # the blocks' records (not the page-hash records that follow each one)
        records = [(off, rec) for off, rec in scan_records(reader, start, reader.size)
                   if not rec.flags & fmt.FLAG_PAGE_HASHES]
    bad_off, bad_rec = records[3]
    last_off, _ = records[-1]
    os.truncate(img, last_off)        # the last record and the index are lost
    bad = (bad_off + fmt.RECORD_HEADER_SIZE + 1024, 512)
    image_on_bad_disk = faulty(img, bad=[bad], partial="eio").fuse_file
    target = tmp_path / "target.raw"
    res = cli("restore", image_on_bad_disk, target, "--salvage", "--yes", "--json")
    assert res.rc == 1, res.err
    assert "Traceback" not in res.err
    salvaged = {(s["block"], s["last_block"]): s["reason"] for s in res.json["salvaged"]}
    assert bad_rec.block == 3
    assert "read error" in salvaged[(3, 3)] and str(image_on_bad_disk) in salvaged[(3, 3)]
    got = target.read_bytes()
    for b in range(7):
        want = bytes(BS) if b == 3 else data[b * BS:(b + 1) * BS]
        assert got[b * BS:(b + 1) * BS] == want, b
    assert got[7 * BS:] == bytes(BS)
