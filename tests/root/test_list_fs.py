"""`diskimg list` shows what `lsblk -f` users expect (FSTYPE, LABEL, UUID, RO, [SWAP]) on real loop
devices: an ext4 with a label, an active swap and a read-only loop."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import MiB, cli, run

pytestmark = pytest.mark.root


@pytest.fixture
def three_loops(loops, tmp_path):
    ext, _ = loops.create(16 * MiB, "ext")
    run("mkfs.ext4", "-q", "-F", "-L", "my data", ext)
    swap, _ = loops.create(8 * MiB, "swap")
    run("mkswap", "-L", "myswap", swap)
    ro_backing = tmp_path / "ro.img"
    with open(ro_backing, "wb") as f:
        f.truncate(4 * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", "frozen", str(ro_backing))
    ro = loops.attach(ro_backing, "-r")
    return ext, swap, ro


def _uuid(dev: str) -> str:
    return run("blkid", "-p", "-s", "UUID", "-o", "value", dev).stdout.strip()


def test_list_shows_fstype_label_uuid_ro_and_swap(three_loops):
    ext, swap, ro = three_loops
    run("swapon", swap)
    try:
        res = cli("list", "--json")
        assert res.rc == 0
        rows = {d["path"]: d for d in res.json}
        text = cli("list").out
    finally:
        run("swapoff", swap)
    e, s, r = rows[ext], rows[swap], rows[ro]
    assert (e["fstype"], e["label"], e["uuid"], e["ro"]) == ("ext4", "my data", _uuid(ext), False)
    assert (s["fstype"], s["label"], s["uuid"]) == ("swap", "myswap", _uuid(swap))
    assert s["mountpoints"] == ["[SWAP]"] and s["ro"] is False
    assert (r["fstype"], r["label"], r["ro"]) == ("ext4", "frozen", True)
    assert r["read_only"] is True and e["mountpoints"] == []

    lines = text.splitlines()
    header = lines[0]
    for col in ("FSTYPE", "LABEL", "UUID", "RO", "MOUNTPOINTS"):
        assert col in header.split()
    by_name = {ln.split()[0]: ln for ln in lines[1:] if not ln.startswith(" ")}
    swap_line = by_name[Path(swap).name]
    assert swap_line.rstrip().endswith("[SWAP]") and "myswap" in swap_line
    # every row's UUID and FSTYPE start in the header's column (aligned for any width)
    for dev in (ext, swap, ro):
        line = by_name[Path(dev).name]
        assert line[header.index("FSTYPE"):].startswith(rows[dev]["fstype"])
        assert line[header.index("UUID"):].startswith(rows[dev]["uuid"])
        ro_cell = line[header.index("RO "):].split()[0]
        assert ro_cell == ("1" if dev == ro else "0")
    assert "my data" in by_name[Path(ext).name]


def test_partitions_carry_the_same_fields(loops, tmp_path):
    dev, _ = loops.create(32 * MiB, "parted")
    run("sfdisk", "-q", dev, input="label: gpt\n,8M\n,8M\n")
    run("partx", "-u", dev, check=False)
    run("mkfs.ext4", "-q", "-F", "-L", "first", dev + "p1")
    run("mkswap", dev + "p2")
    res = cli("list", "--json")
    row = {d["path"]: d for d in res.json}[dev]
    p1, p2 = row["partitions"]
    assert (p1["fstype"], p1["label"], p1["uuid"], p1["ro"]) == ("ext4", "first",
                                                                  _uuid(dev + "p1"), False)
    assert p2["fstype"] == "swap" and p2["uuid"] == _uuid(dev + "p2")
    assert row["fstype"] is None   # a partition table is not a filesystem
    json.dumps(res.json)
