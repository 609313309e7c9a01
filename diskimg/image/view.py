"""The block view: one random-access read path over a resolved chain.

A `BlockView` reads the state of a chain's leaf image (the device as it was when the leaf was
taken), whatever image of the chain holds each block.  Restore reads every block through it,
and mount, export and NBD will: so the rules of what a block holds live here once.

- A block is *located* first: the leaf's index entry, followed through PARENT entries to the
  nearest image that holds the block (`Chain.resolve`), and that image's entry must carry the
  SHA-256 the leaf expects (else "chain inconsistent": docs/FORMAT.md, section 10).  Restore
  locates before it reads, because `--only-changed` compares the target with the expected
  checksum and skips the read when they agree, and because it writes zero blocks as zero runs
  (holes) rather than as buffers of zeros.
- A DATA block is then decoded by the holding image's `read_block`, which checks it against
  the entry's SHA-256; a zero or unused block reads as zeros without touching any image file
  (its entry's checksum must be that of zeros).  Unreadable ranges of a rescued image are
  stored as zeros in their records, so they read as zeros like everything else.

`read_block(n, out)` decodes straight into the caller's buffer (restore's page-aligned pool):
no copy and no lock around the decode; the per-thread zstd contexts make it safe to call from
several threads at once with different buffers.  `read(offset, length)` serves any byte range
for readers that ask for small pieces (a filesystem mount asks for 4 KiB at a time): the blocks
it decodes go into a small LRU cache bounded by bytes, so that reading a block piece by piece
decodes it once.  The cache's lock is held for dictionary operations only, never while
decoding; a thread missing a block that another thread is decoding waits for that decode
instead of doing it again (a FUSE mount has several requests for pieces of the same block in
flight at once).  `read_into(offset, out)` serves a range into the caller's buffer: a whole
block that is not cached is decoded straight into it (a mount's 1 MiB requests: no cache, no
copy), pieces of blocks go through the cache.
"""
from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from dataclasses import dataclass

from diskimg import format as fmt
from diskimg.errors import CorruptImage
from diskimg.format import delta
from diskimg.image.chain import Chain
from diskimg.image.imagefile import ImageReader

# A few blocks of the default size (1 MiB), and always at least one block whatever the size.
DEFAULT_CACHE_BYTES = 8 << 20

# what a block is decoded into: writable, at least a block long
Buffer = mmap.mmap | bytearray | memoryview


@dataclass(slots=True)
class BlockSource:
    """Where block `block` of the leaf's state is: `image` holds it with `entry` (DATA, ZERO or
    UNUSED, never PARENT), whose SHA-256 is the one the leaf's index expects (`locate` checks
    it).  Made once per block on restore's path: a slotted dataclass costs a sixth of a frozen
    one to make, so it is not frozen; nothing changes it."""

    block: int
    image: ImageReader
    entry: fmt.IndexEntry
    level: int = -1       # the holding image's place in the chain (0: the root)

    @property
    def sha256(self) -> bytes:
        """What the block's content hashes to."""
        return self.entry.sha256

    @property
    def zero(self) -> bool:
        """The block reads as zeros (a zero or unused entry): no image data to read."""
        return self.entry.kind not in fmt.STORED_KINDS


@dataclass(frozen=True)
class ViewStats:
    """What a view has done so far: blocks decoded (decompressed and checked) and reads served
    from its cache."""

    decoded: int = 0
    cache_hits: int = 0


class _Counts:
    """One thread's counts: each thread counts in its own, so that counting takes no lock on
    the per-block path and loses nothing to concurrent increments; `BlockView.stats` adds
    them up."""

    __slots__ = ("decoded", "cache_hits")

    def __init__(self) -> None:
        self.decoded = 0
        self.cache_hits = 0


