"""Reading and writing one image file: the I/O over the structures of format.py.

`ImageReader` checks the header, trailer and footer when opened, reads the index segment by
segment (so a multi-terabyte index is never held whole) and reads single blocks.  `ImageWriter`
appends records under ``IMAGE.partial``, builds the compressed index as entries arrive in block
order, and publishes the image under its name only after the trailer is written and fsynced.
All I/O goes through a store (diskimg.store): this module never opens a file itself.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import stat
from dataclasses import dataclass
from typing import Iterator

from diskimg import format as fmt
from diskimg.disk.blockdev import file_kind as _kind
from diskimg.errors import BlockError, ChecksumMismatch, CorruptImage, DecodeError
from diskimg.errors import DigestMismatch, DiskimgError, IncompleteImage, NotAnImage
from diskimg.errors import PermissionDenied, TruncatedImage, UsageError
from diskimg.store import Store, StoreReader, StoreSink, open_store
from diskimg.image.records import decode_verified
from diskimg.transforms import reading_chain

log = logging.getLogger(__name__)


def segment_runs(first: int, raw: bytes) -> Iterator[tuple[int, int, fmt.IndexEntry]]:
    """(first block, count, entry) of the runs of identical entries in one raw segment."""
    size = fmt.ENTRY_SIZE
    count = len(raw) // size
    if raw[:size] * count == raw:     # the whole segment is one run (compared at C speed)
        yield first, count, fmt.IndexEntry.unpack_from(raw, 0)
        return
    start, prev = 0, raw[:size]
    for i in range(1, count + 1):
        cur = raw[i * size:(i + 1) * size] if i < count else None
        if cur != prev:
            yield first + start, i - start, fmt.IndexEntry.unpack_from(prev, 0)
            start, prev = i, cur


def _check_is_file(reader: StoreReader) -> None:
    """Refuse a directory, pipe or device opened as an image."""
    mode = reader.stat.mode
    if mode is not None and stat.S_ISDIR(mode):
        raise NotAnImage(reader.path, "is a directory, not an image")
    if not reader.stat.is_file:
        # a pipe (/dev/stdin) cannot be read at offsets: "Illegal seek" otherwise
        raise NotAnImage(reader.path, f"is {_kind(mode)}, not an image file")


def peek_header(store: Store, name: str, strict: bool = False) -> fmt.Header | None:
    """The header of `name` in `store`, or None when it is not an image (missing, unreadable,
    not a diskimg file, damaged): a look at what a file is, without opening it as an image.
    With `strict` (the file that must be the image looked for), a damaged header raises
    CorruptImage and a file that may not be read PermissionDenied."""
    try:
        with store.open(name) as reader:
            return fmt.read_header(reader, reader.path)[0]
    except (CorruptImage, PermissionDenied):
        if strict:
            raise
        return None
    except DiskimgError:
        return None


class ImageReader:
    """An open, complete image.  Raises NotAnImage, IncompleteImage, CorruptImage
    (TruncatedImage, MetadataError), PermissionDenied or DiskIOError on open.

    `path` is where the image is (a path or URL); with `store`, `path` is a name in it."""

    def __init__(self, path: str, store: Store | None = None) -> None:
        if store is None:
            store, name = open_store(str(path))
        else:
            name = str(path)
        self.store, self.name = store, name
        self.path = store.path(name)
        self.reader = store.open(name)
        try:
            _check_is_file(self.reader)
            self.file_size = self.reader.size
            try:
                self.header, self.data_start = fmt.read_header(self.reader, self.path)
                self.footer = fmt.read_footer(self.reader, self.path, self.file_size,
                                              self.header, self.data_start)
                self.transforms = reading_chain(self.header.transforms)
            except IncompleteImage as err:
                if self.path.endswith(".partial"):
                    raise
                # a file that was once complete and has been cut short is damage, not input
                raise TruncatedImage(self.path, self.file_size, err.reason) from err
            self.segments = self.footer.segments
            self.entries_per_segment = self.footer.entries_per_segment
            self.index_sha256 = self.footer.index_sha256
            # where records may lie: after the header, before the first index segment
            self.records_end = min((off for off, _ in self.segments), default=self.footer.offset)
        except BaseException:
            self.reader.close()
            raise
        self._seg_cache: tuple[int, bytes] | None = None

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def blocks(self) -> int:
        return self.header.blocks

    @property
    def local_path(self) -> str | None:
        """The image's local file path for the identity and safety checks (None: remote)."""
        return self.store.local_path(self.name)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- index -------------------------------------------------------------------------------

    def _segment_range(self, seg: int) -> tuple[int, int]:
        first = seg * self.entries_per_segment
        return first, min(self.entries_per_segment, self.blocks - first)

    def segment(self, seg: int) -> bytes:
        """Raw entries of index segment `seg` (raises format.SegmentError when damaged)."""
        cache = self._seg_cache   # read once: worker threads replace it concurrently
        if cache is not None and cache[0] == seg:
            return cache[1]
        first, count = self._segment_range(seg)
        off, length = self.segments[seg]
        raw = fmt.read_segment(self.reader, self.path, off, length, first, count)
        self._seg_cache = (seg, raw)
        return raw

    def entry(self, block: int) -> fmt.IndexEntry:
        seg, pos = divmod(block, self.entries_per_segment)
        return fmt.IndexEntry.unpack_from(self.segment(seg), pos * fmt.ENTRY_SIZE)

    def iter_entries(self) -> Iterator[tuple[int, fmt.IndexEntry]]:
        """Every (block, entry) in order; a damaged segment raises format.SegmentError."""
        for seg in range(len(self.segments)):
            first, _ = self._segment_range(seg)
            for i, e in enumerate(fmt.iter_entries(self.segment(seg))):
                yield first + i, e

    def iter_runs(self) -> Iterator[tuple[int, int, fmt.IndexEntry]]:
        """(first block, count, entry) for runs of blocks with identical index entries (zero,
        unused, parent), so that a mostly empty multi-terabyte device costs a few runs, not
        millions of entries.  A damaged segment raises format.SegmentError."""
        for seg in range(len(self.segments)):
            first, _ = self._segment_range(seg)
            yield from segment_runs(first, self.segment(seg))

    def index_digest(self) -> str:
        """SHA-256 over all raw index entries in block order, as recorded in the footer."""
        h = hashlib.sha256()
        for seg in range(len(self.segments)):
            h.update(self.segment(seg))
        return h.hexdigest()

    # -- blocks ------------------------------------------------------------------------------

    def block_error(self, block: int, reason: str) -> BlockError:
        return BlockError(self.path, self.uuid, block, block * self.header.block_size, reason)

    def check_data_entry(self, block: int, entry: fmt.IndexEntry) -> None:
        """Raise BlockError unless a DATA entry's record can lie where the entry says: inside
        the records area, with a codec (transform-chain id) the header's table names and a
        stored length no zstd frame of the block exceeds (so that a crafted entry never makes a
        reader seek past 2^63 or read gigabytes)."""
        length = self.header.block_length(block)
        if entry.codec not in self.transforms:
            raise self.block_error(block, f"index entry damaged: unknown codec {entry.codec}")
        if entry.stored_len > fmt.max_stored_length(length):
            raise self.block_error(block, f"index entry damaged: stored length "
                                          f"{entry.stored_len} is implausible for a block of "
                                          f"{length} bytes")
        if entry.offset < self.data_start or \
                entry.offset + fmt.RECORD_HEADER_SIZE + entry.stored_len > self.records_end:
            raise self.block_error(block, f"index entry damaged: its record (byte "
                                          f"{entry.offset}, {entry.stored_len} bytes) lies "
                                          f"outside the records area (bytes {self.data_start}-"
                                          f"{self.records_end - 1})")

    def read_block(self, block: int, entry: fmt.IndexEntry,
                   out: mmap.mmap | bytearray | None = None) -> bytearray | memoryview:
        """The uncompressed content of a DATA block, checked against the entry's SHA-256.  With
        `out` (at least a block long) the content is decompressed into it and a view of it is
        returned, so that a caller reusing its buffers allocates nothing per block.  Raises
        ChecksumMismatch, BlockError (a damaged entry or record) or DiskIOError."""
        length = self.header.block_length(block)
        self.check_data_entry(block, entry)
        buf = self.reader.pread(fmt.RECORD_HEADER_SIZE + entry.stored_len, entry.offset)
        rec = fmt.unpack_record(buf)
        if rec is None:
            raise self.block_error(block, "record header damaged (bad magic or CRC-32C)")
        if rec.block != block or rec.stored_len != entry.stored_len or rec.raw_len != length \
                or rec.codec != entry.codec:
            raise self.block_error(block, f"record does not match the index (record says block "
                                          f"{rec.block}, {rec.stored_len} bytes, codec "
                                          f"{rec.codec})")
        if len(buf) != fmt.RECORD_HEADER_SIZE + entry.stored_len:
            raise self.block_error(block, "record is truncated")
        payload = memoryview(buf)[fmt.RECORD_HEADER_SIZE:]
        into = out if out is not None else bytearray(length)
        view = memoryview(into)[:length]
        try:
            decode_verified(self.transforms, block, payload, rec.codec, entry.sha256, view,
                            digest=self.header.hash)
        except DigestMismatch as err:
            raise ChecksumMismatch(self.path, block, err.expected, err.actual, self.uuid,
                                   block * self.header.block_size) from err
        except DecodeError as err:
            raise self.block_error(block, err.reason) from err
        return view if out is not None else into


