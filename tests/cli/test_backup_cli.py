"""`diskimg backup ...` in-process: a job over a regular file (no root needed), its JSON status
and textfile metrics (promtool), exit codes and one-line errors, the lock, the systemd units
(systemd-analyze verify), and that the image commands never import the backup package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from helpers import PYTHON, cli, sha256_of

from diskimg.backup.config import load_config
from diskimg.backup.lock import JobLock

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
    (tmp_path / "dest").mkdir()
    config = tmp_path / "jobs.toml"
    config.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[jobs.files]
source = "{disk}"
destination = "{tmp_path / 'dest'}"
schedule = "*-*-* 03:00"
random-delay = "20min"
keep-last = 2
""")
    return tmp_path, disk, config


def test_run_list_restore_prune_through_the_cli(setup):
    tmp, disk, config = setup
    tf = tmp / "textfile"
    tf.mkdir()
    r = cli("backup", "run", "files", "--config", config, "--json", "--textfile", tf)
    assert r.rc == 0, r.err
    out = json.loads(r.out)
    assert out["ok"] and out["level"] == "full" and out["reason"] == "no restorable full image yet"
    assert out["image"].startswith(str(tmp / "dest" / "files-")) and out["image"].endswith(
        "-full.dimg")
    status = json.loads((tmp / "state" / "files.status.json").read_text())
    assert status["result"] == "success" and status["exit_code"] == 0
    assert status["level"] == "full" and status["bytes_read"] == 4 * MiB
    for key in ("start", "end", "bytes_stored", "image_bytes", "duration_seconds"):
        assert status[key] is not None, key
    assert out["textfile"] == str(tf / "diskimg_backup_files.prom")
    prom = (tf / "diskimg_backup_files.prom").read_text()
    assert 'diskimg_backup_last_run_success{backup_job="files"} 1' in prom
    assert 'diskimg_backup_last_run_level{backup_job="files",level="full"} 1' in prom
    if shutil.which("promtool"):
        p = subprocess.run(["promtool", "check", "metrics"], input=prom, text=True,
                           capture_output=True)
        assert p.returncode == 0, p.stdout + p.stderr
    # change the file, run twice more (the level follows the policy: incrementals)
    with open(disk, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"x" * 1000)
    expected = sha256_of(disk)
    import time
    time.sleep(1.1)     # the image names carry the second
    r = cli("backup", "run", "files", "--config", config)
    assert r.rc == 0 and "files: incremental image" in r.out and "why incremental" in r.out
    listing = cli("backup", "list", "--config", config)
    assert listing.rc == 0
    assert "job files: 2 restore points in" in listing.out
    assert "full" in listing.out and "incremental" in listing.out and "never" in listing.out
    r = cli("backup", "restore", "files", tmp / "back.raw", "--at", "latest", "--config", config,
            "--no-progress")
    assert r.rc == 0, r.err
    assert sha256_of(tmp / "back.raw") == expected
    assert r.out.startswith("restore point ")
    r = cli("backup", "prune", "files", "--keep-last", "1", "--dry-run", "--config", config)
    assert r.rc == 0
    assert "kept as the parent of" in r.out and "0 would remove" in r.out


def test_failed_run_writes_its_status_and_metrics(setup):
    tmp, disk, config = setup
    tf = tmp / "tf"
    tf.mkdir()
    assert cli("backup", "run", "files", "--config", config).rc == 0
    disk.unlink()
    r = cli("backup", "run", "files", "--config", config, "--textfile", tf)
    assert r.rc == 2
    assert r.err.startswith(f"diskimg: error: {disk}: no such device or file")
    status = json.loads((tmp / "state" / "files.status.json").read_text())
    assert status["result"] == "failed" and status["exit_code"] == 2
    assert status["error"].startswith(f"{disk}: no such device")
    assert status["last_success"] is not None     # kept from the run before
    prom = (tf / "diskimg_backup_files.prom").read_text()
    assert 'diskimg_backup_last_run_success{backup_job="files"} 0' in prom
    assert 'diskimg_backup_last_run_exit_code{backup_job="files"} 2' in prom
    assert "diskimg_backup_last_success_timestamp_seconds" in prom


