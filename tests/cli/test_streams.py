"""Images as streams: `diskimg image SRC -` writes the image to standard output front to back,
`diskimg restore - TARGET` reads it from standard input, checking each block as it arrives.
Run as real processes joined by real pipes."""
from __future__ import annotations

import json
import os
import subprocess

from helpers import PYTHON, cli

MiB = 1 << 20


def _diskimg(*args, stdin=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "diskimg", *map(str, args)], stdin=stdin,
                          stdout=stdout, stderr=subprocess.PIPE)


def _source(path, size=8 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(6 * MiB)
        f.write(b"x" * MiB)
    return path


def test_image_to_stdout_is_the_image_file(tmp_path):
    src = _source(tmp_path / "src.raw")
    with open(tmp_path / "s.dimg", "wb") as out:
        r = _diskimg("image", src, "-", "--block-size", "64K", stdout=out)
    assert r.returncode == 0, r.stderr
    assert b"full image - of" in r.stderr          # the summary goes to stderr
    assert cli("verify", tmp_path / "s.dimg").rc == 0
    # piped straight into a restore
    a = subprocess.Popen([PYTHON, "-m", "diskimg", "image", str(src), "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    b = _diskimg("restore", "-", tmp_path / "out.raw", stdin=a.stdout)
    a.stdout.close()
    assert a.wait() == 0 and b.returncode == 0, b.stderr
    assert (tmp_path / "out.raw").read_bytes() == src.read_bytes()


def test_incremental_to_stdout_with_its_parent_reachable(tmp_path):
    src = _source(tmp_path / "src.raw")
    assert cli("image", src, tmp_path / "full.dimg").rc == 0
    with open(src, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(1000))
    with open(tmp_path / "inc.dimg", "wb") as out:
        r = _diskimg("image", src, "-", "--incremental", tmp_path / "full.dimg", stdout=out)
    assert r.returncode == 0, r.stderr
    res = cli("restore", tmp_path / "inc.dimg", tmp_path / "out.raw")
    assert res.rc == 0, res.err
    assert (tmp_path / "out.raw").read_bytes() == src.read_bytes()
    # restored from a stream, its parent found in --search (by UUID: renamed there)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "full.dimg").rename(elsewhere / "monday.dimg")
    with open(tmp_path / "inc.dimg", "rb") as f:
        r = _diskimg("restore", "-", tmp_path / "none.raw", stdin=f)
    assert r.returncode == 2 and b"parent image" in r.stderr    # refused before writing
    assert not (tmp_path / "none.raw").exists()
    target = tmp_path / "old.raw"
    target.write_bytes(os.urandom(8 * MiB))
    with open(tmp_path / "inc.dimg", "rb") as f:
        r = _diskimg("restore", "-", target, "--yes", "--search", elsewhere, "--json", stdin=f)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == src.read_bytes()
    assert json.loads(r.stdout)["chain_paths"] == [str(elsewhere / "monday.dimg"), "-"]


def test_restore_from_stdin_zeroes_what_the_index_says(tmp_path):
    src = _source(tmp_path / "src.raw")
    assert cli("image", src, tmp_path / "s.dimg", "--block-size", "64K", "--parity", "0").rc == 0
    target = tmp_path / "old.raw"
    target.write_bytes(os.urandom(8 * MiB))            # old contents everywhere
    with open(tmp_path / "s.dimg", "rb") as f:
        r = _diskimg("restore", "-", target, stdin=f)
    assert r.returncode == 2 and b"--yes" in r.stderr  # stdin holds the image: no asking
    with open(tmp_path / "s.dimg", "rb") as f:
        r = _diskimg("restore", "-", target, "--yes", stdin=f)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == src.read_bytes()


def test_a_stream_that_ends_early(tmp_path):
    src = _source(tmp_path / "src.raw")
    assert cli("image", src, tmp_path / "s.dimg", "--block-size", "64K", "--parity", "0").rc == 0
    cut = tmp_path / "cut.dimg"
    cut.write_bytes((tmp_path / "s.dimg").read_bytes()[:2 * MiB])
    out = tmp_path / "out.raw"
    with open(cut, "rb") as f:
        r = _diskimg("restore", "-", out, stdin=f)
    err = r.stderr.decode()
    assert r.returncode == 1 and "the stream ended at byte 2097152" in err
    assert "were written to" in err and not out.exists()    # a file it created: removed
    with open(cut, "rb") as f:
        r = _diskimg("restore", "-", out, "--salvage", stdin=f)
    assert r.returncode == 1 and out.exists()                # --salvage keeps what it checked
    data, want = out.read_bytes(), src.read_bytes()
    written = int(r.stderr.decode().split("; ")[1].split(" blocks")[0])
    first = MiB // (64 << 10)                                # the first data block
    assert data[:(first + written) * (64 << 10)] == want[:(first + written) * (64 << 10)]


def test_a_damaged_record_stops_it(tmp_path):
    src = _source(tmp_path / "src.raw")
    assert cli("image", src, tmp_path / "s.dimg", "--block-size", "64K", "--level", "1",
               "--parity", "0").rc == 0
    raw = bytearray((tmp_path / "s.dimg").read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    (tmp_path / "bad.dimg").write_bytes(raw)
    with open(tmp_path / "bad.dimg", "rb") as f:
        r = _diskimg("restore", "-", tmp_path / "out.raw", stdin=f)
    assert r.returncode == 1 and b"-: " in r.stderr


def test_stdout_terminal_is_refused(tmp_path):
    src = _source(tmp_path / "src.raw")
    import pty
    master, slave = pty.openpty()
    try:
        r = _diskimg("image", src, "-", stdout=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and b"standard output is a terminal" in r.stderr
