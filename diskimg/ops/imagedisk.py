"""An image seen as a disk: what mount, export and NBD share.

`ImageDisk` opens a chain (any point of it) and reads it through the block view
(`diskimg.image.view.BlockView`), the one read path of the architecture: every block is
verified against the leaf's digest like restore does, zero and unused blocks read as zeros
without touching an image file, and whatever the block view learns later (decryption, healing
from parity, images in object storage) reaches every way of opening an image at once.  This
module adds only what a disk has and an image does not say directly:

- `extents()`: the device as runs of data and of zeros, from the leaf's index alone (no block
  is read), so that raw exports get holes, qcow2 exports leave clusters unallocated, the NBD
  server answers block-status queries and the mount answers reads of zeros at once.  A run is
  zeros when the leaf's entry carries the digest of zeros, whatever its kind: the content must
  hash to what the leaf expects, so that is the content (a PARENT run then needs no look into
  the parent; a ZERO or UNUSED entry without that digest is damaged and left to the block view,
  which reports it).
- `partitions()`: the MBR (with logical partitions) or GPT partitions of the device, parsed by
  the used-block scanner's parsers over the block view.
- `read()` and `read_into()` with `readahead`: a reader going through the disk in order in
  small pieces, one at a time (a mount whose kernel read-ahead could not be widened) has the
  next blocks decoded on worker threads while it consumes this one, as restore decodes several
  blocks at once; they wait in the block view's cache.  A reader asking for a block being
  decoded waits for that decode instead of doing it twice.  Random readers start nothing.
  `read_into()` fills the caller's buffer, a whole block decoded straight into it.
- `read_blocks()`: a byte range cut at block boundaries, each piece either its bytes or the
  error that made its block unreadable, so that a caller fails exactly the damaged range and
  serves the rest (FUSE answers EIO for a request that touches it, NBD an error chunk for
  that piece only).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from diskimg import format as fmt
from diskimg.errors import DiskimgError
from diskimg.image.chain import open_chain
from diskimg.image.view import DEFAULT_CACHE_BYTES, BlockView

if TYPE_CHECKING:
    from diskimg.disk.used.partitions import Partition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extent:
    """`length` bytes from `offset` that are all zeros (`zero`) or hold data."""

    offset: int
    length: int
    zero: bool


@dataclass(frozen=True)
class Piece:
    """One block's share of a read: `data`, or `error` when the block cannot be read."""

    offset: int
    length: int
    data: bytes | None
    error: DiskimgError | None = None


