"""Restoring an image or a chain to a block device or file, block by block, verifying each block.

Every block is read from the nearest image of the chain that holds it and checked against the
SHA-256 in the requested image's index before it is written; the first bad block stops the
restore (nothing unverified is ever written).  With `only_changed` each target block is read and
hashed first and only the blocks that differ are written.  Safety checks come before any write: a
target that is mounted, holds mounted partitions or swap, or is smaller than the image is refused,
and an existing target is overwritten only when `confirm` says so.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from diskimg import devices, identity
from diskimg import format as fmt
from diskimg.blockdev import (
    Target,
    open_target,
    preadv_full,
    stat_target,
    zero_range,
)
from diskimg.chain import Chain, open_chain
from diskimg.errors import CorruptImage, OperationFailed, UnsafeTarget, UsageError
from diskimg.pipeline import BufferPool, default_threads, depth_for, ordered_map
from diskimg.units import human

log = logging.getLogger(__name__)

Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class RestoreResult:
    image: str
    target: str
    chain: tuple[str, ...]           # UUIDs, root first
    chain_paths: tuple[str, ...]
    size: int
    target_size: int
    blocks: int
    written_blocks: int
    zeroed_blocks: int               # zero or unused blocks made to read as zeros
    hole_blocks: int                 # zero blocks left as holes in a new file
    skipped_blocks: int              # only_changed: already identical on the target
    read_target_blocks: int
    written_bytes: int
    seconds: float
    unreadable: tuple[tuple[int, int], ...]   # byte ranges restored as zeros (rescued images)


def check_target(target: str, size: int) -> tuple[bool, bool, int]:
    """Refuse an unsafe target; return (exists, is_block, current size)."""
    exists, is_block, tsize = stat_target(target)
    parent_dir = os.path.dirname(os.path.abspath(target))
    if not exists and not os.path.isdir(parent_dir):
        raise UsageError(f"{target}: directory {parent_dir} does not exist")
    if is_block:
        busy = devices.usage(target)
        if busy:
            raise UnsafeTarget(target, "is in use: " + "; ".join(busy))
    if exists:
        # a file under a loop device (or a loop device over a file another one reads):
        # writing it writes that loop device's disk
        how = "shares its backing file with" if is_block else "backs"
        for loop in identity.loops_backed_by(target):
            busy = devices.usage(loop)
            if busy:
                raise UnsafeTarget(target, f"{how} {loop}, which is in use: " + "; ".join(busy))
            log.warning("%s %s %s (attached, not in use): detach it with losetup -d %s before "
                        "using it again, its cached data may be stale", target, how, loop, loop)
    if exists and tsize < size:
        raise UnsafeTarget(target, f"is too small: {tsize} bytes ({human(tsize)}), the image "
                                   f"needs {size} bytes ({human(size)})")
    return exists, is_block, tsize


def restore_image(image: str, target: str, *, search: Iterable[str] = (),
                  only_changed: bool = False, confirm: Confirm | None = None,
                  threads: int | None = None,
                  progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Restore `image` (and the chain it depends on) onto `target`.

    Raises NotAnImage/IncompleteImage/ChainError (exit 2), UnsafeTarget (exit 2), UsageError
    when overwriting is not confirmed, BlockError/CorruptImage (exit 1) at the first bad block,
    OperationFailed (exit 3) on write errors.
    """
    started = time.monotonic()
    with open_chain(image, search) as chain:
        header = chain.leaf.header
        tid = identity.identify(target)
        for img in chain.images:
            iid = identity.identify(img.path)
            if identity.same(tid, iid):
                raise UnsafeTarget(target, f"is image {img.uuid} of the chain being restored")
            why = identity.overlap(tid, iid)
            if why:
                raise UnsafeTarget(target, f"would overwrite image {img.uuid} of the chain "
                                           f"being restored ({why})")
        exists, is_block, tsize = check_target(target, header.size)
        if exists:
            what = "block device" if is_block else "file"
            question = (f"{target} ({what}, {human(tsize)}) will be overwritten with "
                        f"{os.path.basename(image)} ({human(header.size)})")
            if confirm is None or not confirm(question):
                raise UsageError(f"{target}: exists; not overwritten (confirm, or use --yes)")
        if only_changed and not exists:
            log.warning("%s does not exist yet: --only-changed restores every block", target)
        tgt = open_target(target, header.size, exists, is_block, read_back=only_changed and exists)
        try:
            counts = _restore_blocks(chain, tgt, only_changed and exists,
                                     threads or default_threads(), progress)
            try:
                os.fsync(tgt.fd)
            except OSError as err:
                raise OperationFailed(f"{target}: fsync failed: {err.strerror}") from err
        finally:
            tgt.close()
        unreadable = tuple(tuple(r) for r in chain.leaf.footer.get("unreadable", []))
        return RestoreResult(
            image=image, target=target, chain=tuple(chain.uuids),
            chain_paths=tuple(i.path for i in chain.images), size=header.size,
            target_size=tgt.size, blocks=header.blocks, seconds=time.monotonic() - started,
            unreadable=unreadable, **counts,
        )


