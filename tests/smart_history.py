"""Simulated days of a real drive: edited copies of recorded smartctl outputs (fixtures/smart),
replayed through tests/fake_smartctl.py.

``Replay(sample, tmp_path)`` copies one sample's recordings into a directory of its own and
points the fake smartctl at it; ``day(**edits)`` rewrites the ``--all`` answer with counters
moved (ATA raw values and normalized values, power-on hours, NVMe health-log lines, self-test
log rows), keeping everything else exactly as the drive printed it.  ``provenance.json`` beside
the copies says what each edit was and where the original came from.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMART = REPO / "fixtures" / "smart"
FAKE = str(REPO / "tests" / "fake_smartctl.py")

_ROW = re.compile(r"^(\s*(\d+) \S+\s+0x[0-9a-f]{4}\s+)(\d+)(\s+\d+\s+\S+\s+\S+\s+\S+\s+\S+\s+)"
                  r"(.*)$")


def edit_ata(text: str, raw: dict[int, object] | None = None,
             value: dict[int, int] | None = None) -> str:
    """Set attribute rows' RAW_VALUE (``raw``) and VALUE (``value``) by id."""
    raw, value = raw or {}, value or {}
    seen = set()
    out = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and int(m.group(2)) in raw.keys() | value.keys():
            num = int(m.group(2))
            seen.add(num)
            v = f"{value[num]:03d}" if num in value else m.group(3)
            r = str(raw[num]) if num in raw else m.group(5)
            line = f"{m.group(1)}{v}{m.group(4)}{r}"
        out.append(line)
    missing = (raw.keys() | value.keys()) - seen
    assert not missing, f"no attribute rows {missing} to edit"
    return "\n".join(out) + "\n"


def edit_field(text: str, fields: dict[str, object]) -> str:
    """Set ``Key:   value`` lines (NVMe health log: "Percentage Used" -> "7%")."""
    for key, val in fields.items():
        text, n = re.subn(rf"^({re.escape(key)}:\s*)\S.*$", lambda m: f"{m.group(1)}{val}",
                          text, count=1, flags=re.M)
        assert n == 1, f"no line {key!r} to edit"
    return text


def add_selftest(text: str, type_: str, status: str, hours: int, lba: str = "-") -> str:
    """Add an entry as #1 of the ATA self-test log, renumbering the older ones."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("Num  Test_Description"))
    j = i + 1
    while j < len(lines) and lines[j].startswith("# "):
        num = int(lines[j][2:4])
        lines[j] = f"# {num + 1:>2}" + lines[j][4:]
        j += 1
    row = f"# 1  {type_:<18}  {status:<28}  00%  {hours:>8}         {lba}"
    lines.insert(i + 1, row)
    return "\n".join(lines) + "\n"


class Replay:
    """One real drive's recording, edited day by day (see the module docstring)."""

    def __init__(self, sample: str, tmp_path: Path, monkeypatch, name: str | None = None):
        self.sample = sample
        self.meta = json.loads((SMART / sample / "meta.json").read_text())
        self.dir = tmp_path / f"replay-{name or sample}"
        self.dir.mkdir()
        for p in (SMART / sample).iterdir():
            if p.name.startswith("_"):
                shutil.copy(p, self.dir / p.name)
        self.answer = next(p for p in self.dir.iterdir() if "--all" in p.name)
        self.original = self.answer.read_text()
        self.state = tmp_path / f"state-{name or sample}"
        self.state.mkdir()
        self.node = tmp_path / ("node-" + (name or sample))
        self.node.touch()
        self.provenance: list[dict] = []
        self.monkeypatch = monkeypatch
        # the fake smartctl runs through "#!/usr/bin/env python3": put this interpreter first
        # on PATH (a pyenv shim costs 0.4 s a call, ten times the replay itself)
        bindir = tmp_path / "python-bin"
        if not bindir.exists():
            bindir.mkdir()
            (bindir / "python3").symlink_to(sys.executable)
            monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        self.activate()

    def activate(self, node: Path | None = None) -> None:
        """Point the fake smartctl at this replay; with ``node``, answer for that node (another
        drive swapped in behind the same name)."""
        if node is not None:
            self.node = node
        mp = self.monkeypatch
        mp.setenv("FAKE_SMARTCTL_DIR", str(self.dir))
        mp.setenv("FAKE_SMARTCTL_STATE", str(self.state))
        mp.setenv("FAKE_SMARTCTL_MAP", f"{self.node}={self.meta['device']}")
        mp.delenv("DISKIMG_SMARTCTL", raising=False)

    def day(self, label: str, raw: dict[int, object] | None = None,
            value: dict[int, int] | None = None, fields: dict[str, object] | None = None,
            selftest: tuple | None = None, text: str | None = None) -> None:
        """Make the next reading the original with these edits."""
        t = self.original if text is None else text
        if raw or value:
            t = edit_ata(t, raw, value)
        if fields:
            t = edit_field(t, fields)
        if selftest:
            t = add_selftest(t, *selftest)
        self.answer.write_text(t)
        self.provenance.append({"reading": label, "raw": {str(k): str(v) for k, v in
                                                           (raw or {}).items()},
                                "value": {str(k): v for k, v in (value or {}).items()},
                                "fields": {k: str(v) for k, v in (fields or {}).items()},
                                "selftest": list(selftest) if selftest else None})
        (self.dir / "provenance.json").write_text(json.dumps({
            "derived_from": self.sample, "source": self.meta.get("source"),
            "source_path": self.meta.get("source_path"), "licence": self.meta.get("licence"),
            "edits": self.provenance}, indent=1))
