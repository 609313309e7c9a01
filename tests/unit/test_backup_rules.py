"""The backup job's pure parts: the jobs file, the level policy, the keep rules and their chain
closure, and the textfile metrics (checked with promtool when it is installed)."""
from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from diskimg.backup import metrics, policy, retention
from diskimg.backup.catalogue import Catalogue, Point, Verification, image_name
from diskimg.backup.config import Keep, LevelPolicy, Period, parse_config, parse_duration
from diskimg.errors import UsageError

T0 = datetime(2026, 11, 1, 3, 0, tzinfo=timezone.utc)   # a Sunday


def _config(body: str, path: str = "/etc/diskimg/jobs.toml"):
    return parse_config(body, path)


GOOD = """
state-dir = "/var/lib/x"
[jobs.root]
source = { serial = "WD-1234" }
destination = "/srv/backup/root"
full-every = "4w"
differential-every = "weekly"
full-after-incrementals = 10
full-after-percent = 50
keep-last = 3
keep-daily = 7
health = "rescue"
compression-level = 5
schedule = "*-*-* 03:00"
random-delay = "1h"
"""


def test_config_reads_every_key():
    job = _config(GOOD).job("root")
    assert job.source.kind == "serial" and job.source.value == "WD-1234"
    assert job.levels.full_every == Period(seconds=28 * 86400)
    assert job.levels.differential_every == Period(calendar="weekly")
    assert job.levels.full_after_incrementals == 10 and job.levels.full_after_percent == 50
    assert job.keep == Keep(last=3, daily=7)
    assert job.health == "rescue" and job.compression_level == 5
    assert job.random_delay == 3600 and job.state_dir == "/var/lib/x"


@pytest.mark.parametrize("change, message", [
    ('keep-daily = "7"', 'jobs.root.keep-daily: a whole number >= 0 expected, got "7"'),
    ("keep-dialy = 7", "jobs.root.keep-dialy: unknown key (did you mean 'keep-daily'?)"),
    ('full-every = "fortnightly"', "jobs.root.full-every: a period expected"),
    ('health = "pray"', "jobs.root.health: one of stop, rescue, ignore expected"),
    ('destination = "s3://"', "jobs.root.destination: s3://: no bucket in the URL"),
    ('destination = "s3://b//x"', "jobs.root.destination: s3://b//x: an empty name between"),
    ('endpoint-url = "ftp://x"', "jobs.root.endpoint-url: only for an s3:// destination"),
    ('block-size = "3M"', "jobs.root.block-size: "),
    ('destination = "backups"', "jobs.root.destination: an absolute directory expected"),
    ('source = { serial = "A", wwn = "B" }', "jobs.root.source: a table with exactly one of"),
    ("compression-level = 30", "jobs.root.compression-level: 1 to 22 expected, got 30"),
    ('encryption = { key-file = "/k" }', "jobs.root.encryption: this diskimg cannot make "
                                         "encrypted images yet"),
    ("parity = 200", "jobs.root.parity: 0 (none) or 0.5 to 100 (percent) expected, got 200"),
    ('parity = "5"', "jobs.root.parity: 0 (none) or 0.5 to 100 (percent) expected, got \"5\""),
])
def test_config_errors_name_the_file_and_the_key(change, message):
    key = change.split(" =")[0]
    lines = [ln for ln in GOOD.splitlines() if not ln.startswith(key + " ")]
    with pytest.raises(UsageError) as e:
        _config("\n".join(lines) + "\n" + change + "\n")
    text = str(e.value)
    assert text.startswith("/etc/diskimg/jobs.toml: ") and "\n" not in text
    assert message in text


def test_config_not_toml_and_bad_job_name_and_unknown_job():
    with pytest.raises(UsageError, match=r"^/j\.toml: not valid TOML"):
        _config("[jobs.root\n", "/j.toml")
    with pytest.raises(UsageError, match="a job name is letters"):
        _config('[jobs."a b"]\nsource="/dev/x"\ndestination="/d"\n')
    with pytest.raises(UsageError, match=r"no job named 'home' \(jobs: root\)"):
        _config(GOOD).job("home")
    with pytest.raises(UsageError, match="jobs.x.source: missing"):
        _config('[jobs.x]\ndestination="/d"\n')


