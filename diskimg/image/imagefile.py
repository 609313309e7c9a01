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
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from diskimg import format as fmt
from diskimg.format import delta
from diskimg.disk.blockdev import file_kind as _kind
from diskimg.errors import BlockError, ChecksumMismatch, CorruptImage, DecodeError
from diskimg.errors import DigestMismatch, DiskimgError, DiskIOError, IncompleteImage
from diskimg.errors import KeyRefused, MetadataError, NotAnImage, PermissionDenied
from diskimg.errors import TruncatedImage, UsageError
from diskimg.store import Store, StoreReader, StoreSink, open_store
from diskimg.image.records import decode_verified
from diskimg.transforms import TransformChain, reading_chain
from diskimg.crypto import keyring

if TYPE_CHECKING:
    from diskimg.image.parity import HealingReader

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


def unlock_header(header: fmt.Header, path: str) -> fmt.Header:
    """`header` ready to read blocks with: an encrypted image's unlocked with the command's key
    (diskimg.crypto.keyring), authenticated, its sealed fields back.  A plain image's as it is,
    unless a key was given: then it is refused, never read as if it were plain (a header
    stripped of its encryption would otherwise pass).  Raises KeyRefused (exit 2) and
    MetadataError (the header fails authentication)."""
    if header.encrypted:
        if header.keys is not None:
            return header
        from diskimg.crypto import keys   # the cryptography package: encrypted images only
        return keys.unlock_header(header, path)
    if keyring.explicit():
        raise KeyRefused(path, "is not encrypted, but a key was given: refusing to read it as "
                               "a plain image (if it was made encrypted, its header has been "
                               "stripped of the encryption: do not trust it)")
    return header


