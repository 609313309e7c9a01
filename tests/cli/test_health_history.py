"""Health over time (issue 17): `monitor`, `health --history/--ack`, alerts, self-test schedules,
textfile metrics and systemd units, replayed from real drives' recordings (fixtures/smart) with
their counters moved over simulated days (tests/smart_history.py writes the edited copies and
their provenance).  The clock is the hidden `--now` option: a parameter passed down to the
library, nothing faked globally."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from diskimg.cli.main import main
from smart_history import FAKE, SMART, Replay

DAY = 86400
T0 = datetime(2026, 6, 1, 10, 30).timestamp()      # local time, as smartd schedules


def at(day: float) -> float:
    return T0 + day * DAY


def date(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def monitor(capsys, replay: Replay, db: Path, t: float, *extra: str) -> tuple[int, dict]:
    rc = main(["monitor", "--once", "--json", "--db", str(db), "--smartctl", FAKE,
               "--now", str(t), *extra, str(replay.node)])
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert "disks" in doc, (doc, out.err)
    return rc, doc["disks"][0]


def reasons(disk: dict, what: str) -> list[dict]:
    return [r for r in disk["reasons"] if r["what"] == what]


ALERT_SCRIPT = """#!/bin/sh
{ printf '%s|%s|%s|%s\\n' "$DISKIMG_DEVICE" "$DISKIMG_PREVIOUS_VERDICT" "$DISKIMG_VERDICT" \
  "$DISKIMG_REASON"; cat; printf '\\n---\\n'; } >> "$ALERT_LOG"
