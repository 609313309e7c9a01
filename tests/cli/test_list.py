"""`diskimg list` in-process: runs on whatever this machine has (no root needed)."""
from __future__ import annotations

import json

from diskimg.cli import main


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
