"""Progress bars: shown on a terminal (a real pseudo-terminal here), absent in a pipe and with
--no-progress or --json."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios


def _image_cmd(tmp_path, *extra):
    src = tmp_path / "src.raw"
    if not src.exists():
        src.write_bytes(os.urandom(24 << 20))
    return [sys.executable, "-m", "diskimg", "image", str(src), str(tmp_path / "a.img"),
            "--force", *extra]


def _stderr_on_terminal(cmd) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait() == 0
    return out.decode(errors="replace")


def test_progress_bar_on_a_terminal(tmp_path):
    err = _stderr_on_terminal(_image_cmd(tmp_path))
    assert "imaging" in err and "100%" in err and "B/s" in err


def test_no_progress_bar_in_a_pipe_or_when_asked(tmp_path):
    piped = subprocess.run(_image_cmd(tmp_path), capture_output=True, text=True, check=True)
    assert "imaging" not in piped.stderr and "%" not in piped.stderr
    for flag in ("--no-progress", "--json"):
        err = _stderr_on_terminal(_image_cmd(tmp_path, flag))
        assert "imaging" not in err and "%" not in err, flag


def test_bar_uses_the_binary_units_of_the_summaries(tmp_path):
    err = _stderr_on_terminal(_image_cmd(tmp_path))
    assert "/24.0 MiB" in err and "MiB/s" in err
    assert not re.search(r"\d(kB|MB|GB)\b", err), err   # tqdm's decimal-looking units


def test_verify_bar_has_a_total_percentage_and_eta(tmp_path):
    subprocess.run(_image_cmd(tmp_path), check=True, capture_output=True)
    image = tmp_path / "a.img"
    err = _stderr_on_terminal([sys.executable, "-m", "diskimg", "verify", str(image)])
    assert "verifying" in err and "100%" in err and "/24.0 MiB" in err
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", err), err   # elapsed<remaining: an ETA
    # a chain: every image's blocks are checked, so the total counts each image
    src = tmp_path / "src.raw"
    with open(src, "r+b") as f:
        f.write(b"changed")
    subprocess.run([sys.executable, "-m", "diskimg", "image", str(src), str(tmp_path / "i.img"),
                    "--incremental", str(image)], check=True, capture_output=True)
    err = _stderr_on_terminal([sys.executable, "-m", "diskimg", "verify",
                               str(tmp_path / "i.img")])
    assert "100%" in err and "48.0 MiB/48.0 MiB" in err
