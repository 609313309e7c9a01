"""Restoring an image or a chain to a block device or file, block by block, verifying each block.

Every block is read from the nearest image of the chain that holds it and checked against the
SHA-256 in the requested image's index before it is written; the first bad block stops the
restore (nothing unverified is ever written), and the error says what was left on the target:
blocks are written in order, so the target holds the image's contents up to the block before the
failure and its old contents after it.  A file the restore created is removed on failure unless
`keep_partial`.  With `salvage`, bad, unreadable or lost blocks (a truncated image's tail) are
written as zeros and listed instead.  With `only_changed` each target block is read and hashed
first and only the blocks that differ are written.  With `verify` everything written is read
back from the device (O_DIRECT, not the page cache) and compared with the image's SHA-256.
Safety checks come before any write: a target that is mounted, holds mounted partitions or swap,
is read-only, or is smaller than the image is refused, and an existing target is overwritten
only when `confirm`, shown what is on it now, says so.  Blocks are read through the block view
(image/view.py), the read path mount and export share.
"""
from __future__ import annotations

import bisect
import errno
import json
import logging
import mmap
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from diskimg import devices, errors
from diskimg.disk import identity
from diskimg import format as fmt
from diskimg.disk.blockdev import (
    Target,
    check_writable_device,
    open_readback,
    missing_dir_error,
    open_target,
    preadv_full,
    stat_target,
    zero_range,
)
from diskimg.image.chain import open_chain
from diskimg.errors import (
    CorruptImage,
    DiskimgError,
    DiskIOError,
    OperationFailed,
    RestoreFailed,
    RestoreInterrupted,
    TruncatedImage,
    UnsafeTarget,
    UsageError,
)
from diskimg.image.imagefile import read_record_data, scan_records, unlock_header
from diskimg.image.view import BlockView
from diskimg.store import open_store
from diskimg.ops.pipeline import BufferPool, default_threads, depth_for, ordered_map
from diskimg.ops.progress import Progress
from diskimg.units import human

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Content:
    """One device, partition or filesystem found on a target (lsblk's or blkid's view)."""

    name: str
    size: int | None = None
    fstype: str | None = None
    label: str | None = None
    pttype: str | None = None
    mountpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetDescription:
    """What is on a restore target now: what the user is asked to overwrite."""

    path: str
    is_block: bool
    size: int
    model: str | None = None
    serial: str | None = None
    pttype: str | None = None
    contents: tuple[Content, ...] = ()   # the target itself and its partitions, when they hold anything


@dataclass(frozen=True)
class Overwrite:
    """The question `confirm` answers: may `target` be overwritten with `image`?"""

    target: TargetDescription
    image: str
    image_size: int

    def __str__(self) -> str:
        what = "block device" if self.target.is_block else "file"
        return (f"{self.target.path} ({what}, {human(self.target.size)}) will be overwritten "
                f"with {os.path.basename(self.image)} ({human(self.image_size)})")


Confirm = Callable[[Overwrite], bool]


@dataclass(frozen=True)
class Salvaged:
    """Blocks that `salvage` restored as zeros, and why (adjacent blocks with the same reason
    are one range)."""

    block: int
    blocks: int
    offset: int
    length: int
    reason: str


@dataclass(frozen=True)
class VerifyMismatch:
    """A block that read back from the target differs from the image."""

    block: int
    offset: int
    length: int
    expected: str        # SHA-256, hex
    actual: str


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
    salvaged: tuple[Salvaged, ...] = ()       # salvage: blocks restored as zeros, and why
    truncated: bool = False                   # salvage: the image had lost its index
    verified: bool = False                    # verify: everything was read back
    verified_blocks: int = 0
    verify_errors: tuple[VerifyMismatch, ...] = ()
    verify_seconds: float = 0.0
    verify_direct: bool = False               # the read-back bypassed the page cache (O_DIRECT)
    repaired: tuple[Healed, ...] = ()         # images with parity that healed damage on the way


@dataclass(frozen=True)
class Healed:
    """What parity repaired while one image of the chain was read: its damaged slices
    (`slices`, of `slice_bytes` bytes each) rebuilt in memory; the image file is unchanged
    (`diskimg repair` rewrites it)."""

    path: str
    slices: int
    slice_bytes: int
    blocks: tuple[int, ...]                   # blocks whose record was healed

    @property
    def bytes(self) -> int:
        return self.slices * self.slice_bytes


