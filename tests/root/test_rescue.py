"""`diskimg image --rescue` against real kernel read errors: a loop device over faultfs
(tests/faulty.py), whose configured byte ranges fail with EIO, optionally slowly or healing.

Every test runs the CLI as a subprocess (as a user would, and so that it can be killed), then
checks the result end to end: the unreadable ranges `info --json` lists equal the configured ones
(512-byte sectors: rescue reads block devices with O_DIRECT), `restore` gives the original bytes
with zeros exactly there, lists them and exits 1, `verify` passes, the mapfile says the same and
GNU ddrescue's own tools read it.  The file behind the FUSE layer is hashed before and after.

The backing file is 40 MiB + 3 sectors: not a multiple of diskimg's 1 MiB block, so the last
block is short."""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faulty import (
    FaultyDevice,
    blank,
    ddrescue_bad_ranges,
    faulty_device,
    merged,
    missing_requirements,
    parse_ddrescue_map,
)

from diskimg.ops.mapfile import FINISHED, RescueMap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
BLOCK = MiB                     # diskimg's default block size
SIZE = 40 * MiB + 3 * SECTOR    # short last block
needs_ddrescue = pytest.mark.skipif(not shutil.which("ddrescue") or not shutil.which("ddrescuelog"),
                                    reason="GNU ddrescue (ddrescue, ddrescuelog) not installed")


@dataclass(frozen=True)
class Disk:
    path: Path
    data: bytes
    sha256: str

    def unchanged(self) -> bool:
        return sha256(self.path) == self.sha256


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Disk:
    """Random contents (no zero blocks, so every rescued block has a record)."""
    path = tmp_path_factory.mktemp("rescue") / "disk.img"
    data = random.Random(2024).randbytes(SIZE)
    path.write_bytes(data)
    return Disk(path, data, sha256(path))


