"""Crafting damaged images for tests: rewrite an image's header JSON, footer JSON or index
entries with every CRC recomputed, so the damage gets past the CRC-32C checks and reaches the
validation behind them (as a buggy writer, or someone editing an image, would produce).

Import as ``from imagecraft import ...`` (tests/ is on sys.path through tests/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import zstandard

from diskimg import format as fmt

_FIXED = struct.Struct("<8sHHI")
_TRAILER = struct.Struct("<8sQIHHI")


def header_json(path: Path) -> dict:
    buf = Path(path).read_bytes()
    jlen = _FIXED.unpack_from(buf)[3]
    return json.loads(buf[_FIXED.size:_FIXED.size + jlen])


def write_header_json(path: Path, meta: object, raw: bytes | None = None) -> None:
    """Replace the header JSON by `meta` (or by the bytes `raw`), with the CRC made right.  A
    shorter body is padded with spaces (JSON allows them) so that the records do not move."""
    buf = Path(path).read_bytes()
    magic, version, flags, jlen = _FIXED.unpack_from(buf)
    body = raw if raw is not None else json.dumps(meta, sort_keys=True).encode()
    if len(body) < jlen:
        body += b" " * (jlen - len(body))
    fixed = _FIXED.pack(magic, version, flags, len(body))
    head = fixed + body + struct.pack("<I", fmt.crc32c(fixed + body))
    Path(path).write_bytes(head + buf[_FIXED.size + jlen + 4:])


def _footer_place(buf: bytes) -> tuple[int, int]:
    _, f_off, f_len, _, _, _ = _TRAILER.unpack_from(buf, len(buf) - fmt.TRAILER_SIZE)
    return f_off, f_len


def _version(buf: bytes) -> int:
    """The format version the image's trailer states (kept when the trailer is rewritten)."""
    return _TRAILER.unpack_from(buf, len(buf) - fmt.TRAILER_SIZE)[3]


def footer_json(path: Path) -> dict:
    buf = Path(path).read_bytes()
    f_off, f_len = _footer_place(buf)
    return json.loads(buf[f_off + 8:f_off + f_len - 4])


def write_footer_json(path: Path, meta: object, raw: bytes | None = None) -> None:
    """Replace the footer JSON by `meta` (or the bytes `raw`) and the trailer after it, with
    every CRC made right."""
    buf = Path(path).read_bytes()
    f_off, _ = _footer_place(buf)
    body = raw if raw is not None else json.dumps(meta, sort_keys=True).encode()
    fixed = struct.pack("<4sI", fmt.FOOTER_MAGIC, len(body))
    footer = fixed + body + struct.pack("<I", fmt.crc32c(fixed + body))
    Path(path).write_bytes(buf[:f_off] + footer + fmt.pack_trailer(f_off, len(footer),
                                                                   version=_version(buf)))


def rewrite_index(path: Path, mutate: Callable[[list[fmt.IndexEntry]], list[fmt.IndexEntry]],
                  fix_digest: bool = True) -> None:
    """Replace the index entries by `mutate(entries)`: segments, footer table, (with
    `fix_digest`) the footer's index digest and every CRC rewritten to match."""
    path = Path(path)
    buf = path.read_bytes()
    meta = footer_json(path)
    index = meta["index"]
    eps = index["entries_per_segment"]
    raw = b"".join(zstandard.ZstdDecompressor().decompress(
        buf[off + fmt.SEGMENT_HEADER_SIZE:off + length], max_output_size=eps * fmt.ENTRY_SIZE)
        for off, length in index["segments"])
    old = [fmt.IndexEntry.unpack_from(raw, i) for i in range(0, len(raw), fmt.ENTRY_SIZE)]
    new = b"".join(e.pack() for e in mutate(old))
    start = index["segments"][0][0]
    out = bytearray(buf[:start])
    table = []
    for first in range(0, len(new) // fmt.ENTRY_SIZE, eps):
        seg = fmt.pack_segment(first, new[first * fmt.ENTRY_SIZE:(first + eps) * fmt.ENTRY_SIZE])
        table.append([len(out), len(seg)])
        out += seg
    index["segments"] = table
    if fix_digest:
        index["sha256"] = hashlib.sha256(new).hexdigest()
    f_off = len(out)
    out += fmt.pack_footer(meta)
    out += fmt.pack_trailer(f_off, len(out) - f_off, version=_version(buf))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(out))
    os.replace(tmp, path)