def healed_images(images) -> tuple[Healed, ...]:
    """The Healed of each image (ImageReader) whose parity repaired something."""
    out = []
    for img in images:
        h = getattr(img, "healing", None)
        if h is None or not h.repairs.repaired:
            continue
        blocks = tuple(sorted({b for b, _ in img.healed if b is not None}))
        out.append(Healed(img.path, len(h.repairs.repaired), h.geom.slice, blocks))
    return tuple(out)


def check_target(target: str, size: int) -> tuple[bool, bool, int]:
    """Refuse an unsafe target; return (exists, is_block, current size)."""
    exists, is_block, tsize = stat_target(target)
    parent_dir = os.path.dirname(os.path.abspath(target))
    if not exists and not os.path.isdir(parent_dir):
        raise missing_dir_error(target, parent_dir)
    if is_block:
        busy = devices.usage(target)
        if busy:
            raise UnsafeTarget(target, "is in use: " + "; ".join(busy))
        check_writable_device(target)
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


def describe_target(path: str, is_block: bool, size: int) -> TargetDescription:
    """What is on `path` now, for the overwrite question: size, model and serial, partition
    table, filesystems with their labels and mountpoints (lsblk for a device, `blkid -p` for a
    file).  What the tools cannot tell is left out; this never fails."""
    if is_block and shutil.which("lsblk"):
        try:
            out = subprocess.run(
                ["lsblk", "-J", "-b", "-o", "NAME,SIZE,MODEL,SERIAL,PTTYPE,FSTYPE,LABEL,MOUNTPOINTS",
                 path], capture_output=True, text=True, timeout=20, check=True).stdout
            dev = json.loads(out)["blockdevices"][0]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as err:
            log.debug("lsblk %s failed: %s", path, err)
        else:
            found: list[tuple[dict, int]] = []

            def walk(d: dict, depth: int) -> None:
                found.append((d, depth))
                for child in d.get("children") or []:
                    walk(child, depth + 1)
            walk(dev, 0)
            contents: list[Content] = []
            pttype = dev.get("pttype") or None
            for d, depth in found:
                fstype, label = d.get("fstype") or None, d.get("label") or None
                if not fstype and not label:
                    # lsblk takes these from udev's database, absent on many rescue systems
                    tags = devices.probe_fs(path if depth == 0 else f"/dev/{d.get('name')}")
                    fstype, label = tags.get("TYPE"), tags.get("LABEL")
                    if depth == 0:
                        pttype = pttype or tags.get("PTTYPE")
                mps = tuple(m for m in (d.get("mountpoints") or []) if m)
                if fstype or label or mps or depth > 0:
                    contents.append(Content(
                        name=d.get("name") or "", size=_int(d.get("size")), fstype=fstype,
                        label=label, pttype=d.get("pttype") or None, mountpoints=mps))
            return TargetDescription(path, True, size, model=(dev.get("model") or "").strip()
                                     or None, serial=(dev.get("serial") or "").strip() or None,
                                     pttype=pttype, contents=tuple(contents))
    if not is_block:
        tags = devices.probe_fs(path)
        fstype, label = tags.get("TYPE"), tags.get("LABEL")
        contents = ((Content(os.path.basename(path), size, fstype, label),)
                    if fstype or label else ())
        return TargetDescription(path, False, size, pttype=tags.get("PTTYPE"),
                                 contents=contents)
    return TargetDescription(path, is_block, size)


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class _TruncatedImage:
    """A truncated image (its index and footer lost) read for `salvage`: the blocks it still
    holds are found by walking its records, skipping ahead over damage to the next record."""

    def __init__(self, path: str) -> None:
        self.path = path
        store, name = open_store(path)
        self.local_path = store.local_path(name)
        self.reader = store.open(name)
        try:
            self.header, start = fmt.read_header(self.reader, path)
            self.header = unlock_header(self.header, path)   # an encrypted one: its key
            if self.header.parity is not None:   # the records are in the logical stream
                from diskimg.image.parity import UnfinishedReader
                self.reader = UnfinishedReader(self.reader, self.header.parity)
            end = self.reader.size
            self.records: dict[int, tuple[int, fmt.RecordHeader]] = {}
            pos = start
            while pos < end:
                last = pos
                for off, rec in scan_records(self.reader, pos, end):
                    if (0 <= rec.block < self.header.blocks
                            and not rec.flags & (fmt.FLAG_PAGE_HASHES | fmt.FLAG_DELTA)
                            and rec.raw_len == self.header.block_length(rec.block)):
                        self.records[rec.block] = (off, rec)   # a later copy wins (a rescue retry)
                    last = off + fmt.RECORD_HEADER_SIZE + rec.stored_len
                pos = self._next_magic(last + (last == pos), end)
        except BaseException:
            self.reader.close()
            raise
        self.footer: dict = {}
        self.uuid = self.header.uuid
        log.info("%s: truncated; %d intact records of %d blocks", path, len(self.records),
                 self.header.blocks)

    def _next_magic(self, pos: int, end: int) -> int:
        """The offset of the next record magic from `pos` (end when there is none)."""
        chunk = 1 << 20
        while pos < end:
            buf = self.reader.pread(chunk + len(fmt.RECORD_MAGIC) - 1, pos)
            i = buf.find(fmt.RECORD_MAGIC)
            if i >= 0:
                return pos + i
            if len(buf) < chunk:
                return end
            pos += chunk
        return end

    def close(self) -> None:
        self.reader.close()