def differing(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Merged byte ranges, in whole sectors, where `a` and `b` differ (for assertion messages)."""
    out = [(pos, SECTOR) for pos in range(0, max(len(a), len(b)), SECTOR)
           if a[pos:pos + SECTOR] != b[pos:pos + SECTOR]]
    return merged(out)


def diskimg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diskimg", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def rescue_cmd(dev: str, image: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diskimg", "image", dev, str(image), "--rescue",
            "--no-progress", "--json", *extra]


def rescue(dev: str, image: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(rescue_cmd(dev, image, *extra), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode in (0, 1), f"exit {proc.returncode}: {proc.stderr}"
    return proc, json.loads(proc.stdout)


def unreadable_of(image: Path) -> list[tuple[int, int]]:
    proc = diskimg("info", str(image), "--json")
    assert proc.returncode == 0, proc.stderr
    return [(r["offset"], r["length"]) for r in json.loads(proc.stdout)["unreadable"]]


def restored(image: Path, target: Path, want_bad: list[tuple[int, int]]) -> bytes:
    """Restore `image` to a new file; check the exit code and the listing; return the bytes."""
    proc = diskimg("restore", str(image), str(target), "--no-progress")
    assert proc.returncode == (1 if want_bad else 0), proc.stderr
    listed = [(int(a), int(b) - int(a) + 1) for a, b in
              re.findall(r"unreadable on the source, restored as zeros: bytes (\d+)-(\d+)",
                         proc.stdout)]
    assert listed == want_bad, proc.stdout
    data = target.read_bytes()
    target.unlink()
    return data


def check_image(image: Path, disk: Disk, want_bad: list[tuple[int, int]], tmp_path: Path) -> None:
    """info, restore and verify agree with the configured faults."""
    assert not Path(f"{image}.partial").exists()
    assert unreadable_of(image) == want_bad
    data = restored(image, tmp_path / "restored.raw", want_bad)
    expected = blank(disk.data, want_bad)
    assert len(data) == SIZE
    assert data == expected, f"restored data differs at {differing(data, expected)}"
    proc = diskimg("verify", str(image), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def check_mapfile(mapfile: Path, want_bad: list[tuple[int, int]]) -> None:
    """The mapfile, read by our parser and by GNU ddrescuelog, says what `info` says."""
    blocks = parse_ddrescue_map(mapfile)
    assert sum(n for _, n, _ in blocks) == SIZE
    assert {st for _, _, st in blocks} <= {"+", "-"}, "a finished rescue leaves no untried areas"
    assert ddrescue_bad_ranges(mapfile) == want_bad
    if shutil.which("ddrescuelog"):
        listed = subprocess.run(["ddrescuelog", "-b512", "-l-", str(mapfile)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert listed.returncode == 0, listed.stderr
        assert [int(n) for n in listed.stdout.split()] == \
            [s // SECTOR for start, n in want_bad for s in range(start, start + n, SECTOR)]


# -- bad ranges of various sizes and positions ----------------------------------------------------

SCATTERED = [(s * SECTOR, SECTOR) for s in random.Random(5).sample(range(SIZE // SECTOR), 40)]
LAYOUTS = {
    "none": [],
    "first_sector": [(0, SECTOR)],
    "last_sector": [(SIZE - SECTOR, SECTOR)],
    "one_sector": [(17 * MiB + 7 * SECTOR, SECTOR)],
    "unaligned_bytes": [(5 * MiB + 100, 1000)],          # widened to the 3 sectors it touches
    "large_1mib_area": [(20 * MiB, MiB)],
    "large_area_unaligned": [(25 * MiB + 64 * KiB + 3 * SECTOR, MiB + 5 * SECTOR)],
    "straddles_block_boundary": [(12 * MiB - 3 * SECTOR, 7 * SECTOR)],
    "in_short_last_block": [(40 * MiB + SECTOR, SECTOR)],
    "many_scattered": SCATTERED,
    "mixed": [(0, SECTOR), (SIZE - 2 * SECTOR, 2 * SECTOR), (3 * MiB, MiB),
              (8 * MiB - SECTOR, 2 * SECTOR), (30 * MiB + 4 * KiB, 4 * KiB)] + SCATTERED[:10],
}


@pytest.mark.parametrize("bad", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_rescue_records_exactly_the_bad_sectors(faulty, disk, tmp_path, bad):
    device = faulty(disk.path, bad)
    want = merged(bad)
    image = tmp_path / "out.dimg"
    proc, out = rescue(device.dev, image)
    assert proc.returncode == (1 if want else 0), proc.stderr
    assert [(r["offset"], r["length"]) for r in out["unreadable"]] == want
    assert out["resumed"] is False
    assert out["mapfile"] == f"{image}.map"
    check_image(image, disk, want, tmp_path)
    check_mapfile(Path(out["mapfile"]), want)
    assert disk.unchanged()


def test_text_output_lists_unreadable_ranges(faulty, disk, tmp_path):
    bad = [(0, SECTOR), (9 * MiB + 5 * SECTOR, 2 * SECTOR)]
    device = faulty(disk.path, bad)
    image = tmp_path / "out.dimg"
    proc = subprocess.run(rescue_cmd(device.dev, image)[:-1], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "1536 bytes unreadable in 2 area(s)" in proc.stdout
    assert "unreadable: bytes 0-511 (512 bytes)" in proc.stdout
    start = 9 * MiB + 5 * SECTOR
    assert f"unreadable: bytes {start}-{start + 1023} (1024 bytes)" in proc.stdout
    info = diskimg("info", str(image))
    assert info.returncode == 0
    assert f"unreadable:  bytes {start}-{start + 1023} (1024 bytes) read as zeros" in info.stdout
    assert disk.unchanged()


def test_regular_file_source(faulty, disk, tmp_path):
    """A regular file (the FUSE file itself): read buffered, but faultfs's FOPEN_DIRECT_IO passes
    every read through as it is, so the errors are exact to the sector."""
    bad = [(0, SECTOR), (5 * MiB, 3 * SECTOR), (SIZE - SECTOR, SECTOR)]
    device = faulty(disk.path, bad)
    image = tmp_path / "out.dimg"
    proc, out = rescue(str(device.fuse_file), image)
    assert proc.returncode == 1, proc.stderr
    want = merged(bad)
    assert [(r["offset"], r["length"]) for r in out["unreadable"]] == want
    check_image(image, disk, want, tmp_path)
    assert disk.unchanged()


def test_mapfile_option_and_no_direct_fail_per_page(faulty, disk, tmp_path):
    """--no-direct reads through the page cache, where the kernel fails whole 4 KiB pages
    (tests/root/test_faulty_fixture.py): the unreadable ranges may grow to pages, no more.  With
    read-ahead left on, one bad sector fails the whole read-ahead folio (up to 512 KiB here) of
    good data around it."""
    bad = [(5 * MiB, 3 * SECTOR), (17 * MiB + 7 * SECTOR, SECTOR)]
    device = faulty(disk.path, bad)
    image, mapfile = tmp_path / "out.dimg", tmp_path / "elsewhere.map"
    _, out = rescue(device.dev, image, "--no-direct", "--mapfile", str(mapfile))
    assert out["mapfile"] == str(mapfile) and mapfile.exists()
    assert not Path(f"{image}.map").exists()
    want = merged(bad, 4096)
    got = [(r["offset"], r["length"]) for r in out["unreadable"]]
    assert got == want, f"unreadable {got}, the pages of the bad sectors are {want}"
    check_image(image, disk, want, tmp_path)
    check_mapfile(mapfile, want)
    assert disk.unchanged()


# -- without --rescue -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad_sector", [17 * MiB + 7 * SECTOR, 0], ids=["middle", "first"])
def test_read_error_without_rescue_stops_with_exit_3(faulty, disk, tmp_path, bad_sector):
    device = faulty(disk.path, [(bad_sector, SECTOR)])
    image = tmp_path / "out.dimg"
    proc = diskimg("image", device.dev, str(image), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("diskimg: error:")]
    assert len(errors) == 1, proc.stderr
    if bad_sector:  # (at sector 0 the filesystem probe also warns that it cannot read it)
        assert proc.stderr.strip() == errors[0]
    m = re.fullmatch(rf"diskimg: error: {re.escape(device.dev)}: read error at byte (\d+) "
                     r"\((\d+) bytes\): .*--rescue.*", errors[0])
    assert m, errors[0]
    offset, length = int(m[1]), int(m[2])
    assert offset <= bad_sector < offset + length, "the offset named must be where reading failed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []
    assert disk.unchanged()


# -- side by side with GNU ddrescue ---------------------------------------------------------------

@needs_ddrescue
def test_side_by_side_with_gnu_ddrescue(faulty, disk, tmp_path):
    bad = ([(0, SECTOR), (SIZE - SECTOR, SECTOR), (10 * MiB + 3 * SECTOR, SECTOR),
            (20 * MiB, MiB), (12 * MiB - 3 * SECTOR, 7 * SECTOR)] + SCATTERED[:12])
    want = merged(bad)
    device = faulty(disk.path, bad)

    image = tmp_path / "out.dimg"
    started = time.monotonic()
    proc, _ = rescue(device.dev, image, "--retries", "1")
    ours = time.monotonic() - started
    our_reads = device.reads()
    device.clear_reads()
    assert proc.returncode == 1

    raw, ddmap = tmp_path / "ddrescue.raw", tmp_path / "ddrescue.map"
    started = time.monotonic()
    dd = subprocess.run(["ddrescue", "-d", "-r1", device.dev, str(raw), str(ddmap)],
                        capture_output=True, text=True, timeout=300, check=False)
    theirs = time.monotonic() - started
    their_reads = device.reads()
    assert dd.returncode == 0, dd.stderr

    ourmap = Path(f"{image}.map")
    finished = {name: sum(n for _, n, st in parse_ddrescue_map(path) if st == "+")
                for name, path in (("diskimg", ourmap), ("ddrescue", ddmap))}
    print(f"\n{SIZE} bytes, {len(want)} bad areas ({sum(n for _, n in want)} bytes):\n"
          f"  diskimg --rescue --retries 1: {ours:6.2f} s, {len(our_reads):6d} reads reaching "
          f"the device ({sum(n for _, n, r in our_reads if r == 'EIO')} bytes asked in failed "
          f"reads), rescued {finished['diskimg']} bytes\n"
          f"  ddrescue -d -r1:              {theirs:6.2f} s, {len(their_reads):6d} reads reaching "
          f"the device ({sum(n for _, n, r in their_reads if r == 'EIO')} bytes asked in failed "
          f"reads), rescued {finished['ddrescue']} bytes\n"
          f"  diskimg/ddrescue time: {ours / theirs:.2f}")
    assert finished["diskimg"] >= finished["ddrescue"]
    assert finished["diskimg"] == SIZE - sum(n for _, n in want)
    assert ddrescue_bad_ranges(ourmap) == ddrescue_bad_ranges(ddmap) == want

    # Each tool reads the other's mapfile: ours parses ddrescue's, ddrescuelog ours.
    theirs_loaded = RescueMap.load(str(ddmap), SIZE)
    ours_loaded = RescueMap.load(str(ourmap), SIZE)
    assert list(theirs_loaded.intervals()) == list(ours_loaded.intervals())
    assert theirs_loaded.totals()[FINISHED] == finished["ddrescue"]
    status = subprocess.run(["ddrescuelog", "-t", str(ourmap)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"bad-sector:.*in\s+{len(want)} area\(s\)", status.stdout), status.stdout
    assert re.search(r"non-tried:\s+0 B", status.stdout), status.stdout
    same = subprocess.run(["ddrescuelog", "-p", str(ddmap), str(ourmap)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert same.returncode == 0, same.stdout + same.stderr   # identical block types
    check_mapfile(ourmap, want)

    # ddrescue never writes the bad sectors, so its output stops short of the bad last sector
    theirs_data = raw.read_bytes()
    assert len(theirs_data) <= SIZE
    theirs_data += bytes(SIZE - len(theirs_data))
    ours_data = restored(image, tmp_path / "restored.raw", want)
    assert ours_data == theirs_data == blank(disk.data, want)
    assert disk.unchanged()


# -- sectors that heal after failing ---------------------------------------------------------------

@pytest.mark.parametrize("retries", [0, 2])
def test_healing_sectors_are_rescued_by_retries(faulty, disk, tmp_path, retries):
    """heal_after=2: each bad sector reads after it has failed twice.  The copy pass fails it once
    and trimming or scraping once more, so only the retry pass recovers it."""
    bad = [(0, SECTOR), (6 * MiB + 3 * SECTOR, SECTOR), (12 * MiB - 2 * SECTOR, 4 * SECTOR),
           (30 * MiB, 64 * KiB), (SIZE - SECTOR, SECTOR)]
    device = faulty(disk.path, bad, heal_after=2)
    want = merged(bad) if retries == 0 else []
    image = tmp_path / "out.dimg"
    proc, out = rescue(device.dev, image, "--retries", str(retries))
    assert proc.returncode == (1 if want else 0), proc.stderr
    assert [(r["offset"], r["length"]) for r in out["unreadable"]] == want
    check_image(image, disk, want, tmp_path)
    check_mapfile(Path(f"{image}.map"), want)
    assert disk.unchanged()


# -- interrupted and resumed -----------------------------------------------------------------------

# Slow bad sectors (each failing read takes DELAY s), placed so that the sector passes have long
# runs of good sectors to read one by one before reaching a bad one.
DELAY = 0.12
SLOW_BAD = [(4 * MiB + 1500 * SECTOR, SECTOR), (9 * MiB + 300 * SECTOR, 2 * SECTOR),
            (15 * MiB + 1900 * SECTOR, SECTOR), (27 * MiB + 5 * SECTOR, SECTOR),
            (SIZE - SECTOR, SECTOR)]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the rescue exited {proc.returncode} before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def first_eio(device: FaultyDevice) -> bool:
    return any(r == "EIO" for _, _, r in device.reads())


def trimming(device: FaultyDevice) -> bool:
    """Sector-sized reads have started (pass 3) and 20 good sectors were read since."""
    reads = device.reads()
    first = next((i for i, (_, n, _) in enumerate(reads) if n == SECTOR), None)
    return first is not None and sum(r == "512" for _, _, r in reads[first:]) >= 20


@dataclass(frozen=True)
class Reference:
    """An uninterrupted rescue with the SLOW_BAD faults: restored data, unreadable ranges, bytes
    read and seconds."""
    data: bytes
    unreadable: list[tuple[int, int]]
    read: int
    seconds: float


@pytest.fixture(scope="module")
def uninterrupted(disk, tmp_path_factory) -> Reference:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("reference")
    with faulty_device(tmp_path, disk.path, SLOW_BAD, delay=DELAY) as device:
        image = tmp_path / "reference.dimg"
        started = time.monotonic()
        proc, out = rescue(device.dev, image)
        seconds = time.monotonic() - started
        read = sum(int(r) for _, _, r in device.reads() if r != "EIO")
    assert proc.returncode == 1
    ranges = [(r["offset"], r["length"]) for r in out["unreadable"]]
    assert ranges == merged(SLOW_BAD)
    data = restored(image, tmp_path / "reference.raw", ranges)
    assert data == blank(disk.data, ranges)
    assert disk.unchanged()
    return Reference(data, ranges, read, seconds)


def finished_blocks(reads: list[tuple[int, int, str]]) -> set[int]:
    """Blocks wholly read without error in `reads`, each followed by a later read (so diskimg had
    stored it: a block is stored before the next read is issued)."""
    good: set[int] = set()    # sectors read without error; a sector read twice counts once
    for off, n, result in reads[:-1]:
        if result != "EIO":
            good.update(range(off // SECTOR, (off + int(result)) // SECTOR))
    per_block = BLOCK // SECTOR
    return {b for b in {s // per_block for s in good}
            if all(s in good for s in range(b * per_block, min(SIZE, (b + 1) * BLOCK) // SECTOR))}


def trimmed_sectors(reads) -> set[int]:
    """Sectors read one by one (the sector passes) without error."""
    return {off // SECTOR for off, n, r in reads if n == SECTOR and r == str(SECTOR)}


def read_in(reads, blocks: set[int]) -> list[tuple[int, int, str]]:
    return [(off, n, r) for off, n, r in reads
            if any(b in blocks for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1))]


# The CLI with the map saved every 0.2 s instead of every 30 s, so a kill finds a mapfile that is
# current but for the last moments (records written after it are checked by content on resume).
SAVE_OFTEN = ("import sys; import diskimg.ops.rescue; diskimg.ops.rescue.MAP_SAVE_INTERVAL = 0.2; "
              "from diskimg.cli.main import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("when", ["copying", "trimming", "trimming_map_saved"])
def test_kill_9_then_resume_equals_uninterrupted_run(faulty, disk, tmp_path, uninterrupted,
                                                     when):
    """After SIGKILL the mapfile is stale (saved at the start and every 30 s) or missing: the
    resumed run rebuilds what was rescued from the records in IMAGE.partial."""
    device = faulty(disk.path, SLOW_BAD, delay=DELAY)
    ref_data, ref_bad = uninterrupted.data, uninterrupted.unreadable
    ref_read, ref_seconds = uninterrupted.read, uninterrupted.seconds

    image = tmp_path / "out.dimg"
    mapfile = Path(f"{image}.map")
    cmd = rescue_cmd(device.dev, image)
    if when == "trimming_map_saved":
        cmd[1:3] = ["-c", SAVE_OFTEN]
        ready = lambda: trimming(device) and mapfile.exists()
    else:
        ready = (lambda: first_eio(device)) if when == "copying" else (lambda: trimming(device))
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, 20, f"the rescue to be {when}", victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert Path(f"{image}.partial").exists() and not image.exists()
    if when != "trimming_map_saved":
        # saved once when the run started, not since (every 30 s): it claims nothing yet
        assert RescueMap.load(str(mapfile), SIZE).totals()[FINISHED] == 0
        if when == "copying":
            mapfile.unlink()  # and resuming must work with no map at all
    before = device.reads()
    device.clear_reads()
    saved = finished_blocks(before)
    assert saved, "the kill came before any block was stored; nothing to check"
    claimed = RescueMap.load(str(mapfile), SIZE).areas(FINISHED) if mapfile.exists() else []

    started = time.monotonic()
    proc, out = rescue(device.dev, image)
    resumed_seconds = time.monotonic() - started
    after = device.reads()
    assert proc.returncode == 1, proc.stderr
    assert out["resumed"] is True
    reread = read_in(after, saved) + [(off, n, r) for off, n, r in after
                                      if any(off < p + s and p < off + n for p, s in claimed)]
    resumed_read = sum(int(r) for _, _, r in after if r != "EIO")
    again = len(trimmed_sectors(before) & trimmed_sectors(after))
    print(f"\nkill -9 while {when}: {len(before)} reads before the kill finished blocks "
          f"{sorted(saved)}; the resumed run made {len(after)} reads ({resumed_read} bytes, "
          f"{resumed_seconds:.2f} s), {len(reread)} of them in those blocks or in what the map "
          f"claimed; {again} sectors trimmed before the kill were read again; an uninterrupted "
          f"run read "
          f"{ref_read} bytes in {ref_seconds:.2f} s")
    assert reread == [], f"blocks stored before the kill were read again: {reread[:10]}"

    got_bad = [(r["offset"], r["length"]) for r in out["unreadable"]]
    assert got_bad == ref_bad
    assert unreadable_of(image) == ref_bad
    data = restored(image, tmp_path / "restored.raw", ref_bad)
    assert data == ref_data, f"resumed image differs at {differing(data, ref_data)}"
    assert data == blank(disk.data, ref_bad)
    assert diskimg("verify", str(image), "--no-progress").returncode == 0
    check_mapfile(Path(f"{image}.map"), ref_bad)
    assert disk.unchanged()


@pytest.mark.parametrize("when", ["copying", "trimming"])
def test_ctrl_c_keeps_partial_and_map_then_resume_equals_uninterrupted_run(
        faulty, disk, tmp_path, uninterrupted, when):
    device = faulty(disk.path, SLOW_BAD, delay=DELAY)
    ref_data, ref_bad = uninterrupted.data, uninterrupted.unreadable

    image = tmp_path / "out.dimg"
    mapfile = Path(f"{image}.map")
    cmd = rescue_cmd(device.dev, image)
    victim = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: first_eio(device) if when == "copying" else trimming(device), 20,
                 f"the rescue to be {when}", victim)
        victim.send_signal(signal.SIGINT)
        _, stderr = victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == 130, stderr
    assert "interrupted" in stderr and "resume" in stderr, stderr
    assert Path(f"{image}.partial").exists() and mapfile.exists() and not image.exists()
    device.clear_reads()

    # What the map saved at the interruption claims as rescued must not be read again...
    saved = RescueMap.load(str(mapfile), SIZE)
    claimed = saved.areas(FINISHED)
    assert saved.totals()[FINISHED] > 0
    proc, out = rescue(device.dev, image)
    assert proc.returncode == 1, proc.stderr
    assert out["resumed"] is True
    after = device.reads()
    reread = [(off, n) for off, n, _ in after
              if any(off < p + s and p < off + n for p, s in claimed)]
    print(f"\nCtrl-C while {when}: the map claimed {saved.totals()[FINISHED]} bytes rescued in "
          f"{len(claimed)} areas; the resumed run made {len(after)} reads, {len(reread)} of them "
          f"in those areas")
    assert reread == []

    # ...and must really be in the image: the result equals an uninterrupted run's.
    assert [(r["offset"], r["length"]) for r in out["unreadable"]] == ref_bad
    data = restored(image, tmp_path / "restored.raw", ref_bad)
    assert data == ref_data, (
        f"resumed image differs from an uninterrupted run's at {differing(data, ref_data)} "
        f"(zeros where the map saved at Ctrl-C said '+')")
    assert diskimg("verify", str(image), "--no-progress").returncode == 0
    assert disk.unchanged()