def test_durations():
    assert parse_duration("30min") == 1800
    assert parse_duration("1h30min") == 5400
    assert parse_duration("4w") == 28 * 86400
    for bad in ("", "4", "4 weeks", "h4"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --------------------------------------------------------------------------------------------
# a synthetic catalogue: points made by a day-by-day schedule


class _Cat:
    def __init__(self) -> None:
        self.points: list[Point] = []

    def add(self, level: str, when: datetime, stored: int = 100, parent: Point | None = None,
            verified: Verification | None = None) -> Point:
        n = len(self.points)
        chain = (parent.chain if parent else ()) + (f"u{n}",)
        p = Point(name=image_name("j", when, level), path=f"/d/{n}", uuid=f"u{n}", job="j",
                  level=level, time=when, parent=parent.uuid if parent else None, chain=chain,
                  size=1 << 20, image_bytes=stored, stored_bytes=stored, read_bytes=stored,
                  rescue=False, complete=True, verified=verified)
        self.points.append(p)
        return p

    def cat(self) -> Catalogue:
        return Catalogue("j", "/d", tuple(self.points), ())


def simulate(pol: LevelPolicy, days: int, stored: int = 100) -> list[str]:
    """The level of each daily run, made the way the runner makes them."""
    c = _Cat()
    levels = []
    for day in range(days):
        now = T0 + timedelta(days=day, minutes=day * 7 % 31)   # a timer's random delay
        d = policy.choose(pol, c.cat(), now, 1 << 20)
        c.add(d.level, now, stored if d.level != "full" else 1000, d.parent)
        levels.append(d.level[0].upper())
    return levels


def test_calendar_policy_full_monthly_differential_weekly_incremental_daily():
    pol = LevelPolicy(full_every=Period(calendar="monthly"),
                      differential_every=Period(calendar="weekly"))
    got = "".join(simulate(pol, 35))
    # Sunday 1 November: full; every Monday (a new ISO week) a differential; 1 December: full
    assert got == "FD" + "IIIIIID" * 4 + "FIIII"
    assert got[30] == "F"


def test_interval_policy_full_every_4w_differential_every_7d():
    pol = LevelPolicy(full_every=Period(seconds=28 * 86400),
                      differential_every=Period(seconds=7 * 86400))
    got = "".join(simulate(pol, 30))
    assert got == "F" + "IIIIIID" * 3 + "IIIIII" + "FI"


def test_full_after_n_incrementals_and_after_percent():
    pol = LevelPolicy(full_every=Period(), full_after_incrementals=3)
    assert "".join(simulate(pol, 9)) == "FIIIFIIIF"
    # each incremental stores 300 of the full's 1000: more than 50% after two
    pol = LevelPolicy(full_every=Period(), full_after_percent=50)
    assert "".join(simulate(pol, 7, stored=300)) == "FIIFIIF"
    # no incrementals: every other run is a differential on the last full
    pol = LevelPolicy(full_every=Period(calendar="weekly"), incremental=False,
                      differential_every=Period(seconds=86400 * 365))
    # (Sunday 1 November is the last day of its ISO week: Monday's run starts a new one)
    assert "".join(simulate(pol, 9)) == "FFDDDDDDF"


def test_policy_reasons_overrides_and_failed_checks():
    c = _Cat()
    pol = LevelPolicy()
    d = policy.choose(pol, c.cat(), T0)
    assert d.level == "full" and d.reason == "no restorable full image yet"
    with pytest.raises(UsageError, match="--level incremental needs a full image"):
        policy.choose(pol, c.cat(), T0, override="incremental")
    full = c.add("full", T0, 1000)
    inc = c.add("incremental", T0 + timedelta(days=1), 10, full)
    d = policy.choose(pol, c.cat(), T0 + timedelta(days=2), 1 << 20)
    assert d.level == "incremental" and d.parent.uuid == inc.uuid
    d = policy.choose(pol, c.cat(), T0 + timedelta(days=2), 1 << 20, override="differential")
    assert d.level == "differential" and d.parent.uuid == full.uuid
    d = policy.choose(pol, c.cat(), T0 + timedelta(days=2), 2 << 20)
    assert d.level == "full" and "size" in d.reason
    c.points[0] = Point(**{**c.points[0].__dict__,
                           "verified": Verification("2026-11-02T00:00:00Z", False, 3, "bad")})
    d = policy.choose(pol, c.cat(), T0 + timedelta(days=2), 1 << 20)
    assert d.level == "full" and "failed its last check" in d.reason


# --------------------------------------------------------------------------------------------
# retention


def _month() -> tuple[_Cat, dict[str, Point]]:
    """November 2026, one run a day: full on the 1st, differential each Monday, incrementals."""
    c = _Cat()
    pol = LevelPolicy(full_every=Period(calendar="monthly"),
                      differential_every=Period(calendar="weekly"))
    by_day = {}
    for day in range(30):
        now = T0 + timedelta(days=day)
        d = policy.choose(pol, c.cat(), now, 1 << 20)
        by_day[now.strftime("%d")] = c.add(d.level, now, parent=d.parent)
    return c, by_day


def test_keep_rules_as_restic_then_the_chains():
    c, day = _month()
    plan = retention.plan(c.cat(), Keep(last=2, weekly=2))
    kept = {x.point.name: x.reasons for x in plan.keep}
    # keep-last: the 30th and 29th; keep-weekly: the newest of the last two ISO weeks that have
    # one (W48 ends Sunday the 29th: its newest is the 29th; W49 holds only the 30th)
    assert kept[day["30"].name] == ("keep-last", "keep-weekly (2026-W49)")
    assert kept[day["29"].name] == ("keep-last", "keep-weekly (2026-W48)")
    # the 29th is an incremental on the 28th ... on Monday the 23rd's differential on the full
    assert day["30"].level == "differential" and day["23"].level == "differential"
    chain_29 = [day[d].name for d in ("23", "24", "25", "26", "27", "28")] + [day["01"].name]
    for name in chain_29:
        assert any(r.startswith("kept as the parent of") for r in kept[name]), name
    assert set(kept) == {day["30"].name, day["29"].name, *chain_29}
    removed = {x.point.name for x in plan.remove}
    assert removed == {p.name for p in c.points} - set(kept)
    # newest first: a child is always removed before its parent
    times = [x.point.time for x in plan.remove]
    assert times == sorted(times, reverse=True)


def test_keep_daily_monthly_yearly_buckets():
    c, day = _month()
    plan = retention.plan(c.cat(), Keep(daily=3, monthly=5, yearly=1))
    kept = {x.point.name: x.reasons for x in plan.keep}
    assert kept[day["30"].name] == ("keep-daily (2026-11-30)", "keep-monthly (2026-11)",
                                    "keep-yearly (2026)")
    assert kept[day["28"].name] == ("keep-daily (2026-11-28)",)
    assert kept[day["01"].name][0].startswith("kept as the parent of")


def test_prune_without_rules_is_refused_and_broken_chains_are_left_alone():
    c, day = _month()
    with pytest.raises(UsageError, match="no keep rule set"):
        retention.plan(c.cat(), Keep())
    orphan = Point(**{**day["30"].__dict__, "uuid": "x", "name": "j-orphan.dimg",
                      "problem": "chain broken: image u99 is missing or incomplete"})
    c.points.append(orphan)
    plan = retention.plan(c.cat(), Keep(last=1))
    assert [x.point.name for x in plan.left_alone] == ["j-orphan.dimg"]
    assert "j-orphan.dimg" not in {x.point.name for x in plan.remove}


# --------------------------------------------------------------------------------------------
# metrics

def test_textfile_metrics_pass_promtool(tmp_path):
    status = {"job": 'we"ird', "end_epoch": 1796037221.4, "last_success_epoch": 1796037221.4,
              "result": "success", "exit_code": 0, "duration_seconds": 12.5,
              "bytes_read": 7 << 20, "bytes_stored": 3 << 20, "image_bytes": 3 << 20,
              "level": "incremental", "restore_points": 9}
    path = metrics.write_textfile(str(tmp_path), status)
    text = open(path).read()
    assert 'diskimg_backup_last_run_level{backup_job="we\\"ird",level="incremental"} 1' in text
    assert 'diskimg_backup_last_run_success{backup_job="we\\"ird"} 1' in text
    assert [p.name for p in tmp_path.iterdir()] == ["diskimg_backup_we\"ird.prom"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