@dataclass
class _TruncatedChain:
    """A truncated image stands alone for salvage: its parent is not used (see _plan)."""

    leaf: _TruncatedImage

    @property
    def images(self) -> list:
        return [self.leaf]

    @property
    def uuids(self) -> list[str]:
        return [self.leaf.uuid]

    def close(self) -> None:
        self.leaf.close()

    def __enter__(self) -> _TruncatedChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_for_restore(image: str, search: Iterable[str], salvage: bool):
    try:
        return open_chain(image, search)
    except TruncatedImage as err:
        if not salvage or os.path.abspath(err.path) != os.path.abspath(image):
            raise
        log.warning("%s is truncated: restoring the blocks that survived, the rest as zeros",
                    image)
        return _TruncatedChain(_TruncatedImage(image))


class _Progress:
    """What a restore has left on its target so far, for the error that stops it."""

    def __init__(self) -> None:
        self.through = -1       # last block of the prefix holding the image's contents
        self.written = 0        # blocks actually written in that prefix
        self.torn: int | None = None   # the block being written when the write failed


def restore_image(image: str, target: str, *, search: Iterable[str] = (),
                  only_changed: bool = False, confirm: Confirm | None = None,
                  threads: int | None = None,
                  progress: Progress | None = None,
                  salvage: bool = False, verify: bool = False,
                  keep_partial: bool = False) -> RestoreResult:
    """Restore `image` (and the chain it depends on) onto `target`.

    Raises NotAnImage/IncompleteImage/ChainError (exit 2), UnsafeTarget (exit 2: in use, too
    small, read-only), UsageError when overwriting is not confirmed, before anything is
    written.  Once writing has started, every failure is a RestoreFailed carrying the error
    that stopped it (ChecksumMismatch/BlockError/CorruptImage exit 1, DiskIOError exit 3 with
    the target or image, the operation and the byte that failed) and what was left
    on the target; Ctrl-C is a RestoreInterrupted (exit 130).  A file this restore created is
    removed on failure unless `keep_partial`.  With `salvage`, damaged or lost blocks are
    restored as zeros and listed in the result instead; with `verify`, the result lists every
    block that reads back differently.
    """
    started = time.monotonic()
    tgt: Target | None = None
    state = _Progress()
    bs = 0
    done = False
    try:
        with _open_for_restore(image, search, salvage) as chain:
            header = chain.leaf.header
            bs = header.block_size
            tid = identity.identify(target)
            for img in chain.images:
                if img.local_path is None:   # not a local file: the target cannot be it
                    continue
                iid = identity.identify(img.local_path)
                if identity.same(tid, iid):
                    raise UnsafeTarget(target, f"is image {img.uuid} of the chain being restored")
                why = identity.overlap(tid, iid)
                if why:
                    raise UnsafeTarget(target, f"would overwrite image {img.uuid} of the chain "
                                               f"being restored ({why})")
            exists, is_block, tsize = check_target(target, header.size)
            if exists:
                question = Overwrite(describe_target(target, is_block, tsize), image,
                                     header.size)
                if confirm is None or not confirm(question):
                    raise UsageError(f"{target}: exists; not overwritten (confirm, or use "
                                     f"--yes)")
            if only_changed and not exists:
                log.warning("%s does not exist yet: --only-changed restores every block", target)
            tgt = open_target(target, header.size, exists, is_block,
                              read_back=only_changed and exists)
            if progress:
                progress.start(header.size, "B")
            counts, salvaged = _restore_blocks(chain, tgt, only_changed and exists, salvage,
                                               threads or default_threads(), progress, state)
            try:
                os.fsync(tgt.fd)
            except OSError as err:
                raise DiskIOError(target, "fsync", err) from err
            target_size = tgt.size
            tgt.close()
            tgt = None
            done = True      # written and durable: a failure from here on leaves it whole
            written = time.monotonic()
            checked = {}
            if verify:
                checked = _verify_target(chain, target, salvaged)
            unreadable = tuple(tuple(r) for r in chain.leaf.footer.get("unreadable", []))
            return RestoreResult(
                image=image, target=target, chain=tuple(chain.uuids),
                chain_paths=tuple(i.path for i in chain.images), size=header.size,
                target_size=target_size, blocks=header.blocks, seconds=written - started,
                unreadable=unreadable, salvaged=tuple(salvaged),
                truncated=isinstance(chain, _TruncatedChain), verified=verify,
                repaired=healed_images(chain.images), **checked, **counts,
            )
    except BaseException as exc:
        if done:
            raise
        errors.begin_cleanup()    # a Ctrl-C Python dropped may not cut _leave short
        if tgt is None:
            if isinstance(exc, KeyboardInterrupt):
                raise RestoreInterrupted(target, -1, 0, bs) from exc
            raise
        removed = _leave(tgt, keep_partial)
        if isinstance(exc, KeyboardInterrupt):
            raise RestoreInterrupted(target, state.through, state.written, bs,
                                     created=tgt.created, removed=removed,
                                     only_changed=only_changed, torn_block=state.torn) from exc
        if isinstance(exc, DiskimgError):
            raise RestoreFailed(exc, target, state.through, state.written, bs,
                                created=tgt.created, removed=removed,
                                only_changed=only_changed, torn_block=state.torn) from exc
        raise


