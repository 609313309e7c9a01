"""Backup jobs whose destination is ``s3://bucket/prefix``, against a real SeaweedFS (and one
case against moto's server): a simulated week of runs (the library's clock, one day per run)
choosing their levels from the images already in the prefix, every day restored byte for byte
with `cmp`, list reading only headers and footers (ranged GETs), check recording its result as
a sidecar object, prune deleting objects but never a parent of a kept image, a run SIGKILLed
mid-upload leaving no restore point (its uncompleted multipart upload is aborted by the next
run), another host's claim on the job, and one-line errors for a missing bucket.

The source is a regular file (no root needed); the S3 servers are the session's
(tests/conftest.py, tests/s3servers.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import cli, run
from s3servers import SECRET_KEY, use_s3

from diskimg.backup import runner
from diskimg.backup.config import load_config
from diskimg.errors import JobBusy

MiB = 1 << 20
SIZE = 16 * MiB
T0 = datetime(2026, 11, 2, 2, 0, tzinfo=timezone.utc)     # a Monday
DAYS = 8
# full every week, a differential every 3 days, incrementals in between; day 7 a new full
EXPECTED = "FIIDIIDF"


def _day(day: int) -> datetime:
    return T0 + timedelta(days=day, minutes=(day * 13) % 40)   # the timer's random delay


def _change(disk: Path, day: int) -> None:
    """A day's writes: a few scattered 64 KiB pieces, one of them new each day."""
    rnd = __import__("random").Random(day)
    with open(disk, "r+b") as f:
        for _ in range(3):
            f.seek(rnd.randrange(SIZE // (64 << 10)) * (64 << 10))
            f.write(rnd.randbytes(64 << 10))


class Week:
    def __init__(self, root: Path, server) -> None:
        self.root, self.server = root, server
        self.prefix = f"wk-{uuid.uuid4().hex[:10]}"
        self.url = f"s3://{server.bucket}/{self.prefix}"
        self.disk = root / "disk.raw"
        self.config = root / "jobs.toml"
        self.state = root / "state"
        self.days: dict[int, Path] = {}        # day -> copy of the disk after that day
        self.results: dict[int, runner.RunResult] = {}
        self.levels = ""

    def keys(self) -> list[str]:
        r = self.server.client().list_objects_v2(Bucket=self.server.bucket,
                                                 Prefix=self.prefix + "/")
        return sorted(o["Key"][len(self.prefix) + 1:] for o in r.get("Contents", []))

    def uploads(self) -> list[dict]:
        return self.server.client().list_multipart_uploads(
            Bucket=self.server.bucket, Prefix=self.prefix + "/").get("Uploads", [])


@pytest.fixture(scope="module")
def week(seaweedfs, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    use_s3(mp, seaweedfs)
    root = tmp_path_factory.mktemp("s3week")
    w = Week(root, seaweedfs)
    with open(w.disk, "wb") as f:     # 12 MiB of data, holes around
        f.truncate(SIZE)
        f.seek(2 * MiB)
        f.write(os.urandom(12 * MiB))
    w.config.write_text(f"""
state-dir = "{w.state}"
[jobs.week]
source = "{w.disk}"
destination = "{w.url}"
full-every = "1w"
differential-every = "3d"
keep-last = 2
""")
    job = load_config(str(w.config)).job("week")
    try:
        for day in range(DAYS):
            _change(w.disk, day)
            w.days[day] = root / f"day{day}.raw"
            shutil.copyfile(w.disk, w.days[day])
            when = _day(day)
            w.results[day] = runner.run_job(job, now=lambda: when, threads=2)
            w.levels += w.results[day].level[0].upper()
        yield w
    finally:
        mp.undo()


@pytest.fixture
def s3env(week, monkeypatch):
    use_s3(monkeypatch, week.server)
    return week


def test_levels_are_chosen_from_the_images_in_the_prefix(s3env):
    w = s3env
    assert w.levels == EXPECTED
    r = w.results
    assert r[0].reason == "no restorable full image yet"
    assert r[1].parent == Path(r[0].image).name and r[3].parent == Path(r[0].image).name
    assert r[4].parent == Path(r[3].image).name
    assert r[3].reason.startswith("differential-every 3d")
    assert r[7].reason.startswith("full-every 1w")
    assert r[2].image == f"{w.url}/week-20261104T022600Z-incremental.dimg"
    images = [k for k in w.keys() if k.endswith(".dimg")]
    assert images == sorted(Path(x.image).name for x in r.values())
    assert w.uploads() == []                   # every upload completed
    # the status of the run names the object, never a credential
    status = (w.state / "week.status.json").read_text()
    assert json.loads(status)["image"] == r[7].image and SECRET_KEY not in status


def test_list_reads_headers_with_ranged_gets(s3env, monkeypatch):
    from diskimg.store import s3 as s3mod
    fetched = []
    real = s3mod.S3Reader._get

    def counting(self, start, end):
        fetched.append(end - start)
        return real(self, start, end)
    monkeypatch.setattr(s3mod.S3Reader, "_get", counting)
    res = cli("backup", "list", "week", "--config", s3env.config, "--json")
    assert res.rc == 0, res.err
    job = res.json["jobs"][0]
    assert job["restore_points"] == DAYS and job["leftovers"] == []
    assert [i["level"][0].upper() for i in job["images"]] == list(EXPECTED)
    total = sum(i["image_bytes"] for i in job["images"])
    # header, footer, trailer and parity tail of each image, each in one of the reader's
    # kept 256 KiB chunks (a few round trips per image); never a read-ahead window of
    # megabytes: on images of realistic size a small fraction of a percent
    assert fetched and max(fetched) <= s3mod.SMALL_CHUNK, fetched
    assert len(fetched) <= 6 * DAYS, len(fetched)
    assert sum(fetched) <= 6 * s3mod.SMALL_CHUNK * DAYS < total, (sum(fetched), total)
    text = cli("backup", "list", "week", "--config", s3env.config).out
    assert f"job week: {DAYS} restore points in {s3env.url}\n" in text
    print(f"list fetched {sum(fetched)} bytes in {len(fetched)} GETs of {total} image bytes")


def test_every_day_restores_byte_for_byte(s3env, tmp_path):
    for day in (0, 2, 3, 5, 7):
        target = tmp_path / f"restored{day}.raw"
        res = cli("backup", "restore", "week", target, "--at",
                  (_day(day) + timedelta(hours=1)).isoformat(), "--config", s3env.config,
                  "--no-progress")
        assert res.rc == 0, res.err
        assert res.out.startswith(f"restore point {_day(day):%Y-%m-%dT%H:%M:%SZ} ")
        run("cmp", target, s3env.days[day])
    res = cli("backup", "restore", "week", tmp_path / "x.raw", "--at", "2026-11-01",
              "--config", s3env.config)
    assert res.rc == 2 and "job week has no restore point at or before 2026-11-01T23:59:59Z" \
        in res.err


def test_check_records_its_result_in_a_sidecar_object(s3env):
    w = s3env
    res = cli("backup", "check", "week", "--sample", "25", "--config", w.config, "--json")
    assert res.rc == 0, res.err
    chosen = res.json["chosen"]
    assert len(chosen) == 2 and chosen[0].endswith("-full.dimg")      # oldest unverified first
    verified = [k for k in w.keys() if k.endswith(".verified.json")]
    assert sorted(verified) == sorted(c["name"] + ".verified.json" for c in res.json["checked"])
    body = w.server.client().get_object(Bucket=w.server.bucket,
                                        Key=f"{w.prefix}/{verified[0]}")["Body"].read()
    record = json.loads(body)
    assert record["ok"] is True and record["errors"] == 0
    listing = cli("backup", "list", "week", "--config", w.config, "--json").json
    marked = {i["name"] for i in listing["jobs"][0]["images"] if i["verified"]}
    assert marked == {c["name"] for c in res.json["checked"]}


def test_prune_deletes_objects_but_keeps_parents(s3env, tmp_path):
    w = s3env
    names = [Path(w.results[d].image).name for d in range(DAYS)]
    dry = cli("backup", "prune", "week", "--keep-last", "3", "--dry-run", "--config", w.config,
              "--json")
    assert dry.rc == 0, dry.err
    kept = {k["name"]: k["reasons"] for k in dry.json["keep"]}
    # the last three: day 5 (incremental of day 4, of the differential of day 3), 6, 7
    assert set(kept) == {names[0], names[3], names[4], names[5], names[6], names[7]}
    assert any(r.startswith("kept as the parent of") for r in kept[names[0]])
    assert len([k for k in w.keys() if k.endswith(".dimg")]) == DAYS     # dry run: nothing
    res = cli("backup", "prune", "week", "--config", w.config)           # the job's keep-last 2
    assert res.rc == 0, res.err
    # day 6 is the differential of day 0's full: the full stays as its parent
    assert f"keep    {names[0]}: kept as the parent of {names[6]}" in res.out
    assert "week: 3 kept, 5 removed" in res.out
    left = [k for k in w.keys() if k.endswith(".dimg")]
    assert left == [names[0], names[6], names[7]]
    # no verification record outlives its image
    assert all(k.removesuffix(".verified.json") in left for k in w.keys()
               if k.endswith(".verified.json"))
    target = tmp_path / "latest.raw"
    res = cli("backup", "restore", "week", target, "--at", "latest", "--config", w.config,
              "--no-progress")
    assert res.rc == 0, res.err
    run("cmp", target, w.days[DAYS - 1])


KILLED_RUN = r"""
import sys, time
from datetime import datetime
from diskimg.backup.config import load_config
from diskimg.backup.runner import run_job

class Stall:
    seen = 0
    def start(self, total, unit="B"):
        pass
    def advance(self, n):
        Stall.seen += n
        if Stall.seen > 12 << 20:
            time.sleep(3600)      # killed while it uploads

job = load_config(sys.argv[1]).job(sys.argv[2])
when = datetime.fromisoformat(sys.argv[3])
run_job(job, now=lambda: when, level="full", progress=Stall(), threads=1)
"""


def test_a_killed_run_leaves_no_restore_point_and_the_next_run_aborts_its_upload(s3env):
    w = s3env
    job = load_config(str(w.config)).job("week")
    before = [p.name for p in runner.catalogue(job).restore_points]
    when = _day(DAYS) + timedelta(hours=1)
    c = w.server.client()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(w.config), "week",
                             when.isoformat()], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:      # until a part of the upload is on the server
            ups = w.uploads()
            if ups and c.list_parts(Bucket=w.server.bucket, Key=ups[0]["Key"],
                                    UploadId=ups[0]["UploadId"]).get("Parts"):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never uploaded a part"
            time.sleep(0.1)
        with pytest.raises(JobBusy) as busy:      # the host's lock: one run at a time
            runner.run_job(job, now=lambda: when + timedelta(minutes=1))
        assert f"held by pid {proc.pid} on " in str(busy.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = f"week-{when:%Y%m%dT%H%M%SZ}-full.dimg"
    assert killed not in w.keys() and "week.running.json" in w.keys()   # its claim, stale
    listing = cli("backup", "list", "week", "--config", w.config, "--json").json["jobs"][0]
    assert [i["name"] for i in listing["images"] if i["restore_point"]] == before
    assert listing["leftovers"] == [f"{w.url}/{killed} (unfinished upload)"]
    assert "(unfinished upload): left by an interrupted run" in cli(
        "backup", "list", "week", "--config", w.config).out
    # the next run: the claim of this host's dead run replaced, the upload aborted
    res = cli("backup", "run", "week", "--config", w.config, "--no-progress")
    assert res.rc == 0, res.err
    assert "replaced the claim of an interrupted run of this host" in res.err
    assert f"removed {w.url}/{killed} (unfinished upload), left by an interrupted run" in res.err
    assert w.uploads() == [] and "week.running.json" not in w.keys()


def test_another_hosts_claim_stops_the_run(s3env):
    w = s3env
    claim = {"host": "backup-host-2", "machine_id": "0" * 32, "pid": 4242,
             "since": "2026-11-30T03:00:00Z", "what": "backup run week", "token": "x"}
    key = f"{w.prefix}/week.running.json"
    w.server.client().put_object(Bucket=w.server.bucket, Key=key, Body=json.dumps(claim))
    try:
        res = cli("backup", "run", "week", "--config", w.config, "--json")
        assert res.rc == 2
        err = json.loads(res.out)["error"]
        assert err["message"].startswith(f"{w.url}/week.running.json: job week is busy: held by "
                                         f"pid 4242 on backup-host-2 since 2026-11-30T03:00:00Z")
        assert f"if that run is gone, delete {w.url}/week.running.json" in err["message"]
        res = cli("backup", "prune", "week", "--config", w.config)
        assert res.rc == 2 and len(res.err_lines) == 1 and "backup-host-2" in res.err
        assert cli("backup", "list", "week", "--config", w.config).rc == 0    # reading: fine
    finally:
        w.server.client().delete_object(Bucket=w.server.bucket, Key=key)


def test_textfile_metrics_of_an_s3_run(s3env, tmp_path):
    w = s3env
    res = cli("backup", "run", "week", "--config", w.config, "--textfile", tmp_path, "--json")
    assert res.rc == 0, res.err
    prom = (tmp_path / "diskimg_backup_week.prom").read_text()
    assert 'diskimg_backup_last_run_success{backup_job="week"} 1' in prom
    if shutil.which("promtool"):
        p = subprocess.run(["promtool", "check", "metrics"], input=prom, text=True,
                           capture_output=True)
        assert p.returncode == 0, p.stdout + p.stderr


def test_a_missing_bucket_is_one_line_exit_2_and_no_secret(s3env, tmp_path):
    config = tmp_path / "jobs.toml"
    config.write_text(s3env.config.read_text().replace(
        f"s3://{s3env.server.bucket}/", "s3://no-such-bucket-here/"))
    for args in (("run", "week"), ("list", "week"), ("check", "week"), ("prune", "week"),
                 ("restore", "week", tmp_path / "t.raw", "--at", "latest")):
        res = cli("--debug", "backup", *args, "--config", config)
        assert res.rc == 2, (args, res.err)
        lines = [ln for ln in res.err_lines if ln.startswith("diskimg: error: ")]
        assert lines == ["diskimg: error: s3://no-such-bucket-here/"
                         f"{s3env.prefix}/: no such bucket 'no-such-bucket-here'"], res.err
        assert SECRET_KEY not in res.out + res.err
    status = (s3env.state / "week.status.json").read_text()
    assert "no such bucket" in status and SECRET_KEY not in status


def test_moto_with_the_endpoint_in_the_job(moto_s3, tmp_path, monkeypatch):
    """A second S3 implementation, reached through the job's own ``endpoint-url``."""
    use_s3(monkeypatch, moto_s3)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(MiB) + bytes(MiB))
    prefix = f"s3://{moto_s3.bucket}/m-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "jobs.toml"
    config.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[jobs.m]
source = "{disk}"
destination = "{prefix}"
endpoint-url = "{moto_s3.endpoint}"
""")
    job = load_config(str(config)).job("m")
    first = runner.run_job(job, now=lambda: T0)
    with open(disk, "r+b") as f:
        f.write(b"changed")
    second = runner.run_job(job, now=lambda: T0 + timedelta(days=1))
    assert (first.level, second.level) == ("full", "incremental")
    res = cli("backup", "restore", "m", tmp_path / "back.raw", "--at", "latest", "--config",
              config, "--no-progress")
    assert res.rc == 0, res.err
    run("cmp", tmp_path / "back.raw", disk)
    # the command line's --endpoint-url wins over the job's
    monkeypatch.setattr("diskimg.store.s3.ATTEMPTS", 2)
    res = cli("backup", "list", "m", "--config", config, "--endpoint-url",
              "http://127.0.0.1:1")
    assert res.rc == 3 and "cannot reach the server" in res.err


def test_timer_of_an_s3_job_waits_for_the_network(s3env, tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    res = cli("backup", "timer", "install", "week", "--config", s3env.config, "--unit-dir", units)
    assert res.rc == 0, res.err
    service = units / "diskimg-backup-week.service"
    text = service.read_text()
    assert "After=network-online.target" in text and "Wants=network-online.target" in text
    assert "EnvironmentFile=-/etc/diskimg/week.env" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    p = subprocess.run(["systemd-analyze", "verify", str(units / "diskimg-backup-week.timer"),
                        str(service)], capture_output=True, text=True)
    assert p.returncode == 0 and "diskimg-backup-week" not in p.stderr, p.stdout + p.stderr
