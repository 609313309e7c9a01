"""Creating an image: read -> hash -> compare with the parent -> compress -> write.

Only the blocks holding data are read (the used blocks of a recognised filesystem, the data of a
sparse file), into reused buffers: a device with O_DIRECT by READERS threads, a regular file
through the page cache by one reader thread.  Hashing and compression run in --threads workers
(pipeline.ordered_map); records are appended in block order.  For an incremental or
differential image each block's digest (the header's algorithm) is compared with the reference
image's index, so only changed blocks are stored and the parent's data is never read.

The per-block work is a pipeline of named stages (`_BlockStages`: plan -> read -> hash_compare
-> encode -> write) over typed jobs: a `BlockJob` per block to read, filled in stage by stage,
and a `Run` for each stretch of zero or unused blocks, which needs no reading and becomes one
index entry.  The checks before any of that (where the image may go, whether the source is
mounted, which reference image) come first, in create_image.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

from diskimg import __version__, devices, ranges
from diskimg.disk import identity
from diskimg.disk.used import content_ids, scan as scan_used
from diskimg import format as fmt
from diskimg.format import delta
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
from diskimg.image.chain import Chain, open_chain, parent_ref
from diskimg.image.delta import ParentPages
from diskimg.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL  # noqa: F401  (the library's names)
from diskimg import defaults
from diskimg.errors import (
    ChainError,
    DiskimgError,
    NotAnImage,
    OperationFailed,
    PermissionDenied,
    ReadError,
    SourceError,
    UnsafeTarget,
    UsageError,
)
from diskimg.crypto import keyring
from diskimg.image.imagefile import ImageReader, ImageWriter, peek_header
from diskimg.store import is_remote, is_stream, open_directory, open_store
from diskimg.transforms import TransformChain, writing_chain
from diskimg.ops.pipeline import (
    IN_FLIGHT_BYTES,
    BufferPool,
    default_threads,
    depth_for,
    ordered_map,
    prefetch,
)
from diskimg.ops.progress import Progress

log = logging.getLogger(__name__)

READERS = 4   # O_DIRECT reads in flight from a device: one per core would leave the disk idle
READ_AHEAD_WINDOW = 8 << 20   # how far past a failed read its bad sector may lie

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
    # the clock the header's `created` and `completed` times are read from (a backup job
    # passes its own, so that a schedule can be tested day by day); None: the system clock
    clock: Callable[[], datetime] | None = None
    # more metadata for the header's `extra` object (a backup job records its name and level)
    extra: dict = field(default_factory=dict)
    parity: float | None = None         # percent of Reed-Solomon parity (0: none; None: default)
    # encrypt a new full image with the command's key (crypto.keyring); a changed-block image
    # is encrypted exactly when its parent is, with the parent's chain key
    encrypt: bool = False
    delta: bool = True                  # store a changed block as its changed pages when few
                                        # changed (needs the parent's page hashes)
    # the source's used-block scan, started early (disk.prescan.EarlyScan: the CLI starts it
    # before importing this module); used when it scanned this very source
    prescan: object | None = field(default=None, compare=False, repr=False)


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
    delta_blocks: int = 0               # of the stored blocks, those stored as deltas
    delta_saved_bytes: int = 0          # their bytes minus their delta records' stored bytes
    page_hash_bytes: int = 0            # what the page-hash records cost


def utc_now(clock: Callable[[], datetime] | None = None) -> str:
    """The time now (or `clock`'s) as the header records it: ISO 8601 UTC, to the second."""
    now = clock() if clock is not None else datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parity_fields(pct: float | None) -> dict:
    """The header fields of an image with `pct` percent of parity (none for 0, the default
    for None); raises UsageError for a percentage out of range."""
    if pct is None:
        pct = defaults.DEFAULT_PARITY
    if not pct:
        return {}
    try:
        return {"features": ("parity",), "parity": fmt.Geometry.for_percent(pct)}
    except ValueError as err:
        raise UsageError(f"--parity {pct:g}: must be 0 (none) or from 0.5 to 100") from err


def with_features(fields: dict, features: tuple[str, ...]) -> dict:
    """Header fields (parity_fields') with more required features added."""
    if not features:
        return fields
    return {**fields, "features": tuple(sorted({*fields.get("features", ()), *features}))}


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
    if is_remote(image):
        _check_remote_image_path(image, force)
        return
    if is_stream(image):
        return      # standard output: checked (not a terminal) when the sink is made
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


def _check_remote_image_path(image: str, force: bool) -> None:
    """An image in object storage cannot be the source nor lie on it; an existing object is
    replaced only with --force, and only when it is an image."""
    store, name = open_store(image)
    if store.exists(name):
        if not force:
            raise UsageError(f"{image}: already exists; use --force to overwrite it")
        _check_replaceable(image)


def _check_replaceable(image: str) -> None:
    """What --force may replace: a diskimg image (its header magic) that no loop device reads.
    A disk's file (`image /dev/sdb /var/vm.img --force`), or any other file, is never
    replaced, even one under a loop device that is not in use."""
    store, name = open_store(image)
    try:
        with store.open(name) as reader:
            magic = reader.pread(len(fmt.HEADER_MAGIC), 0)
    except PermissionDenied as err:
        raise PermissionDenied(image, "read the existing file") from err
    except (NotAnImage, OperationFailed) as err:
        why = getattr(err.__cause__, "strerror", None) or str(err)
        raise OperationFailed(f"{image}: cannot read the existing file: {why}",
                              path=image) from err
    if magic != fmt.HEADER_MAGIC:
        raise UnsafeTarget(image, "is not a diskimg image; --force replaces only images")
    if store.local_path(name) is None:
        return
    loops = identity.loops_backed_by(image)
    if loops:
        raise UnsafeTarget(image, f"backs the loop device {', '.join(loops)}; --force never "
                                  f"replaces a loop device's file (detach it first: losetup -d "
                                  f"{loops[0]})")


def check_no_children(image: str, search: tuple[str, ...] = ()) -> None:
    """Refuse to replace `image` when an image next to it (or in a search directory) was
    made against it: replacing it would break that image and every one after it."""
    if is_stream(image):
        return
    if is_remote(image):
        store, name = open_store(image)
        if store.exists(name):
            _check_no_children(image, search)
    elif os.path.isfile(image):
        _check_no_children(image, search)


def _check_no_children(image: str, search: tuple[str, ...]) -> None:
    """Refuse to replace `image` when an image next to it (or in a search directory) was
    made against it: replacing it would break that image and every one after it."""
    store, name = open_store(image)
    header = peek_header(store, name)
    if header is None:
        return      # not an image (or a damaged one): nothing can depend on it
    uuid = header.uuid
    mine = store.local_path(name)
    me = identity.identify(mine) if mine is not None else None
    me_remote = (store.location, name)
    locations = dict.fromkeys([store.location] + [open_directory(d).location for d in search])
    for location in locations:
        there = open_directory(location)
        try:
            names = there.list()
        except DiskimgError:
            continue
        for name in names:
            path = there.path(name)
            local = there.local_path(name)
            if me is not None and local is not None and \
                    identity.same(identity.identify(local), me):
                continue
            if (there.location, name) == me_remote:
                continue
            child = peek_header(there, name)
            parent = child.parent if child is not None else None
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
    tells disks apart without a serial: partition-table id, filesystem UUID (disk.used)."""
    ident = devices.identify(source.path)
    ident.update(content_ids(source.fd, source.size, sector_size=source.logical_sector))
    return ident


def _is_rescue_partial(path: str) -> bool:
    store, name = open_store(path)
    header = peek_header(store, name)
    return header is not None and header.extra.get("rescue") is True


def _load_reference(opts: ImageOptions, source: Source, ident: dict, image_path: str
                    ) -> Chain | None:
    """The image whose index the new one is compared against, checked against the source and
    against the new image's path: no image of the chain is ever replaced (not even with
    --force), and a source that is not the parent's disk is refused unless --force.  Returns
    the chain whose leaf is the reference (an incremental's parent, a differential's root), kept
    open for the page hashes of its blocks (image.delta.ParentPages)."""
    ref_path = opts.incremental or opts.differential
    if ref_path is None:
        return None
    chain = open_chain(ref_path, opts.search)
    keep = chain.images[-1] if opts.incremental else chain.images[0]
    try:
        target = (identity.identify(image_path)
                  if not is_remote(image_path) and not is_stream(image_path) else None)
        for img in chain.images:
            if target is None or img.local_path is None:
                # an object: the new image is one of the chain only under the same name
                if img.path != image_path:
                    continue
                why = "the same object"
            else:
                why = identity.overlap(target, identity.identify(img.local_path))
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
    if opts.differential:     # the root alone: a differential is compared with it only
        for img in chain.images[1:]:
            img.close()
        chain = Chain([keep])
    return chain


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
    ChainError, PermissionDenied, ReadError (a source read, exit 3) and DiskIOError (the image,
    exit 3); a failed run leaves no partial file."""
    if opts.block_size is not None:
        check_block_size(opts.block_size)
    if opts.incremental and opts.differential:
        raise UsageError("--incremental and --differential exclude each other")
    if opts.digest is not None and opts.digest not in fmt.KNOWN_DIGESTS:
        raise UsageError(f"--digest {opts.digest}: one of {', '.join(fmt.KNOWN_DIGESTS)} expected")
    check_encryption_asked(opts.encrypt, image_path)
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


