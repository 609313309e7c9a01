"""Restore from a stream (`diskimg restore - TARGET`): the image arrives front to back on
standard input and is never sought back into.

Each record is checked as it arrives, against the digest its own header carries, and written at
its block; the index comes last, so only then is it known which blocks are zero or unused
(they are zeroed then: a new file keeps them as holes) and that every DATA entry names the
very content that was written for its block (the entry's digest against the record's).  A
stream that ends early, or a record that fails its check, stops the restore with exit 1 naming
what was written; with `salvage` a damaged record is skipped (its block listed) and a
target file this restore created is kept however it ends.

An incremental or differential image refers to its parents' blocks by index entries, which
arrive last: its parents are found (by name, then UUID, in the --search directories or prefixes
and the current directory) and checked before anything is written, and the blocks it refers to
them are read from them and written when the index arrives, each checked against the digest
the stream's entry carries (docs/FORMAT.md section 10).  A delta record (section 18) is
applied over its block as the parents hold it, then checked against the record's digest.

The images a plain `diskimg image` makes are read as they are: with parity (section 16), the
records are read out of the windows as they arrive, the checksum tables and parity skipped
(diskimg.image.stream_parity); the current window is kept, and a record that fails its check is
healed from its window's parity (the stream is read on past the window for it) and checked
again.  Encrypted (section 17): the command's key opens the header before anything is written,
and decrypts the records and the index.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Iterable

from diskimg import format as fmt
from diskimg.disk.blockdev import open_target
from diskimg.errors import ChainError, DecodeError, DigestMismatch, DiskIOError, DiskimgError
from diskimg.errors import StreamEnded
from diskimg.errors import UsageError
from diskimg.format import delta
from diskimg.image.chain import Chain, find_image, open_chain
from diskimg.image.imagefile import segment_runs, transforms_of, unlock_header
from diskimg.image.records import decode_verified
from diskimg.image.view import BlockView
from diskimg.ops.restore import Overwrite, RestoreResult, Salvaged, _leave, check_target
from diskimg.ops.restore import describe_target
from diskimg.store import open_directory
from diskimg.store.stream import ForwardReader
from diskimg.transforms import TransformChain
from diskimg.units import human

if TYPE_CHECKING:
    from diskimg.image.stream_parity import ParityStreamReader

log = logging.getLogger(__name__)

STREAM = "-"


def restore_stream(target: str, *, search: Iterable[str] = (), confirm: Callable | None = None,
                   salvage: bool = False, keep_partial: bool = False, progress=None,
                   fd: int = 0) -> RestoreResult:
    """Restore the image arriving on `fd` (standard input) onto `target`; an incremental or
    differential one against its parents, found in `search` and the current directory.
    Raises what restore_image raises before writing (NotAnImage, MissingParent, UnsafeTarget,
    UsageError: overwriting not confirmed), and StreamEnded (exit 1) once writing started."""
    started = time.monotonic()
    fwd = ForwardReader(fd, STREAM)
    header, pos = fmt.read_header(fwd, STREAM)
    # an encrypted image: its key (the command's --key-file, --passphrase... options), refused
    # before anything is written when it does not open the header
    header = unlock_header(header, STREAM)
    src: ForwardReader | ParityStreamReader = fwd
    if header.parity is not None:
        # the records are read as they arrive, the parity and tables skipped as they pass;
        # the current window is kept, to heal a record that fails its check
        from diskimg.image.stream_parity import ParityStreamReader
        src = ParityStreamReader(fwd, header.parity)
    parents = _open_parents(header, search) if header.parent is not None else None
    try:
        return _restore(src, header, pos, parents, target, confirm, salvage, keep_partial,
                        progress, started)
    finally:
        if parents is not None:
            parents.close()


def _open_parents(header: fmt.Header, search: Iterable[str]) -> Chain:
    """The chain an incremental or differential stream was made against, found (before
    anything is written) by its recorded name and then by UUID in each `search` directory or
    prefix, then in the current directory; checked as a chain's images are."""
    places = [*search, "."]
    stores = [open_directory(p) for p in places]
    stores = list({s.location: s for s in stores}.values())
    parent = find_image(header.parent, stores, STREAM)
    parents = open_chain(parent, search)
    top = parents.leaf.header
    if (top.size, top.block_size, top.digest) != (header.size, header.block_size,
                                                   header.digest):
        parents.close()
        raise ChainError(f"{parents.leaf.path}: size, block size or block digest differs from "
                         f"the image on standard input")
    return parents


