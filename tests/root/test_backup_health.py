"""The health gate before a backup run: a real loop device answered for by the fake smartctl
replaying recorded drives (E04 failing, E01 healthy), through the real pySMART."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, sha256_of

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _fake_smartctl(monkeypatch, tmp_path, sample: str, dev: str) -> None:
    state = tmp_path / "smartctl-state"
    state.mkdir(exist_ok=True)
    monkeypatch.setenv("DISKIMG_SMARTCTL", str(REPO / "tests" / "fake_smartctl.py"))
    monkeypatch.setenv("FAKE_SMARTCTL_DIR", str(REPO / "fixtures" / "smart" / sample))
    monkeypatch.setenv("FAKE_SMARTCTL_STATE", str(state))
    monkeypatch.setenv("FAKE_SMARTCTL_MAP", f"{dev}=/dev/sda")


def _job(tmp_path, dev: str, health: str) -> Path:
    (tmp_path / "dest").mkdir(exist_ok=True)
    config = tmp_path / "jobs.toml"
    config.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[jobs.disk]
source = "{dev}"
destination = "{tmp_path / 'dest'}"
health = "{health}"
""")
    return config


def test_fail_verdict_stops_the_run_and_says_why(loops, tmp_path, monkeypatch):
    dev, _ = loops.create(4 << 20)
    _fake_smartctl(monkeypatch, tmp_path, "E04", dev)
    config = _job(tmp_path, dev, "stop")
    r = cli("backup", "run", "disk", "--config", config)
    assert r.rc == 1
    assert r.err.startswith(f"diskimg: error: {dev}: health FAIL, job disk not run (")
    assert 'health = "rescue"' in r.err
    assert not list((tmp_path / "dest").iterdir())
    status = json.loads((tmp_path / "state" / "disk.status.json").read_text())
    assert status["result"] == "failed" and status["exit_code"] == 1
    assert "health FAIL" in status["error"]


def test_fail_verdict_switches_to_a_rescue_when_the_job_says_so(loops, tmp_path, monkeypatch):
    dev, backing = loops.create(4 << 20)
    with open(backing, "r+b") as f:
        f.write(b"data" * 100000)
    _fake_smartctl(monkeypatch, tmp_path, "E04", dev)
    config = _job(tmp_path, dev, "rescue")
    r = cli("backup", "run", "disk", "--config", config, "--no-progress")
    assert r.rc == 0, r.err
    assert f"health of {dev}: FAIL: making a full rescue image" in r.err
    assert "rescue image (health FAIL): 0 bytes unreadable" in r.out
    listing = cli("backup", "list", "disk", "--config", config, "--json")
    image = json.loads(listing.out)["jobs"][0]["images"][0]
    assert image["level"] == "full" and image["rescue"] and image["restore_point"]
    r = cli("backup", "restore", "disk", tmp_path / "back.raw", "--at", "latest",
            "--config", config, "--no-progress")
    assert r.rc == 0, r.err
    assert sha256_of(tmp_path / "back.raw") == sha256_of(backing)


def test_healthy_disk_passes_the_gate(loops, tmp_path, monkeypatch):
    dev, _ = loops.create(4 << 20)
    _fake_smartctl(monkeypatch, tmp_path, "E01", dev)
    config = _job(tmp_path, dev, "stop")
    r = cli("backup", "run", "disk", "--config", config, "--json")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["health"] == "PASS"
