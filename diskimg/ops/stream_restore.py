"""Restore from a stream (`diskimg restore - TARGET`): the image arrives front to back on
standard input and is never sought back into.

Each record is checked as it arrives, against the digest its own header carries, and written at
its block; the index comes last, so only then is it known which blocks are zero or unused
(they are zeroed then: a new file keeps them as holes) and that every DATA entry names the
very content that was written for its block (the entry's digest against the record's).  A
stream that ends early, or a record that fails its check, stops the restore with exit 1 naming
what was written; with `salvage` a damaged record is skipped (its block listed) and a
target file this restore created is kept however it ends.

An incremental image refers to its parent's blocks by index entry, which arrive last: it is
refused before anything is written (restore it from a file or object storage, where the
chain is resolved), so a stream never leaves a target half from one image and half from
another.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from diskimg import format as fmt
from diskimg.disk.blockdev import open_target
from diskimg.errors import DecodeError, DiskIOError, DiskimgError, StreamEnded, UsageError
from diskimg.image.imagefile import segment_runs
from diskimg.image.records import decode_verified
from diskimg.ops.restore import Overwrite, RestoreResult, Salvaged, _leave, check_target
from diskimg.ops.restore import describe_target
from diskimg.store.stream import ForwardReader
from diskimg.transforms import reading_chain
from diskimg.units import human

log = logging.getLogger(__name__)

STREAM = "-"


def restore_stream(target: str, *, confirm: Callable | None = None, salvage: bool = False,
                   keep_partial: bool = False, progress=None, fd: int = 0) -> RestoreResult:
    started = time.monotonic()
    src = ForwardReader(fd, STREAM)
    header, pos = fmt.read_header(src, STREAM)
    if header.parent is not None:
        raise UsageError(f"{STREAM}: is an incremental or differential image (parent "
                         f"{header.parent['name']}, {header.parent['uuid']}); a stream is "
                         f"restored whole only: restore it from a file or object storage")
    bs, blocks = header.block_size, header.blocks
    transforms = reading_chain(header.transforms)
    exists, is_block, tsize = check_target(target, header.size)
    if exists:
        question = Overwrite(describe_target(target, is_block, tsize), STREAM, header.size)
        if confirm is None or not confirm(question):
            raise UsageError(f"{target}: exists; not overwritten (use --yes: standard input "
                             f"holds the image, so there is no asking)")
    tgt = open_target(target, header.size, exists, is_block)
    written: dict[int, bytes] = {}
    salvaged: list[Salvaged] = []
    out = bytearray(bs)
    written_bytes = 0
    if progress:
        progress.start(header.size, "B")

    def stop(why: str) -> StreamEnded:
        what = (f"{len(written)} blocks ({human(written_bytes)}) of {blocks} were written "
                f"to {target}, each checked")
        return StreamEnded(f"{STREAM}: {why}; {what}", path=STREAM)

    try:
        try:
            while True:
                head = src.pread(fmt.RECORD_HEADER_SIZE, pos)
                if len(head) < fmt.RECORD_HEADER_SIZE:
                    raise stop(f"the stream ended at byte {src.size}, before the image's "
                               f"index")
                rec = fmt.unpack_record(head)
                if rec is None:
                    break          # the index (or damage: the footer check tells)
                if rec.block >= blocks or rec.raw_len != header.block_length(rec.block):
                    raise stop(f"record at byte {pos} names block {rec.block} of "
                               f"{rec.raw_len} bytes, not a block of this image")
                payload = src.pread(rec.stored_len, pos + fmt.RECORD_HEADER_SIZE)
                if len(payload) < rec.stored_len:
                    raise stop(f"the stream ended at byte {src.size}, inside the record of "
                               f"block {rec.block}")
                view = memoryview(out)[:rec.raw_len]
                try:
                    decode_verified(transforms, rec.block, payload, rec.codec, rec.sha256,
                                    view, digest=header.hash)
                except DecodeError as err:
                    if not salvage:
                        raise stop(f"block {rec.block} (record at byte {pos}) is damaged: "
                                   f"{err.reason}") from err
                    salvaged.append(Salvaged(rec.block, 1, rec.block * bs, rec.raw_len,
                                             f"record damaged: {err.reason}"))
                    try:    # restored as zeros, as restore --salvage does
                        tgt.write(bytes(rec.raw_len), rec.block * bs)
                    except OSError as err2:
                        raise DiskIOError(target, "write", err2, rec.block * bs) from err2
                else:
                    try:
                        tgt.write(view, rec.block * bs)
                    except OSError as err:
                        raise DiskIOError(target, "write", err, rec.block * bs) from err
                    written[rec.block] = rec.sha256
                    written_bytes += rec.raw_len
                    if progress:
                        progress.advance(rec.raw_len)
                pos += fmt.RECORD_HEADER_SIZE + rec.stored_len
                src.release(pos)
            src.read_all()
            try:
                footer = fmt.read_footer(src, STREAM, src.size, header, pos)
            except DiskimgError as err:
                raise stop(f"no valid index after the records ({err})") from err
            zeroed = holes = 0
            zeros = bytes(bs)
            per = footer.entries_per_segment
            for seg, (off, length) in enumerate(footer.segments):
                first = seg * per
                raw = fmt.read_segment(src, STREAM, off, length, first,
                                       min(per, blocks - first))
                for block, count, entry in segment_runs(first, raw):
                    if entry.kind == fmt.DATA:
                        for b in range(block, block + count):
                            if written.get(b) != entry.sha256 and not any(
                                    s.block == b for s in salvaged):
                                raise stop(f"the index names content for block {b} that "
                                           f"the stream did not carry")
                    elif entry.kind in (fmt.ZERO, fmt.UNUSED):
                        if tgt.created:
                            holes += count
                            continue
                        for b in range(block, block + count):
                            n = header.block_length(b)
                            try:
                                tgt.write(memoryview(zeros)[:n], b * bs)
                            except OSError as err:
                                raise DiskIOError(target, "write", err, b * bs) from err
                        zeroed += count
                    else:
                        raise stop(f"block {block}: index entry of kind {entry.kind} in a full "
                                   f"image")
            os.fsync(tgt.fd)
        except BaseException:
            removed = _leave(tgt, keep_partial or salvage)
            if removed:
                log.warning("%s: removed (created by this restore; --salvage keeps it)", target)
            raise
        target_size = tgt.size
        tgt.close()
    finally:
        if tgt.fd >= 0:
            tgt.close()
    return RestoreResult(
        image=STREAM, target=target, chain=(header.uuid,), chain_paths=(STREAM,),
        size=header.size, target_size=target_size, blocks=blocks,
        written_blocks=len(written), zeroed_blocks=zeroed, hole_blocks=holes,
        skipped_blocks=0, read_target_blocks=0, written_bytes=written_bytes,
        seconds=time.monotonic() - started, unreadable=(), salvaged=tuple(salvaged))