def _restore(src: ForwardReader | ParityStreamReader, header: fmt.Header, pos: int,
             parents: Chain | None, target: str, confirm, salvage: bool, keep_partial: bool,
             progress, started: float) -> RestoreResult:
    bs, blocks = header.block_size, header.blocks
    transforms = transforms_of(header)
    opener = header.keys.open_segment if header.keys is not None else None
    healing = header.parity is not None    # src is a ParityStreamReader
    view = BlockView(parents) if parents is not None else None   # the parents' blocks, for deltas
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
                if rec is None and healing and src.heal(pos, fmt.RECORD_HEADER_SIZE):
                    head = src.pread(fmt.RECORD_HEADER_SIZE, pos)
                    rec = fmt.unpack_record(head)
                    log.warning("%s: %s at byte %d was damaged in the stream and healed by "
                                "its parity", STREAM, "the record header" if rec is not None
                                else "the image's index", pos)
                if rec is None:
                    break          # the index (or damage: the footer check tells)
                if rec.flags & fmt.FLAG_PAGE_HASHES and rec.block < blocks:
                    # a stored block's page hashes (section 18.1): for the next incremental
                    pos += fmt.RECORD_HEADER_SIZE + rec.stored_len
                    continue
                is_delta = bool(rec.flags & fmt.FLAG_DELTA)
                length = header.block_length(rec.block) if rec.block < blocks else 0
                if rec.block >= blocks or not (delta.plausible_length(rec.raw_len, length)
                                               if is_delta else rec.raw_len == length):
                    raise stop(f"record at byte {pos} names block {rec.block} of "
                               f"{rec.raw_len} bytes, not a block of this image")
                if is_delta and view is None:
                    raise stop(f"record at byte {pos} is a delta of block {rec.block}, but "
                               f"this is a full image")
                payload = src.pread(rec.stored_len, pos + fmt.RECORD_HEADER_SIZE)
                if len(payload) < rec.stored_len:
                    raise stop(f"the stream ended at byte {src.size}, inside the record of "
                               f"block {rec.block}")
                block_view = memoryview(out)[:length]
                try:
                    try:
                        _decode(transforms, rec, payload, block_view, header, view, is_delta)
                    except DecodeError:
                        if not (healing and src.heal(pos, fmt.RECORD_HEADER_SIZE
                                                     + rec.stored_len)):
                            raise
                        payload = src.pread(rec.stored_len, pos + fmt.RECORD_HEADER_SIZE)
                        _decode(transforms, rec, payload, block_view, header, view, is_delta)
                        log.warning("%s: block %d (record at byte %d) was damaged in the "
                                    "stream and healed by its parity", STREAM, rec.block, pos)
                except DecodeError as err:
                    if not salvage:
                        raise stop(f"block {rec.block} (record at byte {pos}) is damaged: "
                                   f"{err.reason}") from err
                    salvaged.append(Salvaged(rec.block, 1, rec.block * bs, length,
                                             f"record damaged: {err.reason}"))
                    try:    # restored as zeros, as restore --salvage does
                        tgt.write(bytes(length), rec.block * bs)
                    except OSError as err2:
                        raise DiskIOError(target, "write", err2, rec.block * bs) from err2
                else:
                    try:
                        tgt.write(block_view, rec.block * bs)
                    except OSError as err:
                        raise DiskIOError(target, "write", err, rec.block * bs) from err
                    written[rec.block] = rec.sha256
                    written_bytes += length
                    if progress:
                        progress.advance(length)
                pos += fmt.RECORD_HEADER_SIZE + rec.stored_len
                src.release(pos)
            try:
                src.read_all()
            except ValueError as err:      # an image with parity: its tail is damaged
                raise stop(str(err)) from err
            def healed(read: Callable, offset: int, length: int):
                """read(), and with parity once more after healing [offset, offset+length)."""
                try:
                    return read()
                except DiskimgError as err:
                    if not (healing and src.heal(offset, length)):
                        raise
                    result = read()
                    log.warning("%s: the image's index or footer was damaged in the stream and "
                                "healed by its parity (%s)", STREAM, err)
                    return result

            try:
                footer = healed(lambda: fmt.read_footer(src, STREAM, src.size, header, pos),
                                pos, src.size - pos)
            except DiskimgError as err:
                raise stop(f"no valid index after the records ({err})") from err
            zeroed = holes = parent_blocks = 0
            zeros = bytes(bs)
            per = footer.entries_per_segment
            for seg, (off, length) in enumerate(footer.segments):
                first = seg * per
                try:
                    raw = healed(lambda: fmt.read_segment(src, STREAM, off, length, first,
                                                          min(per, blocks - first), opener),
                                 off, length)
                except DiskimgError as err:
                    raise stop(f"index segment {seg} is damaged ({err})") from err
                for block, count, entry in segment_runs(first, raw):
                    if entry.kind in (fmt.DATA, fmt.DELTA):
                        for b in range(block, block + count):
                            if written.get(b) != entry.sha256 and not any(
                                    s.block == b for s in salvaged):
                                raise stop(f"the index names content for block {b} that "
                                           f"the stream did not carry")
                    elif entry.kind == fmt.PARENT and parents is not None:
                        for b in range(block, block + count):
                            n = _from_parents(parents, b, entry, out, tgt, target, bs, stop)
                            written_bytes += n
                            parent_blocks += 1
                            if progress and n:
                                progress.advance(n)
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
                        raise stop(f"block {block}: index entry of kind {entry.kind} "
                                   f"{'in a full image' if parents is None else 'unknown'}")
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
    chain = ([*parents.uuids] if parents else []) + [header.uuid]
    paths = ([i.path for i in parents.images] if parents else []) + [STREAM]
    return RestoreResult(
        image=STREAM, target=target, chain=tuple(chain), chain_paths=tuple(paths),
        size=header.size, target_size=target_size, blocks=blocks,
        written_blocks=len(written) + parent_blocks, zeroed_blocks=zeroed, hole_blocks=holes,
        skipped_blocks=0, read_target_blocks=0, written_bytes=written_bytes,
        seconds=time.monotonic() - started, unreadable=(), salvaged=tuple(salvaged))


