"""The unchanged incremental's read floor, for scripts/bench (issue 20): read what `diskimg image`
reads of a device and nothing more, the way it reads it, and do nothing with it.

Usage: bench_floor.py DEVICE [BLOCK_SIZE]

The used-block scan of DEVICE (diskimg.disk.used, as imaging runs it), then, for each block
that holds used bytes, one O_DIRECT read of the span from its first used sector to its last
(what diskimg reads of a block), READERS requests in flight into reused page-aligned buffers,
as diskimg.ops.imaging reads a device.  No hashing, no image, no parent, none of the imaging
modules: what is left of the incremental when everything but the interpreter, the scan and
the reads is taken away.  Prints the blocks, the bytes and the seconds of the reads alone.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import time

from diskimg.disk.used import scan

READERS = 4         # diskimg.ops.imaging.READERS (not imported: its import is no part of a floor)
ALIGN = 4096        # O_DIRECT alignment; diskimg aligns to the logical sector (<= 4096)


def spans(used: list[tuple[int, int]], bs: int) -> list[tuple[int, int]]:
    """(offset, length) of the aligned span of used bytes in each block that holds any."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for start, n in used:
        end = start + n
        pos = start
        while pos < end:
            b = pos // bs
            stop = min(end, (b + 1) * bs)
            first.setdefault(b, pos)
            last[b] = stop
            pos = stop
    out = []
    for b in sorted(first):
        lo = first[b] // ALIGN * ALIGN
        hi = min(-(-last[b] // ALIGN) * ALIGN, (b + 1) * bs)
        out.append((lo, hi - lo))
    return out


def main(dev: str, bs: int = 1 << 20) -> None:
    fd = os.open(dev, os.O_RDONLY)
    size = os.lseek(fd, 0, os.SEEK_END)
    todo = spans(list(scan(fd, size).ranges), bs)
    direct = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    lock = threading.Lock()
    it = iter(todo)
    failed: list[BaseException] = []

    def reader() -> None:
        buf = mmap.mmap(-1, bs)
        view = memoryview(buf)
        try:
            while not failed:
                with lock:
                    job = next(it, None)
                if job is None:
                    break
                off, n = job
                got = os.preadv(direct, [view[:n]], off)
                if got != n:
                    raise OSError(f"{dev}: short read at byte {off}: {got} of {n}")
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failed.append(err)
        finally:
            view.release()
            buf.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=reader) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if failed:
        raise failed[0]
    print(f"{len(todo)} blocks, {sum(n for _, n in todo) >> 20} MiB read in {took:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
