"""Checking an image, or a whole chain, and naming every damaged block.

Every image the requested one depends on is checked in full: its index segments against their
CRC-32C, every stored block's record header against its CRC-32C and the index, and its content
against its SHA-256.  Errors are collected, not raised, so that the report names every bad block.
An image cut short (no trailer) has lost its index; its records are still scanned one by one
(each record header carries the block's SHA-256) so the report says what survived.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from diskimg import format as fmt
from diskimg.chain import open_chain
from diskimg.imagefile import (
    BlockError,
    ImageReader,
    TruncatedImage,
    read_record_data,
    scan_records,
    segment_runs,
)
from diskimg.pipeline import default_threads, depth_for, ordered_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyError:
    image: str            # UUID (empty when the header itself is unreadable)
    path: str
    block: int | None     # None: the damage is not in one block (header, footer, trailer)
    offset: int | None    # byte offset of the block in the device
    reason: str
    last_block: int | None = None   # a range of blocks (damaged index segment)

    def to_json(self) -> dict:
        d = {"block": self.block, "offset": self.offset, "image": self.image,
             "path": self.path, "reason": self.reason}
        if self.last_block is not None:
            d["last_block"] = self.last_block
        return d


@dataclass(frozen=True)
class VerifyResult:
    image: str
    chain: tuple[tuple[str, str], ...]    # (uuid, path), root first
    errors: tuple[VerifyError, ...]
    blocks_checked: int
    bytes_checked: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_image(path: str, search: Iterable[str] = (), threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Verify `path` and its chain.  Raises NotAnImage/IncompleteImage (exit 2) and ChainError
    (exit 2, missing parent); damage is reported in the result, not raised."""
    started = time.monotonic()
    threads = threads or default_threads()
    try:
        chain = open_chain(path, search)
    except TruncatedImage as err:
        errors, checked, nbytes = _scan_truncated(err.path, err.size)
        return VerifyResult(path, (), tuple(errors), checked, nbytes, time.monotonic() - started)
    except fmt.CorruptImage as err:  # header, footer or trailer damaged
        return VerifyResult(path, (), (VerifyError("", path, None, None, str(err)),), 0, 0,
                            time.monotonic() - started)
    errors: list[VerifyError] = []
    checked = nbytes = 0
    with chain:
        for img in chain.images:
            e, c, n = _verify_one(img, threads, progress)
            errors += e
            checked += c
            nbytes += n
        return VerifyResult(path, tuple((i.uuid, i.path) for i in chain.images), tuple(errors),
                            checked, nbytes, time.monotonic() - started)


def _runs(img: ImageReader, errors: list[VerifyError]
          ) -> Iterator[tuple[int, int, fmt.IndexEntry]]:
    """(first block, count, entry) for the runs of identical entries of `img`, so that long
    runs of zero blocks cost one check; damaged segments become errors naming their blocks."""
    for seg in range(len(img.segments)):
        first = seg * img.entries_per_segment
        try:
            raw = img.segment(seg)
        except fmt.SegmentError as err:
            errors.append(VerifyError(img.uuid, img.path, err.first,
                                      err.first * img.header.block_size, err.reason,
                                      last_block=err.first + err.count - 1))
            continue
        yield from segment_runs(first, raw)


def _verify_one(img: ImageReader, threads: int,
                progress: Callable[[int], None] | None) -> tuple[list[VerifyError], int, int]:
    errors: list[VerifyError] = []
    h = img.header
    scratch = threading.local()   # one buffer per worker, reused for every block it checks

    def work(item: tuple[int, int, fmt.IndexEntry]
             ) -> tuple[int, int, fmt.IndexEntry, VerifyError | None]:
        block, count, entry = item
        return block, count, entry, check(block, count, entry)

    def check(block: int, count: int, entry: fmt.IndexEntry) -> VerifyError | None:
        last = block + count - 1
        if entry.kind == fmt.DATA:
            buf = getattr(scratch, "buf", None)
            if buf is None:
                buf = scratch.buf = bytearray(h.block_size)
            try:
                img.read_block(block, entry, out=buf)
            except BlockError as err:
                return VerifyError(img.uuid, img.path, block, block * h.block_size, err.reason)
        reason = None
        if entry.kind in (fmt.ZERO, fmt.UNUSED) and not h.zero_run_ok(block, last, entry.sha256):
            reason = "index entry damaged: zero block with a non-zero checksum"
        elif entry.kind not in fmt.KIND_NAMES:
            reason = f"index entry damaged: unknown kind {entry.kind}"
        elif entry.kind == fmt.PARENT and h.parent is None:
            reason = "index entry refers to a parent, but this is a full image"
        if reason is None:
            return None
        return VerifyError(img.uuid, img.path, block, block * h.block_size, reason,
                           last_block=last if count > 1 else None)

    checked = nbytes = 0
    for block, count, entry, block_error in ordered_map(
            work, _runs(img, errors), threads, depth=depth_for(h.block_size, threads),
            inline=lambda item: item[2].kind != fmt.DATA):
        checked += count
        run_bytes = min((block + count) * h.block_size, h.size) - block * h.block_size
        if entry.kind == fmt.DATA:
            nbytes += run_bytes
        if block_error:
            errors.append(block_error)
        if progress:
            progress(run_bytes)
    digest_ok = not errors or all(e.block is not None and e.last_block is None for e in errors)
    if digest_ok and img.index_digest() != img.index_sha256:
        errors.append(VerifyError(img.uuid, img.path, None, None,
                                  "index digest differs from the footer's"))
    errors.sort(key=lambda e: (e.block if e.block is not None else -1))
    return errors, checked, nbytes


def _scan_truncated(path: str, size: int) -> tuple[list[VerifyError], int, int]:
    """Walk the records of an image without a trailer; report damaged ones and where it ends."""
    errors: list[VerifyError] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, start = fmt.read_header(fd, path)
        checked = nbytes = 0
        last_block = -1
        for offset, rec in scan_records(fd, start, size):
            if read_record_data(fd, offset, rec) is None:
                errors.append(VerifyError(header.uuid, path, rec.block,
                                          rec.block * header.block_size,
                                          "checksum mismatch in record"))
            checked += 1
            nbytes += rec.raw_len
            last_block = max(last_block, rec.block)
        errors.append(VerifyError(
            header.uuid, path, last_block + 1, (last_block + 1) * header.block_size,
            f"image truncated at byte {size}: no trailer, index lost; {checked} stored blocks "
            f"up to block {last_block} are intact, later blocks are missing"))
        return errors, checked, nbytes
    finally:
        os.close(fd)
