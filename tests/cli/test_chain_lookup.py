"""Chain lookup: a parent is looked for next to the child, next to every image of the chain found
so far, and in every --search directory, by name and by UUID."""
from __future__ import annotations

import os
import shutil

import pytest
from helpers import cli

BS = 64 << 10


@pytest.fixture
def three_states(tmp_path):
    """full.img <- inc1.img <- inc2.img of a 2 MiB file, all in dir A; returns (A, states)."""
    a = tmp_path / "A"
    a.mkdir()
    src = tmp_path / "source.raw"
    data = bytearray(os.urandom(2 << 20))
    states = []
    for i, name in enumerate(("full.img", "inc1.img", "inc2.img")):
        if i:
            data[i * 5 * BS:i * 5 * BS + 100] = os.urandom(100)
        src.write_bytes(data)
        extra = ["--incremental", a / ("full.img" if i == 1 else "inc1.img")] if i else []
        res = cli("image", src, a / name, "--block-size", "64K", *extra)
        assert res.rc == 0, res.err
        states.append(bytes(data))
    return a, states


@pytest.mark.parametrize("renamed", [False, True])
def test_grandparent_beside_the_child_when_the_parent_is_in_a_search_dir(tmp_path, three_states,
                                                                          renamed):
    a, states = three_states
    b = tmp_path / "B"
    b.mkdir()
    # the parent moved away (renamed too: found by UUID); the grandparent stayed beside the child
    shutil.move(a / "inc1.img", b / ("tuesday.img" if renamed else "inc1.img"))
    res = cli("verify", a / "inc2.img", "--search", b, "--json")
    assert res.rc == 0, res.err
    assert [os.path.dirname(c["path"]) for c in res.json["chain"]] == [str(a), str(b), str(a)]
    out = tmp_path / "out.raw"
    res = cli("restore", a / "inc2.img", out, "--search", b)
    assert res.rc == 0, res.err
    assert out.read_bytes() == states[2]


def test_grandparent_beside_the_parent_in_the_search_dir(tmp_path, three_states):
    a, states = three_states
    b = tmp_path / "B"
    b.mkdir()
    shutil.move(a / "inc1.img", b / "inc1.img")
    shutil.move(a / "full.img", b / "monday.img")   # found by UUID next to the parent
    res = cli("restore", a / "inc2.img", tmp_path / "out.raw", "--search", b)
    assert res.rc == 0, res.err
    assert (tmp_path / "out.raw").read_bytes() == states[2]
