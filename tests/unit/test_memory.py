"""Memory stays flat whatever the size of the device: a 4 TiB sparse file holding a few
scattered MiB is imaged and restored by a real `diskimg` process whose peak RSS is measured."""
from __future__ import annotations

import random
import subprocess
import sys

LIMIT = 256 << 20


# A child's peak RSS includes what it inherited at fork, so diskimg is started from a small
# wrapper process, not from pytest (hundreds of MiB by the end of the suite).
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen([sys.executable, "-m", "diskimg", *sys.argv[1:]],
                        stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _run_measured(*args: str) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of `python -m diskimg ARGS`."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True,
                         text=True, check=True)
    code, rss = map(int, out.stdout.split())
    assert code == 0, out.stderr
    return code, rss


def test_four_tib_sparse_file_images_and_restores_in_bounded_memory(tmp_path):
    src = tmp_path / "huge.raw"
    rnd = random.Random(4)
    chunks = {}
    with open(src, "wb") as f:
        f.truncate(4 << 40)
        for _ in range(16):
            off = rnd.randrange(0, (4 << 40) - (1 << 20)) // 4096 * 4096
            chunks[off] = rnd.randbytes(1 << 20)
            f.seek(off)
            f.write(chunks[off])
    _, rss = _run_measured("image", str(src), str(tmp_path / "huge.img"), "--no-progress")
    assert rss < LIMIT, f"imaging peaked at {rss >> 20} MiB"
    _, rss = _run_measured("restore", str(tmp_path / "huge.img"), str(tmp_path / "out.raw"),
                           "--no-progress")
    assert rss < LIMIT, f"restoring peaked at {rss >> 20} MiB"
    out = tmp_path / "out.raw"
    assert out.stat().st_size == 4 << 40
    assert out.stat().st_blocks * 512 < 64 << 20  # the holes stayed holes
    with open(out, "rb") as f:
        for off, data in chunks.items():
            f.seek(off)
            assert f.read(len(data)) == data