def _restore_blocks(chain: Chain, tgt: Target, only_changed: bool, threads: int,
                    progress: Callable[[int], None] | None) -> dict:
    leaf = chain.leaf
    header = leaf.header
    bs = header.block_size
    c = dict(written_blocks=0, zeroed_blocks=0, hole_blocks=0, skipped_blocks=0,
             read_target_blocks=0, written_bytes=0)
    pool = BufferPool(bs)   # blocks are decompressed into reused, page-aligned buffers

    def work(item: tuple[int, int, fmt.IndexEntry]) -> tuple[int, int, memoryview | None, bool]:
        """(first block, count, data or None for zeros, skip), the data verified; the data
        is a view of a pool buffer, given back (`.obj`) once written."""
        block, count, entry = item
        if count > 1:  # a run of zero or unused blocks: nothing to read
            return block, count, None, False
        length = header.block_length(block)
        img, held = chain.resolve(block, entry)
        if held.sha256 != entry.sha256:
            raise CorruptImage(f"{img.path}: block {block} has checksum {held.sha256.hex()} but "
                               f"{leaf.path} expects {entry.sha256.hex()}: chain inconsistent")
        buf = pool.get()
        if only_changed:  # compare first: an identical block costs no read of the image
            current = memoryview(buf)[:length]
            try:
                preadv_full(tgt.fd, current, block * bs, tgt.path)
            except OSError as err:
                raise OperationFailed(f"{tgt.path}: read error at byte {block * bs}: "
                                      f"{err.strerror}") from err
            if hashlib.sha256(current).digest() == entry.sha256:
                pool.put(buf)
                return block, 1, None, True
        if held.kind == fmt.DATA:
            return block, 1, img.read_block(block, held, out=buf), False
        pool.put(buf)
        if not header.zero_run_ok(block, block, entry.sha256):
            raise img.block_error(block, "index entry damaged: zero block with a non-zero "
                                         "checksum")
        return block, 1, None, False

    def items() -> Iterator[tuple[int, int, fmt.IndexEntry]]:
        """Runs of zero/unused blocks stay runs; everything else goes block by block."""
        for first, count, entry in leaf.iter_runs():
            if entry.kind in (fmt.ZERO, fmt.UNUSED) and not only_changed:
                if not header.zero_run_ok(first, first + count - 1, entry.sha256):
                    raise leaf.block_error(first, "index entry damaged: zero block with a "
                                                  "non-zero checksum")
                yield first, count, entry
            else:
                for b in range(first, first + count):
                    yield b, 1, entry

    zeros = [0, 0]   # a pending run of bytes to zero: [offset, length], written in one call

    def flush_zeros() -> None:
        if zeros[1]:
            try:
                zero_range(tgt, zeros[0], zeros[1])
            except OSError as err:
                raise OperationFailed(f"{tgt.path}: write error at byte {zeros[0]}: "
                                      f"{err.strerror}") from err
            zeros[1] = 0

    for block, count, data, skip in ordered_map(work, items(), threads,
                                                depth=depth_for(bs, threads),
                                                inline=lambda item: item[1] > 1):
        offset = block * bs
        length = min(count * bs, header.size - offset)
        if only_changed:
            c["read_target_blocks"] += count
        if skip:
            c["skipped_blocks"] += count
        elif data is not None:
            flush_zeros()
            try:
                tgt.write(data, offset)
            except OSError as err:
                raise OperationFailed(f"{tgt.path}: write error at byte {offset}: "
                                      f"{err.strerror}") from err
            pool.put(data.obj)
            c["written_blocks"] += 1
            c["written_bytes"] += length
        elif tgt.created:
            c["hole_blocks"] += count
        else:
            if zeros[1] and zeros[0] + zeros[1] == offset:
                zeros[1] += length
            else:
                flush_zeros()
                zeros[0], zeros[1] = offset, length
            c["zeroed_blocks"] += count
            c["written_bytes"] += length
        if progress:
            progress(length)
    flush_zeros()
    return c
