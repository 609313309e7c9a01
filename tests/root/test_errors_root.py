"""Issue 10, errors part, on a real loop device: a broken smartctl does not stop imaging."""
from __future__ import annotations

import os

import pytest
from helpers import MiB, cli, cmp_same

pytestmark = pytest.mark.root


def test_broken_smartctl_warns_once_and_imaging_goes_on(loops, tmp_path, monkeypatch):
    backing = tmp_path / "disk.raw"
    backing.write_bytes(os.urandom(4 * MiB))
    dev = loops.attach(backing)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smartctl = bindir / "smartctl"
    smartctl.write_text("#!/bin/sh\necho 'garbage line one'\nexit 3\n")
    smartctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("DISKIMG_SMARTCTL", raising=False)
    r = cli("image", dev, tmp_path / "a.dimg", "--no-progress")
    assert r.rc == 0, r.err
    assert r.err_lines == [f"diskimg: warning: no health check of {dev} before imaging: "
                           f"smartctl at {smartctl} failed: exit 3: garbage line one"]
    assert cli("restore", tmp_path / "a.dimg", tmp_path / "out.raw", "--yes").rc == 0
    cmp_same(backing, tmp_path / "out.raw")
