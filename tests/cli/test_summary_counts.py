"""The counts in a summary add up: stored + zero + unused + unchanged = blocks, in `image`'s text
and JSON and in `info`, for full, incremental, differential, rescue and sparse-file images; and
`changed` is the blocks that differ from the parent."""
from __future__ import annotations

import os
import re

import pytest
from helpers import cli

BS = 64 << 10
KINDS = ("stored_blocks", "zero_blocks", "unused_blocks", "unchanged_blocks")


def assert_adds_up(res_json: dict, info: dict, text: str, parent: bool) -> None:
    for d in (res_json, info):
        assert sum(d[k] for k in KINDS) == d["blocks"], d
        if parent:
            # changed: stored blocks, plus zero/unused ones that were not zeros in the parent
            assert d["changed_blocks"] == d["blocks"] - d["unchanged_blocks"] \
                - d["unchanged_zero_blocks"]
            assert d["changed_blocks"] >= d["stored_blocks"]
        else:
            assert d["changed_blocks"] == d["blocks"] and d["unchanged_blocks"] == 0
    for k in (*KINDS, "changed_blocks", "unchanged_zero_blocks", "blocks"):
        assert res_json[k] == info[k], k
    m = re.search(r"blocks: (\d+) x \S+ \S+ = stored (\d+) \+ zero (\d+) \+ unused (\d+)"
                  r"(?: \+ unchanged (\d+))?", text)
    assert m, text
    nums = [int(x or 0) for x in m.groups()]
    assert nums[0] == sum(nums[1:]) == res_json["blocks"]
    if parent:
        assert f"changed: {res_json['changed_blocks']} of {res_json['blocks']} blocks differ " \
               f"from the parent" in text


def image(*args) -> tuple[dict, str, dict]:
    """(JSON result, text summary, info --json) of one image made twice (text, then JSON)."""
    path = args[1]
    text = cli("image", *args, "--block-size", "64K")
    assert text.rc == 0, text.err
    res = cli("image", *args, "--block-size", "64K", "--json", "--force")
    assert res.rc == 0, res.err
    return res.json, text.out, cli("info", path, "--json").json


def test_counts_add_up_for_every_kind(tmp_path):
    src = tmp_path / "src.raw"
    # data, zero blocks, data, a sparse tail (holes are not read)
    data = bytearray(os.urandom(10 * BS) + bytes(6 * BS) + os.urandom(4 * BS + 100))
    src.write_bytes(data)
    with open(src, "r+b") as f:
        f.truncate(len(data) + 12 * BS)
    full, text, info = image(src, tmp_path / "full.img")
    assert_adds_up(full, info, text, parent=False)
    assert full["zero_blocks"] >= 6 + 11

    # change two data blocks, zero one, write into a former zero block and into the hole
    with open(src, "r+b") as f:
        for off, chunk in ((1 * BS, b"x" * 10), (3 * BS, b"y" * 10), (2 * BS, bytes(BS)),
                           (12 * BS, b"z" * 10), (len(data) + 5 * BS, b"w" * 10)):
            f.seek(off)
            f.write(chunk)
    inc, text, info = image(src, tmp_path / "inc.img", "--incremental", tmp_path / "full.img")
    assert_adds_up(inc, info, text, parent=True)
    assert inc["changed_blocks"] == 5 and inc["stored_blocks"] == 4
    assert inc["unchanged_zero_blocks"] > 0      # the untouched zero blocks and holes

    with open(src, "r+b") as f:
        f.seek(7 * BS)
        f.write(b"v" * 10)
    diff, text, info = image(src, tmp_path / "diff.img", "--differential", tmp_path / "inc.img")
    assert_adds_up(diff, info, text, parent=True)
    assert diff["changed_blocks"] == 6

    inc2, text, info = image(src, tmp_path / "inc2.img", "--incremental", tmp_path / "inc.img")
    assert_adds_up(inc2, info, text, parent=True)
    assert inc2["changed_blocks"] == 1

    resc, text, info = image(src, tmp_path / "resc.img", "--rescue")
    assert_adds_up(resc, info, text, parent=False)
    assert info["rescue"] is True and info["all_blocks"] is True


def test_info_of_an_image_made_before_the_rule(tmp_path):
    """Older images counted zero blocks that were zeros in the parent as unchanged too; info
    recovers the split from the sum."""
    from diskimg.image.imagefile import block_counts
    old = {"stored_blocks": 1, "zero_blocks": 50, "unused_blocks": 0, "unchanged_blocks": 95,
           "changed_blocks": 1}
    c = block_counts(96, old, has_parent=True)
    assert (c["unchanged_blocks"], c["unchanged_zero_blocks"], c["changed_blocks"]) == (45, 50, 1)
    assert sum(c[k] for k in KINDS) == 96


@pytest.mark.parametrize("all_blocks", [False, True])
def test_info_shows_contents_level_and_completion(tmp_path, all_blocks):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(3 * BS))
    img = tmp_path / "a.img"
    extra = ["--all-blocks"] if all_blocks else []
    assert cli("image", src, img, "--level", "7", *extra).rc == 0
    info = cli("info", img, "--json").json
    assert info["rescue"] is False and info["all_blocks"] is all_blocks
    assert info["compression_level"] == 7
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["completed"])
    text = cli("info", img).out
    assert "zstd level 7" in text and f"completed:   {info['completed']}" in text
    assert ("all blocks" if all_blocks else "used blocks") in text
