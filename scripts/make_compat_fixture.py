#!/usr/bin/env python3
"""Make the compatibility fixtures of the current image format version: fixtures/compat/vN/.

Run this ONCE per released format version (N = diskimg.format.v1.FORMAT_VERSION), and commit what it
writes.  Never regenerate an existing version's fixtures: they are the images that version's
diskimg wrote, and tests/unit/test_compat.py checks that every later diskimg still verifies,
describes and restores them exactly.  The script refuses to touch an existing directory; if a
fixture turns out to be wrong, add a new one next to it and say why, do not replace it.

What it writes (block size 64 KiB, a 6-block source whose last block is short, all contents
deterministic and compressible, so the images are a few KiB):

* ``full.img``: a full image of the base contents: text, zero and patterned blocks;
* ``incremental.img``: an incremental image on top of ``full.img`` of the changed contents
  (blocks unchanged, made zero, made non-zero, patched, and a changed short last block);
* ``expected.json``: per image its UUID, kind, parent, chain, index digest, block digest
  algorithm (from version 2), the SHA-256 and size
  of the raw contents a restore must give, and the SHA-256 of the image file itself.

With ``--feature NAME`` it writes fixtures/compat/vN-NAME/ instead: images using that format
feature (section 13 of docs/FORMAT.md).  ``--feature delta``: ``incremental.img`` holds delta
records (blocks 2 and 5: a few changed bytes), and ``incremental2.img`` on top of it a delta on
a delta on the full image (block 2 again) and a delta on a full block (block 0).

Usage: .venv/bin/python scripts/make_compat_fixture.py [--feature delta]
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diskimg import __version__  # noqa: E402
from diskimg import format as fmt  # noqa: E402
from diskimg.image.imagefile import ImageReader, describe  # noqa: E402
from diskimg.ops.imaging import ImageOptions, create_image  # noqa: E402

BS = 64 * 1024
SIZE = 5 * BS + 20000           # 6 blocks, the last one 20000 bytes


def text(tag: str, n: int) -> bytes:
    """`n` bytes of numbered text lines: compressible, and different for each tag."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{tag} line {i:06d}: diskimg compatibility fixture\n".encode()
        i += 1
    return bytes(out[:n])


def pattern(seed: int, n: int) -> bytes:
    """`n` bytes of a small-alphabet linear congruential sequence (compresses, is not text)."""
    x = seed
    out = bytearray(n)
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = 0x40 + ((x >> 16) & 0x0F)
    return bytes(out)


def base() -> bytes:
    blocks = [
        text("base0", BS),      # 0 data
        bytes(BS),              # 1 zero
        pattern(1, BS),         # 2 data
        bytes(BS),              # 3 zero
        text("base4", BS),      # 4 data
        text("tail", 20000),    # 5 data, short
    ]
    data = b"".join(blocks)
    assert len(data) == SIZE
    return data


def changed() -> bytes:
    data = bytearray(base())
    data[1 * BS:2 * BS] = text("new1", BS)                  # zero -> data
    data[2 * BS + 1000:2 * BS + 1100] = b"\xa5" * 100       # patched
    data[4 * BS:5 * BS] = bytes(BS)                         # data -> zero
    data[5 * BS + 19990:] = b"0123456789"                   # short last block changed
    return bytes(data)                                      # blocks 0 and 3 unchanged


def changed2() -> bytes:
    data = bytearray(changed())
    data[2 * BS + 9000:2 * BS + 9050] = b"\x5a" * 50          # block 2 again: delta on delta
    data[0 * BS + 30000:0 * BS + 30010] = b"ABCDEFGHIJ"      # block 0: a delta on the full
    return bytes(data)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    feature = None
    if sys.argv[1:2] == ["--feature"] and len(sys.argv) == 3:
        feature = sys.argv[2]
        if feature not in fmt.KNOWN_FEATURES:
            print(f"unknown feature {feature!r}", file=sys.stderr)
            return 2
    elif sys.argv[1:]:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    name = f"v{fmt.FORMAT_VERSION}" + (f"-{feature}" if feature else "")
    out = ROOT / "fixtures" / "compat" / name
    if out.exists():
        print(f"{out} exists: fixtures of a released format version are never regenerated",
              file=sys.stderr)
        return 1
    contents = {"full.img": base(), "incremental.img": changed()}
    parents = {"incremental.img": "full.img"}
    if feature == "delta":
        contents["incremental2.img"] = changed2()
        parents["incremental2.img"] = "incremental.img"
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="diskimg-compat-") as tmp:
        for name, data in contents.items():
            src = Path(tmp) / name.replace(".img", ".raw")
            src.write_bytes(data)
            parent = str(out / parents[name]) if name in parents else None
            create_image(str(src), str(out / name),
                         ImageOptions(block_size=BS, threads=1, incremental=parent,
                                      delta=feature == "delta"))
    images = []
    for name, data in contents.items():
        with ImageReader(str(out / name)) as r:
            info = describe(r)
        # the directory is named by the version the images really are (written by default),
        # and the feature the images of a -feature directory use
        if feature is None or info["kind"] == "full":
            assert info["features"] == [], info["features"]
        else:
            assert info["format_version"] == fmt.FORMAT_VERSION, info["format_version"]
            assert info["features"] == [feature] and info["delta_blocks"], info
        images.append({
            "file": name,
            "uuid": info["uuid"],
            "kind": info["kind"],
            "parent": info["parent"],
            "parent_name": info["parent_name"],
            "chain": info["chain"],
            "size": info["size"],
            "block_size": info["block_size"],
            "index_sha256": info["index_sha256"],
            "digest": info["digest"],
            "format_version": info["format_version"],
            "features": info["features"],
            "raw_size": len(data),
            "raw_sha256": hashlib.sha256(data).hexdigest(),
            "image_sha256": sha256_file(out / name),
        })
    expected = {
        "format_version": fmt.FORMAT_VERSION,
        **({"feature": feature} if feature else {}),
        "made_by": f"diskimg {__version__}, scripts/make_compat_fixture.py",
        "images": images,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    total = sum(os.path.getsize(out / i["file"]) for i in images)
    print(f"wrote {out}: {', '.join(i['file'] for i in images)} ({total} bytes), expected.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
