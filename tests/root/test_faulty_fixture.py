"""Proves the faulty-device fixture (tests/faulty.py, tests/faultfs.py): the kernel reports EIO for
exactly the configured sectors of a real loop device and nothing else, GNU ddrescue agrees, the
backing file is never written, and nothing (loop device, mount, process) is left behind."""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from faulty import (blank, ddrescue_bad_ranges,
                    faulty_device, merged, missing_requirements, parse_ddrescue_map, read_direct)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(missing_requirements() is not None,
                       reason=str(missing_requirements())),
]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_sector(dev: str, offset: int, size: int = 512) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, max(size, 4096))
    try:
        n = os.preadv(fd, [memoryview(buf)[:size]], offset)
        return buf[:n]
    finally:
        buf.close()
        os.close(fd)


@pytest.fixture
def backing(tmp_path) -> Path:
    path = tmp_path / "backing.img"
    path.write_bytes(random.Random(42).randbytes(SIZE))
    return path


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(tmp_path_factory):
    """After the module: no loop device over, and no FUSE mount in, this session's tmp dirs."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    loops = [line for line in subprocess.run(["losetup", "-a"], capture_output=True,
                                             text=True).stdout.splitlines() if base in line]
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if base in line]
    assert not loops and not mounts, f"left behind: {loops + mounts}"


SCATTERED = [(s * 512, 512) for s in (97, 2048, 2049, 5000, 8191, 12345, 16000)]
CASES = {
    "first-sector": [(0, 512)],
    "last-sector": [(SIZE - 512, 512)],
    "middle-sector": [(MiB + 3 * 512, 512)],
    "1MiB-area": [(3 * MiB + 512, MiB)],
    "scattered": SCATTERED,
    "unaligned-bytes": [(5 * MiB + 100, 10), (6 * MiB + 511, 2)],  # widen to whole sectors
}


@pytest.mark.parametrize("direct_io", [True, False], ids=["loop-dio", "loop-buffered"])
@pytest.mark.parametrize("case", CASES)
def test_odirect_reads_fail_exactly_on_bad_sectors(faulty, backing, case, direct_io):
    before = sha256(backing)
    device = faulty(backing, CASES[case], direct_io=direct_io)
    data, bad = read_direct(device.dev)
    want = merged(CASES[case])
    assert bad == want
    assert data == blank(backing.read_bytes(), want)
    # A 512-byte O_DIRECT read of the loop device reaches faultfs as one 512-byte read.
    bad_sector, good_sector = want[0][0], (want[0][0] + want[0][1]) % SIZE
    device.clear_reads()
    with pytest.raises(OSError):
        read_sector(device.dev, bad_sector)
    read_sector(device.dev, good_sector)
    assert device.reads() == [(bad_sector, 512, "EIO"), (good_sector, 512, "512")]
    assert sha256(backing) == before


def test_4096_sector_loop_fails_whole_4k_sectors(faulty, backing):
    bad = [(MiB + 3 * 512, 512), (4 * MiB - 1, 2)]
    device = faulty(backing, bad, sector_size=4096)
    data, got = read_direct(device.dev, sector_size=4096)
    assert got == merged(bad, 4096) == [(MiB, 4096), (4 * MiB - 4096, 8192)]
    assert data == blank(backing.read_bytes(), got)


def test_buffered_reads_fail_per_page_without_readahead(faulty, backing):
    """Documents the kernel, not the fixture: a buffered reader loses the whole 4 KiB page (and,
    with readahead on, the whole readahead folio, up to 512 KiB here) around a bad sector."""
    device = faulty(backing, [(MiB + 3 * 512, 512)])
    fd = os.open(device.dev, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        failing = []
        for off in range(MiB - 8 * KiB, MiB + 16 * KiB, 512):
            try:
                os.pread(fd, 512, off)
            except OSError as err:
                assert err.errno == errno.EIO
                failing.append(off)
    finally:
        os.close(fd)
    assert failing == list(range(MiB, MiB + 4096, 512))


@pytest.mark.skipif(not shutil.which("ddrescue"), reason="GNU ddrescue not installed")
def test_ddrescue_finds_exactly_the_bad_ranges(faulty, tmp_path):
    size = 64 * MiB
    backing = tmp_path / "disk64.img"
    backing.write_bytes(random.Random(7).randbytes(size))
    before = sha256(backing)
    bad = ([(0, 512), (size - 512, 512), (10 * MiB + 3 * 512, 512), (20 * MiB, MiB)]
           + [(s * 512, 512) for s in random.Random(1).sample(range(50_000, 120_000), 8)])
    device = faulty(backing, bad)
    out, mapfile = tmp_path / "out.img", tmp_path / "rescue.map"
    started = time.monotonic()
    proc = subprocess.run(["ddrescue", "-d", "-r2", device.dev, str(out), str(mapfile)],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    want = merged(bad)
    assert ddrescue_bad_ranges(mapfile) == want
    blocks = parse_ddrescue_map(mapfile)
    assert {status for _, _, status in blocks} == {"+", "-"}  # fully trimmed and scraped
    assert sum(n for _, n, _ in blocks) == size
    assert blank(out.read_bytes(), want) == blank(backing.read_bytes(), want)
    assert sha256(backing) == before
    print(f"ddrescue -d -r2 over {size // MiB} MiB with {len(bad)} bad ranges: {elapsed:.2f} s, "
          f"{len(device.reads())} FUSE reads")


@pytest.mark.skipif(not shutil.which("ddrescue"), reason="GNU ddrescue not installed")
def test_ddrescue_on_4096_sector_device(faulty, backing, tmp_path):
    device = faulty(backing, [(MiB + 3 * 512, 512)], sector_size=4096)
    mapfile = tmp_path / "rescue.map"
    proc = subprocess.run(["ddrescue", "-d", "-b4096", "-r1", device.dev, str(tmp_path / "out.img"),
                           str(mapfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ddrescue_bad_ranges(mapfile) == [(MiB, 4096)]


@pytest.mark.skipif(not shutil.which("ddrescue"), reason="GNU ddrescue not installed")
@pytest.mark.parametrize("retries, recovered", [(0, False), (1, True)])
def test_ddrescue_retry_pass_recovers_healing_sectors(faulty, backing, tmp_path, retries,
                                                      recovered):
    """heal_after=2: ddrescue's copy pass and its trim/scrape pass each fail once on every bad
    sector, so only a retry pass (-r1) reads the healed sectors (measured: recovered iff
    retries >= heal_after - 1)."""
    bad = [(MiB + 3 * 512, 512), (5 * MiB, 64 * KiB)]
    device = faulty(backing, bad, heal_after=2)
    out, mapfile = tmp_path / "out.img", tmp_path / "rescue.map"
    proc = subprocess.run(["ddrescue", "-d", f"-r{retries}", device.dev, str(out), str(mapfile)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if recovered:
        assert ddrescue_bad_ranges(mapfile) == []
        assert out.read_bytes() == backing.read_bytes()
    else:
        assert ddrescue_bad_ranges(mapfile) == bad


def test_writes_are_refused_and_backing_unchanged(faulty, backing):
    before = sha256(backing)
    device = faulty(backing, [(0, 512)])
    with pytest.raises(OSError) as exc:
        os.open(device.fuse_file, os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError) as exc:
        fd = os.open(device.dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert exc.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert device.sysfs("ro") == "1"
    assert sha256(backing) == before


def test_faults_can_change_while_attached(faulty, backing):
    device = faulty(backing, [])
    sector = 2 * MiB + 512
    assert read_sector(device.dev, sector) == backing.read_bytes()[sector:sector + 512]
    device.set_faults([(sector, 512)])
    with pytest.raises(OSError) as exc:
        read_sector(device.dev, sector)
    assert exc.value.errno == errno.EIO
    device.set_faults([])
    assert read_sector(device.dev, sector) == backing.read_bytes()[sector:sector + 512]


def test_heal_after_n_failed_reads(faulty, backing):
    sector = 3 * MiB
    device = faulty(backing, [(sector, 1024)], heal_after=2)
    for _ in range(2):
        with pytest.raises(OSError):
            read_sector(device.dev, sector + 512)
    assert read_sector(device.dev, sector + 512) == backing.read_bytes()[sector + 512:sector + 1024]
    # Its neighbour failed no reads yet, so it is still bad.
    with pytest.raises(OSError):
        read_sector(device.dev, sector)


def test_delay_slows_failing_reads_only(faulty, backing):
    device = faulty(backing, [(MiB, 512)], delay=0.3)
    started = time.monotonic()
    read_sector(device.dev, 0)
    assert time.monotonic() - started < 0.25
    started = time.monotonic()
    with pytest.raises(OSError):
        read_sector(device.dev, MiB)
    assert time.monotonic() - started >= 0.3


def test_short_read_model_needs_fuse_direct_io(tmp_path, backing):
    with pytest.raises(ValueError):
        faulty_device(tmp_path, backing, [(0, 512)], partial="short", fuse_direct_io=False)


def test_close_leaves_nothing(tmp_path, backing):
    with faulty_device(tmp_path, backing, [(0, 512)]) as device:
        dev, mnt, proc = device.dev, device.mountpoint, device.process
        assert os.path.ismount(mnt)
    assert not Path("/sys/block", Path(dev).name, "loop").exists() or \
        str(mnt) not in Path("/sys/block", Path(dev).name, "loop/backing_file").read_text()
    assert not os.path.ismount(mnt)
    assert proc.poll() is not None


def test_setup_failure_cleans_up(tmp_path):
    missing = tmp_path / "does-not-exist.img"
    with pytest.raises(Exception):
        faulty_device(tmp_path, missing, [(0, 512)], timeout=5)
    assert not any(str(tmp_path) in line for line in Path("/proc/mounts").read_text().splitlines())


def test_parse_ddrescue_map(tmp_path):
    mapfile = tmp_path / "map"
    mapfile.write_text(
        "# Mapfile. Created by GNU ddrescue version 1.27\n"
        "# Command line: ddrescue -d /dev/loop0 out map\n"
        "# current_pos  current_status  current_pass\n"
        "0x00100600     +               1\n"
        "#      pos        size  status\n"
        "0x00000000  0x00000200  -\n"
        "0x00000200  0x000FFE00  +\n"
        "0x00100000  0x00000200  *\n"
        "0x00100200  0x00000400  /\n"
        "0x00100600  0x00000200  ?\n"
        "0x00100800  0x00000200  -\n")
    assert parse_ddrescue_map(mapfile)[:2] == [(0, 512, "-"), (512, 0xFFE00, "+")]
    assert ddrescue_bad_ranges(mapfile) == [(0, 512), (MiB, 1536), (MiB + 2048, 512)]
    (tmp_path / "bad").write_text("0x0 +\n0x0 0x200 X\n")
    with pytest.raises(ValueError):
        parse_ddrescue_map(tmp_path / "bad")
