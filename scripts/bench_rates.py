"""Raw per-core speed of the digest and the compressor on the benchmark disk's own data (issue 20).

scripts/bench runs this with the python of the diskimg it measures, so that it times the same
hashlib, zstandard (and blake3, when importable) as the pipeline. It reads a sample of the blocks
diskimg images (the block-size blocks holding at least one block the ext4 bitmap marks used, as
`dumpe2fs` lists the free ones) into memory and times, on one thread, CPU seconds
(time.thread_time) for SHA-256, BLAKE3 and zstd at the image's level over 1 MiB buffers.
Prints one JSON object on stdout. Standard library plus what diskimg's venv has.

Usage: python scripts/bench_rates.py DEVICE --level N [--block-size B] [--sample-mib M] [--reps R]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def used_blocks(device: str, block_size: int) -> tuple[list[int], int]:
    """Indices of the block_size blocks of `device` with at least one used filesystem block."""
    out = subprocess.run(["dumpe2fs", device], capture_output=True, text=True, check=True).stdout
    fs_bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    count = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
    free = bytearray(count)   # 1 = free
    for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in m.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
            free[lo:hi + 1] = b"\1" * (hi - lo + 1)
    per = block_size // fs_bs
    used = [i for i in range((count + per - 1) // per) if 0 in free[i * per:(i + 1) * per]]
    return used, count * fs_bs


def cpu_rate(fn, bufs: list[memoryview], reps: int) -> dict:
    """Bytes per CPU second of fn over bufs, median and best of `reps` passes, on this thread."""
    total = sum(len(b) for b in bufs)
    rates = []
    for _ in range(reps):
        t0 = time.thread_time()
        for b in bufs:
            fn(b)
        rates.append(total / max(time.thread_time() - t0, 1e-9))
    return {"median": statistics.median(rates), "best": max(rates), "bytes": total, "reps": reps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("device")
    ap.add_argument("--level", type=int, required=True)
    ap.add_argument("--block-size", type=int, default=MiB)
    ap.add_argument("--sample-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    used, fs_size = used_blocks(args.device, args.block_size)
    # spread the sample over the whole disk: its files differ (headers, binaries, man pages, random)
    want = max(1, min(len(used), args.sample_mib * MiB // args.block_size))
    step = len(used) / want
    picks = [used[int(i * step)] for i in range(want)]
    chunks = []
    with open(args.device, "rb", buffering=0) as f:
        for i in picks:
            f.seek(i * args.block_size)
            chunks.append(f.read(args.block_size))
    data = b"".join(chunks)
    del chunks
    bufs = [memoryview(data)[i:i + MiB] for i in range(0, len(data), MiB)]

    res: dict = {"sample_bytes": len(data), "used_blocks": len(used), "block_size": args.block_size,
                 "fs_size": fs_size, "level": args.level, "buffer": MiB,
                 "python": sys.version.split()[0]}
    res["sha256"] = cpu_rate(lambda b: hashlib.sha256(b).digest(), bufs, args.reps)
    try:
        import blake3
    except ImportError:
        res["blake3"] = None
    else:
        res["blake3"] = cpu_rate(lambda b: blake3.blake3(b, max_threads=1).digest(), bufs, args.reps)
        res["blake3"]["version"] = getattr(blake3, "__version__", "?")
    try:
        import zstandard
    except ImportError:
        res["zstd"] = None
    else:
        zc = zstandard.ZstdCompressor(level=args.level)
        res["zstd"] = cpu_rate(zc.compress, bufs, args.reps)
        res["zstd"]["ratio"] = sum(len(zc.compress(b)) for b in bufs) / max(len(data), 1)
        res["zstd"]["version"] = zstandard.__version__
        # the full image hashes and compresses every block it stores: the pair on one core
        res["sha256+zstd"] = cpu_rate(lambda b: (hashlib.sha256(b).digest(), zc.compress(b)),
                                      bufs, args.reps)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