def test_a_second_run_is_told_who_holds_the_job(setup):
    tmp, disk, config = setup
    job = load_config(str(config)).job("files")
    with JobLock(job.state_dir, "files", "backup prune files"):
        r = cli("backup", "run", "files", "--config", config, "--json")
    assert r.rc == 2
    err = json.loads(r.out)["error"]
    assert f"job files is busy: held by pid {os.getpid()} on " in err["message"]
    assert "(backup prune files)" in err["message"]
    assert err["holder"]["pid"] == os.getpid()
    assert not list((tmp / "dest").iterdir())
    # released: the run goes ahead
    assert cli("backup", "run", "files", "--config", config).rc == 0


@pytest.mark.parametrize("body, message", [
    ("[jobs.x]\nsource = 3\n", "jobs.x.source: a device path or a table expected, got 3"),
    ('[jobs.x]\nsource = "/dev/sdb"\ndestination = "ftp://b/x"\n',
     "jobs.x.destination: ftp://b/x: a directory or s3://BUCKET/PREFIX expected"),
    ('[jobs.x]\nsource = "/dev/sdb"\ndestination = "/b"\nendpoint-url = "http://h:1"\n',
     "jobs.x.endpoint-url: only for an s3:// destination"),
    ('[jobs.x]\nsource = "/dev/sdb"\ndestination = "s3://b/x"\n'
     'endpoint-url = "http://k:secret@h:1"\n', "jobs.x.endpoint-url: no credentials in the URL"),
    ('[jobs.x]\nsource = "/dev/sdb"\ndestination = "s3://b/x"\nhealth = "rescue"\n',
     "jobs.x.health: rescue needs a local destination"),
    ("jobs = 3\n", "jobs: a table of jobs expected"),
    ("[jobs.x\n", "not valid TOML"),
])
def test_config_errors_are_one_line_with_exit_2(tmp_path, body, message):
    config = tmp_path / "jobs.toml"
    config.write_text(body)
    r = cli("backup", "list", "--config", config)
    assert r.rc == 2
    assert r.err.startswith(f"diskimg: error: {config}: ") and message in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err


def test_missing_config_job_and_destination(setup, tmp_path):
    tmp, disk, config = setup
    r = cli("backup", "list", "--config", tmp / "nope.toml")
    assert r.rc == 2 and "no such jobs file" in r.err
    r = cli("backup", "run", "other", "--config", config)
    assert r.rc == 2 and "no job named 'other' (jobs: files)" in r.err
    (tmp / "dest").rmdir()
    r = cli("backup", "run", "files", "--config", config)
    assert r.rc == 2 and "the destination directory does not exist (is the backup disk " \
                         "mounted?)" in r.err
    r = cli("backup", "restore", "files", tmp / "t", "--at", "yesterday", "--config", config)
    assert r.rc == 2 and "--at yesterday: 'latest' or an ISO 8601 time expected" in r.err