"""


def test_reallocating_drive_day_by_day(tmp_path, monkeypatch, capsys):
    """E13 (HGST, 54 reallocated sectors for years): static, then +3 on day 3, then quiet.
    The static count is WARN; growth is FAIL on the day it happens with the numbers and dates;
    a week later WARN (grew in 30 days, not in 7); alerts go out once per change only; an
    acknowledged count is quiet until it grows past its acknowledged value."""
    r = Replay("E13", tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    script = tmp_path / "alert.sh"
    script.write_text(ALERT_SCRIPT)
    script.chmod(0o755)
    alert_log = tmp_path / "alerts.log"
    monkeypatch.setenv("ALERT_LOG", str(alert_log))
    alert = ("--alert-exec", str(script))

    def day(d: int, reallocated: int) -> tuple[int, dict]:
        r.day(f"day {d}", raw={5: reallocated, 9: 60013 + 24 * d})
        return monitor(capsys, r, db, at(d), *alert)

    rc, disk = day(0, 54)
    assert (rc, disk["verdict"], disk["changed"]) == (1, "WARN", True)   # old static count
    rc, disk = day(1, 54)
    assert (rc, disk["verdict"], disk["changed"]) == (1, "WARN", False)
    (static,) = [x for x in reasons(disk, "5 Reallocated_Sector_Ct") if x["severity"] == "WARN"]
    assert static["value"] == "54"

    rc, disk = day(3, 57)                       # the drive reallocates 3 more sectors
    assert (rc, disk["verdict"], disk["previous_verdict"]) == (1, "FAIL", "WARN")
    (grew,) = [x for x in reasons(disk, "5 Reallocated_Sector_Ct") if x["severity"] == "FAIL"]
    assert grew["value"] == (f"57: +3 since the last reading (54 at {when(at(1))}), "
                             f"+3 in 7 days (54 on {date(at(0))}), "
                             f"+3 in 30 days (54 on {date(at(0))})")
    rc, disk = day(4, 57)                       # no more growth, but within a week: FAIL
    assert disk["verdict"] == "FAIL" and not disk["changed"]
    (grew,) = [x for x in reasons(disk, "5 Reallocated_Sector_Ct") if x["severity"] == "FAIL"]
    assert "since the last reading" not in grew["value"] and "+3 in 7 days" in grew["value"]

    rc, disk = day(11, 57)                      # 8 days without growth: watch it
    assert (rc, disk["verdict"]) == (1, "WARN")
    (grew,) = [x for x in reasons(disk, "5 Reallocated_Sector_Ct")
               if x["severity"] == "WARN" and "30 days" in x["value"]]
    assert grew["value"] == f"57: +3 in 30 days (54 on {date(at(0))})"

    # alerts: first WARN, WARN -> FAIL, FAIL -> WARN; none for the readings that stayed
    entries = alert_log.read_text().split("\n---\n")[:-1]
    heads = [e.splitlines()[0] for e in entries]
    node = str(r.node)
    assert heads == [f"{node}||WARN|5 Reallocated_Sector_Ct: 54",
                     f"{node}|WARN|FAIL|5 Reallocated_Sector_Ct: 57: +3 since the last reading"
                     f" (54 at {when(at(1))}), +3 in 7 days (54 on {date(at(0))}), +3 in 30 "
                     f"days (54 on {date(at(0))})",
                     f"{node}|FAIL|WARN|5 Reallocated_Sector_Ct: 57"]
    doc = json.loads("\n".join(entries[1].splitlines()[1:]))
    assert doc["verdict"] == "FAIL" and doc["previous_verdict"] == "WARN"
    assert doc["model"] == "HGST HUS724020ALA640"
    assert any(x["severity"] == "FAIL" for x in doc["reasons"])

    # acknowledge 5 and 196: PASS now, and the next reading stays PASS (no alert: the
    # sysadmin asked for it)
    rc = main(["health", node, "--ack", "5", "--ack", "Reallocated_Event_Count", "--db",
               str(db), "--smartctl", FAKE, "--now", str(at(11) + 60), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["verdict"] == "PASS"
    assert doc["acknowledged"] == [{"attribute": "5", "value": 57},
                                   {"attribute": "196", "value": 65}]
    assert reasons(doc, "5 Reallocated_Sector_Ct")[0]["value"] == \
        f"57 (acknowledged at 57 on {date(at(11))})"
    rc, disk = day(12, 57)
    assert (rc, disk["verdict"], disk["changed"]) == (0, "PASS", False)
    rc, disk = day(13, 58)                      # grows past the acknowledged value
    assert (rc, disk["verdict"]) == (1, "FAIL")
    (grew,) = [x for x in reasons(disk, "5 Reallocated_Sector_Ct") if x["severity"] == "FAIL"]
    assert grew["value"].startswith("58: +1 since the last reading")
    assert "acknowledged on" in grew["why"]
    assert len(alert_log.read_text().split("\n---\n")[:-1]) == 4

    # the history as a table, and --since
    assert main(["health", node, "--history", "--db", str(db), "--now", str(at(13))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{node}: 8 readings from {when(at(0))} to {when(at(13))}")
    assert out[1].split() == ["time", "verdict", "temp", "hours", "5", "10", "196", "197",
                              "198", "199"]
    assert out[2].split()[2:] == ["WARN", "42", "60013", "54", "0", "65", "0", "0", "0"]
    assert out[4].split()[2:6] == ["FAIL", "42", "60085", "57"]
    assert main(["health", node, "--history", "--since", "3d", "--json", "--db", str(db),
                 "--now", str(at(13))]) == 0
    doc = json.loads(capsys.readouterr().out)
    (drive,) = doc["drives"]
    assert [x["values"]["5"] for x in drive["readings"]] == [57, 57, 57, 58]


def test_acknowledging_what_the_drive_does_not_count_is_a_usage_error(tmp_path, monkeypatch,
                                                                       capsys):
    r = Replay("E01", tmp_path, monkeypatch)
    rc = main(["health", str(r.node), "--ack", "media_errors", "--db", str(tmp_path / "h.db"),
               "--smartctl", FAKE])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diskimg: error: --ack media_errors: not a counter this drive "
                          "reports (counters: 5 Reallocated_Sector_Ct")


def test_wear_prediction_within_a_day(tmp_path, monkeypatch, capsys):
    """E26 (Samsung NVMe) wearing 1 % a day from 60 %: 100 % falls on day 40 of the straight
    line; the prediction from the integer percentages is within a day of it."""
    r = Replay("E26", tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    for d in (0, 4, 8, 12, 16, 20):
        r.day(f"day {d}", fields={"Percentage Used": f"{60 + d}%",
                                  "Power On Hours": f"{24125 + 24 * d:,}"})
        rc, disk = monitor(capsys, r, db, at(d))
    assert disk["wear"] == 80 and rc == 1
    (wear,) = reasons(disk, "wear")
    assert wear["value"].startswith("80% used, +30.0% per 30 days: 100% around ")
    predicted = datetime.strptime(wear["value"].rsplit(" ", 1)[1], "%Y-%m-%d")
    truth = datetime.fromtimestamp(at(40))
    assert abs(predicted - truth.replace(hour=0, minute=0)) <= timedelta(days=1)
    assert wear["severity"] == "WARN"           # within 90 days: plan the replacement


def test_temperature_above_the_drives_limit_and_its_usual_range(tmp_path, monkeypatch, capsys):
    """E26 says its warning limit is 77 C (Warning Comp. Temp. Threshold); a week at 31 C."""
    r = Replay("E26", tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    for d in range(7):
        r.day(f"day {d}", fields={"Temperature": "31 Celsius"})
        monitor(capsys, r, db, at(d))
    r.day("day 7", fields={"Temperature": "48 Celsius"})
    rc, disk = monitor(capsys, r, db, at(7))
    assert (rc, disk["verdict"]) == (1, "WARN")
    assert [x["value"] for x in reasons(disk, "temperature")] == \
        ["48 C, usually 31-31 C (last 30 days)"]
    r.day("day 8", fields={"Temperature": "78 Celsius"})
    rc, disk = monitor(capsys, r, db, at(8))
    assert [x["value"] for x in reasons(disk, "temperature")] == \
        ["78 C", "78 C >= the drive's warning limit 77 C"]        # the 60 C rule, the drive's


def test_newly_failed_selftest(tmp_path, monkeypatch, capsys):
    r = Replay("E13", tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    rc, disk = monitor(capsys, r, db, at(0))
    r.day("day 1", raw={9: 60037}, selftest=("Extended offline", "Completed: read failure",
                                             60030, "1234567"))
    rc, disk = monitor(capsys, r, db, at(1))
    assert disk["verdict"] == "FAIL"
    new = [x for x in reasons(disk, "self-test #1") if "new since" in x["value"]]
    assert new and new[0]["value"] == ("Extended offline: Completed: read failure at LBA "
                                       f"1234567, new since {when(at(0))}")
    rc, disk = monitor(capsys, r, db, at(2))    # still failed, no longer new
    assert disk["verdict"] == "FAIL"
    assert not [x for x in reasons(disk, "self-test #1") if "new since" in x["value"]]


def test_a_different_drive_behind_the_same_name(tmp_path, monkeypatch, capsys):
    """E13 (60013 power-on hours, 54 reallocated; anonymised serial) replaced by a drive of the
    same model with 1200 hours and none reallocated, then by E01 (another model): each is a new
    drive in the history, its counters not compared with the old one's."""
    r = Replay("E13", tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    monitor(capsys, r, db, at(0))
    r.day("day 1", raw={9: 60037})
    monitor(capsys, r, db, at(1))
    r.day("day 2: a new drive of the same model", raw={5: 0, 196: 0, 9: 1200})
    rc, disk = monitor(capsys, r, db, at(2))
    (swap,) = reasons(disk, "power-on hours")
    assert (rc, swap["severity"]) == (1, "WARN")
    assert swap["value"] == f"1200 h, were 60037 h at {when(at(1))}"
    assert "a different drive" in swap["why"]
    assert not reasons(disk, "5 Reallocated_Sector_Ct")         # 54 -> 0 is not "went down"
    r.day("day 3", raw={5: 0, 196: 0, 9: 1224})
    rc, disk = monitor(capsys, r, db, at(3))
    assert (rc, disk["verdict"], disk["reasons"]) == (0, "PASS", [])
    other = Replay("E01", tmp_path, monkeypatch)
    other.activate(node=r.node)
    rc, disk = monitor(capsys, other, db, at(4))
    assert disk["model"] == "WDC WD40PURX-64GVNY0"
    assert [(x["severity"], x["value"]) for x in reasons(disk, "drive")] == [
        ("INFO", f"a different drive behind {r.node}: model WDC WD40PURX-64GVNY0, was HGST "
                 "HUS724020ALA640")]
    assert (rc, disk["verdict"]) == (0, "PASS")
    assert main(["health", str(r.node), "--history", "--db", str(db), "--now",
                 str(at(4))]) == 0
    out = capsys.readouterr().out
    assert f"-- a different drive from {when(at(2))}: power-on hours 1200, were 60037" in out
    assert f"-- a different drive from {when(at(4))}: model WDC WD40PURX-64GVNY0" in out


def _selftest_replay(tmp_path, monkeypatch) -> Replay:
    r = Replay("E01", tmp_path, monkeypatch)
    shutil.copy(SMART / "selftest-ok" / "_-d_sat_-t_short__dev_sda", r.dir)
    return r


def test_schedule_starts_a_test_once_and_skips_while_one_runs(tmp_path, monkeypatch, capsys):
    r = _selftest_replay(tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    schedule = ("--schedule", "(S/../.././10|L/../../7/03)")
    rc, disk = monitor(capsys, r, db, at(0), *schedule)              # 10:30: due
    assert disk["selftest"] == "started the scheduled short self-test"
    assert sum("-t short" in c for c in _calls(r)) == 1
    rc, disk = monitor(capsys, r, db, at(0) + 900, *schedule)        # 10:45: already done
    assert disk["selftest"] is None
    running = (SMART / "selftest-ok" / "_-d_sat_--all__dev_sda.3").read_text()
    assert "90% of test remaining" in running
    r.day("day 1: a self-test runs", text=running)
    rc, disk = monitor(capsys, r, db, at(1), *schedule)
    assert disk["selftest"] == ("skipped the scheduled short self-test: a self-test is "
                                "running (90% left)")
    assert sum("-t short" in c for c in _calls(r)) == 1
    r.day("day 2", text=r.original)
    rc, disk = monitor(capsys, r, db, at(1) + 6 * 3600, *schedule)   # 16:30: nothing due
    assert disk["selftest"] is None


def _calls(r: Replay) -> list[str]:
    return (r.state / "calls.log").read_text().splitlines()


def test_schedule_picks_long_over_short_and_catches_up():
    from diskimg.health import schedule
    pattern = schedule.parse_schedule("(S/../.././..|L/../../1/0[2-4])")
    monday3 = datetime(2026, 6, 1, 3, 10).timestamp()          # 2026-06-01 is a Monday
    assert schedule.due(pattern, None, monday3) == ["2026/L/06/01/1/03", "2026/S/06/01/1/03"]
    two_hours = schedule.due(pattern, monday3, monday3 + 2 * 3600)
    assert two_hours == ["2026/L/06/01/1/04", "2026/S/06/01/1/04", "2026/S/06/01/1/05"]


@pytest.mark.parametrize("bad", ["(S/../.././2", "S/../.././2", "X/../.././02"])
def test_bad_schedule_is_a_usage_error(bad, tmp_path, capsys):
    rc = main(["monitor", "--once", "--db", str(tmp_path / "h.db"), "--schedule", bad,
               str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"diskimg: error: --schedule {bad!r}: ")


def test_textfile_metrics_pass_promtool(tmp_path, monkeypatch, capsys):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    r = Replay("E13", tmp_path, monkeypatch)
    r.day("serial", fields={"Serial Number": "PN1234P8JG4ABC"})
    out = tmp_path / "textfile"
    out.mkdir()
    rc, disk = monitor(capsys, r, tmp_path / "h.db", at(0), "--textfile", str(out))
    assert rc == 1
    files = sorted(p.name for p in out.iterdir())
    assert files == ["diskimg.prom"]                 # nothing left of the temporary file
    text = (out / "diskimg.prom").read_text()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    ident = f'device="{r.node}",model="HGST HUS724020ALA640",serial="PN1234P8JG4ABC"'
    assert f"diskimg_health_status{{{ident}}} 1" in text
    assert f'diskimg_health_verdict{{{ident},verdict="WARN"}} 1' in text
    assert f"diskimg_smart_temperature_celsius{{{ident}}} 42" in text
    assert f'diskimg_smart_attribute_raw{{{ident},attribute="5",' \
           f'name="5 Reallocated_Sector_Ct"}} 54' in text
    assert f'diskimg_smart_selftest_last_passed{{{ident},type="Short offline"}} 1' in text


def test_timer_units_pass_systemd_analyze(tmp_path, capsys):
    analyze = shutil.which("systemd-analyze")
    units = tmp_path / "units"
    rc = main(["monitor", "timer", "install", "/dev/sda", "--unit-dir", str(units),
               "--interval", "1h", "--db", str(tmp_path / "my db.sqlite"), "--schedule",
               "(S/../.././02|L/../../6/03)", "--textfile", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    service = (units / "diskimg-monitor.service").read_text()
    timer = (units / "diskimg-monitor.timer").read_text()
    exec_start = next(x for x in service.splitlines() if x.startswith("ExecStart="))
    assert exec_start == (f"ExecStart={sys.executable} -m diskimg monitor --once --db "
                          f"\"{tmp_path}/my db.sqlite\" --schedule "
                          "(S/../.././02|L/../../6/03) "
                          f"--textfile {tmp_path} /dev/sda")
    assert "OnUnitActiveSec=3600s" in timer and "WantedBy=timers.target" in timer
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    check = subprocess.run([analyze, "verify", str(units / "diskimg-monitor.service"),
                            str(units / "diskimg-monitor.timer")], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "diskimg-monitor" not in check.stderr, check.stderr


def test_unreadable_disk_changes_the_verdict_and_exits_3(tmp_path, monkeypatch, capsys):
    r = Replay("E01", tmp_path, monkeypatch)
    db = tmp_path / "h.db"
    rc, disk = monitor(capsys, r, db, at(0))
    assert (rc, disk["verdict"]) == (0, "PASS")
    r.node.unlink()                                   # the disk vanished
    rc, disk = monitor(capsys, r, db, at(1))
    assert (rc, disk["verdict"], disk["previous_verdict"]) == (3, "UNKNOWN", "PASS")
    assert "no such device" in disk["error"] and disk["changed"]


def test_history_errors(tmp_path, capsys):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all\n" * 100)
    assert main(["health", "/dev/sda", "--history", "--db", str(junk)]) == 3
    assert capsys.readouterr().err.startswith(f"diskimg: error: {junk}: not a diskimg health "
                                              "history")
    assert main(["health", "/dev/sda", "--history", "--db", str(tmp_path / "none.db")]) == 3
    assert "no health history here" in capsys.readouterr().err
    assert main(["health", "/dev/sda", "--since", "3d"]) == 2
    assert "--since goes with --history" in capsys.readouterr().err


def test_alert_mail_through_sendmail(tmp_path, monkeypatch, capsys):
    """--alert-mail pipes a message to the sendmail found on PATH (here a script standing in for
    the local MTA, which keeps what it is given), once per change of verdict."""
    bindir = tmp_path / "mta"
    bindir.mkdir()
    spool = tmp_path / "spool"
    (bindir / "sendmail").write_text(f"#!/bin/sh\necho \"$@\" >> {spool}\ncat >> {spool}\n")
    (bindir / "sendmail").chmod(0o755)
    r = Replay("E13", tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    db = tmp_path / "h.db"
    rc, disk = monitor(capsys, r, db, at(0), "--alert-mail", "root@example.org")
    assert disk["alert"] == "mailed"
    rc, disk = monitor(capsys, r, db, at(1), "--alert-mail", "root@example.org")
    assert disk["alert"] is None
    mail = spool.read_text()
    assert mail.startswith("-oi -t\nTo: root@example.org\nSubject: diskimg: ")
    assert f"Subject: diskimg: {r.node} (HGST HUS724020ALA640) is now WARN: " \
           "5 Reallocated_Sector_Ct: 54\n" in mail
    assert mail.count("Subject:") == 1


def test_skip_standby_leaves_a_sleeping_disk_alone(tmp_path, monkeypatch, capsys):
    """smartctl -n standby answers exit 2 and "Device is in STANDBY mode" for a spun-down disk
    (smartctl's own text, written for this test: no recording of a sleeping disk was at hand);
    neither the reading nor the scheduled test wakes it."""
    r = _selftest_replay(tmp_path, monkeypatch)
    db = tmp_path / "health.db"
    rc, disk = monitor(capsys, r, db, at(0))
    asleep = r.dir / "_-d_sat_-n_standby_-i__dev_sda"
    asleep.write_text("smartctl 7.3 2022-02-28 r5338 [x86_64-linux] (local build)\n"
                      "Copyright (C) 2002-22, Bruce Allen, Christian Franke, "
                      "www.smartmontools.org\n\nDevice is in STANDBY mode, exit(2)\n")
    (r.dir / (asleep.name + ".rc")).write_text("2")
    before = len(_calls(r))
    rc, disk = monitor(capsys, r, db, at(1), "--skip-standby", "-d", "sat", "--schedule",
                       "S/../.././..")
    assert disk["selftest"] == "skipped: the disk is in standby"
    assert [x["what"] for x in disk["reasons"]] == ["standby"]
    assert (rc, disk["verdict"]) == (0, "PASS")          # the last verdict stands
    assert _calls(r)[before:] == ["-d sat -n standby -i /dev/sda"]