def transforms_of(header: fmt.Header) -> TransformChain:
    """The transform chain that decodes the records of `header`'s image (unlocked)."""
    if header.keys is not None:
        return header.keys.reading_chain(header.transforms)
    return reading_chain(header.transforms)


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

    `path` is where the image is (a path or URL); with `store`, `path` is a name in it.

    An encrypted image is unlocked with the command's key (diskimg.crypto.keyring; KeyRefused
    when none opens it).  With `unlock=False` it stays locked: its header and structure can
    be looked at (`info`, `verify --no-key`), its index and blocks cannot (`locked`)."""

    def __init__(self, path: str, store: Store | None = None, unlock: bool = True) -> None:
        if store is None:
            store, name = open_store(str(path))
        else:
            name = str(path)
        self.store, self.name = store, name
        self.path = store.path(name)
        self.reader: StoreReader = store.open(name)
        # an image with parity (format feature "parity"): the reader of its logical stream,
        # which heals damaged slices when asked (diskimg.image.parity)
        self.healing: HealingReader | None = None
        self.healed: list[tuple[int | None, str]] = []   # (block or None, what was healed)
        self._heal_lock = threading.Lock()
        try:
            _check_is_file(self.reader)
            self.physical_size = self.reader.size
            try:
                self._open_parts()
            except IncompleteImage as err:
                if self.path.endswith(".partial"):
                    raise
                # a file that was once complete and has been cut short is damage, not input
                raise TruncatedImage(self.path, self.file_size, err.reason) from err
            self.locked = False
            if self.header.encrypted and not unlock:
                self.locked = True
                self.transforms = None
            else:
                self._unlock()
            self.segments = self.footer.segments
            self.entries_per_segment = self.footer.entries_per_segment
            self.index_sha256 = self.footer.index_sha256
            # where records may lie: after the header, before the first index segment
            self.records_end = min((off for off, _ in self.segments), default=self.footer.offset)
        except BaseException:
            self.reader.close()
            raise
        self._seg_cache: tuple[int, bytes] | None = None

    def _open_parts(self) -> None:
        """Header, footer and transform table; for an image with parity, through a healing
        reader, healing what fails its checks (a damaged header at the start is also found
        again through the tail's copy)."""
        self.file_size = self.reader.size
        try:
            header, start = fmt.read_header(self.reader, self.path)
            failed = None
        except (CorruptImage, NotAnImage, DiskIOError) as err:
            # damaged or unreadable: an image with parity has it again (healed, or its copy)
            header, failed = None, err
        if failed is not None or header.parity is not None:
            from diskimg.image.parity import open_healing
            healing = open_healing(self.reader, header.parity if header else None,
                                   fmt.crc32c)
            if healing is None:
                if failed is not None:
                    raise failed
                # no tail, and no image trailer where the layout puts one: cut short
                raise IncompleteImage(self.path, "image is incomplete (no parity tail and no "
                                                 "trailer): it is still being written, was "
                                                 "interrupted, or was cut short")
            self.healing = self.reader = healing
            self.file_size = healing.size
            header, start = self._healed_header(failed)
        self.header, self.data_start = header, start
        try:
            self.footer = fmt.read_footer(self.reader, self.path, self.file_size, header, start)
        except (CorruptImage, IncompleteImage):
            if self.healing is None:
                raise
            self._heal_footer()
            self.footer = fmt.read_footer(self.reader, self.path, self.file_size, header, start)
            self._note_healed(None, "footer or trailer")
        if not self.header.encrypted:
            self.transforms = reading_chain(self.header.transforms)

    def _healed_header(self, failed: Exception | None) -> tuple[fmt.Header, int]:
        """The header read through the healing reader: healed in place when it fails its
        checks, or else taken from the tail's copy."""
        healing = self.healing
        copy = healing.tail.header
        if failed is None:
            return fmt.read_header(self.reader, self.path)
        healing.heal(0, len(copy) or 1 << 16)
        try:
            got = fmt.read_header(self.reader, self.path)
            self._note_healed(None, "header")
            return got
        except (CorruptImage, NotAnImage, IncompleteImage, DiskIOError):
            pass
        if not copy:
            raise failed
        from diskimg.store import BytesReader
        got = fmt.read_header(BytesReader(copy, self.path), self.path)
        self._note_healed(None, "header (from its copy at the end of the file)")
        return got

    def _heal_footer(self) -> None:
        size = self.file_size
        tsize = fmt.TRAILER_SIZE
        self.healing.heal(size - tsize, tsize)
        tr = self.reader.pread(tsize, size - tsize)
        f_off = int.from_bytes(tr[8:16], "little")
        f_len = int.from_bytes(tr[16:20], "little")
        if tr[:8] == fmt.TRAILER_MAGIC and f_off + f_len + tsize == size:
            self.healing.heal(f_off, f_len)

    def _note_healed(self, block: int | None, what: str) -> None:
        with self._heal_lock:
            self.healed.append((block, what))

    def scrub(self, progress=None):
        """Check every slice of an image with parity against its checksum and rebuild what
        parity can (later reads return the healed bytes); the repairs (ParityRepairs), or None
        for an image without parity."""
        if self.healing is None:
            return None
        return self.healing.scrub(progress)

    def _unlock(self) -> None:
        """Unlock an encrypted image's header and footer (or refuse a plain one when a key was
        given): see unlock_header."""
        header = unlock_header(self.header, self.path)
        if header is not self.header and header.keys is not None:
            full = header.keys.open_footer(self.footer.json, self.path)
            try:
                self.footer = fmt.Footer.from_json(full, header, self.data_start,
                                                   self.footer.offset)
            except ValueError as err:
                raise MetadataError(self.path, "footer", str(err)) from err
            self.header = header
            self.transforms = transforms_of(header)

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
        if self.locked:
            raise KeyRefused(self.path, "is encrypted and was opened without its key")
        keys = self.header.keys
        opener = keys.open_segment if keys is not None else None
        try:
            raw = fmt.read_segment(self.reader, self.path, off, length, first, count, opener)
        except fmt.SegmentError:
            if self.healing is None:
                raise
            self.healing.heal(off, length)
            raw = fmt.read_segment(self.reader, self.path, off, length, first, count, opener)
            self._note_healed(None, f"index segment {seg}")
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
        """Raise BlockError unless a DATA (or DELTA) entry's record can lie where the entry says:
        inside the records area, with a codec (transform-chain id) the header's table names and
        a stored length no zstd frame of the block exceeds (so that a crafted entry never makes
        a reader seek past 2^63 or read gigabytes)."""
        length = self.header.block_length(block)
        if entry.kind == fmt.DELTA:
            length = delta.max_delta_length(length)
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
                   out: mmap.mmap | bytearray | None = None, *, check: bool = True
                   ) -> bytearray | memoryview:
        """The uncompressed content of a DATA block, checked against the entry's SHA-256.  With
        `out` (at least a block long) the content is decompressed into it and a view of it is
        returned, so that a caller reusing its buffers allocates nothing per block.  Without
        `check` the digest is not computed (the block view reading the parent block of a delta,
        whose result it checks).  Raises ChecksumMismatch (naming the damaged pages when the
        block has page hashes), BlockError (a damaged entry or record) or DiskIOError.

        An image with parity heals a record that fails its checks and reads it again."""
        return self._healed(block, entry, lambda: self._read_block(block, entry, out, check))

    def _healed(self, block: int, entry: fmt.IndexEntry, read):
        """read(), and for an image with parity, once more after healing the entry's record
        when it fails its checks."""
        try:
            return read()
        except BlockError:
            if self.healing is None:
                raise
            self.check_data_entry(block, entry)
            span = fmt.RECORD_HEADER_SIZE + entry.stored_len
            self.healing.heal(entry.offset, span)
            try:
                got = read()
            except BlockError as err:
                lost = self.healing.slot_ranges(self.healing.repairs.lost)
                if any(o < entry.offset + span and entry.offset < o + n for o, n in lost):
                    g = self.header.parity
                    raise self.block_error(block, f"{err.reason}; beyond what parity repairs "
                                                  f"(more than {g.m} of the {g.k + g.m} "
                                                  f"slices of a group damaged)") from err
                raise
            self._note_healed(block, "record")
            return got

    def _record(self, block: int, entry: fmt.IndexEntry, raw_len: int | None
                ) -> tuple[fmt.RecordHeader, memoryview]:
        """The header and stored bytes of the record `entry` points at, checked against the
        entry (and its raw length against `raw_len` when given).  Raises BlockError."""
        self.check_data_entry(block, entry)
        buf = self.reader.pread(fmt.RECORD_HEADER_SIZE + entry.stored_len, entry.offset)
        rec = fmt.unpack_record(buf)
        if rec is None:
            raise self.block_error(block, "record header damaged (bad magic or CRC-32C)")
        is_delta = entry.kind == fmt.DELTA
        if rec.block != block or rec.stored_len != entry.stored_len or rec.codec != entry.codec \
                or (raw_len is not None and rec.raw_len != raw_len) \
                or bool(rec.flags & fmt.FLAG_DELTA) != is_delta:
            raise self.block_error(block, f"record does not match the index (record says block "
                                          f"{rec.block}, {rec.stored_len} bytes, codec "
                                          f"{rec.codec}{', a delta' if rec.flags & fmt.FLAG_DELTA else ''})")
        if len(buf) != fmt.RECORD_HEADER_SIZE + entry.stored_len:
            raise self.block_error(block, "record is truncated")
        return rec, memoryview(buf)[fmt.RECORD_HEADER_SIZE:]

    def _read_block(self, block: int, entry: fmt.IndexEntry,
                    out: mmap.mmap | bytearray | None, check: bool) -> bytearray | memoryview:
        length = self.header.block_length(block)
        rec, payload = self._record(block, entry, length)
        into = out if out is not None else bytearray(length)
        view = memoryview(into)[:length]
        try:
            if not check:
                self.transforms.decode_into(block, payload, rec.codec, view)
                return view if out is not None else into
            decode_verified(self.transforms, block, payload, rec.codec, entry.sha256, view,
                            digest=self.header.hash)
        except DigestMismatch as err:
            raise self.checksum_mismatch(block, entry, view, err.expected, err.actual) from err
        except DecodeError as err:
            raise self.block_error(block, err.reason) from err
        return view if out is not None else into

    def checksum_mismatch(self, block: int, entry: fmt.IndexEntry, content: memoryview,
                          expected: bytes, actual: bytes, what: str = "") -> ChecksumMismatch:
        """The ChecksumMismatch of `block` whose decoded `content` hashes to `actual`, naming
        the pages that differ from the page hashes recorded with the block, when it has any."""
        detail, bad = what, []
        vector = self.page_hashes(block, entry)
        if vector is not None and len(vector) == delta.pages_in(len(content)) * 8:
            bad = delta.differing_pages(content, vector)
            if bad:
                detail += "; " + delta.describe_pages(bad, len(content),
                                                      block * self.header.block_size)
        return ChecksumMismatch(self.path, block, expected, actual, self.uuid,
                                block * self.header.block_size, detail=detail, pages=tuple(bad))

    def read_delta(self, block: int, entry: fmt.IndexEntry) -> tuple[bytearray, list[int]]:
        """The decoded delta payload of a DELTA block and its pages (see _read_delta), healed by
        parity when the image has it."""
        return self._healed(block, entry, lambda: self._read_delta(block, entry))

    def _read_delta(self, block: int, entry: fmt.IndexEntry) -> tuple[bytearray, list[int]]:
        """The decoded delta payload of a DELTA block (docs/FORMAT.md section 18) and the pages
        it carries, its structure checked; the result of applying it is checked by the caller
        against the entry's digest.  Raises BlockError or DiskIOError."""
        rec, payload = self._record(block, entry, None)
        length = self.header.block_length(block)
        if not delta.plausible_length(rec.raw_len, length):
            raise self.block_error(block, f"delta record damaged: its length {rec.raw_len} is "
                                          f"implausible for a block of {length} bytes")
        out = bytearray(rec.raw_len)
        try:
            self.transforms.decode_into(block, payload, rec.codec, memoryview(out))
            pages = delta.delta_pages(out, length)
        except DecodeError as err:
            raise self.block_error(block, f"delta record damaged: {err.reason}") from err
        return out, pages

    def page_hashes(self, block: int, entry: fmt.IndexEntry) -> bytes | None:
        """The page-hash vector recorded with stored block `block` (the record right after its
        record), or None when there is none or it is damaged (the block is then stored whole
        by the next incremental; verify reports the damage).  Raises DiskIOError."""
        try:
            return self.read_page_hashes(block, entry)
        except BlockError as err:
            log.debug("%s", err)
            return None

    def read_page_hashes(self, block: int, entry: fmt.IndexEntry) -> bytes | None:
        """Like `page_hashes`, but damage raises BlockError; None when the image records no
        page hashes for the block."""
        if entry.kind not in fmt.STORED_KINDS or "page_hashes" not in self.header.extra:
            return None
        length = delta.pages_in(self.header.block_length(block)) * delta.PAGE_HASH_SIZE
        offset = entry.offset + fmt.RECORD_HEADER_SIZE + entry.stored_len
        if offset + fmt.RECORD_HEADER_SIZE + length > self.records_end:
            return None
        buf = self.reader.pread(fmt.RECORD_HEADER_SIZE + fmt.max_stored_length(length), offset)
        rec = fmt.unpack_record(buf)
        if rec is None or not rec.flags & fmt.FLAG_PAGE_HASHES:
            if rec is None and buf[:4] == fmt.RECORD_MAGIC:
                raise self.block_error(block, "page-hash record damaged (bad CRC-32C)")
            return None    # written without page hashes (a rescue, an unreadable block)
        if rec.block != block or rec.raw_len != length or \
                len(buf) < fmt.RECORD_HEADER_SIZE + rec.stored_len:
            raise self.block_error(block, "page-hash record damaged (does not match the block)")
        out = bytearray(length)
        try:
            decode_verified(self.transforms, block, memoryview(buf)[
                fmt.RECORD_HEADER_SIZE:fmt.RECORD_HEADER_SIZE + rec.stored_len], rec.codec,
                rec.sha256, memoryview(out), digest=self.header.hash)
        except DecodeError as err:
            raise self.block_error(block, f"page-hash record damaged: {err.reason}") from err
        return bytes(out)