def _from_parents(parents: Chain, block: int, entry: fmt.IndexEntry, out: bytearray, tgt,
                  target: str, bs: int, stop) -> int:
    """Write `block`, which the stream's index refers to its parent for, from the parents'
    chain: the content the chain holds must hash to the digest the stream's PARENT entry
    carries (docs/FORMAT.md section 10).  Returns the bytes written (0: zeros left as a hole
    in a new file)."""
    top = len(parents.images) - 1
    _, img, held = parents.resolve_from(top, block, parents.leaf.entry(block))
    if held.sha256 != entry.sha256:
        raise stop(f"block {block}: chain inconsistent (the parents hold another content than "
                   f"the stream's index says)")
    length = parents.leaf.header.block_length(block)
    if held.kind == fmt.DATA:
        data = img.read_block(block, held, out=out)
    elif tgt.created:
        return 0
    else:
        data = memoryview(bytes(length))
    try:
        tgt.write(data, block * bs)
    except OSError as err:
        raise DiskIOError(target, "write", err, block * bs) from err
    return length


def _decode(transforms: TransformChain, rec: fmt.RecordHeader, payload: bytes, out: memoryview,
            header: fmt.Header, view: BlockView | None, is_delta: bool) -> None:
    """Decode record `rec` into `out` (its block) and check it against the record's digest.  A
    delta record (docs/FORMAT.md section 18) is applied over the block's content in the
    parents' chain (`view`, each block read checked).  Raises DecodeError."""
    if not is_delta:
        decode_verified(transforms, rec.block, payload, rec.codec, rec.sha256, out,
                        digest=header.hash)
        return
    assert view is not None
    payload_out = bytearray(rec.raw_len)
    transforms.decode_into(rec.block, payload, rec.codec, memoryview(payload_out))
    pages = delta.delta_pages(payload_out, len(out))
    view.read_block(rec.block, out)
    delta.apply_delta(out, payload_out, pages)
    actual = header.hash(out)
    if actual != rec.sha256:
        raise DigestMismatch(rec.sha256, actual)