@dataclass
class WriteStats:
    stored_blocks: int = 0
    stored_bytes: int = 0
    zero_blocks: int = 0
    unused_blocks: int = 0
    parent_blocks: int = 0
    unreadable_blocks: int = 0


class ImageWriter:
    """Writes an image through a StoreSink (under ``PATH.partial`` in a directory); `finish`
    makes it complete and publishes it under its name."""

    def __init__(self, path: str, header: fmt.Header, resume_at: int | None = None,
                 store: Store | None = None, size_hint: int | None = None) -> None:
        """Start ``PATH.partial`` afresh, or with `resume_at` reopen an existing one and go on
        appending records after its first `resume_at` bytes (a resumed rescue).  With `store`,
        `path` is a name in it.  `size_hint`: the most the image may take (object storage
        sizes its upload parts by it)."""
        if store is None:
            store, name = open_store(str(path))
        else:
            name = str(path)
        if resume_at is not None and not store.resumable:
            raise UsageError(f"{store.path(name)}: this store cannot resume an image")
        self.store, self.name = store, name
        self.path = store.path(name)
        self.partial = store.path(store.partial_name(name))
        self.header = header
        self.sink: StoreSink = store.create(name, resume_at=resume_at, size_hint=size_hint)
        if resume_at is None:
            try:
                self.sink.write([header.pack()])
            except BaseException:
                self.abort()
                raise
        self._entries = bytearray()
        self._segments: list[bytes] = []  # compressed, kept until finish (small)
        self._next_block = 0
        self._index_hash = hashlib.sha256()
        self.stats = WriteStats()

    @property
    def pos(self) -> int:
        """Bytes written: where the next record goes."""
        return self.sink.pos

    def open_partial(self) -> StoreReader:
        """A reader of what was written so far (rescue reads back the records it stored)."""
        return self.store.open(self.store.partial_name(self.name))

    def add_data(self, block: int, stored: bytes, codec: int, sha256: bytes,
                 flags: int = 0) -> None:
        """Append a record for `block` and its index entry."""
        self.add_entry(block, self.write_record(block, stored, codec, sha256, flags))

    def write_record(self, block: int, stored: bytes, codec: int, sha256: bytes,
                     flags: int = 0) -> fmt.IndexEntry:
        """Append a record for `block` and return the index entry pointing at it; the caller
        adds it (records may come in any order, entries in block order)."""
        raw_len = self.header.block_length(block)
        offset = self.pos
        self.sink.write([fmt.pack_record(block, stored, raw_len, codec, flags, sha256), stored])
        return fmt.IndexEntry(fmt.DATA, sha256, offset, len(stored), codec, flags)

    def sync(self) -> None:
        """Make every record written so far durable (before a rescue map claims them)."""
        self.sink.sync()

    def close_partial(self) -> None:
        """Close, keeping the partial file (an interrupted rescue resumes from it)."""
        self.sink.close()

    def add_entry(self, block: int, entry: fmt.IndexEntry, count: int = 1) -> None:
        """The index entry of the next block, or of the next `count` blocks that share it (a
        run of zero or unused blocks).  Entries must come in block order."""
        if block != self._next_block:
            raise ValueError(f"index entry for block {block}, expected {self._next_block}")
        self._next_block += count
        if entry.kind == fmt.DATA:
            self.stats.stored_blocks += count
            self.stats.stored_bytes += entry.stored_len * count
        elif entry.kind == fmt.ZERO:
            self.stats.zero_blocks += count
        elif entry.kind == fmt.UNUSED:
            self.stats.unused_blocks += count
        elif entry.kind == fmt.PARENT:
            self.stats.parent_blocks += count
        if entry.flags & fmt.FLAG_UNREADABLE:
            self.stats.unreadable_blocks += count
        packed = entry.pack()
        seg_bytes = fmt.ENTRIES_PER_SEGMENT * fmt.ENTRY_SIZE
        while count:
            n = min(count, (seg_bytes - len(self._entries)) // fmt.ENTRY_SIZE)
            chunk = packed * n
            self._entries += chunk
            self._index_hash.update(chunk)
            count -= n
            if len(self._entries) == seg_bytes:
                self._flush_segment()

    def _flush_segment(self) -> None:
        if not self._entries:
            return
        first = len(self._segments) * fmt.ENTRIES_PER_SEGMENT
        self._segments.append(fmt.pack_segment(first, bytes(self._entries)))
        self._entries = bytearray()

    def finish(self, meta: dict) -> dict:
        """Write index, footer and trailer, fsync, rename into place.  Returns the footer."""
        if self._next_block != self.header.blocks:
            raise ValueError(f"{self._next_block} index entries for {self.header.blocks} blocks")
        self._flush_segment()
        table = []
        for seg in self._segments:
            table.append([self.pos, len(seg)])
            self.sink.write([seg])
        footer = dict(meta)
        footer["index"] = {
            "sha256": self._index_hash.hexdigest(),
            "entries_per_segment": fmt.ENTRIES_PER_SEGMENT,
            "segments": table,
        }
        packed = fmt.pack_footer(footer)
        footer_offset = self.pos
        self.sink.write([packed, fmt.pack_trailer(footer_offset, len(packed),
                                                  version=self.header.format_version)])
        self.sink.commit()
        return footer

    def abort(self) -> None:
        """Close and remove the partial file (used when imaging fails or is interrupted)."""
        self.sink.abort()


def scan_records(image: StoreReader, start: int, end: int
                 ) -> Iterator[tuple[int, fmt.RecordHeader]]:
    """(offset, record header) of the records from `start`, in file order, up to the first
    place that is not a whole, valid record (the index, damage, or a torn write)."""
    pos = start
    while pos + fmt.RECORD_HEADER_SIZE <= end:
        rec = fmt.unpack_record(image.pread(fmt.RECORD_HEADER_SIZE, pos))
        if rec is None or pos + fmt.RECORD_HEADER_SIZE + rec.stored_len > end:
            return
        yield pos, rec
        pos += fmt.RECORD_HEADER_SIZE + rec.stored_len


def read_record_data(image: StoreReader, offset: int, rec: fmt.RecordHeader,
                     header: fmt.Header) -> bytearray | None:
    """The content of a record found by scan_records in `image`, whose header is `header`, or
    None when it does not decode or fails its checksum.  Raises DiskIOError (naming the
    image) when it cannot be read."""
    payload = image.pread(rec.stored_len, offset + fmt.RECORD_HEADER_SIZE)
    data = bytearray(rec.raw_len)
    try:
        decode_verified(reading_chain(header.transforms), rec.block, payload, rec.codec,
                        rec.sha256, memoryview(data), digest=header.hash)
    except DecodeError:
        return None
    return data


@dataclass(frozen=True)
class Survivors:
    """What is left of an image cut short (no trailer, so no index): its header and the whole
    records that follow it, walked in file order from the first."""

    path: str
    header: fmt.Header
    file_size: int
    records: int                   # whole records with a valid header CRC
    blocks: int                    # distinct blocks among them
    data_bytes: int                # bytes of the device those blocks hold
    end: int                       # byte of the image file where those records end
    last_block: int | None         # the highest block among them
    bad: tuple[tuple[int, str], ...]   # (block, reason): records whose content fails its SHA-256


def survey_truncated(path: str, check_data: bool = False) -> Survivors:
    """Walk the records of an image without a trailer.  With `check_data` every record's
    content is checked against its SHA-256 (reads the whole file); without, only the record
    headers are read.  Raises TruncatedImage (`in_header`) when not even the header survived,
    NotAnImage or CorruptImage when the header is not an image's or damaged."""
    store, name = open_store(path)
    image = store.open(name)
    try:
        size = image.size
        try:
            header, start = fmt.read_header(image, path)
        except IncompleteImage as err:
            raise TruncatedImage(path, size, err.reason) from err
        records = data_bytes = 0
        end, last = start, None
        seen: set[int] = set()
        bad: list[tuple[int, str]] = []
        for offset, rec in scan_records(image, start, size):
            if rec.block >= header.blocks or rec.raw_len != header.block_length(rec.block):
                break   # not a record of this image: what follows is not records either
            if check_data and read_record_data(image, offset, rec, header) is None:
                bad.append((rec.block, "record damaged: its content fails its checksum"))
            records += 1
            if rec.block not in seen:
                seen.add(rec.block)
                data_bytes += rec.raw_len
            last = rec.block if last is None else max(last, rec.block)
            end = offset + fmt.RECORD_HEADER_SIZE + rec.stored_len
        return Survivors(path, header, size, records, len(seen), data_bytes, end, last,
                         tuple(bad))
    finally:
        image.close()


def describe_truncated(path: str) -> dict:
    """What `diskimg info` reports of an image cut short: its header and what survived of its
    records (their headers are checked, not their content: `verify` does that)."""
    s = survey_truncated(path)
    return {
        **_header_fields(s.header),
        "image_bytes": s.file_size,
        "format_version": s.header.format_version,
        "survived": {"records": s.records, "blocks": s.blocks, "bytes": s.data_bytes,
                     "up_to_byte": s.end, "last_block": s.last_block},
    }


def _header_fields(h: fmt.Header) -> dict:
    """What info reports of any image's header, complete or cut short."""
    return {
        "uuid": h.uuid,
        "kind": h.kind,
        "parent": h.parent["uuid"] if h.parent else None,
        "parent_name": h.parent["name"] if h.parent else None,
        "chain": list(h.chain) or [h.uuid],
        "size": h.size,
        "block_size": h.block_size,
        "blocks": h.blocks,
        "source": h.source,
        "created": h.created,
        "tool_version": h.tool_version,
        "compression": h.compression,
        "digest": h.digest,
    }


def describe(reader: ImageReader) -> dict:
    """What `diskimg info` reports of an image: header, statistics and unreadable ranges."""
    h, f = reader.header, reader.footer
    stats = f.get("stats", {})
    counts = block_counts(h.blocks, stats, h.parent is not None)
    rescue = h.extra.get("rescue", False)
    # a rescue reads every block; images before all_blocks was recorded: unknown (None)
    all_blocks = True if rescue else h.extra.get("all_blocks")
    return {
        **_header_fields(h),
        **counts,
        "stored_bytes": stats.get("stored_bytes", 0),
        "image_bytes": reader.file_size,
        "completed": f.get("completed"),
        "compression_level": (h.compression or {}).get("level"),
        "rescue": rescue,
        "all_blocks": all_blocks,
        "format_version": h.format_version,
        "index_sha256": reader.index_sha256,
        "unreadable": [{"offset": o, "length": n} for o, n in f.get("unreadable", [])],
        # mountpoints where the source was mounted read-write (imaged with --force)
        "source_mounted_rw": list(h.extra.get("source_mounted_rw", [])),
    }


def block_counts(blocks: int, stats: dict, has_parent: bool) -> dict[str, int]:
    """The block counts of a footer's stats, so that stored + zero + unused + unchanged =
    blocks, with changed = blocks - unchanged - unchanged_zero (zero or unused blocks that were
    zeros in the parent too).  Images written before this rule counted those zero blocks in
    `unchanged` as well; their split is recovered here from the sum."""
    stored = stats.get("stored_blocks", 0)
    zero = stats.get("zero_blocks", 0)
    unused = stats.get("unused_blocks", 0)
    unchanged = stats.get("unchanged_blocks", 0)
    unchanged_zero = stats.get("unchanged_zero_blocks")
    if unchanged_zero is None:          # an older image
        parents = max(0, blocks - stored - zero - unused)
        unchanged_zero = max(0, unchanged - parents) if has_parent else 0
        unchanged = parents if has_parent else 0
    changed = stats.get("changed_blocks", blocks) if has_parent else blocks
    return {
        "stored_blocks": stored, "zero_blocks": zero, "unused_blocks": unused,
        "unchanged_blocks": unchanged, "changed_blocks": changed,
        "unchanged_zero_blocks": unchanged_zero,
        "unreadable_blocks": stats.get("unreadable_blocks", 0),
    }