@dataclass
class WriteStats:
    stored_blocks: int = 0
    stored_bytes: int = 0
    zero_blocks: int = 0
    unused_blocks: int = 0
    parent_blocks: int = 0
    unreadable_blocks: int = 0
    delta_blocks: int = 0          # of the stored blocks, those stored as deltas
    delta_bytes: int = 0           # their records' stored bytes
    delta_block_bytes: int = 0     # the bytes of those blocks
    page_hash_bytes: int = 0       # page-hash records, headers included


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
        if header.parity is None:
            self.sink: StoreSink = store.create(name, resume_at=resume_at,
                                                size_hint=size_hint)
        else:
            from diskimg.image import parity
            resume = None
            if resume_at is not None:   # the logical offset: cut where it lies in the file
                with store.open(store.partial_name(name)) as raw:
                    resume_at, resume = parity.resume_point(raw, header.parity, resume_at)
            self.sink = parity.ParitySink(store.create(name, resume_at=resume_at,
                                                       size_hint=size_hint),
                                          header.parity, header.pack(), resume,
                                          write_through=header.extra.get("rescue") is True)
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

    @property
    def file_bytes(self) -> int:
        """Bytes of the file (or object) as stored: with parity, its windows' parity and
        tables and its tails too (once finished)."""
        return getattr(self.sink, "inner", self.sink).pos

    def open_partial(self) -> StoreReader:
        """A reader of what was written so far (rescue reads back the records it stored)."""
        raw = self.store.open(self.store.partial_name(self.name))
        if self.header.parity is not None:
            from diskimg.image.parity import PartialParityReader
            return PartialParityReader(raw, self.sink)
        return raw

    def add_data(self, block: int, stored: bytes, codec: int, sha256: bytes,
                 flags: int = 0) -> None:
        """Append a record for `block` and its index entry."""
        self.add_entry(block, self.write_record(block, stored, codec, sha256, flags))

    def add_stored(self, block: int, stored: bytes | memoryview, codec: int, sha256: bytes, *,
                   delta_len: int | None = None,
                   page_hashes: tuple[bytes | memoryview, int, bytes] | None = None) -> None:
        """Append the record of a block stored whole, or with `delta_len` (the decoded length of
        its delta payload) as a delta (docs/FORMAT.md section 18), followed by the record of its
        page-hash vector, `page_hashes` = (stored bytes, chain id, digest of the vector), and
        add the block's index entry."""
        length = self.header.block_length(block)
        offset = self.pos
        is_delta = delta_len is not None
        parts = [fmt.pack_record(block, stored, delta_len if is_delta else length, codec,
                                 fmt.FLAG_DELTA if is_delta else 0, sha256), stored]
        if page_hashes is not None:
            ph, ph_codec, ph_sha = page_hashes
            parts += [fmt.pack_record(block, ph, delta.pages_in(length) * delta.PAGE_HASH_SIZE,
                                      ph_codec, fmt.FLAG_PAGE_HASHES, ph_sha), ph]
            self.stats.page_hash_bytes += fmt.RECORD_HEADER_SIZE + len(ph)
        self.sink.write(parts)
        if is_delta:
            self.stats.delta_blocks += 1
            self.stats.delta_bytes += len(stored)
            self.stats.delta_block_bytes += length
        self.add_entry(block, fmt.IndexEntry(fmt.DELTA if is_delta else fmt.DATA, sha256, offset,
                                             len(stored), codec))

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
        if entry.kind in fmt.STORED_KINDS:
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
        keys = self.header.keys
        self._segments.append(fmt.pack_segment(
            first, bytes(self._entries),
            seal=keys.seal_segment if keys is not None else None))
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
        keys = self.header.keys
        packed = fmt.pack_footer(keys.seal_footer(footer) if keys is not None else footer)
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
        decode_verified(transforms_of(header), rec.block, payload, rec.codec,
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
        if header.parity is not None:   # the records are in the logical stream
            from diskimg.image.parity import UnfinishedReader
            image = UnfinishedReader(image, header.parity)
            size = image.size
        if check_data:
            header = unlock_header(header, path)
        records = data_bytes = 0
        end, last = start, None
        seen: set[int] = set()
        bad: list[tuple[int, str]] = []
        for offset, rec in scan_records(image, start, size):
            if rec.flags & (fmt.FLAG_PAGE_HASHES | fmt.FLAG_DELTA) and rec.block < header.blocks:
                # a block's page hashes, or a delta (which needs the parent: not a survivor of
                # this image alone); the records go on after it
                end = offset + fmt.RECORD_HEADER_SIZE + rec.stored_len
                continue
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
        "encrypted": h.encrypted,
        **({"encryption": _encryption_fields(h)} if h.encrypted else {}),
        "features": list(h.features),
    }


