"""Creating an image: read -> hash -> compare with the parent -> compress -> write.

The source is read on the calling thread in block-size reads; hashing and compression run in
worker threads (pipeline.ordered_map); records are appended in block order.  Blocks of a regular
file that lie wholly in holes are never read.  For an incremental or differential image each
block's SHA-256 is compared with the reference image's index, so only changed blocks are stored
and the parent's data is never read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import zstandard

from diskimg import __version__, devices
from diskimg import format as fmt
from diskimg.blockdev import Source, data_ranges, open_source, pread_full
from diskimg.chain import open_chain, parent_ref
from diskimg.errors import ChainError, ReadError, UnsafeTarget, UsageError
from diskimg.imagefile import ImageReader, ImageWriter
from diskimg.pipeline import default_threads, ordered_map

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_LEVEL = 3

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ImageOptions:
    block_size: int = DEFAULT_BLOCK_SIZE
    level: int = DEFAULT_LEVEL
    threads: int = field(default_factory=default_threads)
    force: bool = False                 # overwrite an existing image; accept another serial
    incremental: str | None = None      # parent image path
    differential: str | None = None     # any image of the chain whose root full image is used
    search: tuple[str, ...] = ()


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


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_image_path(image: str, source: Source, force: bool) -> None:
    """Refuse to overwrite an image without force, or to write an image onto the source."""
    if os.path.exists(image):
        if os.path.isdir(image):
            raise UsageError(f"{image}: is a directory; give the image's file name")
        if os.path.samefile(image, source.path):
            raise UnsafeTarget(image, "is the source itself")
        if not force:
            raise UsageError(f"{image}: already exists; use --force to overwrite it")
    parent_dir = os.path.dirname(os.path.abspath(image))
    if not os.path.isdir(parent_dir):
        raise UsageError(f"{image}: directory {parent_dir} does not exist")
    if source.is_block:
        src = os.path.realpath(source.path)
        holders = devices.holding_devices(parent_dir)
        if src in holders:
            raise UnsafeTarget(image, f"lies on the source device {source.path}; write the "
                                      f"image to another disk")


def _load_reference(opts: ImageOptions, source: Source, identity: dict) -> ImageReader | None:
    """The image whose index the new one is compared against, checked against the source."""
    ref_path = opts.incremental or opts.differential
    if ref_path is None:
        return None
    chain = open_chain(ref_path, opts.search)
    keep = chain.images[-1] if opts.incremental else chain.images[0]
    for img in chain.images:
        if img is not keep:
            img.close()
    h = keep.header
    if h.size != source.size:
        keep.close()
        raise ChainError(f"{source.path}: size {source.size} differs from {keep.path}'s source "
                         f"size {h.size}; a changed-block image needs the same device")
    theirs, ours = (h.source or {}).get("serial"), identity.get("serial")
    if theirs and ours and theirs != ours and not opts.force:
        keep.close()
        raise ChainError(f"{source.path}: serial {ours} differs from {keep.path}'s source serial "
                         f"{theirs}; use --force if this really is the same disk's data")
    return keep


def _block_plan(source: Source, blocks: int, block_size: int) -> Iterator[tuple[int, bool]]:
    """(block, has_data) for every block: False only for blocks wholly inside holes of a
    regular file, which are then not read at all."""
    if source.is_block:
        for b in range(blocks):
            yield b, True
        return
    b = 0
    for off, length in data_ranges(source.fd, source.size):
        first, last = off // block_size, (off + length - 1) // block_size
        while b < first:
            yield b, False
            b += 1
        while b <= last and b < blocks:
            yield b, True
            b += 1
    while b < blocks:
        yield b, False
        b += 1


class _Compressor:
    """Per-thread zstd contexts (a ZstdCompressor must not be shared between threads)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def __call__(self, data: bytes) -> bytes:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c.compress(data)


