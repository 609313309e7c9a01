"""--force may replace a finished image, never one that a chain on disk depends on: not an
older link of the reference chain (under its own name, a hard link or a symlink), not an
image that a child next to it names as its parent, and not through --rescue either.  Each
refusal is exit 2 and one line naming both paths, and changes nothing."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from helpers import KiB, cli, compressible


def _stamp(paths) -> dict:
    """Bytes and mtimes of the files: what must not change."""
    return {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in paths}


def _one_line(res, *names) -> str:
    lines = res.err.strip().splitlines()
    assert res.rc == 2, res.err
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: "), lines
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def chain(tmp_path):
    """full <- i1 <- i2 of a 1 MiB file that changes between images."""
    rnd = random.Random(10)
    src = tmp_path / "src.raw"
    data = bytearray(compressible(rnd, 1 << 20))
    src.write_bytes(data)
    paths = [tmp_path / n for n in ("full.dimg", "i1.dimg", "i2.dimg")]
    for i, p in enumerate(paths):
        if i:
            data[i * 100 * KiB:i * 100 * KiB + 10] = os.urandom(10)
            src.write_bytes(data)
        extra = ["--incremental", paths[i - 1]] if i else []
        res = cli("image", src, p, "--block-size", "64K", "--no-progress", *extra)
        assert res.rc == 0, res.err
    return src, paths


def test_force_never_replaces_an_older_link_of_the_chain(chain, tmp_path):
    src, (full, i1, i2) = chain
    before = _stamp([full, i1, i2])
    for target in (full, i1):
        res = cli("image", src, target, "--incremental", i2, "--force", "--no-progress")
        line = _one_line(res, target, i2)
        assert "--force never replaces" in line
        assert not Path(str(target) + ".partial").exists()
    assert _stamp([full, i1, i2]) == before


def test_force_never_replaces_the_direct_parent(chain):
    src, (full, i1, i2) = chain
    before = _stamp([full, i1, i2])
    _one_line(cli("image", src, i2, "--incremental", i2, "--force", "--no-progress"), i2)
    # a differential is taken against the root full image; i1 is still in the chain of i2
    _one_line(cli("image", src, i1, "--differential", i2, "--force", "--no-progress"), i1, i2)
    assert _stamp([full, i1, i2]) == before


def test_chain_member_under_another_name(chain, tmp_path):
    """A hard link or a symlink to a chain member is the member: compared by identity."""
    src, (full, i1, i2) = chain
    hard = tmp_path / "hard.dimg"
    os.link(full, hard)
    soft = tmp_path / "soft.dimg"
    soft.symlink_to(full)
    before = _stamp([full, i1, i2])
    for alias in (hard, soft):
        _one_line(cli("image", src, alias, "--incremental", i2, "--force", "--no-progress"),
                  alias, full)
    assert _stamp([full, i1, i2]) == before


def test_force_never_replaces_a_parent_found_next_to_it(chain, tmp_path):
    src, (full, i1, i2) = chain
    before = _stamp([full, i1, i2])
    _one_line(cli("image", src, full, "--force", "--no-progress"), full, i1)
    _one_line(cli("image", src, i1, "--force", "--no-progress"), i1, i2)
    # nor by a rescue, which writes the same way
    _one_line(cli("image", src, full, "--rescue", "--force", "--no-progress"), full, i1)
    assert not Path(str(full) + ".map").exists()
    assert _stamp([full, i1, i2]) == before


def test_force_still_replaces_the_last_image(chain):
    src, (full, i1, i2) = chain
    old = i2.read_bytes()
    res = cli("image", src, i2, "--force", "--no-progress")
    assert res.rc == 0, res.err
    assert i2.read_bytes() != old
    assert cli("info", i2, "--json").json["kind"] == "full"
    assert cli("verify", i1).rc == 0


def test_parent_in_a_search_directory_is_protected(chain, tmp_path):
    src, (full, i1, i2) = chain
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "i2.dimg"
    os.rename(i2, moved)
    before = _stamp([full, i1, moved])
    # i1 has no child next to it any more, but one in the search directory
    _one_line(cli("image", src, i1, "--force", "--search", elsewhere, "--no-progress"),
              i1, moved)
    assert _stamp([full, i1, moved]) == before
