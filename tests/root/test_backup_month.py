"""A simulated month of a backup job on a loop device holding a real ext4 that changes every day.

The clock is the library's parameter (run_job(now=...)), stepping one day per run from Sunday
1 November 2026, never the system's.  The filesystem is trimmed after each day's changes
(fstrim over the loop device punches holes in its file), so its free space reads as zeros and
the device's bytes are exactly what a used-blocks image restores: every restore point must
give back its day's device byte for byte.  Along the way: a run killed while it writes leaves
nothing `list` takes as a restore point (and a second start meanwhile is told which run holds
the job), and on day 20 the disk moves to another device node and is still found by its
filesystem UUID (ambiguous while both nodes exist: refused).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import LoopDevices, cli, run, sha256_of

from diskimg.backup import runner
from diskimg.backup.config import load_config
from diskimg.errors import JobBusy, SourceError

pytestmark = pytest.mark.root

T0 = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)    # a Sunday
DAYS = 30
SIZE = 32 << 20
KILL_DAY = 10
MOVE_DAY = 20
# full every 2 weeks, a differential each new ISO week, incrementals in between
EXPECTED = "FDIIIIIIDIIIIIFDIIIIIIDIIIIIFD"


def _day_time(day: int) -> datetime:
    # the timer's random delay: a different minute each day
    return T0 + timedelta(days=day, minutes=(day * 17) % 45)


def _change(mnt: Path, rnd: random.Random, day: int) -> None:
    """A day's work: new files, one rewritten, one deleted, a directory of small files."""
    (mnt / f"day{day:02d}.bin").write_bytes(rnd.randbytes(rnd.randint(50, 400) * 1024))
    d = mnt / "logs"
    d.mkdir(exist_ok=True)
    with open(d / "syslog", "ab") as f:
        f.write(f"day {day}: ".encode() + rnd.randbytes(20000).hex().encode() + b"\n")
    if day >= 3:
        victim = mnt / f"day{day - 3:02d}.bin"
        if day % 2:
            victim.unlink()
        else:
            victim.write_bytes(rnd.randbytes(100 * 1024))


def _trimmed(dev: str, mnt: Path, rnd: random.Random, day: int) -> None:
    run("mount", dev, str(mnt))
    try:
        _change(mnt, rnd, day)
        run("sync")
        run("fstrim", str(mnt))
    finally:
        run("umount", str(mnt))


KILLED_RUN = r"""
import sys, time
from datetime import datetime
from diskimg.backup.config import load_config
from diskimg.backup.runner import run_job

class Stall:
    def start(self, total, unit="B"):
        pass
    def advance(self, n):
        time.sleep(3600)      # killed while it writes

job = load_config(sys.argv[1]).job(sys.argv[2])
when = datetime.fromisoformat(sys.argv[3])
run_job(job, now=lambda: when, progress=Stall(), threads=1)
"""


class Month:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "dest"
        self.state = root / "state"
        self.mnt = root / "mnt"
        self.config = root / "jobs.toml"
        self.hashes: dict[int, str] = {}       # day -> sha256 of the device after the day
        self.results: dict[int, runner.RunResult] = {}
        self.levels = ""
        self.locked_message = ""
        self.list_while_killed: list = []
        self.leftover_after_kill: tuple = ()
        self.list_after_kill: list = []
        self.removed_next_day: tuple = ()
        self.ambiguous = ""
        self.moved_from = self.moved_to = ""