def _leave(tgt: Target, keep_partial: bool) -> bool:
    """After a failure: make what was written durable, close, and remove a file this restore
    created (unless keep_partial).  True when it was removed."""
    if tgt.fd >= 0:
        try:
            os.fsync(tgt.fd)
        except OSError as err:
            log.debug("%s: fsync after the failure: %s", tgt.path, err)
    if not tgt.created or keep_partial:
        tgt.close()
        return False
    try:
        mine = os.fstat(tgt.fd) if tgt.fd >= 0 else None
        now = os.stat(tgt.path)
        # remove only the very file created, not one that took its name meanwhile
        if mine is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        os.unlink(tgt.path)
        return True
    except OSError as err:
        log.warning("%s: could not remove the partial file: %s", tgt.path, err)
        return False
    finally:
        tgt.close()


# what an item of the restore plan is
_ZERO, _SALVAGE, _ENTRY, _RECORD = range(4)


def _plan(chain, only_changed: bool, salvage: bool) -> Iterator[tuple[int, int, int, object]]:
    """(first block, count, kind, what) in block order: runs of zero/unused blocks stay runs,
    everything else goes block by block.  With `salvage`, what cannot be restored becomes a
    _SALVAGE run with its reason: the blocks of a damaged index segment, and for a truncated
    image every block without an intact record.  A truncated incremental's parent is not used:
    its index is lost, so nothing says which blocks it left to the parent and which it had
    changed; mixing the parent's blocks in could give a state that never existed."""
    leaf = chain.leaf
    header = leaf.header
    if isinstance(chain, _TruncatedChain):
        recs = leaf.records
        gap = None
        for b in range(header.blocks):
            if b in recs:
                if gap is not None:
                    yield gap, b - gap, _SALVAGE, "image truncated: no intact record of the block"
                    gap = None
                yield b, 1, _RECORD, recs[b]
            elif gap is None:
                gap = b
        if gap is not None:
            yield gap, header.blocks - gap, _SALVAGE, "image truncated: no intact record of " \
                                                      "the block"
        return
    for seg in range(len(leaf.segments)):
        first, count = leaf._segment_range(seg)
        try:
            runs = list(_segment_runs(leaf, seg, first))
        except CorruptImage as err:
            if not salvage:
                raise
            yield first, count, _SALVAGE, getattr(err, "reason", str(err))
            continue
        for first_b, n, entry in runs:
            if entry.kind in (fmt.ZERO, fmt.UNUSED) and not only_changed:
                if not header.zero_run_ok(first_b, first_b + n - 1, entry.sha256):
                    err = leaf.block_error(first_b, "index entry damaged: zero block with a "
                                                    "non-zero checksum")
                    if not salvage:
                        raise err
                    yield first_b, n, _SALVAGE, err.reason
                    continue
                yield first_b, n, _ZERO, None
            else:
                for b in range(first_b, first_b + n):
                    yield b, 1, _ENTRY, entry