def create_image(source_path: str, image_path: str, opts: ImageOptions = ImageOptions(),
                 progress: Progress | None = None) -> ImageResult:
    """Image `source_path` into `image_path`.  Raises SourceError, UsageError, UnsafeTarget,
    ChainError, ReadError (exit 3) and OperationFailed; a failed run leaves no partial file."""
    fmt.check_block_size(opts.block_size)
    if opts.incremental and opts.differential:
        raise UsageError("--incremental and --differential exclude each other")
    started = time.monotonic()
    source = open_source(source_path)
    try:
        check_image_path(image_path, source, opts.force)
        identity = devices.identify(source_path)
        ref = _load_reference(opts, source, identity)
        try:
            return _create(source, image_path, opts, identity, ref, progress, started)
        finally:
            if ref is not None:
                ref.close()
    finally:
        source.close()


def _create(source: Source, image_path: str, opts: ImageOptions, identity: dict,
            ref: ImageReader | None, progress: Progress | None, started: float) -> ImageResult:
    bs = opts.block_size
    new_uuid = str(uuidlib.uuid4())
    if ref is None:
        kind, parent, chain = "full", None, (new_uuid,)
    else:
        kind = "incremental" if opts.incremental else "differential"
        parent = parent_ref(ref)
        chain = tuple(ref.header.chain or (ref.uuid,)) + (new_uuid,)
    header = fmt.Header(
        uuid=new_uuid, kind=kind, size=source.size, block_size=bs, source=identity,
        created=_now(), tool_version=__version__, parent=parent, chain=chain,
        compression={"codec": "zstd", "level": opts.level},
    )
    compress = _Compressor(opts.level)
    ref_entries = ref.iter_entries() if ref is not None else None
    read_bytes = 0

    def produce() -> Iterator[tuple[int, bytes | None, bytes | None]]:
        nonlocal read_bytes
        for block, has_data in _block_plan(source, header.blocks, bs):
            ref_sha = next(ref_entries)[1].sha256 if ref_entries is not None else None
            if not has_data:
                yield block, None, ref_sha
                continue
            length = header.block_length(block)
            try:
                data = pread_full(source.fd, length, block * bs, source.path)
            except OSError as err:
                raise ReadError(source.path, block * bs, length, err,
                                hint="use --rescue to image past unreadable sectors") from err
            read_bytes += length
            yield block, data, ref_sha

    def work(item: tuple[int, bytes | None, bytes | None]):
        block, data, ref_sha = item
        length = header.block_length(block)
        if data is None:
            sha = fmt.zero_digest(length)
            return block, (fmt.PARENT if sha == ref_sha else fmt.ZERO), sha, None, 0
        sha = hashlib.sha256(data).digest()
        if sha == ref_sha:
            return block, fmt.PARENT, sha, None, 0
        if sha == fmt.zero_digest(length):
            return block, fmt.ZERO, sha, None, 0
        stored = compress(data)
        if len(stored) >= length:
            return block, fmt.DATA, sha, data, fmt.CODEC_RAW
        return block, fmt.DATA, sha, stored, fmt.CODEC_ZSTD

    writer = ImageWriter(image_path, header)
    try:
        for block, kind_, sha, stored, codec in ordered_map(work, produce(), opts.threads):
            if kind_ == fmt.DATA:
                writer.add_data(block, stored, codec, sha)
            else:
                writer.add_entry(block, fmt.IndexEntry(kind_, sha))
            if progress:
                progress(header.block_length(block))
        stats = writer.stats
        changed = header.blocks - stats.parent_blocks
        meta = {
            "completed": _now(),
            "stats": {
                "stored_blocks": stats.stored_blocks, "stored_bytes": stats.stored_bytes,
                "zero_blocks": stats.zero_blocks, "unused_blocks": stats.unused_blocks,
                "unchanged_blocks": stats.parent_blocks, "changed_blocks": changed,
                "read_bytes": read_bytes,
            },
            "unreadable": [],
        }
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    return ImageResult(
        path=image_path, uuid=new_uuid, kind=kind, size=source.size, block_size=bs,
        blocks=header.blocks, stored_blocks=stats.stored_blocks, zero_blocks=stats.zero_blocks,
        unused_blocks=stats.unused_blocks, unchanged_blocks=stats.parent_blocks,
        changed_blocks=changed, stored_bytes=stats.stored_bytes,
        image_bytes=os.path.getsize(image_path), read_bytes=read_bytes,
        seconds=time.monotonic() - started, parent=parent["uuid"] if parent else None,
        chain=chain,
    )
