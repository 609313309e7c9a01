"""Replay recorded smartctl outputs through tests/fake_smartctl.py (see its docstring)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMART = REPO / "fixtures" / "smart"
FAKE = REPO / "tests" / "fake_smartctl.py"


class SmartSample:
    """Points the fake smartctl at one sample; ``node(dev)`` is a path on this machine that the
    fake answers for as if it were the recorded device ``dev``."""

    def __init__(self, name: str, tmp_path: Path, monkeypatch) -> None:
        self.dir = SMART / name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.state = tmp_path / "smartctl-state"
        self.state.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.smartctl = str(FAKE)
        self.map: dict[str, str] = {}
        monkeypatch.setenv("FAKE_SMARTCTL_DIR", str(self.dir))
        monkeypatch.setenv("FAKE_SMARTCTL_STATE", str(self.state))
        monkeypatch.delenv("DISKIMG_SMARTCTL", raising=False)

    def node(self, dev: str | None = None) -> str:
        dev = dev or self.meta["device"]
        path = self.tmp_path / ("node" + dev.replace("/", "_"))
        path.touch()
        self.map[str(path)] = dev
        self.monkeypatch.setenv("FAKE_SMARTCTL_MAP",
                                ";".join(f"{k}={v}" for k, v in self.map.items()))
        return str(path)

    def calls(self) -> list[str]:
        log = self.state / "calls.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def smart_sample(tmp_path, monkeypatch):
    def make(name: str) -> SmartSample:
        return SmartSample(name, tmp_path, monkeypatch)
    return make
