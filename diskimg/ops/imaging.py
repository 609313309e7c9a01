"""Creating an image: read -> hash -> compare with the parent -> compress -> write.

Only the blocks holding data are read (the used blocks of a recognised filesystem, the data of a
sparse file), into reused buffers: a device with O_DIRECT by READERS threads, a regular file
through the page cache by one reader thread.  Hashing and compression run in --threads workers
(pipeline.ordered_map); records are appended in block order.  For an incremental or
differential image each block's digest (the header's algorithm) is compared with the reference image's index, so only
changed blocks are stored and the parent's data is never read.
"""
from __future__ import annotations

import errno
import logging
import os
import time
import uuid as uuidlib
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from diskimg import __version__, devices
from diskimg.disk import identity
from diskimg.disk import usedblocks
from diskimg import format as fmt
from diskimg.disk.blockdev import (
    Source,
    data_ranges,
    file_kind,
    locate_bad_sector,
    missing_dir_error,
    open_direct,
    open_source,
    preadv_full,
)
from diskimg.image.chain import open_chain, parent_ref
from diskimg.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL  # noqa: F401  (the library's names)
from diskimg.errors import (
    ChainError,
    DiskimgError,
    OperationFailed,
    PermissionDenied,
    ReadError,
    SourceError,
    UnsafeTarget,
    UsageError,
    is_permission_error,
)
from diskimg.image.imagefile import ImageReader, ImageWriter
from diskimg.transforms import writing_chain
from diskimg.ops.pipeline import (
    IN_FLIGHT_BYTES,
    BufferPool,
    default_threads,
    depth_for,
    ordered_map,
    prefetch,
)

log = logging.getLogger(__name__)

READERS = 4   # O_DIRECT reads in flight from a device: one per core would leave the disk idle
READ_AHEAD_WINDOW = 8 << 20   # how far past a failed read its bad sector may lie

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ImageOptions:
    block_size: int | None = None      # None: the parent's, or DEFAULT_BLOCK_SIZE
    level: int = DEFAULT_LEVEL
    threads: int = field(default_factory=default_threads)
    force: bool = False                 # replace a finished image; accept another disk; a rw mount
    incremental: str | None = None      # parent image path
    differential: str | None = None     # any image of the chain whose root full image is used
    search: tuple[str, ...] = ()
    all_blocks: bool = False            # read every block, even free space (exact copy)
    digest: str | None = None           # block digest; None: the parent's, or DEFAULT_DIGEST


@dataclass(frozen=True)
class ImageResult:
    path: str
    uuid: str
    kind: str
    size: int
    block_size: int
    blocks: int
    stored_blocks: int
    zero_blocks: int
    unused_blocks: int
    unchanged_blocks: int
    changed_blocks: int
    stored_bytes: int
    image_bytes: int
    read_bytes: int
    seconds: float
    parent: str | None
    chain: tuple[str, ...]
    # stored + zero + unused + unchanged = blocks: each block counts once, by how this image
    # records it (unchanged: a reference to the parent).  changed = blocks - unchanged -
    # unchanged_zero: the zero or unused blocks that were all zeros in the parent too are
    # recorded as zero or unused, but did not change.
    unchanged_zero_blocks: int = 0
    unreadable_blocks: int = 0          # a rescue: blocks holding unreadable sectors (zeros)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_block_size(size: int) -> None:
    try:
        fmt.check_block_size(size)
    except ValueError as err:
        raise UsageError(f"--block-size: {err}") from err