def test_timer_units_pass_systemd_analyze_verify(setup):
    tmp, disk, config = setup
    units = tmp / "units"
    units.mkdir()
    r = cli("backup", "timer", "install", "files", "--config", config, "--unit-dir", units,
            "--textfile", tmp)
    assert r.rc == 0, r.err
    service = (units / "diskimg-backup-files.service").read_text()
    timer = (units / "diskimg-backup-files.timer").read_text()
    assert "OnCalendar=*-*-* 03:00" in timer and "Persistent=true" in timer
    assert "RandomizedDelaySec=1200" in timer
    assert "Nice=19" in service and "IOSchedulingClass=idle" in service
    assert f"backup run files --config {config} --no-progress --textfile {tmp}" in service
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    p = subprocess.run(["systemd-analyze", "verify", str(units / "diskimg-backup-files.timer"),
                        str(units / "diskimg-backup-files.service")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "diskimg-backup-files" not in p.stderr, p.stderr
    r = cli("backup", "timer", "remove", "files", "--unit-dir", units)
    assert r.rc == 0 and not list(units.iterdir())
    r = cli("backup", "timer", "remove", "files", "--unit-dir", units)
    assert r.rc == 2 and "has no units here" in r.err


def test_a_bad_schedule_is_refused_before_any_unit_is_written(setup):
    tmp, disk, config = setup
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    config.write_text(config.read_text().replace('"*-*-* 03:00"', '"every tuesday"'))
    units = tmp / "units"
    units.mkdir()
    r = cli("backup", "timer", "install", "files", "--config", config, "--unit-dir", units)
    assert r.rc == 2 and "jobs.files.schedule: 'every tuesday' is not a systemd calendar" in r.err
    assert not list(units.iterdir())


def test_image_commands_do_not_import_the_backup_package(tmp_path):
    src = tmp_path / "a.raw"
    src.write_bytes(os.urandom(MiB))
    proc = subprocess.run([PYTHON, "-X", "importtime", "-m", "diskimg", "image", str(src),
                           str(tmp_path / "a.dimg"), "--no-progress"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines()
             if ln.startswith("import time:") and "|" in ln}
    assert "diskimg.ops.imaging" in names
    assert not {n for n in names if n.startswith(("diskimg.backup", "diskimg.cli.backup_"))}


def test_broken_chains_and_cut_images_are_listed_but_no_restore_points(setup):
    tmp, disk, config = setup
    import time
    assert cli("backup", "run", "files", "--config", config).rc == 0
    for _ in range(2):
        time.sleep(1.1)
        assert cli("backup", "run", "files", "--config", config).rc == 0
    full, inc1, inc2 = sorted((tmp / "dest").iterdir())
    assert full.name.endswith("-full.dimg") and inc2.name.endswith("-incremental.dimg")
    # the last image cut short (a copy that stopped), the first one gone
    with open(inc2, "r+b") as f:
        f.truncate(inc2.stat().st_size // 2)   # 10 bytes less: its parity heals that
    listing = cli("backup", "list", "files", "--config", config, "--json").json
    images = {i["name"]: i for i in listing["jobs"][0]["images"]}
    assert images[inc2.name]["restore_point"] is False
    assert images[inc2.name]["problem"].startswith("not complete: ")
    assert listing["jobs"][0]["restore_points"] == 2
    full.unlink()
    text = cli("backup", "list", "files", "--config", config).out
    assert "job files: 0 restore points" in text
    assert f"NOT A RESTORE POINT: chain broken: image " in text
    r = cli("backup", "restore", "files", tmp / "t.raw", "--at", "latest", "--config", config)
    assert r.rc == 2 and "job files has no restore point" in r.err
    # prune leaves what it cannot judge alone; the next run starts a new full
    r = cli("backup", "prune", "files", "--config", config)
    assert r.rc == 0 and f"left    {inc1.name}: not a restore point: chain broken" in r.out
    assert inc1.exists() and inc2.exists()
    r = cli("backup", "run", "files", "--config", config, "--json")
    assert r.json["level"] == "full" and r.json["reason"] == "no restorable full image yet"


def test_check_records_results_and_writes_its_metrics(setup):
    tmp, disk, config = setup
    import time
    assert cli("backup", "run", "files", "--config", config).rc == 0
    time.sleep(1.1)
    assert cli("backup", "run", "files", "--config", config).rc == 0
    tf = tmp / "tf"
    tf.mkdir()
    r = cli("backup", "check", "files", "--sample", "50", "--config", config, "--textfile", tf,
            "--json")
    assert r.rc == 0, r.err
    out = r.json
    # 50% of 2 points: the oldest never verified, the full
    assert out["ok"] and out["chosen"] == [out["checked"][0]["name"]]
    assert out["chosen"][0].endswith("-full.dimg") and out["unverified"] == 1
    prom = (tf / "diskimg_backup_check_files.prom").read_text()
    assert 'diskimg_backup_last_check_images{backup_job="files"} 1' in prom
    assert 'diskimg_backup_unverified_restore_points{backup_job="files"} 1' in prom
    assert 'diskimg_backup_last_check_failed_images{backup_job="files"} 0' in prom
    if shutil.which("promtool"):
        p = subprocess.run(["promtool", "check", "metrics"], input=prom, text=True,
                           capture_output=True)
        assert p.returncode == 0, p.stdout + p.stderr
    # the next sample takes the one never verified, checked with its chain
    r = cli("backup", "check", "files", "--sample", "50", "--config", config, "--json")
    assert r.json["chosen"][0].endswith("-incremental.dimg") and len(r.json["checked"]) == 2
    assert r.json["unverified"] == 0
    listing = cli("backup", "list", "files", "--config", config, "--json").json
    assert all(i["verified"]["ok"] for i in listing["jobs"][0]["images"])
    r = cli("backup", "check", "files", "--sample", "0", "--config", config)
    assert r.rc == 2 and "--sample 0: a percentage above 0" in r.err
