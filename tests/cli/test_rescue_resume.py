"""Resuming a rescue never trusts a mapfile written for another image of the same name: its
claims are about data the partial image does not hold.  (Regular-file source: no faults are
needed to show this.)"""
from __future__ import annotations

import hashlib
import json
import os

from diskimg import format as fmt
from diskimg.cli.main import main
from diskimg.image.imagefile import ImageReader, ImageWriter
from diskimg.ops.mapfile import FINISHED, RescueMap

BS = 64 * 1024


def test_resume_ignores_a_map_left_by_an_earlier_image(tmp_path, capsys):
    src = tmp_path / "src.raw"
    data = os.urandom(20 * BS + 1000)
    src.write_bytes(data)
    image, mapfile = tmp_path / "a.img", tmp_path / "a.img.map"

    # an earlier, finished rescue to the same name leaves a map claiming every byte
    assert main(["image", str(src), str(image), "--rescue", "--block-size", "64K",
                 "--no-progress"]) == 0
    old_map = mapfile.read_text()
    assert RescueMap.loads(old_map, len(data)).totals()[FINISHED] == len(data)
    image.unlink()

    # a later rescue was cut off after storing 3 blocks, before it could save its own map
    header = fmt.Header(uuid="later-run", kind="full", size=len(data), block_size=BS, source={},
                        created="2026-11-24T00:00:00Z", tool_version="t", chain=("later-run",),
                        extra={"rescue": True})
    writer = ImageWriter(str(image), header)
    for b in range(3):
        block = data[b * BS:(b + 1) * BS]
        writer.write_record(b, block, fmt.CODEC_RAW, hashlib.sha256(block).digest())
    writer.close_partial()
    mapfile.write_text(old_map)

    capsys.readouterr()
    assert main(["image", str(src), str(image), "--rescue", "--block-size", "64K",
                 "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resumed"] is True and out["unreadable"] == []
    assert out["read_bytes"] == len(data) - 3 * BS   # everything but the 3 stored blocks
    restored = tmp_path / "out.raw"
    assert main(["restore", str(image), str(restored), "--no-progress"]) == 0
    assert restored.read_bytes() == data
    with ImageReader(str(image)) as r:
        assert r.uuid == "later-run"