def check_image_path(image: str, source: Source, force: bool, extra: tuple[str, ...] = (),
                     rescue: bool = False) -> None:
    """Refuse to overwrite an image without force, or to write an image (or its partial file,
    or the `extra` files that go with it) onto the source: the same file or device, or one of
    its loop device's backing file, its disk or its partitions.  Unless `rescue` (which
    resumes it), an interrupted rescue's partial file is refused too: starting over would
    discard it.  (check_no_children, after the chain is loaded, refuses to replace an image
    that others depend on.)"""
    src = identity.identify(source.path)
    for path in (image, image + ".partial", *extra):
        ident = identity.identify(path)
        if identity.same(ident, src):
            raise UnsafeTarget(path, "is the source itself")
        why = identity.overlap(ident, src)
        if why:
            raise UnsafeTarget(path, f"would overwrite the source {source.path} ({why})")
    if os.path.exists(image):
        if os.path.isdir(image):
            raise UsageError(f"{image}: is a directory; give the image's file name")
        if not os.path.isfile(image):  # /dev/stdin, a pipe, a device: --force would replace it
            raise UsageError(f"{image}: is {file_kind(os.stat(image).st_mode)}, not a regular "
                             f"file; an image is written to a file")
        if not force:
            raise UsageError(f"{image}: already exists; use --force to overwrite it")
        _check_replaceable(image)
    partial = image + ".partial"
    if not rescue and os.path.exists(partial) and _is_rescue_partial(partial):
        raise UsageError(f"{partial}: holds an interrupted rescue; resume it with --rescue, or "
                         f"remove it to start over")
    parent_dir = os.path.dirname(os.path.abspath(image))
    if not os.path.isdir(parent_dir):
        raise missing_dir_error(image, parent_dir)
    if source.is_block:
        src_path = os.path.realpath(source.path)
        holders = devices.holding_devices(parent_dir)
        if src_path in holders:
            raise UnsafeTarget(image, f"lies on the source device {source.path}; write the "
                                      f"image to another disk")


def _check_replaceable(image: str) -> None:
    """What --force may replace: a diskimg image (its header magic) that no loop device reads.
    A disk's file (`image /dev/sdb /var/vm.img --force`), or any other file, is never
    replaced, even one under a loop device that is not in use."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(image, "read the existing file") from err
        raise OperationFailed(f"{image}: cannot read the existing file: {err.strerror}",
                              path=image) from err
    try:
        magic = os.pread(fd, len(fmt.HEADER_MAGIC), 0)
    except OSError as err:
        raise OperationFailed(f"{image}: cannot read the existing file: {err.strerror}",
                              path=image) from err
    finally:
        os.close(fd)
    if magic != fmt.HEADER_MAGIC:
        raise UnsafeTarget(image, "is not a diskimg image; --force replaces only images")
    loops = identity.loops_backed_by(image)
    if loops:
        raise UnsafeTarget(image, f"backs the loop device {', '.join(loops)}; --force never "
                                  f"replaces a loop device's file (detach it first: losetup -d "
                                  f"{loops[0]})")


def check_no_children(image: str, search: tuple[str, ...] = ()) -> None:
    """Refuse to replace `image` when an image next to it (or in a search directory) was
    made against it: replacing it would break that image and every one after it."""
    if os.path.isfile(image):
        _check_no_children(image, search)


def _check_no_children(image: str, search: tuple[str, ...]) -> None:
    """Refuse to replace `image` when an image next to it (or in a search directory) was
    made against it: replacing it would break that image and every one after it."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        uuid = fmt.read_header(fd, image)[0].uuid
    except (DiskimgError, OSError):
        return      # not an image (or a damaged one): nothing can depend on it
    finally:
        os.close(fd)
    me = identity.identify(image)
    dirs = dict.fromkeys([os.path.dirname(os.path.abspath(image))]
                         + [os.path.abspath(d) for d in search])
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if not os.path.isfile(path) or identity.same(identity.identify(path), me):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                parent = fmt.read_header(fd, path)[0].parent
            except (DiskimgError, OSError):
                continue
            finally:
                os.close(fd)
            if isinstance(parent, dict) and parent.get("uuid") == uuid:
                raise UnsafeTarget(image, f"is the parent of {path}; --force never replaces "
                                          f"an image other images depend on (give the new "
                                          f"image another name)")


def check_source_mounted(source: Source, force: bool) -> list[str]:
    """The mountpoints where the source (its partitions, holders, or the loop devices over
    the same file) is mounted read-write.  Refused unless `force`: the filesystem changes
    while it is read, so the image may be inconsistent."""
    devs = ([source.path] if source.is_block else []) + identity.loops_backed_by(source.path)
    found: list[tuple[str, str]] = []
    for dev in devs:
        found += [f for f in devices.mounted_read_write(dev) if f not in found]
    if found and not force:
        where = ", ".join(f"{mp} ({dev})" if dev != source.path else mp for dev, mp in found)
        mp = found[0][1]
        raise SourceError(source.path, f"is mounted read-write on {where}: the image would not "
                                       f"be consistent; unmount it, remount it read-only "
                                       f"(mount -o remount,ro {mp}), or freeze it (fsfreeze -f "
                                       f"{mp}) and use --force, or image a snapshot; --force "
                                       f"images it anyway")
    if found:
        log.warning("%s is mounted read-write on %s: the image may not be consistent",
                    source.path, ", ".join(mp for _, mp in found))
    return [mp for _, mp in found]


