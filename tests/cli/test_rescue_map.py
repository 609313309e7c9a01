"""The mapfile a completed rescue leaves names its image (path and UUID) and says it is complete,
as the README promises, and stays a map GNU ddrescue's tools read.  (Regular-file source.)"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers import cli

from diskimg.ops.mapfile import FINISHED, RescueMap


def test_completed_rescue_map_names_its_image(tmp_path):
    src = tmp_path / "src.raw"
    data = os.urandom(10 * 65536 + 1000)
    src.write_bytes(data)
    image = tmp_path / "a.img"
    res = cli("image", src, image, "--rescue", "--block-size", "64K", "--json")
    assert res.rc == 0, res.err
    mapfile = tmp_path / "a.img.map"
    assert res.json["mapfile"] == str(mapfile)
    assert not (tmp_path / "a.img.partial").exists()
    uuid = cli("info", image, "--json").json["uuid"]
    text = mapfile.read_text()
    comments = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert f"# diskimg-image: {image}" in comments
    assert f"# diskimg-image-uuid: {uuid}" in comments
    assert "# diskimg-status: complete" in comments
    assert not any("partial" in ln for ln in comments)
    assert RescueMap.loads(text, len(data)).totals()[FINISHED] == len(data)


@pytest.mark.skipif(not shutil.which("ddrescuelog"), reason="GNU ddrescue not installed")
def test_ddrescuelog_reads_the_final_map(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * 65536))
    assert cli("image", src, tmp_path / "b.img", "--rescue", "--block-size", "64K").rc == 0
    proc = subprocess.run(["ddrescuelog", "-t", str(tmp_path / "b.img.map")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "100" in proc.stdout   # rescued: 100%
