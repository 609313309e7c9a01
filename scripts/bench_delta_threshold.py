#!/usr/bin/env python3
"""How many changed pages a delta record pays off for (issue 19): the measurement behind
diskimg.format.delta.DELTA_MAX_FRACTION.

For blocks of a source (a device or file: `scripts/bench --delta` passes the benchmark disk; by
default random and text-like blocks are made up), k of the 256 pages of each 1 MiB block are
overwritten with random bytes (a database's page writes), for k from 1 to 256.  For each k:
the bytes a delta record stores against the bytes the whole block stores (both through zstd at
the default level, as diskimg writes them), and the time to read the block back: the whole
block decoded and hashed, against the parent's block decoded and hashed plus the delta decoded,
applied and the result hashed (what restore does for a delta on a full image).

Usage: .venv/bin/python scripts/bench_delta_threshold.py [SOURCE] [--blocks N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from diskimg.defaults import DEFAULT_LEVEL
from diskimg.format import delta
from diskimg.format.digest import digest_fn
from diskimg.transforms import writing_chain

MiB = 1 << 20
STEPS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)


def blocks_of(source: str | None, n: int, rnd: random.Random) -> list[bytes]:
    if source is None:
        words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(500)]
        text = [b" ".join(rnd.choice(words) for _ in range(MiB // 8))[:MiB] for _ in range(n // 2)]
        return text + [rnd.randbytes(MiB) for _ in range(n - n // 2)]
    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        out = []
        for _ in range(n * 4):      # skip all-zero blocks: they are never deltas' parents
            b = os.pread(fd, MiB, rnd.randrange(size // MiB) * MiB)
            if b.count(0) < len(b) // 2:
                out.append(b)
            if len(out) == n:
                break
        return out
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", nargs="?")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rnd = random.Random(19)
    tc = writing_chain(DEFAULT_LEVEL)
    h = digest_fn("blake3")
    blocks = blocks_of(args.source, args.blocks, rnd)
    whole_stored = sum(len(tc.encode(0, b)[0]) for b in blocks)
    rows = []
    for k in STEPS:
        d_stored = w_stored = 0
        t_whole = t_delta = 0.0
        for b in blocks:
            new = bytearray(b)
            pages = sorted(rnd.sample(range(256), k))
            for p in pages:
                new[p * 4096:(p + 1) * 4096] = rnd.randbytes(4096)
            w, wc = tc.encode(0, new)
            w = bytes(w)
            payload = delta.pack_delta(new, pages)
            d, dc = tc.encode(0, payload)
            d = bytes(d)
            base, bc = tc.encode(0, b)
            base = bytes(base)
            w_stored += len(w)
            d_stored += len(d)
            out = bytearray(MiB)
            buf = bytearray(len(payload))
            tw = td = 1e9
            for _ in range(5):      # the best of 5: the machine is shared
                t0 = time.perf_counter()
                tc.decode_into(0, w, wc, memoryview(out))
                h(out)
                t1 = time.perf_counter()
                # what the block view does: the parent decoded, the delta applied, one hash
                tc.decode_into(0, base, bc, memoryview(out))
                tc.decode_into(0, d, dc, memoryview(buf))
                delta.apply_delta(memoryview(out), buf)
                h(out)
                t2 = time.perf_counter()
                tw, td = min(tw, t1 - t0), min(td, t2 - t1)
            t1, t0, t2 = tw, 0.0, tw + td
            t_whole += t1 - t0
            t_delta += t2 - t1
        rows.append({"pages": k, "delta_vs_whole_bytes": round(d_stored / w_stored, 3),
                     "read_delta_vs_whole_time": round(t_delta / t_whole, 2)})
    result = {"source": args.source or "made up (half text, half random)",
              "blocks": len(blocks), "whole_stored_mib": round(whole_stored / MiB, 1),
              "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(blocks)} blocks of {result['source']}")
        print("changed pages  delta/whole bytes  read time delta/whole")
        for r in rows:
            print(f"{r['pages']:>13}  {r['delta_vs_whole_bytes']:>17}  "
                  f"{r['read_delta_vs_whole_time']:>21}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