def _segment_runs(leaf, seg: int, first: int):
    from diskimg.image.imagefile import segment_runs
    return segment_runs(first, leaf.segment(seg))


def _reason(err: DiskimgError) -> str:
    return getattr(err, "reason", None) or str(err)


def _restore_blocks(chain, tgt: Target, only_changed: bool, salvage: bool, threads: int,
                    progress: Progress | None,
                    state: _Progress) -> tuple[dict, list[Salvaged]]:
    leaf = chain.leaf
    header = leaf.header
    bs = header.block_size
    c = dict(written_blocks=0, zeroed_blocks=0, hole_blocks=0, skipped_blocks=0,
             read_target_blocks=0, written_bytes=0)
    salvaged: list[Salvaged] = []
    pool = BufferPool(bs)   # blocks are decompressed into reused, page-aligned buffers
    # every block of a chain is read through the view (a truncated image's records are not:
    # it has no index to resolve through, see _TruncatedImage)
    view = None if isinstance(chain, _TruncatedChain) else BlockView(chain, cache_bytes=0)

    def work(item: tuple[int, int, int, object]
             ) -> tuple[int, int, memoryview | None, bool, str | None]:
        """(first block, count, data or None for zeros, skip, salvage reason), the data
        verified; data in a pool buffer (`.obj` is an mmap) is given back once written."""
        block, count, kind, what = item
        if kind == _ZERO:
            return block, count, None, False, None
        if kind == _SALVAGE:
            return block, count, None, False, what
        length = header.block_length(block)
        try:
            if kind == _ENTRY:
                src = view.locate(block, what)   # through the chain, consistency checked
                expected = src.sha256
            else:
                expected = what[1].sha256
        except CorruptImage as err:
            if not salvage:
                raise
            return block, 1, None, False, _reason(err)
        buf = pool.get()
        if only_changed:  # compare first: an identical block costs no read of the image
            current = memoryview(buf)[:length]
            try:
                preadv_full(tgt.fd, current, block * bs, tgt.path)
            except OSError as err:
                raise DiskIOError(tgt.path, "read", err, block * bs) from err
            if header.hash(current) == expected:
                pool.put(buf)
                return block, 1, None, True, None
        try:
            if kind == _RECORD:
                pool.put(buf)
                off, rec = what
                data = read_record_data(leaf.reader, off, rec, header)
                if data is None:
                    raise leaf_block_error(block, "record damaged (data does not match its "
                                                  "checksum)")
                return block, 1, memoryview(data), False, None
            if not src.zero:
                return block, 1, view.read_located(src, buf), False, None
            pool.put(buf)
            view.check_zero(src)     # zeros are written as a zero run, not from a buffer
            return block, 1, None, False, None
        except (CorruptImage, OperationFailed) as err:   # a damaged or unreadable image
            if not salvage:
                raise
            if kind == _ENTRY and not src.zero:
                pool.put(buf)
            return block, 1, None, False, _reason(err)

    def leaf_block_error(block: int, reason: str) -> DiskimgError:
        return CorruptImage(f"{leaf.path}: block {block} (byte {block * bs}): {reason}",
                            path=leaf.path)

    zeros = [0, 0, -1]   # a pending run of bytes to zero: [offset, length, last block]

    def flush_zeros() -> None:
        if zeros[1]:
            try:
                zero_range(tgt, zeros[0], zeros[1])
            except OSError as err:
                state.torn = zeros[0] // bs
                raise DiskIOError(tgt.path, "write", err, zeros[0]) from err
            zeros[1] = 0
            state.through = zeros[2]

    def salvage_note(block: int, count: int, reason: str) -> None:
        offset = block * bs
        length = min(count * bs, header.size - offset)
        last = salvaged[-1] if salvaged else None
        if last and last.reason == reason and last.block + last.blocks == block:
            salvaged[-1] = Salvaged(last.block, last.blocks + count, last.offset,
                                    last.length + length, reason)
        else:
            salvaged.append(Salvaged(block, count, offset, length, reason))
        log.info("%s: blocks %d-%d (bytes %d-%d) restored as zeros: %s", tgt.path, block,
                    block + count - 1, offset, offset + length - 1, reason)

    try:
        for block, count, data, skip, reason in ordered_map(
                work, _plan(chain, only_changed, salvage), threads,
                depth=depth_for(bs, threads), inline=lambda item: item[2] in (_ZERO, _SALVAGE)):
            offset = block * bs
            length = min(count * bs, header.size - offset)
            if only_changed and reason is None:
                c["read_target_blocks"] += count
            if reason is not None:
                salvage_note(block, count, reason)
            if skip:
                c["skipped_blocks"] += count
                if not zeros[1]:
                    state.through = block + count - 1
            elif data is not None:
                flush_zeros()
                try:
                    tgt.write(data, offset)
                except OSError as err:
                    state.torn = block
                    raise DiskIOError(tgt.path, "write", err, offset) from err
                if isinstance(data.obj, mmap.mmap):
                    pool.put(data.obj)
                c["written_blocks"] += 1
                c["written_bytes"] += length
                state.through = block
                state.written += 1
            elif tgt.created:
                c["hole_blocks"] += count
                state.through = block + count - 1
            else:
                if zeros[1] and zeros[0] + zeros[1] == offset:
                    zeros[1] += length
                else:
                    flush_zeros()
                    zeros[0], zeros[1] = offset, length
                zeros[2] = block + count - 1
                c["zeroed_blocks"] += count
                c["written_bytes"] += length
                state.written += count
            if progress:
                progress.advance(length)
        flush_zeros()
    except DiskimgError:
        # the blocks before the failure are good: make the zero run before it real too, so
        # that what is reported as restored is the whole prefix (not on Ctrl-C: stop now)
        try:
            flush_zeros()
        except DiskimgError:
            pass
        raise
    return c, salvaged