class ImageDisk:
    """The state of the chain ending at `image` as a read-only disk of `size` bytes.  Close it
    (or use it as a context manager) to close the chain's images."""

    def __init__(self, image: str, search: Iterable[str] = (),
                 cache_bytes: int = DEFAULT_CACHE_BYTES, readahead: int = 0) -> None:
        """`readahead`: blocks decoded ahead of a sequential reader, on as many threads (0:
        none; the view's cache must hold them, so it is grown to fit)."""
        self.image = image
        self.chain = open_chain(image, search)
        try:
            bs = self.chain.leaf.header.block_size
            if readahead:
                cache_bytes = max(cache_bytes, (2 * readahead + 2) * bs)
            self.view = BlockView(self.chain, cache_bytes=cache_bytes)
        except BaseException:
            self.chain.close()
            raise
        self.size: int = self.view.size
        self.block_size: int = self.view.block_size
        self._reported: set[int] = set()
        self._lock = threading.Lock()
        self._ahead = readahead
        self._pool = ThreadPoolExecutor(readahead, thread_name_prefix="readahead") \
            if readahead else None
        self._inflight: dict[int, Future] = {}
        self._warmed: dict[int, None] = {}      # blocks decoded ahead lately (bounded)
        self._last = -2

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.chain.close()

    def __enter__(self) -> ImageDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The bytes from `offset` (fewer at the end of the disk); raises what the block view
        raises for a damaged block (a DiskimgError)."""
        self._wait_ahead(offset, length)
        return self.view.read(offset, length)

    def read_into(self, offset: int, out: memoryview) -> None:
        """`len(out)` bytes from `offset` (within the disk) into `out`, whole blocks decoded
        straight into it (`BlockView.read_into`); raises what `read` raises."""
        self._wait_ahead(offset, len(out))
        self.view.read_into(offset, out)

    def _wait_ahead(self, offset: int, length: int) -> None:
        """With `readahead`: start decoding the blocks after this read when it continues a
        sequential one, and wait for the decodes of its own blocks already under way."""
        if self._pool is not None and length > 0:
            bs = self.block_size
            first, last = offset // bs, (offset + length - 1) // bs
            self._read_ahead(first, last)
            for b in range(first, last + 1):
                fut = self._inflight.get(b)
                if fut is not None:
                    fut.result()        # its decode is in the cache now (or failed: see below)

    def _read_ahead(self, first: int, last: int) -> None:
        with self._lock:
            sequential = self._last <= first <= self._last + 1
            self._last = last
            if not sequential:
                return
            for b in range(last + 1, min(last + 1 + self._ahead, self.view.blocks)):
                if b in self._inflight or b in self._warmed:
                    continue
                self._inflight[b] = self._pool.submit(self._warm, b)
                self._warmed[b] = None
            while len(self._warmed) > 4 * self._ahead:
                del self._warmed[next(iter(self._warmed))]

    def _warm(self, block: int) -> None:
        """Decode `block` into the view's cache; a damaged block is left for the reader to
        meet (and report) itself."""
        try:
            self.view.read(block * self.block_size, 1)
        except DiskimgError:
            pass
        finally:
            with self._lock:
                self._inflight.pop(block, None)

    def read_blocks(self, offset: int, length: int) -> Iterator[Piece]:
        """The range cut at block boundaries, each piece read on its own: a damaged block
        gives a Piece with its error (logged once per block), the others their bytes."""
        end = min(offset + length, self.size)
        bs = self.block_size
        pos = offset
        while pos < end:
            take = min(bs - pos % bs, end - pos)
            try:
                yield Piece(pos, take, self.view.read(pos, take))
            except DiskimgError as err:
                self.report(pos // bs, err)
                yield Piece(pos, take, None, err)
            pos += take

    def report(self, block: int, err: DiskimgError) -> None:
        """Log a damaged block once (a reader retrying it would flood the log)."""
        with self._lock:
            if block in self._reported:
                return
            self._reported.add(block)
        start = block * self.block_size
        log.error("%s: bytes %d-%d unreadable (I/O error given to the reader): %s", self.image,
                  start, min(start + self.block_size, self.size) - 1, err)

    # -- layout ----------------------------------------------------------------------------

    def extents(self) -> Iterator[Extent]:
        """The disk as alternating runs of data and zeros, in order, adjacent runs of the same
        kind merged; from the leaf's index only.  A damaged index segment raises
        format.SegmentError (a CorruptImage)."""
        header = self.view.header
        bs = header.block_size
        last = header.blocks - 1

        def runs():
            for first, count, entry in self.view.leaf.iter_runs():
                if entry.kind == fmt.PARENT and first + count - 1 == last and count > 1 \
                        and header.block_length(last) != bs:
                    # the short last block has its own digest of zeros
                    yield first, count - 1, entry
                    yield last, 1, entry
                else:
                    yield first, count, entry

        cur: list | None = None       # [offset, length, zero] of the run being merged
        for first, count, entry in runs():
            if entry.kind == fmt.DATA:
                zero = False
            elif entry.kind == fmt.PARENT:
                zero = entry.sha256 == header.zero_digest(header.block_length(first))
            else:
                # ZERO, UNUSED: zeros only if the entry carries the digest of zeros; a damaged
                # entry is left to the block view, which reads it as the error it is
                zero = header.zero_run_ok(first, first + count - 1, entry.sha256)
            offset = first * bs
            length = min(count * bs, header.size - offset)
            if cur is not None and cur[2] == zero:
                cur[1] += length
                continue
            if cur is not None:
                yield Extent(*cur)
            cur = [offset, length, zero]
        if cur is not None:
            yield Extent(*cur)

    def partitions(self) -> list[Partition]:
        """The partitions of the disk's MBR or GPT (empty for an unpartitioned disk, a bare
        filesystem, or a table that cannot be parsed: that is logged)."""
        # here, not at the top: importing the used-block scanners (every file system's parser)
        # would slow down the start of an export, which needs none of them
        from diskimg.disk.used.partitions import GPT_SIG, mbr_entries, parse_gpt, parse_mbr
        from diskimg.disk.used.raw import Unrecognised
        rd = _ViewReader(self.view)
        try:
            sector0 = rd.read(0, 512) if self.size >= 512 else b""
            entries = mbr_entries(sector0) if sector0 else None
            if not entries:
                return []
            if any(t == 0xEE for t, _, _ in entries):
                for ss in (512, 4096):
                    if self.size >= 2 * ss and rd.read(ss, 8) == GPT_SIG:
                        break
                else:
                    ss = 512
                return parse_gpt(rd, ss)
            if not any(t and n and lba for t, lba, n in entries):
                return []
            return parse_mbr(rd, sector0, 512) or []
        except Unrecognised as err:
            log.warning("%s: partition table not usable: %s", self.image, err)
            return []


class _ViewReader:
    """The used-block scanner's SourceReader interface over the block view: reads within the
    disk, any failure is Unrecognised."""

    def __init__(self, view: BlockView) -> None:
        self.view = view
        self.size = view.size

    def read(self, offset: int, length: int) -> bytes:
        from diskimg.disk.used.raw import Unrecognised
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Unrecognised(f"structure at byte {offset} (+{length}) lies outside the disk "
                               f"({self.size} bytes)")
        try:
            return self.view.read(offset, length)
        except DiskimgError as err:
            raise Unrecognised(f"unreadable at byte {offset}: {err}") from err
