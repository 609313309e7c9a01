"""The one renderer: how any result becomes JSON."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diskimg.cli.render import to_json


@dataclass(frozen=True)
class Inner:
    offset: int
    length: int


@dataclass(frozen=True)
class Outer:
    path: Path
    ranges: tuple[tuple[int, int], ...]
    inner: tuple[Inner, ...]
    meta: dict
    note: str | None = None


def test_to_json_turns_dataclasses_tuples_and_paths_into_plain_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = to_json(Outer(Path("a.dimg"), ((0, 4096),), (Inner(1, 2),),
                        {"k": (Inner(3, 4),), "p": Path("sub/b")}))
    assert out == {"path": str(tmp_path / "a.dimg"), "ranges": [[0, 4096]],
                   "inner": [{"offset": 1, "length": 2}],
                   "meta": {"k": [{"offset": 3, "length": 4}], "p": str(tmp_path / "sub/b")},
                   "note": None}
    # field order is kept: the JSON lists keys as the result declares them
    assert list(out) == ["path", "ranges", "inner", "meta", "note"]
    assert os.path.isabs(out["path"])