def source_identity(source: Source) -> dict:
    """What the header records of the source: model, serial, WWN (devices.identify), and what
    tells disks apart without a serial: partition-table id, filesystem UUID (usedblocks)."""
    ident = devices.identify(source.path)
    ident.update(usedblocks.content_ids(source.fd, source.size,
                                        sector_size=source.logical_sector))
    return ident


def _is_rescue_partial(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fmt.read_header(fd, path)[0].extra.get("rescue") is True
    except (DiskimgError, OSError):
        return False
    finally:
        os.close(fd)


def _load_reference(opts: ImageOptions, source: Source, ident: dict, image_path: str
                    ) -> ImageReader | None:
    """The image whose index the new one is compared against, checked against the source and
    against the new image's path: no image of the chain is ever replaced (not even with
    --force), and a source that is not the parent's disk is refused unless --force."""
    ref_path = opts.incremental or opts.differential
    if ref_path is None:
        return None
    chain = open_chain(ref_path, opts.search)
    keep = chain.images[-1] if opts.incremental else chain.images[0]
    try:
        target = identity.identify(image_path)
        for img in chain.images:
            why = identity.overlap(target, identity.identify(img.path))
            if why:
                what = ("the parent image itself" if img is chain.images[-1] and opts.incremental
                        else f"image {img.uuid} of {ref_path}'s chain")
                raise UnsafeTarget(image_path, f"is {what} ({img.path}); --force never replaces "
                                               f"an image a chain depends on; give the new image "
                                               f"another name")
        h = keep.header
        if opts.block_size is not None and opts.block_size != h.block_size:
            raise ChainError(f"--block-size {opts.block_size} differs from {keep.path}'s block "
                             f"size {h.block_size}; a changed-block image uses its parent's")
        if opts.digest is not None and opts.digest != h.digest:
            raise ChainError(f"--digest {opts.digest} differs from {keep.path}'s block digest "
                             f"{h.digest}; a changed-block image uses its parent's")
        if h.size != source.size:
            raise ChainError(f"{source.path}: size {source.size} differs from {keep.path}'s "
                             f"source size {h.size}; a changed-block image needs the same device")
        why = identity.source_mismatch(ident, h.source, source.path, keep.path)
        if why and not opts.force:
            raise ChainError(f"{why}: not the disk the image was made from; use --force if "
                             f"this really is the same disk's data")
        if why:
            log.warning("%s (accepted with --force)", why)
    except BaseException:
        chain.close()
        raise
    for img in chain.images:
        if img is not keep:
            img.close()
    return keep


@dataclass(frozen=True)
class Run:
    """`count` blocks from `first` that need no reading: ZERO (holes of a sparse file) or
    UNUSED (free space of a recognised filesystem)."""

    first: int
    count: int
    kind: int


@dataclass(frozen=True)
class Read:
    """A block to read; `parts` are the byte ranges inside it that hold data (the rest reads
    as zeros), or None for the whole block."""

    block: int
    parts: tuple[tuple[int, int], ...] | None


def _intersect(a: Iterable[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted lists of (offset, length) ranges."""
    out = []
    j = 0
    for off, length in a:
        end = off + length
        while j < len(b) and b[j][0] + b[j][1] <= off:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            lo, hi = max(off, b[k][0]), min(end, b[k][0] + b[k][1])
            if hi > lo:
                out.append((lo, hi - lo))
            k += 1
    return out


def plan_blocks(size: int, bs: int, read: list[tuple[int, int]],
                used: list[tuple[int, int]]) -> Iterator[Run | Read]:
    """Every block of the device in order, as runs that need no reading and blocks to read.

    `read` are the byte ranges to read (used and not a hole), `used` the used ranges; a block
    touching no `read` range is ZERO when it touches `used` (a hole of a sparse file) and
    UNUSED otherwise.
    """
    blocks = -(-size // bs)
    pos = 0          # next block to emit
    u = 0            # index into used

    def gap(first: int, end: int) -> Iterator[Run]:
        nonlocal u
        b = first
        while b < end:
            while u < len(used) and (used[u][0] + used[u][1] - 1) // bs < b:
                u += 1
            if u < len(used) and used[u][0] // bs <= b:      # b touches a used range
                stop = min(end, (used[u][0] + used[u][1] - 1) // bs + 1)
                kind = fmt.ZERO
            else:
                stop = min(end, used[u][0] // bs) if u < len(used) else end
                kind = fmt.UNUSED
            yield Run(b, stop - b, kind)
            b = stop

    cur: int | None = None          # block being collected
    parts: list[tuple[int, int]] = []

    def emit(block: int) -> Read:
        length = min(bs, size - block * bs)
        whole = len(parts) == 1 and parts[0] == (0, length)
        return Read(block, None if whole else tuple(parts))

    for off, length in read:
        end = off + length
        while off < end:
            b = off // bs
            piece_end = min(end, (b + 1) * bs)
            if b != cur:
                if cur is not None:
                    yield emit(cur)
                    pos = cur + 1
                yield from gap(pos, b)
                cur, parts = b, []
            rel = off - b * bs
            if parts and parts[-1][0] + parts[-1][1] == rel:
                parts[-1] = (parts[-1][0], parts[-1][1] + piece_end - off)
            else:
                parts.append((rel, piece_end - off))
            off = piece_end
    if cur is not None:
        yield emit(cur)
        pos = cur + 1
    yield from gap(pos, blocks)


class ReadAhead:
    """For a source read through the page cache (a regular file, or a device that refuses
    O_DIRECT): tells the kernel which ranges will be read next (POSIX_FADV_WILLNEED), a window
    ahead of the reader, so that the disk gets large requests for exactly the used ranges even
    where they are scattered and its own sequential read-ahead would not follow.  Behind the
    reader it lets go of what was read (POSIX_FADV_DONTNEED): imaging does not push everything
    else out of the page cache, and the pages it frees are reused for the next reads, which is
    cheaper than taking fresh memory."""

    WINDOW = 32 << 20
    BEHIND = 16 << 20     # dropped in pieces of this size, once the reader is past them

    def __init__(self, fd: int, ranges: list[tuple[int, int]]) -> None:
        self.fd = fd
        self.ranges = ranges
        self.i = 0          # next range to advise
        self.done = 0       # advised up to this offset inside ranges[i]
        self.kept = 0       # pages before this offset have been let go

    def advance(self, pos: int) -> None:
        """The reader is about to read at `pos`; everything before it has been read."""
        if pos - self.kept >= self.BEHIND:
            try:
                os.posix_fadvise(self.fd, self.kept, pos - self.kept, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            self.kept = pos
        limit = pos + self.WINDOW
        while self.i < len(self.ranges):
            off, length = self.ranges[self.i]
            start = max(off, self.done)
            if start >= limit:
                return
            end = min(off + length, limit)
            try:
                os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                return
            if end < off + length:
                self.done = end
                return
            self.i += 1
            self.done = 0


def create_image(source_path: str, image_path: str, opts: ImageOptions = ImageOptions(),
                 progress: Progress | None = None) -> ImageResult:
    """Image `source_path` into `image_path`.  Raises SourceError, UsageError, UnsafeTarget,
    ChainError, ReadError (exit 3) and OperationFailed; a failed run leaves no partial file."""
    if opts.block_size is not None:
        check_block_size(opts.block_size)
    if opts.incremental and opts.differential:
        raise UsageError("--incremental and --differential exclude each other")
    if opts.digest is not None and opts.digest not in fmt.KNOWN_DIGESTS:
        raise UsageError(f"--digest {opts.digest}: one of {', '.join(fmt.KNOWN_DIGESTS)} expected")
    started = time.monotonic()
    source = open_source(source_path)
    try:
        os.posix_fadvise(source.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
        check_image_path(image_path, source, opts.force)
        mounted_rw = check_source_mounted(source, opts.force)
        ident = source_identity(source)
        ref = _load_reference(opts, source, ident, image_path)
        try:
            check_no_children(image_path, opts.search)
        except BaseException:
            if ref is not None:
                ref.close()
            raise
        try:
            return _create(source, image_path, opts, ident, ref, progress, started, mounted_rw)
        finally:
            if ref is not None:
                ref.close()
    finally:
        source.close()


def _create(source: Source, image_path: str, opts: ImageOptions, ident: dict,
            ref: ImageReader | None, progress: Progress | None, started: float,
            mounted_rw: list[str]) -> ImageResult:
    bs = ref.header.block_size if ref is not None else opts.block_size or DEFAULT_BLOCK_SIZE
    new_uuid = str(uuidlib.uuid4())
    if ref is None:
        kind, parent, chain = "full", None, (new_uuid,)
    else:
        kind = "incremental" if opts.incremental else "differential"
        parent = parent_ref(ref)
        chain = tuple(ref.header.chain or (ref.uuid,)) + (new_uuid,)
    transforms = writing_chain(opts.level)
    header = fmt.Header(
        uuid=new_uuid, kind=kind, size=source.size, block_size=bs, source=ident,
        created=utc_now(), tool_version=__version__, parent=parent, chain=chain,
        compression={"codec": "zstd", "level": opts.level},
        extra={"all_blocks": opts.all_blocks,   # info tells an exact copy from a used-blocks one
               **({"source_mounted_rw": mounted_rw} if mounted_rw else {})},
        transforms=transforms.table,
        digest=ref.header.digest if ref is not None else opts.digest or fmt.DEFAULT_DIGEST,
    )
    ref_entries = ref.iter_entries() if ref is not None else None
    used_map = None
    if opts.all_blocks:
        used = [(0, source.size)]
    else:
        used_map = usedblocks.scan(source.fd, source.size, sector_size=source.logical_sector)
        used = list(used_map.ranges)
    # what is not a hole of a sparse file (a device has none)
    data_spans = ([(0, source.size)] if source.is_block
                  else list(data_ranges(source.fd, source.size)))
    counts = {"read_bytes": 0, "unchanged_zero": 0}

    def split_short(run: Run) -> Iterator[Run]:
        """Runs share one entry; the short last block has another checksum, so alone."""
        last = run.first + run.count - 1
        if header.block_length(last) == bs or run.count == 1:
            yield run
        else:
            yield Run(run.first, run.count - 1, run.kind)
            yield Run(last, 1, run.kind)

    to_read = _intersect(data_spans, used)
    pool = BufferPool(bs)   # blocks are read into reused buffers, given back once stored
    zeros = bytes(bs)
    sector = source.logical_sector

    def produce() -> Iterator[Run | tuple[Read, bytes | None]]:
        """The plan, with each block's reference checksum (for a changed-block image)."""
        for item in plan_blocks(source.size, bs, to_read, used):
            if isinstance(item, Run):
                for run in split_short(item):
                    if ref_entries is not None:
                        zsha = header.zero_digest(header.block_length(run.first))
                        counts["unchanged_zero"] += sum(
                            next(ref_entries)[1].sha256 == zsha for _ in range(run.count))
                    yield run
                continue
            yield item, next(ref_entries)[1].sha256 if ref_entries is not None else None

    def load(planned: Run | tuple[Read, bytes | None]):
        """Read a planned block: (block, content, reference checksum, bytes read)."""
        if isinstance(planned, Run):
            return planned
        item, ref_sha = planned
        view, nread = _read_block(item)
        return item.block, view, ref_sha, nread

    def _read_block(item: Read) -> tuple[memoryview, int]:
        """The block's content in a pool buffer, and the bytes read: its data ranges read in
        one request, the free space around and between them zeros."""
        start, length = item.block * bs, header.block_length(item.block)
        parts = item.parts or ((0, length),)
        lo, hi = parts[0][0], parts[-1][0] + parts[-1][1]
        view = memoryview(pool.get())[:length]
        try:
            if direct_fd is None:
                preadv_full(source.fd, view[lo:hi], start + lo, source.path)
            else:   # whole sectors, into the page-aligned buffer at the same place
                a, e = lo // sector * sector, min(-(-hi // sector) * sector, length)
                try:
                    preadv_full(direct_fd, view[a:e], start + a, source.path)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    preadv_full(source.fd, view[lo:hi], start + lo, source.path)
        except OSError as err:
            # a buffered read-ahead may have failed this read for a bad sector further on
            where, length = start + lo, hi - lo
            if source.is_block:
                bad = locate_bad_sector(source.path, where,
                                        min(source.size, where + length + READ_AHEAD_WINDOW),
                                        source.logical_sector)
                if bad is not None:
                    where, length = bad, source.logical_sector
            raise ReadError(source.path, where, length, err,
                            hint="use --rescue to image past unreadable sectors") from err
        pos = 0
        for off, n in (*parts, (length, 0)):   # zero what lies outside the data ranges
            if off > pos:
                view[pos:off] = zeros[:off - pos]
            pos = off + n
        return view, hi - lo

    def loaded() -> Iterator:
        """The blocks read, in order.  From a device: O_DIRECT requests from READERS threads,
        the kernel's cache left alone.  From a file: one reader thread through the page cache,
        telling the kernel ahead which ranges come next and letting go of those read."""
        if direct_fd is not None:
            # 1 MiB blocks: 4 readers; 16 MiB: 1 (memory is bounded by bytes, as in depth_for)
            readers = max(1, min(READERS, IN_FLIGHT_BYTES // (2 * bs)))
            if readers == 1:   # still off the main thread, which writes the image
                return prefetch(map(load, produce()), depth=2)
            return ordered_map(load, produce(), readers, depth=2 * readers,
                               inline=lambda planned: isinstance(planned, Run))
        readahead = ReadAhead(source.fd, to_read)

        def read_in_order():
            for planned in produce():
                if not isinstance(planned, Run):
                    readahead.advance(planned[0].block * bs)
                yield load(planned)
        return prefetch(read_in_order(), depth=ahead)

    hash_block = header.hash

    def work(item):
        if isinstance(item, Run):
            return item
        block, data, ref_sha, nread = item
        sha = hash_block(data)
        if sha == ref_sha:
            pool.put(data.obj)
            return block, fmt.PARENT, sha, None, 0, nread
        if sha == header.zero_digest(len(data)):
            pool.put(data.obj)
            return block, fmt.ZERO, sha, None, 0, nread
        stored, codec = transforms.encode(block, data)
        if stored is not data:   # else stored as read (raw): the buffer is given back when written
            pool.put(data.obj)
        return block, fmt.DATA, sha, stored, codec, nread

    depth = depth_for(bs, opts.threads)
    ahead = max(2, depth - opts.threads)   # read-ahead beyond what the workers hold
    writer = ImageWriter(image_path, header)   # removes its partial file if it fails
    # a device is read with O_DIRECT: on the benchmark disk, reading through the page cache
    # cost 0.5-0.66 s of system time (read-ahead, copy, invalidation), O_DIRECT 0.07-0.14 s
    direct_fd = open_direct(source.path) if source.is_block else None
    try:
        results = ordered_map(work, loaded(), opts.threads, depth=depth,
                              inline=lambda item: isinstance(item, Run))
        with closing(results):  # stops the readers before the source is closed
            for res in results:
                if isinstance(res, Run):
                    length = header.block_length(res.first)
                    writer.add_entry(res.first,
                                     fmt.IndexEntry(res.kind, header.zero_digest(length)), res.count)
                    if progress:
                        progress(min((res.first + res.count) * bs, source.size) - res.first * bs)
                    continue
                block, kind_, sha, stored, codec, nread = res
                counts["read_bytes"] += nread
                if kind_ == fmt.DATA:
                    writer.add_data(block, stored, codec, sha)
                    if codec == fmt.CODEC_RAW:
                        pool.put(stored.obj)
                else:
                    writer.add_entry(block, fmt.IndexEntry(kind_, sha))
                if progress:
                    progress(header.block_length(block))
        stats = writer.stats
        # unchanged: the parent references only, so that the four kinds add up to the blocks
        unchanged, unchanged_zero = stats.parent_blocks, counts["unchanged_zero"]
        changed = header.blocks - unchanged - unchanged_zero if ref is not None else header.blocks
        meta = {
            "completed": utc_now(),
            "stats": {
                "stored_blocks": stats.stored_blocks, "stored_bytes": stats.stored_bytes,
                "zero_blocks": stats.zero_blocks, "unused_blocks": stats.unused_blocks,
                "unchanged_blocks": unchanged, "changed_blocks": changed,
                "unchanged_zero_blocks": unchanged_zero, "read_bytes": counts["read_bytes"],
            },
            "used": None if used_map is None else {
                "used_bytes": used_map.used_bytes,
                "regions": [asdict(r) for r in used_map.regions],
            },
            "unreadable": [],
        }
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
    return ImageResult(
        path=image_path, uuid=new_uuid, kind=kind, size=source.size, block_size=bs,
        blocks=header.blocks, stored_blocks=stats.stored_blocks, zero_blocks=stats.zero_blocks,
        unused_blocks=stats.unused_blocks, unchanged_blocks=unchanged,
        changed_blocks=changed, stored_bytes=stats.stored_bytes,
        image_bytes=os.path.getsize(image_path), read_bytes=counts["read_bytes"],
        seconds=time.monotonic() - started, parent=parent["uuid"] if parent else None,
        chain=chain, unchanged_zero_blocks=unchanged_zero,
    )