class BlockView:
    """Random access to the state of `chain`'s leaf.  The chain stays the caller's to close.

    `cache_bytes` bounds the cache of decoded blocks that `read` fills (at least one block is
    kept; 0 disables the cache)."""

    def __init__(self, chain: Chain, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.chain = chain
        self.leaf = chain.leaf
        self.header = self.leaf.header
        self.size: int = self.header.size
        self.block_size: int = self.header.block_size
        self.blocks: int = self.header.blocks
        self._local = threading.local()
        self._counts: list[_Counts] = []      # every thread's, for `stats`
        self._capacity = 0 if cache_bytes <= 0 else max(1, cache_bytes // self.block_size)
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._decoding: dict[int, threading.Event] = {}   # blocks being decoded for the cache
        self._lock = threading.Lock()
        self._zeros = memoryview(bytes(self.block_size))
        self._top = len(chain.images) - 1

    @property
    def stats(self) -> ViewStats:
        """The counts so far, of every thread that read through this view."""
        with self._lock:
            counts = list(self._counts)
        return ViewStats(sum(c.decoded for c in counts), sum(c.cache_hits for c in counts))

    def _mine(self) -> _Counts:
        counts = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._local.counts = _Counts()
            with self._lock:
                self._counts.append(counts)
        return counts

    # -- locating ----------------------------------------------------------------------------

    def locate(self, block: int, entry: fmt.IndexEntry | None = None) -> BlockSource:
        """Where `block` is held.  `entry` is the leaf's index entry for it when the caller has
        it already (restore walks the index in runs); otherwise it is read from the leaf.
        Raises BlockError for a damaged entry (unknown kind, PARENT in the root image),
        format.SegmentError for a damaged index segment, and CorruptImage "chain inconsistent"
        when the holding image's entry does not carry the leaf's SHA-256."""
        if entry is None:
            if not 0 <= block < self.blocks:
                raise IndexError(f"block {block} outside the image ({self.blocks} blocks)")
            entry = self.leaf.entry(block)
        if entry.kind == fmt.DATA:     # held by the leaf itself: most blocks, no chain walk
            return BlockSource(block, self.leaf, entry, self._top)
        return self._locate_from(self._top, block, entry)

    def _locate_from(self, level: int, block: int, entry: fmt.IndexEntry) -> BlockSource:
        """Where `block` of the state of image `level` is held, given that image's entry."""
        lvl, img, held = self.chain.resolve_from(level, block, entry)
        if held.sha256 != entry.sha256:
            raise CorruptImage(f"{img.path}: block {block} has checksum {held.sha256.hex()} but "
                               f"{self.chain.images[level].path} expects {entry.sha256.hex()}: "
                               f"chain inconsistent", path=img.path)
        if held.kind == fmt.DELTA and fmt.FEATURE_DELTA not in img.header.features:
            raise img.block_error(block, f"index entry damaged: unknown kind {held.kind}")
        return BlockSource(block, img, held, lvl)

    def check_zero(self, src: BlockSource) -> None:
        """Raise BlockError unless the zero or unused block `src` carries the checksum of
        zeros (a damaged entry must not pass for a block of zeros)."""
        if not self.header.zero_run_ok(src.block, src.block, src.sha256):
            raise src.image.block_error(src.block, "index entry damaged: zero block with a "
                                                   "non-zero checksum")

    # -- reading -----------------------------------------------------------------------------

    def read_located(self, src: BlockSource, out: Buffer) -> memoryview:
        """The verified content of the located block `src`, in `out` (a writable buffer at least
        a block long, e.g. a page-aligned mmap reused by the caller); returns a view of its
        first block-length bytes.  Raises BlockError for damage, OperationFailed when the
        image cannot be read."""
        block = src.block
        if src.zero:
            self.check_zero(src)
            length = self.header.block_length(block)
            view = memoryview(out)[:length]
            view[:] = self._zeros[:length]
            return view
        if self._cache:       # filled by `read` only: empty (and no lock taken) for restore
            cached = self._cached(block)
            if cached is not None:
                view = memoryview(out)[:len(cached)]
                view[:] = cached
                return view
        view = self._decode_into(src, out)
        self._mine().decoded += 1
        return view

    def _decode_into(self, src: BlockSource, out: Buffer) -> memoryview:
        """The verified content of the stored block `src` (DATA or DELTA), decoded into `out`.
        A DELTA block is its parent image's state of the block (located through the chain,
        itself maybe a delta: a delta on a delta on a full) with the delta's pages written
        over it, and the result must have the DELTA entry's digest.  That one check proves the
        whole result, parent included, so the parent's block is not hashed on the way: a delta
        costs one decode of each record and one hash.  When the result is wrong, the block is
        read again checking every step, so that the error names what is damaged: the parent's
        block (and its pages) or the delta record."""
        if src.entry.kind == fmt.DATA:
            return src.image.read_block(src.block, src.entry, out=out)
        view = self._apply_deltas(src, out, check=False)
        actual = self.header.hash(view)
        if actual == src.entry.sha256:
            return view
        view = self._apply_deltas(src, out, check=True)   # raises, naming the damage
        raise src.image.checksum_mismatch(src.block, src.entry, view, src.entry.sha256,
                                          self.header.hash(view))

    def _apply_deltas(self, src: BlockSource, out: Buffer, check: bool) -> memoryview:
        """The delta block `src` built from the nearest block below it stored whole (or zeros)
        and the deltas above that; with `check`, each step's digest is checked."""
        block = src.block
        deltas = []          # a loop, not recursion: a chain may be 10000 images long
        while src.entry.kind == fmt.DELTA:
            deltas.append(src)
            if src.level <= 0:
                raise src.image.block_error(block, "index entry is a delta, but this is a "
                                                   "full image")
            below = self.chain.images[src.level - 1]
            src = self._locate_from(src.level - 1, block, below.entry(block))
        length = self.header.block_length(block)
        view = memoryview(out)[:length]
        if src.zero:
            self.check_zero(src)
            view[:] = self._zeros[:length]
        else:
            src.image.read_block(block, src.entry, out=out, check=check)
        for d in reversed(deltas):
            payload, pages = d.image.read_delta(block, d.entry)
            delta.apply_delta(view, payload, pages)
            if check:
                actual = self.header.hash(view)
                if actual != d.entry.sha256:
                    raise d.image.checksum_mismatch(
                        block, d.entry, view, d.entry.sha256, actual,
                        what=f" (the delta's pages applied to block {block} of "
                             f"{self.chain.images[d.level - 1].path}, which checked out)")
        return view

    def read_block(self, block: int, out: Buffer,
                   entry: fmt.IndexEntry | None = None) -> memoryview:
        """The verified content of block `block` of the leaf's state, decoded into `out`: see
        `locate` (with `entry`) and `read_located`."""
        return self.read_located(self.locate(block, entry), out)

    def _cached(self, block: int) -> bytearray | None:
        """Block `block` from the cache (made the most recently used, and counted as a hit),
        or None."""
        with self._lock:
            cached = self._cache.get(block)
            if cached is not None:
                self._cache.move_to_end(block)
        if cached is not None:
            self._mine().cache_hits += 1
        return cached

    def _decoded(self, src: BlockSource) -> bytearray:
        """The content of the DATA block `src`, from the cache or decoded into it; when another
        thread is decoding it, that decode is waited for (should it fail, this thread decodes
        the block itself and meets the error on its own).  Cached buffers are never written
        again, so a reader holding one while it is evicted is safe."""
        block = src.block
        done = None
        while self._capacity:
            cached = self._cached(block)
            if cached is not None:
                return cached
            with self._lock:
                busy = self._decoding.get(block)
                if busy is None:
                    done = self._decoding[block] = threading.Event()
                    break
            busy.wait()       # then from the cache (or, that decode failed, decoded here)
        try:
            buf = bytearray(self.header.block_length(block))
            self._decode_into(src, buf)
            self._mine().decoded += 1
            if self._capacity:
                with self._lock:
                    self._cache[block] = buf
                    self._cache.move_to_end(block)
                    while len(self._cache) > self._capacity:
                        self._cache.popitem(last=False)
            return buf
        finally:
            if done is not None:
                with self._lock:
                    del self._decoding[block]
                done.set()

    def read_into(self, offset: int, out: memoryview) -> None:
        """The `len(out)` bytes of the leaf's state from `offset` (which must lie within the
        device), into `out`, a writable byte buffer.  A whole block is decoded straight into
        `out` (or copied from the cache when it is there), pieces of blocks are copied from the
        cache.  Raises ValueError for a range outside the device, and what `locate` and
        `read_located` raise for a damaged block (`out` then holds part of the range)."""
        if offset < 0 or offset + len(out) > self.size:
            raise ValueError(f"cannot read {len(out)} bytes at offset {offset} of a "
                             f"{self.size}-byte device")
        at = 0
        for block, within, take, src in self._spans(offset, offset + len(out)):
            if src.zero:
                self.check_zero(src)
                out[at:at + take] = self._zeros[:take]
            elif within == 0 and take == self.header.block_length(block):
                self.read_located(src, out[at:at + take])
            else:
                out[at:at + take] = memoryview(self._decoded(src))[within:within + take]
            at += take

    def _spans(self, offset: int, end: int):
        """(block, offset within it, bytes of it, its located source) of each block that
        `offset`..`end` touches, in order."""
        bs = self.block_size
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            take = min(bs - within, end - pos)
            yield block, within, take, self.locate(block)
            pos += take

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of the leaf's state from `offset`, at most `length` of them (fewer at the
        end of the device, none from its end on), across as many blocks as the range spans.
        Raises ValueError for a negative offset or length, and what `locate` and
        `read_located` raise for a damaged block."""
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset}")
        parts: list[memoryview | bytearray] = []
        for _, within, take, src in self._spans(offset, min(offset + length, self.size)):
            if src.zero:
                self.check_zero(src)
                parts.append(self._zeros[:take])
            else:
                data = self._decoded(src)
                parts.append(data if within == 0 and take == len(data)
                             else memoryview(data)[within:within + take])
        return b"".join(parts)
