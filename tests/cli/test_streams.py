"""Images as streams: `diskimg image SRC -` writes the image to standard output front to back,
`diskimg restore - TARGET` reads it from standard input, checking each block as it arrives.
Run as real processes joined by real pipes."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

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
    # the ordinary image: with the default parity, as a file would be
    assert json.loads(cli("info", tmp_path / "s.dimg", "--json").out)["parity"] is not None
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


# -- images with parity, encryption and delta records, as a plain `diskimg image` makes them ---

WINDOW = 32 * MiB          # logical bytes of a parity window (the default geometry)


def _cat_into_restore(image, target, *args) -> subprocess.CompletedProcess:
    """`cat IMAGE | diskimg restore - TARGET ARGS`: real processes, a real pipe."""
    cat = subprocess.Popen(["cat", str(image)], stdout=subprocess.PIPE)
    try:
        return _diskimg("restore", "-", target, *args, stdin=cat.stdout)
    finally:
        cat.stdout.close()
        cat.wait()


def _flip(path, offsets, out):
    raw = bytearray(path.read_bytes())
    for off in offsets:
        raw[off:off + 3] = bytes(b ^ 0xFF for b in raw[off:off + 3])
    out.write_bytes(raw)
    return out


@pytest.fixture(scope="module")
def parity_image(tmp_path_factory):
    """A default (parity) image of 72 MiB of random data and 8 MiB of zeros: three windows,
    the first two full."""
    d = tmp_path_factory.mktemp("parity-stream")
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(72 * MiB))
        f.truncate(80 * MiB)
    img = d / "p.dimg"
    assert cli("image", src, img, "--no-progress").rc == 0
    info = cli("info", img, "--json")
    assert json.loads(info.out)["parity"]["windows"] == 3
    return src, img


def test_parity_image_through_a_pipe(parity_image, tmp_path):
    src, img = parity_image
    r = _cat_into_restore(img, tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", src, tmp_path / "out.raw"]).returncode == 0


def test_parity_heals_a_damaged_stream(parity_image, tmp_path):
    """Damage in a full window (healed with the window read on past it) and in the last one
    (healed with the layout from the tail), each within what parity repairs."""
    src, img = parity_image
    size = img.stat().st_size
    bad = _flip(img, [5 * MiB, 40 * MiB, size - 4 * MiB], tmp_path / "bad.dimg")
    r = _cat_into_restore(bad, tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(b"healed by its parity") >= 2
    assert subprocess.run(["cmp", src, tmp_path / "out.raw"]).returncode == 0
    # the footer, at the end of the logical stream (docs/FORMAT.md 16.2 places it in the file)
    p = json.loads(cli("info", img, "--json").out)["parity"]
    k, m, depth, s = p["data"], p["parity"], p["depth"], p["slice"]
    window, table = k * depth * s, 28 + 4 * (k + m) * depth + 4
    stored = (k + m) * depth * s + 2 * (-(-table // s) * s)
    at = p["logical_bytes"] - 100
    bad = _flip(img, [at // window * stored + at % window], tmp_path / "bad-footer.dimg")
    r = _cat_into_restore(bad, tmp_path / "out2.raw")
    assert r.returncode == 0 and b"healed by its parity" in r.stderr, r.stderr
    assert subprocess.run(["cmp", src, tmp_path / "out2.raw"]).returncode == 0


def test_parity_stream_beyond_repair_and_cut_short(parity_image, tmp_path):
    src, img = parity_image
    # 3 MiB of a window destroyed: more than its parity repairs (2 slices in each of its 256
    # groups: a burst of 2 MiB)
    raw = bytearray(img.read_bytes())
    raw[10 * MiB:13 * MiB] = os.urandom(3 * MiB)
    (tmp_path / "lost.dimg").write_bytes(raw)
    r = _cat_into_restore(tmp_path / "lost.dimg", tmp_path / "out.raw")
    assert r.returncode == 1 and b"is damaged" in r.stderr
    assert not (tmp_path / "out.raw").exists()
    # cut in the second window
    cut = tmp_path / "cut.dimg"
    cut.write_bytes(img.read_bytes()[:WINDOW + 5 * MiB])
    r = _cat_into_restore(cut, tmp_path / "out.raw")
    err = r.stderr.decode()
    assert r.returncode == 1 and "the stream ended at byte" in err and "were written to" in err
    assert not (tmp_path / "out.raw").exists()
    r = _cat_into_restore(cut, tmp_path / "out.raw", "--salvage")
    assert r.returncode == 1 and (tmp_path / "out.raw").exists()
    written = int(r.stderr.decode().split("; ")[1].split(" blocks")[0])
    assert written >= 32                       # the first window's blocks, each checked
    got, want = (tmp_path / "out.raw").read_bytes(), src.read_bytes()
    assert got[:written * MiB] == want[:written * MiB]


def test_encrypted_image_through_a_pipe(tmp_path):
    src = _source(tmp_path / "src.raw")
    kf = tmp_path / "kf"
    kf.write_bytes(os.urandom(32))
    img = tmp_path / "e.dimg"
    res = cli("image", src, img, "--block-size", "64K", "--encrypt", "--key-file", kf,
              "--no-progress")
    assert res.rc == 0, res.err
    r = _cat_into_restore(img, tmp_path / "none.raw")
    assert r.returncode == 2 and b"key" in r.stderr, r.stderr       # no key given
    assert not (tmp_path / "none.raw").exists()          # refused before writing
    r = _cat_into_restore(img, tmp_path / "none.raw", "--paper-key", "-")
    assert r.returncode == 2 and b"standard input holds the image" in r.stderr
    r = _cat_into_restore(img, tmp_path / "out.raw", "--key-file", kf)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", src, tmp_path / "out.raw"]).returncode == 0


def test_incremental_with_delta_records_through_a_pipe(tmp_path):
    src = _source(tmp_path / "src.raw")
    assert cli("image", src, tmp_path / "full.dimg", "--no-progress").rc == 0
    with open(src, "r+b") as f:              # a few bytes of two blocks: stored as deltas
        f.seek(MiB + 5000)
        f.write(os.urandom(100))
        f.seek(6 * MiB + 70000)
        f.write(os.urandom(100))
    res = cli("image", src, tmp_path / "inc.dimg", "--incremental", tmp_path / "full.dimg",
              "--no-progress", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["delta_blocks"] >= 1     # the random block
    r = _cat_into_restore(tmp_path / "inc.dimg", tmp_path / "out.raw", "--search", tmp_path)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", src, tmp_path / "out.raw"]).returncode == 0