def check_encryption_asked(encrypt: bool, image_path: str) -> None:
    """Refuse --encrypt without a key, and a key without --encrypt for a full image: nothing
    is written in plaintext when encryption was asked for (exit 2 before anything is read)."""
    if encrypt and keyring.given() is None:
        raise UsageError(f"{image_path}: --encrypt needs a key: --key-file KF, --passphrase or "
                         f"--passphrase-file FILE (or DISKIMG_PASSPHRASE_FILE); nothing written")


def _image_keys(opts: ImageOptions, ref: ImageReader | None, uuid: str, size: int, bs: int,
                digest: str):
    """(keys, key slots) of the new image: its parent's chain key and slots for a
    changed-block image of an encrypted chain, a new master key for an encrypted full image,
    (None, None) for a plain one.  An encrypted child of a plain chain is refused (its keyed
    digests could never match the parent's)."""
    if ref is not None and not ref.header.encrypted:
        if opts.encrypt:
            raise ChainError(f"{ref.path} is not encrypted: a chain is encrypted from its full "
                             f"image on, or not at all; start a new chain with a full image")
        return None, None
    if ref is None and not opts.encrypt:
        if keyring.explicit():
            raise UsageError("a key was given but not --encrypt: add --encrypt to encrypt the "
                             "image with it")
        return None, None
    from diskimg.crypto import keys as crypto_keys   # the cryptography package: only here
    if ref is not None:
        master = ref.header.keys.master
        slots = list(ref.header.encryption["slots"])
    else:
        master = crypto_keys.new_master()
        slots = crypto_keys.new_slots(master, keyring.given())
    return crypto_keys.ImageKeys(master, uuid, size, bs, digest), slots


