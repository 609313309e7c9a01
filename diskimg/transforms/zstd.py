"""zstd: the compression transform, and the one place that holds zstd contexts.

A zstandard context must not be used by two threads at once, and making one costs more than
compressing or decompressing a block, so each thread keeps one decompression context and one
compression context per level, made on first use.  Records (through `Zstd`) and index segments
(diskimg.format) use the same helpers.

Every payload is one zstd frame (docs/FORMAT.md, section 3.3); frames carry the content size
(zstandard's default), which readers do not rely on: they decompress with an output limit.
"""
from __future__ import annotations

import threading

import zstandard

from diskimg.defaults import DEFAULT_LEVEL
from diskimg.errors import DecodeError

NAME = "zstd"
Error = zstandard.ZstdError   # what damaged frames raise, for callers that handle it themselves

_local = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compression context for `level`."""
    contexts = getattr(_local, "cctx", None)
    if contexts is None:
        contexts = _local.cctx = {}
    cctx = contexts.get(level)
    if cctx is None:
        cctx = contexts[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompression context."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def compress(data: bytes | memoryview, level: int) -> bytes:
    """One zstd frame of `data`."""
    return compressor(level).compress(data)


def decompress(payload: bytes | memoryview, limit: int) -> bytes:
    """The content of one zstd frame, at most `limit` bytes; raises Error when damaged or
    larger."""
    return decompressor().decompress(payload, max_output_size=limit)


def decompress_into(payload: bytes | memoryview, out: memoryview) -> int:
    """Decompress one zstd frame into `out`; the number of bytes it holds, or len(out) + 1 when
    it holds more than `out` takes.  Damaged data decompresses short or raises Error.
    Decompressing into a buffer that is reused costs half of allocating a new one per block."""
    got = 0
    with decompressor().stream_reader(payload) as reader:
        while got < len(out):
            n = reader.readinto(out[got:])
            if n == 0:
                return got
            got += n
        return got + 1 if reader.read(1) else got


class Zstd:
    """The zstd transform: one frame per block, left out where it does not make the block
    smaller (incompressible data is stored as it is)."""

    name = NAME
    optional = True

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def encode(self, block_no: int, data: bytes | memoryview) -> bytes | None:
        stored = compressor(self.level).compress(data)
        return stored if len(stored) < len(data) else None

    def decode_into(self, block_no: int, stored: bytes | memoryview, out: memoryview) -> int:
        try:
            got = decompress_into(stored, out)
        except Error as err:
            raise DecodeError(f"data does not decompress ({err})") from err
        if got != len(out):
            what = "more" if got > len(out) else f"{got}"
            raise DecodeError(f"data does not decompress: {what} bytes, {len(out)} expected")
        return got

    def decode(self, block_no: int, stored: bytes | memoryview, limit: int) -> bytes:
        try:
            return decompress(stored, limit)
        except Error as err:
            raise DecodeError(f"data does not decompress ({err})") from err