def _encryption_fields(h: fmt.Header) -> dict:
    """What info shows of an encrypted image's keys: never a key."""
    from diskimg.crypto.keys import describe as describe_encryption
    return {**describe_encryption(h.encryption or {}), "unlocked": h.keys is not None}


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
        # format feature "delta": stored = whole + delta; saved = the delta blocks' bytes not
        # stored (their length minus their delta records' stored bytes)
        "whole_blocks": stats.get("stored_blocks", 0) - stats.get("delta_blocks", 0),
        "delta_blocks": stats.get("delta_blocks", 0),
        "delta_saved_bytes": stats.get("delta_block_bytes", 0) - stats.get("delta_bytes", 0),
        "page_hash_bytes": stats.get("page_hash_bytes", 0),
        "image_bytes": reader.physical_size,
        "completed": f.get("completed"),
        "compression_level": (h.compression or {}).get("level"),
        "rescue": rescue,
        "all_blocks": all_blocks,
        "format_version": h.format_version,
        "index_sha256": reader.index_sha256,
        "unreadable": [{"offset": o, "length": n} for o, n in f.get("unreadable", [])],
        # mountpoints where the source was mounted read-write (imaged with --force)
        "source_mounted_rw": list(h.extra.get("source_mounted_rw", [])),
        # Reed-Solomon parity (format feature "parity"), or None
        "parity": None if reader.healing is None else {
            "percent": round(reader.healing.geom.percent, 2), "data": reader.healing.geom.k,
            "parity": reader.healing.geom.m, "depth": reader.healing.geom.depth,
            "slice": reader.healing.geom.slice, "windows": reader.healing.layout.windows,
            "logical_bytes": reader.file_size},
        # filesystems whose allocation map missed blocks their metadata owns (read all the same)
        "allocation_repaired": list(h.extra.get("allocation_repaired", [])),
        # an encrypted image opened without its key: statistics, source, unreadable ranges and
        # completion time are sealed (the counts above are then zeros: not known)
        "locked": reader.locked,
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
