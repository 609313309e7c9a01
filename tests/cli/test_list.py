"""`diskimg list` in-process: runs on whatever this machine has (no root needed)."""
from __future__ import annotations

import json

from diskimg.cli.main import main


def test_list_json_shape(capsys):
    assert main(["list", "--json", "--all"]) == 0
    devices = json.loads(capsys.readouterr().out)
    assert isinstance(devices, list)
    for d in devices:
        for key in ("name", "path", "size", "model", "serial", "wwn", "transport", "rotational",
                    "removable", "logical_sector_size", "physical_sector_size", "backing_file",
                    "partitions", "mountpoints", "smart_available"):
            assert key in d
        assert isinstance(d["size"], int)
        if d["transport"] in ("loop", "ram", "zram", "virtio"):
            assert d["smart_available"] is False


def test_list_text_has_header(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.startswith("NAME")


def test_all_lists_at_least_as_much(capsys):
    main(["list", "--json"])
    some = json.loads(capsys.readouterr().out)
    main(["list", "--json", "--all"])
    every = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in some} <= {d["name"] for d in every}


def test_list_usage_error():
    assert main(["list", "--bogus"]) == 2


def test_natural_device_order():
    from diskimg.devices import natural_key
    names = ["loop10", "sdb", "loop2", "nvme0n1p10", "sda", "nvme0n1p2", "loop1", "nvme1n1",
             "nvme0n1", "sr0"]
    assert sorted(names, key=natural_key) == [
        "loop1", "loop2", "loop10", "nvme0n1", "nvme0n1p2", "nvme0n1p10", "nvme1n1", "sda",
        "sdb", "sr0"]


def test_list_columns_align_with_a_long_backing_file():
    from diskimg.cli.render import list_table as _list_table
    from diskimg.devices import DeviceInfo, PartitionInfo

    def loop(name, backing, label=None):
        return DeviceInfo(
            name=name, path=f"/dev/{name}", size=8 << 20, model=None, serial=None, wwn=None,
            transport="loop", rotational=False, removable=False, read_only=False,
            logical_sector_size=512, physical_sector_size=512, backing_file=backing,
            partitions=(PartitionInfo(f"{name}p1", f"/dev/{name}p1", 1, 1 << 20, 4 << 20,
                                      ("/mnt/a",), "ext4", label, "1234-ABCD", False),),
            fstype=None)
    long_path = "/srv/images/" + "very-long-directory-name/" * 6 + "disk.img"
    text = _list_table([loop("loop2", "/a.img"), loop("loop10", long_path, "a long label")])
    lines = text.splitlines()
    header = lines[0]
    mp = header.index("MOUNTPOINTS")
    assert len(header) > len(long_path)
    for line in lines[1:]:
        # the mountpoints column starts at the same place in every row
        assert line[mp - 1] == " " and line[mp] in "-/", line
    for line in (lines[2], lines[4]):   # partition rows
        assert line[header.index("UUID"):].startswith("1234-ABCD")
        assert line[header.index("FSTYPE"):].startswith("ext4")
