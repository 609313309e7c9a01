"""The on-disk image format, version 1: header, block records, index, footer and trailer.

This module owns (de)serialisation and the integrity checks of metadata; it knows nothing of
devices, chains or pipelines.  docs/FORMAT.md is the specification; keep the two in step.

Layout of an image file::

    header    magic "DISKIMG\\0", version, JSON metadata, CRC-32C
    records   one per stored block: a 60-byte record header (CRC-32C) + zstd or raw data
    index     segments of 48-byte entries, one entry per block of the device, zstd-compressed,
              each segment CRC-32C'd
    footer    JSON: statistics, the index segment table, the index digest, unreadable ranges
    trailer   32 bytes at the very end; written last, so a file without it is incomplete

Why shaped so: records are appended in one sequential pass, each readable on its own (seekable
restore, damage confined to one block); the index comes last because it is only known at the end,
and it is segmented and compressed so that a multi-terabyte device's index neither has to sit
uncompressed in memory nor be read whole to find one block.  CRC-32C guards metadata (cheap,
but crcmod holds the GIL); SHA-256 in the index and record header guards data.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator

import crcmod.predefined
import zstandard

from diskimg.errors import CorruptImage, IncompleteImage, NotAnImage

crc32c = crcmod.predefined.mkCrcFun("crc-32c")

FORMAT_VERSION = 1
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
ENTRIES_PER_SEGMENT = 16384

# header: magic, version u16, flags u16, json length u32 | json | crc32c u32
HEADER_MAGIC = b"DISKIMG\x00"
_HEADER_FIXED = struct.Struct("<8sHHI")
MAX_HEADER_JSON = 1 << 20

# record header: magic, block u64, stored length u32, raw length u32, codec u8, flags u8,
# reserved u16, sha256 32s | crc32c u32 over the preceding 56 bytes
RECORD_MAGIC = b"DIBK"
_RECORD = struct.Struct("<4sQIIBBH32s")
RECORD_HEADER_SIZE = _RECORD.size + 4  # 60

# index entry: kind u8, codec u8, flags u16, stored length u32, record offset u64, sha256 32s
_ENTRY = struct.Struct("<BBHIQ32s")
ENTRY_SIZE = _ENTRY.size  # 48

# index segment header: magic, first block u64, entry count u32, stored length u32,
# crc32c of the stored payload u32 | crc32c u32 over the preceding 24 bytes
SEGMENT_MAGIC = b"DIIX"
_SEGMENT = struct.Struct("<4sQIII")
SEGMENT_HEADER_SIZE = _SEGMENT.size + 4  # 28

# footer: magic, json length u32 | json | crc32c u32 over magic, length and json
FOOTER_MAGIC = b"DIFT"
_FOOTER_FIXED = struct.Struct("<4sI")

# trailer: magic, footer offset u64, footer length u32, version u16, reserved u16 and u32 |
# crc32c u32 over the preceding 28 bytes
TRAILER_MAGIC = b"DIMGEND\x00"
_TRAILER = struct.Struct("<8sQIHHI")
TRAILER_SIZE = _TRAILER.size + 4  # 32

# block kinds in the index
ZERO = 0      # all zero bytes; no record
DATA = 1      # a record in this image holds the block
PARENT = 2    # unchanged since the parent image: resolve through the chain
UNUSED = 3    # free space of a recognised filesystem; not read, restored as zeros
KIND_NAMES = {ZERO: "zero", DATA: "data", PARENT: "parent", UNUSED: "unused"}

KINDS_OF_IMAGE = ("full", "incremental", "differential")

# codecs of a record
CODEC_RAW = 0
CODEC_ZSTD = 1

# entry and record flags
FLAG_UNREADABLE = 0x1  # the block has unreadable sectors, stored as zeros (rescue mode)


_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(length: int) -> bytes:
    """SHA-256 of `length` zero bytes (cached: every image has at most two block lengths)."""
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = _ZERO_DIGESTS[length] = hashlib.sha256(bytes(length)).digest()
    return d


def check_block_size(size: int) -> None:
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise ValueError(
            f"block size {size} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )


@dataclass(frozen=True)
class IndexEntry:
    kind: int
    sha256: bytes
    offset: int = 0
    stored_len: int = 0
    codec: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return _ENTRY.pack(self.kind, self.codec, self.flags, self.stored_len, self.offset,
                           self.sha256)

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, pos: int) -> IndexEntry:
        kind, codec, flags, stored_len, offset, sha = _ENTRY.unpack_from(buf, pos)
        return cls(kind, sha, offset, stored_len, codec, flags)


@dataclass(frozen=True)
class Header:
    """What the image is: written first, never changed."""

    uuid: str
    kind: str                      # "full", "incremental", "differential"
    size: int                      # bytes of the source device
    block_size: int
    source: dict                   # path, model, serial, wwn (None when unknown)
    created: str                   # ISO 8601 UTC
    tool_version: str
    parent: dict | None = None     # uuid, name, index_sha256, kind
    chain: tuple[str, ...] = ()    # uuids from the root full image to this one
    compression: dict = field(default_factory=lambda: {"codec": "zstd", "level": 3})
    extra: dict = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def block_length(self, block: int) -> int:
        return min(self.block_size, self.size - block * self.block_size)

    def zero_run_ok(self, first: int, last: int, sha256: bytes) -> bool:
        """Whether a zero or unused entry shared by blocks first..last has the checksum of
        zeros (a short last block has its own)."""
        return sha256 == zero_digest(self.block_length(first)) == \
            zero_digest(self.block_length(last))

    def to_json(self) -> dict:
        return {
            "uuid": self.uuid, "kind": self.kind, "size": self.size,
            "block_size": self.block_size, "source": self.source, "created": self.created,
            "tool_version": self.tool_version, "parent": self.parent, "chain": list(self.chain),
            "compression": self.compression, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> Header:
        return cls(
            uuid=d["uuid"], kind=d["kind"], size=int(d["size"]), block_size=int(d["block_size"]),
            source=d.get("source") or {}, created=d["created"], tool_version=d["tool_version"],
            parent=d.get("parent"), chain=tuple(d.get("chain") or ()),
            compression=d.get("compression") or {}, extra=d.get("extra") or {},
        )

    def pack(self) -> bytes:
        body = json.dumps(self.to_json(), sort_keys=True).encode()
        fixed = _HEADER_FIXED.pack(HEADER_MAGIC, FORMAT_VERSION, 0, len(body))
        return fixed + body + struct.pack("<I", crc32c(fixed + body))


def pack_record(block: int, stored: bytes, raw_len: int, codec: int, flags: int,
                sha256: bytes) -> bytes:
    head = _RECORD.pack(RECORD_MAGIC, block, len(stored), raw_len, codec, flags, 0, sha256)
    return head + struct.pack("<I", crc32c(head))


@dataclass(frozen=True)
class RecordHeader:
    block: int
    stored_len: int
    raw_len: int
    codec: int
    flags: int
    sha256: bytes


def unpack_record(buf: bytes) -> RecordHeader | None:
    """The record header in `buf`, or None when its magic or CRC is wrong."""
    if len(buf) < RECORD_HEADER_SIZE:
        return None
    magic, block, stored_len, raw_len, codec, flags, _, sha = _RECORD.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, _RECORD.size)
    if magic != RECORD_MAGIC or crc != crc32c(buf[: _RECORD.size]):
        return None
    return RecordHeader(block, stored_len, raw_len, codec, flags, sha)


def pack_segment(first_block: int, entries: bytes, level: int = 3) -> bytes:
    payload = zstandard.ZstdCompressor(level=level).compress(entries)
    head = _SEGMENT.pack(SEGMENT_MAGIC, first_block, len(entries) // ENTRY_SIZE, len(payload),
                         crc32c(payload))
    return head + struct.pack("<I", crc32c(head)) + payload


def pack_footer(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    fixed = _FOOTER_FIXED.pack(FOOTER_MAGIC, len(body))
    return fixed + body + struct.pack("<I", crc32c(fixed + body))


def pack_trailer(footer_offset: int, footer_len: int) -> bytes:
    head = _TRAILER.pack(TRAILER_MAGIC, footer_offset, footer_len, FORMAT_VERSION, 0, 0)
    return head + struct.pack("<I", crc32c(head))


def read_header(fd: int, path: str) -> tuple[Header, int]:
    """The header of the image open on `fd`, and the offset where records start."""
    fixed = os.pread(fd, _HEADER_FIXED.size, 0)
    if len(fixed) < _HEADER_FIXED.size or fixed[:8] != HEADER_MAGIC:
        raise NotAnImage(path, "not a diskimg image (no DISKIMG magic at the start)")
    _, version, _, jlen = _HEADER_FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise NotAnImage(path, f"image format version {version} is not supported "
                               f"(this diskimg reads version {FORMAT_VERSION})")
    if jlen > MAX_HEADER_JSON:
        raise CorruptImage(f"{path}: header damaged (metadata length {jlen} is implausible)")
    body = os.pread(fd, jlen + 4, _HEADER_FIXED.size)
    if len(body) < jlen + 4:
        raise IncompleteImage(path, "image is truncated inside its header")
    (crc,) = struct.unpack_from("<I", body, jlen)
    if crc != crc32c(fixed + body[:jlen]):
        raise CorruptImage(f"{path}: header damaged (CRC-32C mismatch); the image cannot be trusted")
    try:
        header = Header.from_json(json.loads(body[:jlen]))
        check_block_size(header.block_size)
        if header.kind not in KINDS_OF_IMAGE or (header.kind == "full") != (header.parent is None):
            raise ValueError(f"kind {header.kind!r} with parent {header.parent!r}")
        if header.size < 0:
            raise ValueError(f"size {header.size}")
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptImage(f"{path}: header metadata invalid: {err}") from err
    return header, _HEADER_FIXED.size + jlen + 4


def read_footer(fd: int, path: str, file_size: int) -> dict:
    """The footer metadata, found through the trailer; raises when the image is incomplete."""
    partial_hint = ("image is incomplete (no trailer): it is still being written, was "
                    "interrupted, or was cut short")
    if file_size < TRAILER_SIZE:
        raise IncompleteImage(path, partial_hint)
    buf = os.pread(fd, TRAILER_SIZE, file_size - TRAILER_SIZE)
    magic, f_off, f_len, version, _, _ = _TRAILER.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, _TRAILER.size)
    if magic != TRAILER_MAGIC:
        raise IncompleteImage(path, partial_hint)
    if crc != crc32c(buf[: _TRAILER.size]):
        raise CorruptImage(f"{path}: trailer damaged (CRC-32C mismatch)")
    if version != FORMAT_VERSION:
        raise CorruptImage(f"{path}: trailer says format version {version}, header says "
                           f"{FORMAT_VERSION}")
    if f_off + f_len + TRAILER_SIZE != file_size or f_len < _FOOTER_FIXED.size + 4:
        raise CorruptImage(f"{path}: trailer points outside the file (footer at {f_off}, "
                           f"{f_len} bytes)")
    fbuf = os.pread(fd, f_len, f_off)
    fmagic, jlen = _FOOTER_FIXED.unpack_from(fbuf)
    if fmagic != FOOTER_MAGIC or jlen + _FOOTER_FIXED.size + 4 != f_len:
        raise CorruptImage(f"{path}: footer damaged (bad magic or length)")
    (fcrc,) = struct.unpack_from("<I", fbuf, f_len - 4)
    if fcrc != crc32c(fbuf[: f_len - 4]):
        raise CorruptImage(f"{path}: footer damaged (CRC-32C mismatch)")
    try:
        return json.loads(fbuf[_FOOTER_FIXED.size: f_len - 4])
    except ValueError as err:
        raise CorruptImage(f"{path}: footer metadata invalid: {err}") from err


class SegmentError(CorruptImage):
    """An index segment that failed its checks; names the blocks it describes."""

    def __init__(self, path: str, first: int, count: int, reason: str) -> None:
        super().__init__(f"{path}: index segment for blocks {first}-{first + count - 1} {reason}")
        self.first = first
        self.count = count
        self.reason = f"index segment {reason}"


def read_segment(fd: int, path: str, offset: int, length: int, first: int, count: int) -> bytes:
    """The raw entries of one index segment, checked against its CRCs and expected place."""
    buf = os.pread(fd, length, offset)
    if len(buf) != length or length < SEGMENT_HEADER_SIZE:
        raise SegmentError(path, first, count, "is truncated")
    magic, s_first, s_count, s_len, s_crc = _SEGMENT.unpack_from(buf)
    (hcrc,) = struct.unpack_from("<I", buf, _SEGMENT.size)
    if magic != SEGMENT_MAGIC or hcrc != crc32c(buf[: _SEGMENT.size]):
        raise SegmentError(path, first, count, "header damaged (CRC-32C mismatch)")
    if s_first != first or s_count != count or s_len + SEGMENT_HEADER_SIZE != length:
        raise SegmentError(path, first, count, "does not match the footer's segment table")
    payload = buf[SEGMENT_HEADER_SIZE:]
    if crc32c(payload) != s_crc:
        raise SegmentError(path, first, count, "damaged (CRC-32C mismatch)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=count * ENTRY_SIZE)
    except zstandard.ZstdError as err:
        raise SegmentError(path, first, count, f"does not decompress: {err}") from err
    if len(raw) != count * ENTRY_SIZE:
        raise SegmentError(path, first, count, "has the wrong number of entries")
    return raw


def iter_entries(raw: bytes) -> Iterator[IndexEntry]:
    for pos in range(0, len(raw), ENTRY_SIZE):
        yield IndexEntry.unpack_from(raw, pos)
