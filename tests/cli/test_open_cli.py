"""mount, umount, export and serve refusing what they must refuse, with one error line and the
documented exit code; export of a small file image (no root needed); what `mount` imports."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, MiB, cli

from diskimg.ops.imagedisk import ImageDisk


def _image(tmp_path: Path) -> tuple[Path, Path]:
    """A 3 MiB + 4 KiB source: data, a zero run, data, a short last block."""
    src = tmp_path / "src.raw"
    data = os.urandom(MiB) + bytes(MiB) + os.urandom(MiB) + os.urandom(4096)
    src.write_bytes(data)
    img = tmp_path / "src.dimg"
    r = cli("image", src, img, "--no-progress")
    assert r.rc == 0, r.err
    return src, img


def _error(r, code: int, *words: str) -> str:
    assert r.rc == code, (r.rc, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: "), r.err
    for w in words:
        assert str(w) in lines[0], lines[0]
    return lines[0]


def test_extents_and_no_partitions(tmp_path):
    src, img = _image(tmp_path)
    with ImageDisk(str(img)) as disk:
        ext = [(e.offset, e.length, e.zero) for e in disk.extents()]
        assert ext == [(0, MiB, False), (MiB, MiB, True), (2 * MiB, MiB + 4096, False)]
        assert disk.partitions() == []
        assert disk.read(MiB - 10, 20) == src.read_bytes()[MiB - 10:MiB + 10]


@pytest.mark.parametrize("foreground", [True, False])
def test_mount_refusals(tmp_path, foreground):
    _, img = _image(tmp_path)
    fg = ["--foreground"] if foreground else []
    _error(cli("mount", img, tmp_path / "nowhere", *fg), 2, "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _error(cli("mount", img, full, *fg), 2, "not empty")
    empty = tmp_path / "empty"
    empty.mkdir()
    _error(cli("mount", tmp_path / "src.raw", empty, *fg), 2, "src.raw")
    assert os.listdir(empty) == []


def test_umount_refusals(tmp_path):
    _error(cli("umount", tmp_path), 2, "not mounted")


def test_export_raw_and_qcow2_json(tmp_path):
    src, img = _image(tmp_path)
    out = tmp_path / "out.raw"
    r = cli("export", img, out, "--format", "raw", "--json")
    assert r.rc == 0, r.err
    j = r.json
    assert j["ok"] and j["format"] == "raw" and j["size"] == src.stat().st_size
    assert j["data_bytes"] == 2 * MiB + 4096 and j["zero_bytes"] == MiB
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 <= 2 * MiB + 2 * 4096 + 65536    # the zero MiB is a hole
    r = cli("export", img, tmp_path / "out.qcow2", "-O", "qcow2", "--no-progress")
    assert r.rc == 0, r.err
    head = (tmp_path / "out.qcow2").read_bytes()[:8]
    assert head == b"QFI\xfb\x00\x00\x00\x03"


def test_export_refusals(tmp_path):
    _, img = _image(tmp_path)
    out = tmp_path / "exists.raw"
    out.write_text("keep")
    _error(cli("export", img, out, "--format", "raw"), 2, out, "--force")
    assert out.read_text() == "keep"
    _error(cli("export", img, tmp_path, "--format", "raw"), 2, "directory")
    r = cli("export", img, tmp_path / "x", "--format", "vdi")
    assert r.rc == 2 and "invalid choice" in r.err
    assert not list(tmp_path.glob("*.partial"))


def test_serve_refusals(tmp_path):
    _, img = _image(tmp_path)
    taken = tmp_path / "sock"
    taken.write_text("")
    _error(cli("serve", img, "--nbd", taken), 2, "exists")
    _error(cli("serve", img, "--nbd", "127.0.0.1:99999"), 2, "port")
    _error(cli("serve", tmp_path / "nothing.dimg", "--nbd", tmp_path / "s"), 2, "nothing.dimg")


def test_mount_imports_fuse_only_when_mounting(tmp_path):
    """`export` and `info` do not import mfusepy; `mount --help` imports no library code."""
    _, img = _image(tmp_path)

    def imported(*argv: str) -> set[str]:
        proc = subprocess.run([PYTHON, "-X", "importtime", "-m", "diskimg", *argv],
                              capture_output=True, text=True, cwd=tmp_path)
        return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert not {"mfusepy", "diskimg.ops.mount", "zstandard"} & imported("mount", "--help")
    got = imported("export", str(img), str(tmp_path / "o.raw"), "-O", "raw")
    assert "diskimg.ops.export" in got and not {"mfusepy", "diskimg.ops.mount"} & got
    assert not {"mfusepy", "diskimg.ops.export", "diskimg.ops.nbd"} & imported("info", str(img))