def _verify_target(chain, target: str, salvaged: list[Salvaged]) -> dict:
    """Read back every block of the image's size from `target` (O_DIRECT, else after dropping
    its cached pages) and compare it with what the image says it holds: the index's SHA-256,
    zeros for zero, unused and salvaged blocks.  Raises DiskIOError ("open to read back", or
    "read" at a byte "while verifying")."""
    started = time.monotonic()
    leaf = chain.leaf
    header = leaf.header
    bs = header.block_size
    truncated = isinstance(chain, _TruncatedChain)
    starts = [s.block for s in salvaged]
    try:
        fd, direct = open_readback(target)
    except OSError as err:
        raise DiskIOError(target, "open to read back", err) from err
    span = -(-bs // 4096) * 4096
    buf = mmap.mmap(-1, span)      # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    errors: list[VerifyMismatch] = []
    checked = 0
    try:
        for block in range(header.blocks):
            offset = block * bs
            length = header.block_length(block)
            i = bisect.bisect_right(starts, block) - 1
            if i >= 0 and block < salvaged[i].block + salvaged[i].blocks:
                expected = None
            elif truncated:
                rec = leaf.records.get(block)
                expected = rec[1].sha256 if rec else None
            else:
                try:
                    entry = leaf.entry(block)
                except CorruptImage:
                    expected = None      # salvaged above; never reached otherwise
                else:
                    expected = (None if entry.kind in (fmt.ZERO, fmt.UNUSED)
                                else entry.sha256)
            if expected is None:
                expected = header.zero_digest(length)
            want = -(-length // 512) * 512 if direct else length
            try:
                got = _read_at(fd, view[:want], offset)
            except OSError as err:
                if direct and err.errno == errno.EINVAL:
                    os.close(fd)      # the filesystem refused this O_DIRECT read after all
                    fd = -1
                    direct = False
                    try:
                        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        got = _read_at(fd, view[:length], offset)
                    except OSError as err2:
                        raise DiskIOError(target, "read", err2, offset,
                                          context="while verifying") from err2
                else:
                    raise DiskIOError(target, "read", err, offset,
                                      context="while verifying") from err
            data = view[:min(got, length)]
            actual = header.hash(data)
            data.release()
            checked += 1
            if actual != expected or got < length:
                errors.append(VerifyMismatch(block, offset, length, expected.hex(),
                                             actual.hex()))
                log.warning("%s: block %d (byte %d) reads back as %s, the image has %s",
                            target, block, offset, actual.hex(), expected.hex())
    finally:
        view.release()
        buf.close()
        if fd >= 0:
            os.close(fd)
    return dict(verified_blocks=checked, verify_errors=tuple(errors),
                verify_seconds=time.monotonic() - started, verify_direct=direct)


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` until it is full or the end of the file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