def _create(source: Source, image_path: str, opts: ImageOptions, ident: dict,
            ref_chain: Chain | None, progress: Progress | None, started: float,
            mounted_rw: list[str]) -> ImageResult:
    ref = ref_chain.leaf if ref_chain is not None else None
    # a stream (image to "-") is the ordinary image, parity and delta records included:
    # `diskimg restore -` reads them front to back (diskimg.ops.stream_restore)
    parent_pages = ParentPages(ref_chain) if ref_chain is not None and opts.delta else None
    if parent_pages is not None and not parent_pages.available:
        parent_pages = None      # a chain written before page hashes: whole blocks only
    bs = ref.header.block_size if ref is not None else opts.block_size or DEFAULT_BLOCK_SIZE
    new_uuid = fmt.new_image_uuid()
    if ref is None:
        kind, parent, chain = "full", None, (new_uuid,)
    else:
        kind = "incremental" if opts.incremental else "differential"
        parent = parent_ref(ref)
        chain = tuple(ref.header.chain or (ref.uuid,)) + (new_uuid,)
    digest = ref.header.digest if ref is not None else opts.digest or fmt.DEFAULT_DIGEST
    keys, slots = _image_keys(opts, ref, new_uuid, source.size, bs, digest)
    transforms = keys.writing_chain(opts.level) if keys else writing_chain(opts.level)
    used_map = None
    if opts.all_blocks:
        used = [(0, source.size)]
    else:
        used_map = opts.prescan.take(source) if opts.prescan is not None else None
        if used_map is None:
            used_map = scan_used(source.fd, source.size, sector_size=source.logical_sector)
        used = list(used_map.ranges)
    # blocks the filesystem's metadata owns that its allocation map marked free (read all the
    # same): `info` reports them, so the header says so (readers ignore unknown extra keys)
    repaired = used_map.repaired if used_map is not None else []
    header = fmt.Header(
        uuid=new_uuid, kind=kind, size=source.size, block_size=bs, source=ident,
        created=utc_now(opts.clock), tool_version=__version__, parent=parent, chain=chain,
        compression={"codec": "zstd", "level": opts.level},
        extra={**opts.extra,
               "all_blocks": opts.all_blocks,   # info tells an exact copy from a used-blocks one
               **({"source_mounted_rw": mounted_rw} if mounted_rw else {}),
               **({"allocation_repaired": repaired} if repaired else {}),
               # every stored block is followed by its page hashes (FORMAT.md section 18)
               "page_hashes": dict(delta.PAGE_HASH_INFO)},
        transforms=transforms.table, digest=digest,
        # an image that may hold delta records says so: a reader that cannot resolve them
        # refuses it instead of reporting its delta blocks as damaged
        **with_features(parity_fields(opts.parity),
                        ((fmt.ENCRYPTED,) if keys else ())
                        + ((fmt.FEATURE_DELTA,) if parent_pages is not None else ())),
    )
    if keys is not None:
        header = keys.seal_header(header, slots)
    # what is not a hole of a sparse file (a device has none)
    data_spans = ([(0, source.size)] if source.is_block
                  else list(data_ranges(source.fd, source.size)))
    to_read = ranges.intersect(data_spans, used)

    # the most the image may take: each block read stored whole (plus its record header), and
    # the index (object storage sizes its upload parts by it)
    hint = sum(n + (n // bs + 1) * fmt.RECORD_HEADER_SIZE for _, n in to_read) + \
        header.blocks * fmt.ENTRY_SIZE + (1 << 20)
    writer = ImageWriter(image_path, header, size_hint=hint)   # removes its partial if it fails
    # a device is read with O_DIRECT: on the benchmark disk, reading through the page cache
    # cost 0.5-0.66 s of system time (read-ahead, copy, invalidation), O_DIRECT 0.07-0.14 s
    direct_fd = open_direct(source.path) if source.is_block else None
    stages = _BlockStages(source, header, to_read, used, direct_fd, transforms,
                          ref.iter_entries() if ref is not None else None, parent_pages)
    try:
        if progress:
            progress.start(source.size, "B")
        jobs = stages.read_all(stages.plan(), opts.threads)
        results = ordered_map(stages.process, jobs, opts.threads,
                              depth=depth_for(bs, opts.threads), inline=_is_done)
        with closing(results):  # stops the readers before the source is closed
            for job in results:
                stages.write(writer, job)
                if progress:
                    progress.advance(_job_bytes(header, job))
        stats = writer.stats
        # unchanged: the parent references only, so that the four kinds add up to the blocks
        unchanged, unchanged_zero = stats.parent_blocks, stages.unchanged_zero
        changed = header.blocks - unchanged - unchanged_zero if ref is not None else header.blocks
        meta = {
            "completed": utc_now(opts.clock),
            "stats": {
                "stored_blocks": stats.stored_blocks, "stored_bytes": stats.stored_bytes,
                "zero_blocks": stats.zero_blocks, "unused_blocks": stats.unused_blocks,
                "unchanged_blocks": unchanged, "changed_blocks": changed,
                "unchanged_zero_blocks": unchanged_zero, "read_bytes": stages.read_bytes,
                "delta_blocks": stats.delta_blocks, "delta_bytes": stats.delta_bytes,
                "delta_block_bytes": stats.delta_block_bytes,
                "page_hash_bytes": stats.page_hash_bytes,
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
    healing = getattr(ref, "healing", None)
    if healing is not None and healing.repairs.repaired:
        # the parent's index was read healed: say so, the parent file itself is still damaged
        log.warning("%s: parity repaired %d damaged slice(s) (%d KiB) while reading its index; "
                    "the file itself is still damaged: run `diskimg repair %s`", ref.path,
                    len(healing.repairs.repaired),
                    len(healing.repairs.repaired) * healing.geom.slice // 1024, ref.path)
    return ImageResult(
        path=image_path, uuid=new_uuid, kind=kind, size=source.size, block_size=bs,
        blocks=header.blocks, stored_blocks=stats.stored_blocks, zero_blocks=stats.zero_blocks,
        unused_blocks=stats.unused_blocks, unchanged_blocks=unchanged,
        changed_blocks=changed, stored_bytes=stats.stored_bytes,
        image_bytes=writer.file_bytes, read_bytes=stages.read_bytes,
        seconds=time.monotonic() - started, parent=parent["uuid"] if parent else None,
        chain=chain, unchanged_zero_blocks=unchanged_zero,
        delta_blocks=stats.delta_blocks,
        delta_saved_bytes=stats.delta_block_bytes - stats.delta_bytes,
        page_hash_bytes=stats.page_hash_bytes,
    )


def _is_run(job: Run | BlockJob) -> bool:
    """Runs need no reading nor hashing: the pipeline passes them through on its own thread."""
    return type(job) is Run


def _is_done(job: Run | BlockJob) -> bool:
    """Nothing left for a worker: a run, or a block already hashed that is not to be stored."""
    return type(job) is Run or (job.hashed and job.kind != fmt.DATA)


def _job_bytes(header: fmt.Header, job: Run | BlockJob) -> int:
    """The bytes of the device a job covers (what the progress counts)."""
    if type(job) is Run:
        start = job.first * header.block_size
        return min(start + job.count * header.block_size, header.size) - start
    return job.length


@dataclass(slots=True)
class BlockJob:
    """One block on its way from the source to the image, filled in stage by stage.

    plan: `block`, `length`, `parts` (the byte ranges inside the block that hold data; None for
    the whole block) and `ref_sha` (the reference image's checksum of the block, for a
    changed-block image).  read: `view` (the content, in a pool buffer) and `read_bytes`.
    hash/compare: `sha256` and `kind` (DATA, or PARENT/ZERO when nothing is to be stored).
    encode: `stored` and `codec` (what the record holds and how to decode it).
    """

    block: int
    length: int
    parts: tuple[tuple[int, int], ...] | None
    ref_sha: bytes | None
    view: memoryview | None = None
    read_bytes: int = 0
    sha256: bytes = b""
    kind: int = fmt.DATA
    stored: bytes | memoryview | None = None
    codec: int = fmt.CODEC_RAW
    hashed: bool = False       # hash_compare is done (by the reader)
    ref_entry: fmt.IndexEntry | None = None     # the reference's entry (for its page hashes)
    delta_len: int | None = None                # stored as a delta: its payload's length
    page_hashes: tuple | None = None            # (stored, chain id, digest) of the vector


class _BlockStages:
    """The stages of imaging one source, over a stream of `Run`s and `BlockJob`s in block order:

        plan -> read -> hash_compare -> encode -> write
                (readers) (--threads workers)       (this thread, in order)

    `read_all` runs `read` on reader threads (from a device, `read_and_hash`: the reader hashes
    too, and blocks with nothing to store skip the workers), `process` (hash_compare unless
    done, then encode) runs in the ordered_map workers, `write` on the calling thread.  Runs of zero or unused blocks go
    through as they are: nothing to read, one index entry.  Blocks are read into reused
    buffers (BufferPool), given back as soon as nothing refers to them any more: after hashing
    when the block is not stored, after encoding when the stored bytes are a copy, after
    writing when the block is stored as read.
    """

    def __init__(self, source: Source, header: fmt.Header, to_read: list[tuple[int, int]],
                 used: list[tuple[int, int]], direct_fd: int | None, transforms: TransformChain,
                 ref_entries: Iterator | None, parent_pages: ParentPages | None = None) -> None:
        self.source = source
        self.header = header
        self.to_read = to_read     # the byte ranges to read: used, and not a hole
        self.used = used           # the used byte ranges (the rest: UNUSED runs)
        self.bs = header.block_size
        self.direct_fd = direct_fd
        self.transforms = transforms
        self.ref_entries = ref_entries
        self.parent_pages = parent_pages
        self.pool = BufferPool(self.bs)
        self.zeros = bytes(self.bs)
        self.read_bytes = 0        # counted by write, on one thread
        self.unchanged_zero = 0    # zero/unused runs that were zeros in the reference too

    # -- plan ----------------------------------------------------------------------------------

    def plan(self) -> Iterator[Run | BlockJob]:
        """Every block in order: runs that need no reading (a short last block alone, as its
        checksum differs) and a job for each block to read, with its reference checksum."""
        header, ref_entries = self.header, self.ref_entries
        for item in plan_blocks(self.source.size, self.bs, self.to_read, self.used):
            if type(item) is Run:
                for run in _split_short(header, item):
                    if ref_entries is not None:
                        zsha = header.zero_digest(header.block_length(run.first))
                        self.unchanged_zero += sum(
                            next(ref_entries)[1].sha256 == zsha for _ in range(run.count))
                    yield run
                continue
            if ref_entries is None:
                yield BlockJob(item.block, header.block_length(item.block), item.parts, None)
            else:
                ref_entry = next(ref_entries)[1]
                yield BlockJob(item.block, header.block_length(item.block), item.parts,
                               ref_entry.sha256, ref_entry=ref_entry)

    # -- read ----------------------------------------------------------------------------------

    def read_all(self, jobs: Iterator[Run | BlockJob], threads: int) -> Iterator[Run | BlockJob]:
        """The jobs with their blocks read, in order.  From a device: O_DIRECT requests from
        READERS threads, the kernel's cache left alone.  From a file: one reader thread through
        the page cache, telling the kernel ahead which ranges come next and letting go of
        those read."""
        bs = self.bs
        if self.direct_fd is not None:
            # 1 MiB blocks: 4 readers; 16 MiB: 1 (memory is bounded by bytes, as in depth_for)
            readers = max(1, min(READERS, IN_FLIGHT_BYTES // (2 * bs)))
            # the reader that has a block hashes it too (preadv and the hash both release the
            # GIL): a block that is unchanged or zero is then done, and the workers pass it
            # through on their feeding thread (`_is_done`) instead of handing it to a worker
            # and back, which was most of the Python time of an unchanged incremental
            read = self.read_and_hash
            if readers == 1:   # still off the main thread, which writes the image
                return prefetch(map(read, jobs), depth=2)
            return ordered_map(read, jobs, readers, depth=2 * readers, inline=_is_run)
        readahead = ReadAhead(self.source.fd, self.to_read)
        read = self.read

        def read_in_order() -> Iterator[Run | BlockJob]:
            for job in jobs:
                if type(job) is BlockJob:
                    readahead.advance(job.block * bs)
                    read(job)
                yield job
        # read-ahead beyond what the workers hold
        return prefetch(read_in_order(), depth=max(2, depth_for(bs, threads) - threads))

    def read(self, job: Run | BlockJob) -> Run | BlockJob:
        """Read a job's block into a pool buffer: its data ranges in one request, the free
        space around and between them zeros.  A read error names the bad sector when it can."""
        if type(job) is Run:
            return job
        source, sector = self.source, self.source.logical_sector
        start, length = job.block * self.bs, job.length
        parts = job.parts or ((0, length),)
        lo, hi = parts[0][0], parts[-1][0] + parts[-1][1]
        view = memoryview(self.pool.get())[:length]
        try:
            if self.direct_fd is None:
                preadv_full(source.fd, view[lo:hi], start + lo, source.path)
            else:   # whole sectors, into the page-aligned buffer at the same place
                a, e = lo // sector * sector, min(-(-hi // sector) * sector, length)
                try:
                    preadv_full(self.direct_fd, view[a:e], start + a, source.path)
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
        zeros = self.zeros
        for off, n in (*parts, (length, 0)):   # zero what lies outside the data ranges
            if off > pos:
                view[pos:off] = zeros[:off - pos]
            pos = off + n
        job.view, job.read_bytes = view, hi - lo
        return job

    def read_and_hash(self, job: Run | BlockJob) -> Run | BlockJob:
        """read, then hash_compare on the same thread."""
        if type(job) is BlockJob:
            self.read(job)
            self.hash_compare(job)
            job.hashed = True
        return job

    # -- hash, compare, encode (the workers) ---------------------------------------------------

    def process(self, job: Run | BlockJob) -> Run | BlockJob:
        """hash_compare (unless the reader did), then encode what is to be stored."""
        if type(job) is Run:
            return job
        if job.hashed:
            if job.kind == fmt.DATA:
                self.encode(job)
        elif self.hash_compare(job):
            self.encode(job)
        return job

    def hash_compare(self, job: BlockJob) -> bool:
        """The block's SHA-256, compared with the reference's (unchanged: PARENT) and with the
        all-zeros block's (ZERO).  True when the block is to be stored; otherwise its buffer
        goes back to the pool at once."""
        data = job.view
        job.sha256 = sha = self.header.hash(data)
        if sha == job.ref_sha:
            job.kind = fmt.PARENT
        elif sha == self.header.zero_digest(len(data)):
            job.kind = fmt.ZERO
        else:
            return True
        self.pool.put(data.obj)
        job.view = None
        return False

    def encode(self, job: BlockJob) -> None:
        """What the record stores: the block through the transform chain (which leaves zstd
        out when it does not pay off and then returns the buffer itself: the pool buffer stays
        with the job until it is written); or, when few of its pages differ from the
        reference's page hashes, its changed pages (a delta record, FORMAT.md section 18).
        Every stored block gets its page-hash vector, through the same transform chain."""
        data = job.view
        hashes = delta.page_hashes(data)
        payload = None
        if self.parent_pages is not None and job.ref_entry is not None:
            old = self.parent_pages.lookup(job.block, job.ref_entry)
            if old is not None and len(old) == len(hashes):
                pages = delta.changed_pages(old, hashes)
                if delta.use_delta(len(pages), len(hashes) // delta.PAGE_HASH_SIZE):
                    payload = delta.pack_delta(data, pages)
        if payload is not None:
            job.stored, job.codec = self.transforms.encode(job.block, payload)
            job.delta_len = len(payload)
        else:
            job.stored, job.codec = self.transforms.encode(job.block, data)
        ph, ph_codec = self.transforms.encode(job.block, hashes)
        job.page_hashes = (ph, ph_codec, self.header.hash(hashes))
        if job.stored is not data:
            self.pool.put(data.obj)
            job.view = None

    # -- write (the calling thread, in block order) --------------------------------------------

    def write(self, writer: ImageWriter, job: Run | BlockJob) -> None:
        """Append the job's record (or index entry) to the image."""
        if type(job) is Run:
            writer.add_entry(job.first, fmt.IndexEntry(
                job.kind, self.header.zero_digest(self.header.block_length(job.first))), job.count)
            return
        self.read_bytes += job.read_bytes
        if job.kind != fmt.DATA:
            writer.add_entry(job.block, fmt.IndexEntry(job.kind, job.sha256))
            return
        writer.add_stored(job.block, job.stored, job.codec, job.sha256, delta_len=job.delta_len,
                          page_hashes=job.page_hashes)
        job.page_hashes = None
        if job.view is not None:   # stored as read: the buffer is free once written
            self.pool.put(job.view.obj)
            job.view = None
        job.stored = None


def _split_short(header: fmt.Header, run: Run) -> Iterator[Run]:
    """Runs share one entry; the short last block has another checksum, so alone."""
    last = run.first + run.count - 1
    if header.block_length(last) == header.block_size or run.count == 1:
        yield run
    else:
        yield Run(run.first, run.count - 1, run.kind)
        yield Run(last, 1, run.kind)