@pytest.fixture(scope="module")
def month(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mkfs and mount")
    from diskimg import devices
    real_probe = devices.probe_fs

    def probe(path: str) -> dict[str, str]:   # only loop devices, never the machine's disks
        ok = os.path.basename(path).startswith("loop") or os.path.isfile(path)
        return real_probe(path) if ok else {}

    root = tmp_path_factory.mktemp("month")
    lo = LoopDevices(root)
    mp = pytest.MonkeyPatch()
    mp.setattr(devices, "probe_fs", probe)
    try:
        yield _simulate(root, lo)
    finally:
        mp.undo()
        lo.cleanup()


def _simulate(root: Path, lo: LoopDevices) -> Month:
    m = Month(root)
    m.dest.mkdir()
    m.mnt.mkdir()
    dev, backing = lo.create(SIZE, "month")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    fs_uuid = run("blkid", "-p", "-o", "value", "-s", "UUID", dev).stdout.strip()
    m.config.write_text(f"""
state-dir = "{m.state}"
[jobs.month]
source = {{ fs-uuid = "{fs_uuid}" }}
destination = "{m.dest}"
full-every = "2w"
differential-every = "weekly"
keep-daily = 7
keep-weekly = 2
""")
    job = load_config(str(m.config)).job("month")
    rnd = random.Random(16)
    for day in range(DAYS):
        _trimmed(dev, m.mnt, rnd, day)
        m.hashes[day] = sha256_of(dev)
        when = _day_time(day)
        if day == KILL_DAY:
            _killed_run(m, job, when)
        if day == MOVE_DAY:
            # the disk shows up at a second node too: two devices answer to the UUID
            new = lo.attach(backing)
            with pytest.raises(SourceError) as e:
                runner.run_job(job, now=lambda: when)
            m.ambiguous = str(e.value)
            # ... then the old node goes away: the disk moved from `dev` to `new`
            lo.detach(dev)
            m.moved_from, m.moved_to, dev = dev, new, new
        result = runner.run_job(job, now=lambda: when, threads=2)
        m.results[day] = result
        if day == KILL_DAY:
            m.removed_next_day = result.removed_leftovers
        m.levels += result.level[0].upper()
    return m


def _killed_run(m: Month, job, when: datetime) -> None:
    """A run that is killed (SIGKILL) while it writes its image; meanwhile a second start is
    refused, naming the holder."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(m.config), "month",
                             (when - timedelta(minutes=30)).isoformat()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(n.endswith(".partial") for n in os.listdir(m.dest)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        try:
            runner.run_job(job, now=lambda: when)
        except JobBusy as err:
            m.locked_message = f"{err} [{proc.pid}]"
        before = runner.catalogue(job)
        m.list_while_killed = [p.name for p in before.restore_points]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = runner.catalogue(job)
    m.leftover_after_kill = after.leftovers
    m.list_after_kill = [p.name for p in after.restore_points]


# --------------------------------------------------------------------------------------------

def test_levels_follow_the_policy_day_by_day(month):
    assert month.levels == EXPECTED
    r = month.results
    assert r[0].reason == "no restorable full image yet"
    assert r[14].reason.startswith("full-every 2w: the last full")
    assert r[1].level == "differential" and r[1].parent == Path(r[0].image).name
    assert r[2].level == "incremental" and r[2].parent == Path(r[1].image).name
    # images are named by job, UTC time and level
    assert Path(r[3].image).name == "month-20261104T020600Z-incremental.dimg"


def test_killed_run_leaves_no_restore_point_and_the_next_run_cleans_up(month):
    pid = month.locked_message.rsplit("[", 1)[1].rstrip("]")
    assert f"job month is busy: held by pid {pid} on " in month.locked_message
    assert "(backup run month)" in month.locked_message
    assert len(month.list_while_killed) == KILL_DAY == len(month.list_after_kill)
    assert len(month.leftover_after_kill) == 1
    assert month.leftover_after_kill[0].endswith(".dimg.partial")
    assert month.removed_next_day == month.leftover_after_kill
    # the lock died with its holder: the day's own run went ahead
    assert month.results[KILL_DAY].level == "incremental"
    out = cli("backup", "list", "month", "--config", month.config)
    assert out.rc == 0 and ".partial" not in out.out


def test_disk_moved_to_another_node_is_found_by_its_filesystem_uuid(month):
    assert "more than one device answers to it" in month.ambiguous
    assert month.moved_from in month.ambiguous and month.moved_to in month.ambiguous
    assert month.results[MOVE_DAY - 1].source == month.moved_from
    assert month.results[MOVE_DAY].source == month.moved_to
    assert month.results[MOVE_DAY].level == "incremental"   # the chain goes on


def test_every_restore_point_restores_its_day_byte_for_byte(month, tmp_path):
    job = load_config(str(month.config)).job("month")
    points = runner.catalogue(job).restore_points
    assert len(points) == DAYS
    for day in range(DAYS):
        target = tmp_path / f"day{day}.img"
        at = _day_time(day) + timedelta(hours=1)
        point, result = runner.restore_job(job, str(target), at)
        assert point.name == Path(month.results[day].image).name
        assert sha256_of(target) == month.hashes[day], f"day {day} ({point.name})"
        target.unlink()
    # --at with a date: the last point of that day; latest: the last one
    out = cli("backup", "restore", "month", tmp_path / "latest.img", "--at", "latest",
              "--config", month.config, "--no-progress")
    assert out.rc == 0, out.err
    assert sha256_of(tmp_path / "latest.img") == month.hashes[DAYS - 1]
    out = cli("backup", "restore", "month", tmp_path / "d.img", "--at", "2026-11-05",
              "--config", month.config, "--no-progress", "--json")
    assert out.rc == 0, out.err
    assert sha256_of(tmp_path / "d.img") == month.hashes[4]
    out = cli("backup", "restore", "month", tmp_path / "x.img", "--at", "2026-10-31",
              "--config", month.config)
    assert out.rc == 2 and "has no restore point at or before 2026-10-31T23:59:59Z" in out.err


def test_list_reads_every_point_from_the_images(month):
    import json
    out = cli("backup", "list", "month", "--config", month.config, "--json")
    assert out.rc == 0
    data = json.loads(out.out)["jobs"][0]
    assert data["restore_points"] == DAYS
    assert "".join(i["level"][0].upper() for i in data["images"]) == EXPECTED
    assert all(i["restore_point"] and i["verified"] is None for i in data["images"])
    assert data["images"][3]["chain"][0] == data["images"][0]["uuid"]


def test_check_records_verification_and_a_damaged_image_fails(month):
    job = load_config(str(month.config)).job("month")
    # a sample: 10% of 30 points = 3, each verified with its chain
    res = runner.check_job(job, sample=10, now=lambda: _day_time(DAYS))
    assert len(res.chosen) == 3 and res.ok
    verified = {p.name for p in runner.catalogue(job).points if p.verified}
    assert set(res.chosen) <= verified
    # the next sample takes images never verified before
    res2 = runner.check_job(job, sample=10, now=lambda: _day_time(DAYS))
    assert not set(res2.chosen) & set(res.chosen)
    # damage the middle of day 26's records (the blocks it stores): check names it
    day26 = Path(month.results[26].image)
    from diskimg.image.imagefile import ImageReader
    with ImageReader(str(day26)) as reader:
        where = (reader.data_start + reader.records_end) // 2
    with open(day26, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = cli("backup", "check", "month", "--config", month.config, "--no-progress")
    assert out.rc == 1
    assert f"BAD    {day26.name}" in out.out
    listing = cli("backup", "list", "month", "--config", month.config)
    line = next(ln for ln in listing.out.splitlines() if day26.name in ln)
    assert "FAILED" in line
    # nothing more is built on a damaged chain: had day 27 been the last, the next is a full
    from diskimg.backup import policy
    from diskimg.backup.catalogue import Catalogue
    cat = runner.catalogue(job)
    upto27 = Catalogue(cat.job, cat.location, cat.points[:28], ())
    d = policy.choose(job.levels, upto27, _day_time(27) + timedelta(hours=12), SIZE)
    assert d.level == "full" and day26.name in d.reason
    with open(day26, "r+b") as f:      # mend it for the tests after this one
        f.seek(where)
        f.write(byte)
    assert cli("backup", "check", "month", "--config", month.config).rc == 0


def test_prune_keeps_exactly_the_rules_and_their_chains(month, tmp_path):
    job = load_config(str(month.config)).job("month")
    dry = cli("backup", "prune", "month", "--dry-run", "--config", month.config)
    assert dry.rc == 0 and "dry run: nothing removed" in dry.out
    assert len(os.listdir(month.dest)) >= DAYS
    res = runner.prune_job(job)
    name = {d: Path(month.results[d].image).name for d in month.results}
    # keep-daily 7: days 23-29; keep-weekly 2: the newest of ISO weeks 49 (day 29) and 48
    # (day 28); their chains: day 22's differential and day 14's full
    kept = {x.point.name for x in res.plan.keep}
    assert kept == {name[d] for d in (14, 22, *range(23, 30))}
    reasons = {x.point.name: x.reasons for x in res.plan.keep}
    assert reasons[name[22]][0] == f"kept as the parent of {name[23]}"
    assert reasons[name[14]][0].startswith("kept as the parent of ")
    assert reasons[name[28]] == ("keep-daily (2026-11-29)", "keep-weekly (2026-W48)")
    assert set(res.removed) == {name[d] for d in range(DAYS)} - kept
    left = {n for n in os.listdir(month.dest) if n.endswith(".dimg")}
    assert left == kept
    # what is kept still restores, through its chain
    for day in (23, 29):
        point, _ = runner.restore_job(job, str(tmp_path / "r.img"), _day_time(day))
        assert sha256_of(tmp_path / "r.img") == month.hashes[day]
        (tmp_path / "r.img").unlink()
