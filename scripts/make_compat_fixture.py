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

With ``--feature NAME`` it writes the fixtures of one format feature into
``fixtures/compat/vN-NAME/`` instead (version 3 features, docs/FORMAT.md section 13):
``encrypted`` makes both images encrypted with a key file ``key.bin`` kept next to them
(expected.json names it as ``key_file``).

``parity`` makes them with the default parity.  Without a feature, images are written without
any (``--parity 0``).

fixtures/compat/v3-delta was made by this script's version at commit b280a67 (its
--feature delta writes a second incremental: a delta on a delta on the full image).

Usage: .venv/bin/python scripts/make_compat_fixture.py [--feature encrypted|parity]
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


# each feature's images alone: parity only where it is the feature
FEATURE_OPTIONS = {None: {"parity": 0}, "encrypted": {"parity": 0}, "parity": {}}


def main() -> int:
    feature = None
    if sys.argv[1:2] == ["--feature"] and len(sys.argv) == 3:
        feature = sys.argv[2]
        if feature not in FEATURE_OPTIONS:
            print(f"--feature {feature}: this script knows {', '.join(FEATURE_OPTIONS)}",
                  file=sys.stderr)
            return 2
    out = ROOT / "fixtures" / "compat" / (f"v{fmt.FORMAT_VERSION}"
                                          + (f"-{feature}" if feature else ""))
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
    from contextlib import nullcontext
    from diskimg.crypto.keyring import Credentials, using
    creds = None
    if feature == "encrypted":
        (out / "key.bin").write_bytes(os.urandom(32))
        creds = Credentials(key_file="key.bin", key_file_bytes=(out / "key.bin").read_bytes())
    with tempfile.TemporaryDirectory(prefix="diskimg-compat-") as tmp, \
            (using(creds) if creds else nullcontext()):
        for name, data in contents.items():
            src = Path(tmp) / name.replace(".img", ".raw")
            src.write_bytes(data)
            parent = str(out / parents[name]) if name in parents else None
            create_image(str(src), str(out / name),
                         ImageOptions(block_size=BS, threads=1, incremental=parent,
                                      encrypt=creds is not None and parent is None,
                                      **FEATURE_OPTIONS[feature]))
        images = []
        for name, data in contents.items():
            with ImageReader(str(out / name)) as r:
                info = describe(r)
            # the directory is named by the version the images really are
            assert info["format_version"] == fmt.FORMAT_VERSION, info["format_version"]
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
                "raw_size": len(data),
                "raw_sha256": hashlib.sha256(data).hexdigest(),
                "image_sha256": sha256_file(out / name),
            })
    expected = {
        "format_version": fmt.FORMAT_VERSION,
        **({"feature": feature} if feature else {}),
        **({"key_file": "key.bin"} if creds else {}),
        "made_by": f"diskimg {__version__}, scripts/make_compat_fixture.py",
        "images": images,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    total = sum(os.path.getsize(out / i["file"]) for i in images)
    print(f"wrote {out}: {', '.join(i['file'] for i in images)} ({total} bytes), expected.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
