"""`diskimg image` checks the source's health first: a real loop device answered for by the fake
smartctl replaying recorded drives (E01 healthy, E04 failing), through the real pySMART."""
from __future__ import annotations

from pathlib import Path

import pytest

from diskimg.cli.main import main

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _fake_smartctl(monkeypatch, tmp_path, sample: str, dev: str) -> None:
    state = tmp_path / "smartctl-state"
    state.mkdir()
    monkeypatch.setenv("DISKIMG_SMARTCTL", str(REPO / "tests" / "fake_smartctl.py"))
    monkeypatch.setenv("FAKE_SMARTCTL_DIR", str(REPO / "fixtures" / "smart" / sample))
    monkeypatch.setenv("FAKE_SMARTCTL_STATE", str(state))
    monkeypatch.setenv("FAKE_SMARTCTL_MAP", f"{dev}=/dev/sda")


def test_failing_source_gets_its_verdict_and_the_rescue_advice(loops, tmp_path, monkeypatch,
                                                               capsys):
    dev, backing = loops.create(4 << 20)
    _fake_smartctl(monkeypatch, tmp_path, "E04", dev)
    assert main(["image", dev, str(tmp_path / "a.img"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"health of {dev}: FAIL" in err
    assert "reading it may hit bad sectors" in err and "--rescue" in err
    assert (tmp_path / "a.img").exists()


def test_healthy_source_gets_one_pass_line(loops, tmp_path, monkeypatch, capsys):
    dev, backing = loops.create(4 << 20)
    _fake_smartctl(monkeypatch, tmp_path, "E01", dev)
    assert main(["image", dev, str(tmp_path / "a.img"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"health of {dev}: PASS" in err
    assert "bad sectors" not in err


def test_loop_device_without_smart_images_quietly(loops, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISKIMG_SMARTCTL", raising=False)
    dev, backing = loops.create(4 << 20)
    assert main(["image", dev, str(tmp_path / "a.img"), "--no-progress"]) == 0
    assert "health of" not in capsys.readouterr().err
