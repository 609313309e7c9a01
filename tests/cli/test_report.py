"""`diskimg report` (issue 17): one self-contained HTML page of disk health over time and block
maps of images, rendered by a real browser (headless Chromium, Debian package chromium): the
screenshot is not blank and the page text holds each disk's serial and verdict."""
from __future__ import annotations

import dataclasses
import random
import shutil
import struct
import subprocess
import zlib
from datetime import datetime
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.cli.main import main
from diskimg.report.html import block_map
from helpers import KiB, MiB, cli, compressible
from imagecraft import rewrite_index
from smart_history import FAKE, Replay

# the block-map test rewrites an index in place (imagecraft), in the layout of images without
# parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

DAY = 86400
T0 = datetime(2026, 6, 1, 10, 30).timestamp()
SERIALS = {"E13": "PN1234P8JG4ABC", "E26": "S4TEST26NVME"}


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (Debian package chromium)")
    return exe


def _browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, decompressed scanlines) of a PNG: enough to see whether it is blank."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A directory with a full image and an incremental one of a 4 MiB file (random, zero and
    compressible parts; 256 KiB changed in between)."""
    d = tmp_path_factory.mktemp("images")
    rnd = random.Random(17)
    src = d.parent / "disk.raw"
    src.write_bytes(rnd.randbytes(MiB) + bytes(MiB) + compressible(rnd, 2 * MiB))
    assert cli("image", src, d / "full.dimg", "--block-size", "64K", "--no-progress").rc == 0
    with open(src, "r+b") as f:
        f.seek(3 * MiB)
        f.write(rnd.randbytes(256 * KiB))
    res = cli("image", src, d / "incr.dimg", "--incremental", d / "full.dimg", "--block-size",
              "64K", "--no-progress")
    assert res.rc == 0, res.err
    return d


def test_block_map_kinds(images, tmp_path):
    full = block_map(str(images / "full.dimg"))
    assert (full.blocks, full.kind) == (64, "full")
    assert full.counts["stored"] == 48 and full.counts["zero"] == 16
    assert full.cells[:16] == ("stored",) * 16 and full.cells[16:32] == ("zero",) * 16
    incr = block_map(str(images / "incr.dimg"))
    assert incr.counts["changed"] == 4 and incr.counts["unchanged"] == 60
    assert incr.cells[48:52] == ("changed",) * 4
    # a rescued image: block 3 unreadable (flag set in the index, CRCs and digests rewritten)
    rescued = tmp_path / "rescued.dimg"
    shutil.copy(images / "full.dimg", rescued)

    def mark(entries):
        entries[3] = dataclasses.replace(entries[3], flags=fmt.FLAG_UNREADABLE)
        return entries
    rewrite_index(rescued, mark)
    m = block_map(str(rescued), cells=16)           # 4 blocks a cell: one bad block marks it
    assert m.counts["unreadable"] == 1 and m.cells[0] == "unreadable"
    assert m.cells[1:4] == ("stored",) * 3


def test_report_in_headless_chromium(images, tmp_path, monkeypatch, capsys):
    exe = _chromium()
    db = tmp_path / "health.db"
    for sample, node_fields in (("E13", {}), ("E26", {"Power On Hours": "24,125"})):
        r = Replay(sample, tmp_path, monkeypatch)
        for d in range(3):
            fields = {"Serial Number": SERIALS[sample]}
            if sample == "E13":
                r.day(f"day {d}", raw={9: 60013 + 24 * d, 194: f"{40 + d} (Min/Max 25/53)"},
                      fields=fields)
            else:
                r.day(f"day {d}", fields=dict(fields, **{"Percentage Used": f"{2 + d}%"}))
            assert main(["monitor", "--once", "--db", str(db), "--smartctl", FAKE, "--now",
                         str(T0 + d * DAY), str(r.node)]) in (0, 1)
    capsys.readouterr()
    out = tmp_path / "report.html"
    rc = main(["report", str(images), "--db", str(db), "--out", str(out), "--now",
               str(T0 + 3 * DAY)])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"wrote {out}: 2 disk(s), 2 image(s)")
    page = out.read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not [x for x in ("src=\"http", "href=\"http", "url(", "@import", "<script")
                if x in page]

    dom = _browser(exe, tmp_path / "profile1", "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    for serial in SERIALS.values():
        assert serial in text
    assert '<span class="v v-WARN">WARN</span></td><td>' in text    # E13 in the summary
    assert '<span class="v v-PASS">PASS</span></td><td>' in text    # E26
    assert text.count('class="blockmap"') == 2 and "incr.dimg" in text

    shot = tmp_path / "shot.png"
    res = _browser(exe, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1000,1400",
                   "--hide-scrollbars", out.as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1000, 1400)
    # a blank page is one colour: a rendered report has text, badges, charts (many colours)
    assert len(set(pixels)) > 50
    assert pixels.count(0xff) < 0.97 * len(pixels)


def test_report_errors(images, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(images / "full.dimg"), "--db", str(tmp_path / "none.db"),
                 "--out", str(out)]) == 2
    assert "no health history here" in capsys.readouterr().err
    assert not out.exists()
    junk = tmp_path / "junk.dimg"
    junk.write_bytes(b"not an image" * 100)
    rc = main(["report", str(images / "full.dimg"), str(junk), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and out.exists()
    assert lines[0].startswith(f"wrote {out}: ") and "1 image(s)" in lines[0]
    assert lines[1].startswith(f"  {junk}: ")
    assert str(junk) in out.read_text()
