"""Checking an image, or a whole chain, and naming every damaged block.

Every image the requested one depends on is checked in full: its index segments against their
CRC-32C, every stored block's record header against its CRC-32C and the index, and its content
against its SHA-256.  Errors are collected, not raised, so that the report names every bad block.
An image cut short (no trailer) has lost its index; its records are still scanned one by one
(each record header carries the block's SHA-256) so the report says what survived.

A chain is also checked the way restore resolves it (section 10 of docs/FORMAT.md): every PARENT
entry of the requested image must resolve to an entry with the same SHA-256, from the index
entries alone (no block is read twice).  Damage in a parent image is marked as not affecting
the restore of the requested image when every block it touches is held by a later image.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from diskimg import format as fmt
from diskimg.errors import BlockError, TruncatedImage
from diskimg.image.chain import Chain, open_chain
from diskimg.image.imagefile import (
    ImageReader,
    scan_records,
    segment_runs,
    survey_truncated,
)
from diskimg.image.view import BlockView
from diskimg.ops.pipeline import default_threads, depth_for, ordered_map
from diskimg.ops.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyError:
    image: str            # UUID (empty when the header itself is unreadable)
    path: str
    block: int | None     # None: the damage is not in one block (header, footer, trailer)
    offset: int | None    # byte offset of the block in the device
    reason: str
    last_block: int | None = None   # a range of blocks (damaged index segment)
    # False: damage in a parent image, in blocks that later images of the chain hold, so
    # restoring the requested image never reads them; `overridden_by` names such an image
    affects_restore: bool = True
    overridden_by: str | None = None
    # images with parity: True, damage that parity repairs (restore heals it on the fly,
    # `diskimg repair` rewrites the file); False, damage beyond it; None: an image without parity
    repairable: bool | None = None


@dataclass(frozen=True)
class VerifyResult:
    image: str
    chain: tuple[tuple[str, str], ...]    # (uuid, path), root first
    errors: tuple[VerifyError, ...]
    blocks_checked: int
    bytes_checked: int
    seconds: float
    # "full": every block decoded and checked; "structure": an encrypted image checked without
    # its key (verify --no-key): CRCs of header, record headers, index segments, footer and
    # trailer only
    scope: str = "full"

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def restore_errors(self) -> int:
        """How many errors make restoring the requested image fail."""
        return sum(e.affects_restore for e in self.errors)


def verify_image(path: str, search: Iterable[str] = (), threads: int | None = None,
                 progress: Progress | None = None) -> VerifyResult:
    """Verify `path` and its chain.  Raises NotAnImage/IncompleteImage (exit 2) and ChainError
    (exit 2, missing parent); damage is reported in the result, not raised."""
    started = time.monotonic()
    threads = threads or default_threads()
    try:
        chain = open_chain(path, search)
    except TruncatedImage as err:
        errors, checked, nbytes = _scan_truncated(err)
        return VerifyResult(path, (), tuple(errors), checked, nbytes, time.monotonic() - started)
    except fmt.CorruptImage as err:  # header, footer or trailer damaged
        return VerifyResult(path, (), (VerifyError("", path, None, None, str(err)),), 0, 0,
                            time.monotonic() - started)
    errors: list[VerifyError] = []
    checked = nbytes = 0
    with chain:
        if progress:   # every image's blocks are checked: the device size once per image
            progress.start(sum(img.header.size for img in chain.images), "B")
        for level, img in enumerate(chain.images):
            # delta blocks of this image are read through the chain up to it (their parents)
            view = BlockView(Chain(chain.images[:level + 1]), cache_bytes=0)
            e, c, n = _verify_one(img, threads, progress, view)
            if level < len(chain.images) - 1:
                e = [_mark_overridden(chain, level, err) for err in e]
            errors += e
            checked += c
            nbytes += n
        errors += _check_resolution(chain)
        return VerifyResult(path, tuple((i.uuid, i.path) for i in chain.images), tuple(errors),
                            checked, nbytes, time.monotonic() - started)


def _runs_in(img: ImageReader, first: int, count: int
             ) -> Iterator[tuple[int, int, fmt.IndexEntry | None]]:
    """(first block, count, entry) for the runs of identical entries of `img` among blocks
    first..first+count-1; entry None for the blocks of a damaged index segment (reported by
    that image's own check)."""
    eps = img.entries_per_segment
    end = first + count
    while first < end:
        seg = first // eps
        seg_first = seg * eps
        stop = min(end, seg_first + eps, img.blocks)
        try:
            raw = img.segment(seg)
        except fmt.SegmentError:
            yield first, stop - first, None
        else:
            yield from segment_runs(first, raw[(first - seg_first) * fmt.ENTRY_SIZE:
                                               (stop - seg_first) * fmt.ENTRY_SIZE])
        first = stop


def _resolved(chain: Chain, level: int, first: int, count: int, through_delta: bool = False
              ) -> Iterator[tuple[int, int, int, fmt.IndexEntry | None]]:
    """Resolve blocks first..first+count-1 from image `level` down the chain, run by run:
    (first block, count, level of the image that holds them, its entry).  Entry None: the
    resolution stops at a damaged index segment of that image.  An entry of an unknown kind,
    or PARENT in the root, is returned as it is (the image's own check reports it).  With
    `through_delta`, a DELTA entry is followed down too (a delta needs its parent's block:
    the deepest image reached is what reading the block depends on)."""
    def down(entry: fmt.IndexEntry) -> bool:
        return entry.kind == fmt.PARENT or (through_delta and entry.kind == fmt.DELTA)
    if count == 1:   # a single block (most PARENT entries of data): entry by entry is faster
        while True:
            try:
                entry = chain.images[level].entry(first)
            except fmt.SegmentError:
                yield first, 1, level, None
                return
            if not down(entry) or level == 0:
                yield first, 1, level, entry
                return
            level -= 1
    todo = [(level, first, count)]   # a list, not recursion: a chain may be 10000 long
    while todo:
        lvl, b, n = todo.pop()
        for rb, rn, entry in _runs_in(chain.images[lvl], b, n):
            if entry is not None and down(entry) and lvl > 0:
                todo.append((lvl - 1, rb, rn))
            else:
                yield rb, rn, lvl, entry


def _check_resolution(chain: Chain) -> list[VerifyError]:
    """Every PARENT entry of the leaf against the entry it resolves to (section 10, step 3):
    a different SHA-256 is a block restore refuses ("chain inconsistent")."""
    leaf = chain.leaf
    top = len(chain.images) - 1
    errors: list[VerifyError] = []
    if top == 0:
        return errors
    bs = leaf.header.block_size
    for first, count, entry in _runs_in(leaf, 0, leaf.blocks):
        if entry is None or entry.kind != fmt.PARENT:
            continue
        for b, n, level, held in _resolved(chain, top - 1, first, count):
            if held is None or held.kind not in fmt.KIND_NAMES or held.kind == fmt.PARENT:
                continue   # damage of that image, reported (and marked) by its own check
            if held.sha256 != entry.sha256:
                holder = chain.images[level]
                errors.append(VerifyError(
                    leaf.uuid, leaf.path, b, b * bs,
                    f"chain inconsistent: {holder.path} holds the block with checksum "
                    f"{held.sha256.hex()}, this image's index expects {entry.sha256.hex()}",
                    last_block=b + n - 1 if n > 1 else None))
    return errors


def _mark_overridden(chain: Chain, level: int, err: VerifyError) -> VerifyError:
    """`err`, found in image `level` (not the leaf), marked as not affecting the restore of
    the leaf when resolving its blocks from the leaf never reaches that image."""
    if err.block is None:
        return err    # the whole image (its index digest): cannot be narrowed to blocks
    first, last = err.block, err.last_block if err.last_block is not None else err.block
    nearest = None
    for _, _, held_at, entry in _resolved(chain, len(chain.images) - 1, first,
                                          last - first + 1, through_delta=True):
        if entry is None or held_at <= level:
            return err
        nearest = held_at if nearest is None else min(nearest, held_at)
    if nearest is None:
        return err
    return dataclasses.replace(err, affects_restore=False,
                               overridden_by=chain.images[nearest].path)


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


def _verify_one(img: ImageReader, threads: int, progress: Progress | None,
                view: BlockView | None = None) -> tuple[list[VerifyError], int, int]:
    errors: list[VerifyError] = []
    h = img.header
    scratch = threading.local()   # one buffer per worker, reused for every block it checks

    def work(item: tuple[int, int, fmt.IndexEntry]
             ) -> tuple[int, int, fmt.IndexEntry, VerifyError | None]:
        block, count, entry = item
        return block, count, entry, check(block, count, entry)

    def check(block: int, count: int, entry: fmt.IndexEntry) -> VerifyError | None:
        last = block + count - 1
        if entry.kind in fmt.STORED_KINDS:
            buf = getattr(scratch, "buf", None)
            if buf is None:
                buf = scratch.buf = bytearray(h.block_size)
            try:
                if entry.kind == fmt.DATA:
                    img.read_block(block, entry, out=buf)
                elif fmt.FEATURE_DELTA not in h.features:
                    return VerifyError(img.uuid, img.path, block, block * h.block_size,
                                       f"index entry damaged: unknown kind {entry.kind}")
                else:
                    view.read_block(block, buf, entry)
            except BlockError as err:
                return _block_error(img, block, err)
            except fmt.CorruptImage as err:     # the chain below a delta block (its parent)
                return VerifyError(img.uuid, img.path, block, block * h.block_size,
                                   f"a delta on its parent's block, which cannot be read: "
                                   f"{err}")
            try:
                img.read_page_hashes(block, entry)
            except BlockError as err:
                # only what the next incremental compares with: it stores the block whole
                return VerifyError(img.uuid, img.path, block, block * h.block_size,
                                   f"{err.reason} (restore does not read it; the next "
                                   f"incremental stores this block whole)",
                                   affects_restore=False)
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
    repairs = img.scrub()    # parity: every slice against its checksum, rebuilt where it can be
    for block, count, entry, block_error in ordered_map(
            work, _runs(img, errors), threads, depth=depth_for(h.block_size, threads),
            inline=lambda item: item[2].kind not in fmt.STORED_KINDS):
        checked += count
        run_bytes = min((block + count) * h.block_size, h.size) - block * h.block_size
        if entry.kind in fmt.STORED_KINDS:
            nbytes += run_bytes
        if block_error:
            errors.append(block_error)
        if progress:
            progress.advance(run_bytes)
    digest_ok = not errors or all(e.block is not None and e.last_block is None for e in errors)
    if digest_ok and img.index_digest() != img.index_sha256:
        errors.append(VerifyError(img.uuid, img.path, None, None,
                                  "index digest differs from the footer's"))
    if repairs is not None:
        errors = [dataclasses.replace(e, repairable=False) for e in errors]
        errors += _parity_errors(img, repairs)
    errors.sort(key=lambda e: (e.block if e.block is not None else -1))
    return errors, checked, nbytes


def _parity_errors(img: ImageReader, repairs) -> list[VerifyError]:
    """What the parity scrub of `img` found and rebuilt, named by what the damaged bytes
    belong to: a block's record, an index segment, the header, the footer; and damage of the
    parity data itself.  Damage beyond repair shows in the block checks (reported as not
    repairable) and is named here only where no block check sees it."""
    h = img.healing
    out: list[VerifyError] = []
    bs = img.header.block_size
    fixed = h.slot_ranges(repairs.repaired)
    lost = h.slot_ranges(repairs.lost)
    note = "damaged in the image file; parity repairs it (restore heals it on the fly)"

    def overlaps(ranges: list[tuple[int, int]], off: int, length: int) -> bool:
        i = bisect.bisect_right(ranges, (off + length, -1))
        return any(o < off + length and off < o + n for o, n in ranges[max(0, i - 2):i])

    areas = [("header", 0, img.data_start)]
    areas += [(f"index segment {i}", off, n) for i, (off, n) in enumerate(img.segments)]
    areas.append(("footer and trailer", img.footer.offset, img.file_size - img.footer.offset))
    for ranges, ok in ((fixed, True), (lost, False)):
        if not ranges:
            continue
        for what, off, n in areas:
            if overlaps(ranges, off, n):
                if not ok and what == "header" and h.tail.header:
                    out.append(VerifyError(img.uuid, img.path, None, None,
                                           "header: damaged beyond what parity repairs; its "
                                           "copy in the parity tail is intact and used",
                                           affects_restore=False, repairable=True))
                    continue
                out.append(VerifyError(img.uuid, img.path, None, None,
                                       f"{what}: " + (note if ok else "damaged beyond what "
                                                                     "parity repairs"),
                                       affects_restore=not ok, repairable=ok))
    if fixed:
        try:
            for block, e in img.iter_entries():
                if e.kind in fmt.STORED_KINDS and overlaps(fixed, e.offset,
                                                   fmt.RECORD_HEADER_SIZE + e.stored_len):
                    out.append(VerifyError(img.uuid, img.path, block, block * bs,
                                           f"record {note}", affects_restore=False,
                                           repairable=True))
        except fmt.SegmentError:
            pass   # reported by the block checks
    parity_slots = sum(1 for w, sl in repairs.repaired
                       if sl >= h.layout.window(w).data_slots)
    if parity_slots:
        out.append(VerifyError(img.uuid, img.path, None, None,
                               f"parity data: {parity_slots} parity slice(s) damaged; "
                               f"`diskimg repair` rewrites them", affects_restore=False,
                               repairable=True))
    tables = repairs.tables - repairs.lost_tables
    if tables:
        out.append(VerifyError(img.uuid, img.path, None, None,
                               f"parity checksum table of window(s) "
                               f"{', '.join(map(str, sorted(tables)))} damaged; its second copy "
                               f"is intact", affects_restore=False, repairable=True))
    if repairs.lost_tables:
        out.append(VerifyError(img.uuid, img.path, None, None,
                               f"both copies of the parity checksum table of window(s) "
                               f"{', '.join(map(str, sorted(repairs.lost_tables)))} damaged: "
                               f"damage there cannot be located", affects_restore=False,
                               repairable=False))
    for what in h.tail_damage:
        out.append(VerifyError(img.uuid, img.path, None, None, what, affects_restore=False,
                               repairable=True))
    return out
def _block_error(img: ImageReader, block: int, err: BlockError) -> VerifyError:
    """The VerifyError of stored block `block` of `img` that could not be read: its own damage,
    or (a delta) damage of the parent block it applies to, named with that image and block."""
    bs = img.header.block_size
    if err.image == img.path:
        return VerifyError(img.uuid, img.path, block, block * bs, err.reason)
    return VerifyError(img.uuid, img.path, block, block * bs,
                       f"a delta on a damaged parent block: {err.image}: block {err.block}: "
                       f"{err.reason}")


def _scan_truncated(err: TruncatedImage) -> tuple[list[VerifyError], int, int]:
    """Walk the records of an image without a trailer; report damaged ones and what survived."""
    if err.in_header:
        return [VerifyError("", err.path, None, None, str(err))], 0, 0
    try:
        s = survey_truncated(err.path, check_data=True)
    except fmt.CorruptImage as header_err:   # cut, and its header damaged as well
        return [VerifyError("", err.path, None, None, str(header_err))], 0, 0
    bs = s.header.block_size
    errors = [VerifyError(s.header.uuid, s.path, block, block * bs, reason)
              for block, reason in s.bad]
    if s.records:
        survived = (f"{s.records} stored blocks survived, up to byte {s.end} of the file "
                    f"(the last is block {s.last_block}); later blocks are missing")
    else:
        survived = "no stored block survived"
    after = 0 if s.last_block is None else s.last_block + 1
    errors.append(VerifyError(
        s.header.uuid, s.path, after, after * bs,
        f"image truncated at byte {s.file_size}: no trailer, index lost; {survived}"))
    return errors, s.records, s.data_bytes


def verify_structure(path: str, progress: Progress | None = None) -> VerifyResult:
    """Check `path` without its key (verify --no-key): the CRC-32C of its header, of every
    record header (walked from the first to the index, each in its place), of every index
    segment, and of footer and trailer.  Block contents and their authenticity need the key
    and are not checked; nor are the images the chain depends on.  An image cut short is
    reported as truncated.  Raises NotAnImage (exit 2)."""
    started = time.monotonic()
    try:
        img = ImageReader(path, unlock=False)
    except TruncatedImage as err:
        return VerifyResult(path, (), (VerifyError("", path, None, None, str(err)),), 0, 0,
                            time.monotonic() - started, scope="structure")
    except fmt.CorruptImage as err:
        return VerifyResult(path, (), (VerifyError("", path, None, None, str(err)),), 0, 0,
                            time.monotonic() - started, scope="structure")
    errors: list[VerifyError] = []
    records = nbytes = 0
    with img:
        h = img.header
        if progress:
            progress.start(img.records_end - img.data_start, "B")
        pos, end = img.data_start, img.records_end
        while pos < end:
            last = pos
            for off, rec in scan_records(img.reader, pos, end):
                side = rec.flags & (fmt.FLAG_PAGE_HASHES | fmt.FLAG_DELTA)  # delta, section 18
                if rec.block >= h.blocks or (not side and rec.raw_len != h.block_length(rec.block)):
                    break
                records += 1
                nbytes += 0 if side else rec.raw_len
                last = off + fmt.RECORD_HEADER_SIZE + rec.stored_len
                if progress:
                    progress.advance(fmt.RECORD_HEADER_SIZE + rec.stored_len)
            if last >= end:
                break
            nxt = _next_record(img, last + 1, end)
            errors.append(VerifyError(h.uuid, img.path, None, None,
                                      f"records damaged at bytes {last}-{nxt - 1} of the file "
                                      f"(a record header fails its CRC-32C or does not fit)"))
            pos = nxt
        for seg, (off, length) in enumerate(img.segments):
            first = seg * img.entries_per_segment
            count = min(img.entries_per_segment, h.blocks - first)
            try:
                fmt.check_segment(img.reader.pread(length, off), img.path, length, first, count,
                                  unseal=False)
            except fmt.SegmentError as err:
                errors.append(VerifyError(h.uuid, img.path, err.first,
                                          err.first * h.block_size, err.reason,
                                          last_block=err.first + err.count - 1))
        return VerifyResult(path, ((h.uuid, img.path),), tuple(errors), records, nbytes,
                            time.monotonic() - started, scope="structure")


def _next_record(img: ImageReader, pos: int, end: int) -> int:
    """The offset of the next record magic from `pos` whose record header is valid (end when
    there is none)."""
    chunk = 1 << 20
    while pos < end:
        buf = img.reader.pread(min(chunk + len(fmt.RECORD_MAGIC) - 1, end - pos), pos)
        i = buf.find(fmt.RECORD_MAGIC)
        while i >= 0:
            rec = fmt.unpack_record(img.reader.pread(fmt.RECORD_HEADER_SIZE, pos + i))
            if rec is not None:
                return pos + i
            i = buf.find(fmt.RECORD_MAGIC, i + 1)
        if len(buf) < chunk:
            return end
        pos += chunk
    return end
