"""Imaging a failing disk, ddrescue-style: keep going past unreadable sectors, save the good
data first, narrow the bad areas down to single sectors, and say exactly what was lost.

Passes, as GNU ddrescue's:
  1. copy, forward, block by block; after a read error skip ahead (the skip doubles on each
     consecutive error) so the good data is saved before a dying disk gets worse;
  2. copy what pass 1 skipped, without skipping;
  3. trim each failed block from its edges, sector by sector, up to the first bad sector;
  4. scrape what is left between the edges, sector by sector;
  5. retry each bad sector up to `retries` times.

The image is written as usual under IMAGE.partial, except that a block's record may be
written more than once: when a later pass recovers sectors of a block, the block is re-stored
with them and the newer record supersedes the older (records carry their block number, so a
resumed run finds the latest one by scanning).  Unreadable sectors read as zeros and carry
FLAG_UNREADABLE; the footer lists the unreadable byte ranges.

Progress is kept in a GNU ddrescue mapfile (mapfile.py), written atomically at least every
30 s and always after an fsync of the image, so that the map never claims data the image does
not durably hold.  An interrupted run (Ctrl-C, kill -9, a crash) resumes from the partial image
and the map without rereading what was saved.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import time
from array import array
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Protocol

from diskimg import __version__, devices, ranges
from diskimg import format as fmt
from diskimg.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL
from diskimg.disk.blockdev import Source, open_source
from diskimg.errors import DiskimgError, DiskIOError, Interrupted, MapfileError
from diskimg.errors import OperationFailed, ReadError, UsageError
from diskimg.image.imagefile import ImageWriter, read_record_data, scan_records
from diskimg.image.imagefile import unlock_header
from diskimg.store import is_remote, open_store
from diskimg.ops.imaging import (
    ImageResult,
    check_block_size,
    check_image_path,
    check_no_children,
    check_source_mounted,
    parity_fields,
    with_features,
    utc_now,
)
from diskimg.disk.identity import source_mismatch
from diskimg.ops.mapfile import (
    BAD,
    FINISHED,
    NON_SCRAPED,
    NON_TRIED,
    NON_TRIMMED,
    RescueMap,
)
from diskimg.transforms import writing_chain

log = logging.getLogger(__name__)

MAP_SAVE_INTERVAL = 30.0
NO_RECORD = -1
PASS_NAMES = {1: "copying", 2: "copying skipped areas", 3: "trimming", 4: "scraping",
              5: "retrying bad sectors", 6: "finished"}


@dataclass(frozen=True)
class RescueOptions:
    """What a rescue uses, and nothing else: a rescue is always a full image of every block,
    so imaging's reference-image, thread and --all-blocks options have no place here."""

    block_size: int = DEFAULT_BLOCK_SIZE
    level: int = DEFAULT_LEVEL
    force: bool = False               # replace a finished image; a source mounted read-write
    search: tuple[str, ...] = ()      # where images made against the one replaced may lie
    retries: int = 1
    mapfile: str | None = None        # default: IMAGE.map
    direct: bool | None = None        # O_DIRECT; default: on for block devices
    command: str = ""                 # recorded in the mapfile's header
    digest: str | None = None         # the block digest; None: the default (a resume keeps its own)
    clock: Callable[[], datetime] | None = None   # header times (ImageOptions.clock)
    extra: dict = field(default_factory=dict)     # more header metadata (ImageOptions.extra)
    parity: float | None = None       # percent of Reed-Solomon parity (None: the default; a
                                      # resume keeps its own)
    # encrypt with a new chain key (crypto.keyring); a resume keeps the partial image's key
    # (records go on with random nonces under its data key: none can repeat one already used)
    encrypt: bool = False


@dataclass(frozen=True)
class RescueStatus:
    pass_no: int
    pass_name: str
    pos: int
    rescued: int       # bytes read successfully
    bad: int           # bytes in bad sectors
    pending: int       # non-trimmed and non-scraped bytes (failed areas not yet narrowed)
    remaining: int     # bytes not tried yet
    size: int


class RescueProgress(Protocol):
    """A rescue's progress: started with the source's size, then its status now and then (the
    bytes done are rescued + bad; passes go back over the failed areas, so it is no count)."""

    def start(self, total: int, unit: str = "B") -> None: ...

    def status(self, st: RescueStatus) -> None: ...


@dataclass(frozen=True)
class RescueResult:
    image: ImageResult
    unreadable: tuple[tuple[int, int], ...]
    mapfile: str
    resumed: bool


SYNC_NOTE = "diskimg-synced-bytes:"
UUID_NOTE = "diskimg-image-uuid:"
IMAGE_NOTE = "diskimg-image:"       # the image's final path (IMAGE, not IMAGE.partial)
STATUS_NOTE = "diskimg-status:"     # "in progress", then "complete" in the map left at the end


def _image_notes(writer: ImageWriter, complete: bool) -> tuple[str, ...]:
    """The comment lines that name the image a map belongs to, and whether it is finished."""
    return (f"{IMAGE_NOTE} {os.path.abspath(writer.path)}",
            f"{UUID_NOTE} {writer.header.uuid}",
            f"{STATUS_NOTE} {'complete' if complete else 'in progress'}")


class _Session:
    """One rescue run: the source, the partial image, the map and the latest record of each
    block (`offsets`, NO_RECORD where the block has none)."""

    def __init__(self, source: Source, writer: ImageWriter, rmap: RescueMap, offsets: array,
                 sector: int, align: int, level: int, ropts: RescueOptions, mapfile: str,
                 progress: RescueProgress | None) -> None:
        self.src = source
        self.writer = writer
        self.header = writer.header
        self.map = rmap
        self.offsets = offsets
        self.sector = sector
        self.align = align                        # O_DIRECT: lengths rounded up to this
        self.ropts = ropts
        self.mapfile = mapfile
        self.progress = progress
        self.bs = self.header.block_size
        self.buf = mmap.mmap(-1, self.bs)          # page-aligned, as O_DIRECT needs
        keys = self.header.keys
        self.transforms = keys.writing_chain(level) if keys is not None else writing_chain(level)
        self.partial_reader = writer.open_partial()   # to read back the records stored so far
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.last_save = time.monotonic()
        self.last_report = 0.0
        self.read_bytes = 0

    def close(self) -> None:
        self.partial_reader.close()
        self.buf.close()

    # -- reading -------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | None:
        """`length` bytes at `offset`, or None when the source reports a read error.  Raises
        ReadError when the read itself is refused (EINVAL, EBADF, ENOMEM: not a bad sector)."""
        want = -(-length // self.align) * self.align   # the tail of a file may be unaligned
        view = memoryview(self.buf)[:want]
        try:
            n = os.preadv(self.src.fd, [view], offset)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.EBADF, errno.ENOMEM):
                raise ReadError(self.src.path, offset, length, err) from err
            log.debug("read error at %d+%d: %s", offset, length, err)
            return None
        finally:
            view.release()
        if n < length:  # short inside the device: the next sector failed
            return None
        self.read_bytes += length
        return self.buf[:length]

    # -- blocks --------------------------------------------------------------------------------

    def block_data(self, block: int) -> bytearray:
        """The block's content as stored so far (zeros where nothing was read yet).  Raises
        OperationFailed (path: the partial image) when its record fails its checks, DiskIOError
        when it cannot be read."""
        off = self.offsets[block]
        if off == NO_RECORD:
            return bytearray(self.header.block_length(block))
        rec = fmt.unpack_record(self.partial_reader.pread(fmt.RECORD_HEADER_SIZE, off))
        data = read_record_data(self.partial_reader, off, rec, self.header) if rec else None
        if data is None:
            raise OperationFailed(f"{self.writer.partial}: record of block {block} at byte "
                                  f"{off} fails its checks", path=self.writer.partial)
        return bytearray(data)

    def store(self, block: int, data: bytes | bytearray) -> None:
        """Store the block's current content, flagged while any of its sectors is not read."""
        start, length = block * self.bs, self.header.block_length(block)
        complete = self.map.all_finished(start, start + length)
        data = bytes(data)
        sha = self.header.hash(data)
        if complete and sha == self.header.zero_digest(length) and self.offsets[block] == NO_RECORD:
            return      # a zero block needs no record, unless it supersedes an earlier one
        stored, codec = self.transforms.encode(block, data)
        entry = self.writer.write_record(block, stored, codec, sha,
                                         0 if complete else fmt.FLAG_UNREADABLE)
        self.offsets[block] = entry.offset

    # -- passes --------------------------------------------------------------------------------

    def copy_pass(self, pass_no: int, skipping: bool) -> None:
        """Read the non-tried areas block-wise; a failed read becomes non-trimmed.  With
        `skipping`, each error skips the next blocks (doubling on consecutive errors)."""
        self.map.current_pass = pass_no
        skip, to_skip = 1, 0
        max_skip = max(1, self.header.blocks // 100)
        for pos, size in self.map.areas(NON_TRIED):
            off = pos
            while off < pos + size:
                block = off // self.bs
                end = min((block + 1) * self.bs, pos + size)
                if to_skip:
                    to_skip -= 1
                else:
                    self.map.current_pos = off
                    data = self.read(off, end - off)
                    if data is None:
                        self.map.set(off, end - off, NON_TRIMMED)
                        if skipping:
                            to_skip = skip
                            skip = min(skip * 2, max_skip)
                    else:
                        skip = 1
                        if end - off == self.header.block_length(block):
                            buf = data
                        else:  # part of a block (a resumed run): patch what is stored
                            buf = self.block_data(block)
                            rel = off - block * self.bs
                            buf[rel:rel + len(data)] = data
                        self.commit(block, buf, [(off, end - off, FINISHED)])
                    self.tick()
                off = end

    def sector_pass(self, pass_no: int, status: str, tries: int = 1) -> None:
        """Trimming (3), scraping (4) or retrying (5) the areas with `status` sector by sector,
        block by block, each block re-stored once with what was recovered."""
        self.map.current_pass = pass_no
        for _ in range(tries):
            blocks = sorted({b for p, n in self.map.areas(status)
                             for b in range(p // self.bs, (p + n - 1) // self.bs + 1)})
            for block in blocks:
                start = block * self.bs
                buf = None
                marks: list[tuple[int, int, str]] = []
                for pos, size in self.map.areas(status, start,
                                                 start + self.header.block_length(block)):
                    self.map.current_pos = pos
                    if pass_no == 3:
                        got = self._trim(pos, size, marks)
                    else:
                        got = self._each_sector(pos, size, marks)
                    for off, data in got:
                        if buf is None:
                            buf = self.block_data(block)
                        buf[off - start:off - start + len(data)] = data
                self.commit(block, buf, marks)
                self.tick()
            if not self.map.areas(status):
                break

    def _sector_end(self, off: int, hi: int) -> int:
        return min(hi, (off // self.sector + 1) * self.sector)

    def commit(self, block: int, buf: bytes | bytearray | None,
               marks: list[tuple[int, int, str]]) -> None:
        """Apply a block's map changes and store what was recovered, as one step: Ctrl-C is
        held off in between, so the map never claims sectors whose data is not in the image."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        saved = (list(self.map.starts), list(self.map.statuses))
        try:
            for pos, size, status in marks:
                self.map.set(pos, size, status)
            if buf is not None:
                self.store(block, buf)
        except BaseException:
            self.map.starts, self.map.statuses = saved   # the record did not make it
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _trim(self, pos: int, size: int, marks: list) -> list[tuple[int, bytes]]:
        """Read sectors from both edges of a failed area inwards, each side up to its first
        bad sector; what is left between becomes non-scraped.  Map changes go to `marks`."""
        lo, hi = pos, pos + size
        got = []
        while lo < hi:
            end = self._sector_end(lo, hi)
            data = self.read(lo, end - lo)
            marks.append((lo, end - lo, BAD if data is None else FINISHED))
            if data is None:
                lo = end
                break
            got.append((lo, bytes(data)))
            lo = end
        while hi > lo:
            start = max(lo, (hi - 1) // self.sector * self.sector)
            data = self.read(start, hi - start)
            marks.append((start, hi - start, BAD if data is None else FINISHED))
            hi = start
            if data is None:
                break
            got.append((start, bytes(data)))
        if hi > lo:
            marks.append((lo, hi - lo, NON_SCRAPED))
        return got

    def _each_sector(self, pos: int, size: int, marks: list) -> list[tuple[int, bytes]]:
        got = []
        off, end = pos, pos + size
        while off < end:
            stop = self._sector_end(off, end)
            data = self.read(off, stop - off)
            marks.append((off, stop - off, BAD if data is None else FINISHED))
            if data is not None:
                got.append((off, bytes(data)))
            off = stop
        return got

    # -- bookkeeping ---------------------------------------------------------------------------

    def status(self) -> RescueStatus:
        t = self.map.totals()
        p = self.map.current_pass
        return RescueStatus(p, PASS_NAMES[p], self.map.current_pos, t[FINISHED], t[BAD],
                            t[NON_TRIMMED] + t[NON_SCRAPED], t[NON_TRIED], self.map.size)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_save >= MAP_SAVE_INTERVAL:
            self.save_map()
        if self.progress and now - self.last_report >= 0.2:
            self.last_report = now
            self.progress.status(self.status())

    def save_map(self) -> None:
        """Sync the image, then write the map.  Raises DiskIOError ("fsync" of the image, or
        "write the mapfile")."""
        self.writer.sync()   # the map must never claim data the image does not durably hold
        try:
            self.map.save(self.mapfile, self.ropts.command, self.started,
                          notes=(f"{SYNC_NOTE} {self.writer.pos}",
                                 *_image_notes(self.writer, complete=False)))
        except OSError as err:
            raise DiskIOError(self.mapfile, "write the mapfile", err) from err
        self.last_save = time.monotonic()

    def unreadable(self) -> tuple[tuple[int, int], ...]:
        """Merged byte ranges that are not finished."""
        return tuple(ranges.merge(((pos, size) for pos, size, st in self.map.intervals()
                                   if st != FINISHED), presorted=True))

    def write_index(self) -> None:
        """The index: the latest record of each block, zero blocks as flags."""
        for block in range(self.header.blocks):
            length = self.header.block_length(block)
            off = self.offsets[block]
            if off != NO_RECORD:
                rec = fmt.unpack_record(self.partial_reader.pread(fmt.RECORD_HEADER_SIZE, off))
                entry = fmt.IndexEntry(fmt.DATA, rec.sha256, off, rec.stored_len, rec.codec,
                                       rec.flags)
            else:
                start = block * self.bs
                bad = not self.map.all_finished(start, start + length)
                entry = fmt.IndexEntry(fmt.ZERO, self.header.zero_digest(length),
                                       flags=fmt.FLAG_UNREADABLE if bad else 0)
            self.writer.add_entry(block, entry)


def _map_notes(mapfile: str) -> tuple[str | None, int]:
    """(image UUID, bytes of the partial image fsynced) noted when the map was saved."""
    uuid, synced = None, 0
    try:
        with open(mapfile, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("# " + SYNC_NOTE):
                    synced = int(line.split(":", 1)[1])
                elif line.startswith("# " + UUID_NOTE):
                    uuid = line.split(":", 1)[1].strip()
    except (OSError, ValueError):
        pass
    return uuid, synced


def _resume(image: str, source: Source, mapfile: str, identity: dict, encrypt: bool = False
            ) -> tuple[ImageWriter, RescueMap, array]:
    """Reopen the partial image and map an interrupted rescue left.

    The latest valid record of each block is found by scanning.  Records past what was fsynced
    when the map was last saved may be torn by a crash, so those are checked by content; the
    first bad one and everything after it are dropped and reread.  Blocks whose latest record
    is complete count as finished even where the map (saved earlier) does not say so yet.
    """
    store, name = open_store(image)
    partial = store.path(store.partial_name(name))
    if not store.resumable:
        raise UsageError(f"{image}: this store cannot resume a rescue")
    stored = store.open(store.partial_name(name))
    try:
        header, start = fmt.read_header(stored, partial)
        if encrypt and not header.encrypted:
            raise UsageError(f"{partial}: the interrupted rescue is not encrypted; resume it "
                             f"without --encrypt, or remove it to start over encrypted")
        header = unlock_header(header, partial)
        if header.parity is not None:   # records are found in the logical stream
            from diskimg.image.parity import UnfinishedReader
            stored = UnfinishedReader(stored, header.parity)
        if header.size != source.size or header.extra.get("rescue") is not True:
            raise UsageError(f"{partial}: left by another run (not a rescue of this "
                             f"{source.size}-byte source); remove it to start over")
        why = source_mismatch(identity, header.source, source.path, partial)
        if why:
            raise UsageError(f"{why}: {partial} is a rescue of another disk; remove it to "
                             f"start over")
        rmap = RescueMap.new(source.size)
        synced = 0
        map_uuid, map_synced = _map_notes(mapfile) if os.path.exists(mapfile) else (None, 0)
        if map_uuid == header.uuid:
            try:
                rmap = RescueMap.load(mapfile, source.size)
            except (MapfileError, OSError) as err:
                raise UsageError(f"{mapfile}: cannot be used to resume: {err}") from err
            synced = map_synced
        elif os.path.exists(mapfile):
            # a map of another run (an earlier image of the same name): its claims are about
            # data this partial image does not hold; rebuild from the records alone
            log.warning("%s belongs to another image; resuming from %s's records alone",
                        mapfile, partial)
        offsets = array("q", [NO_RECORD]) * header.blocks
        end = start
        for off, rec in scan_records(stored, start, stored.size):
            if rec.block >= header.blocks or (off >= synced and
                                               read_record_data(stored, off, rec, header) is None):
                break
            offsets[rec.block] = off
            end = off + fmt.RECORD_HEADER_SIZE + rec.stored_len
            if not rec.flags & fmt.FLAG_UNREADABLE:
                rmap.set(rec.block * header.block_size, rec.raw_len, FINISHED)
    finally:
        stored.close()
    log.info("resuming %s: %d bytes of records kept", partial, end)
    return ImageWriter(name, header, resume_at=end, store=store), rmap, offsets


def _new(image: str, source: Source, opts: RescueOptions, identity: dict,
         mounted_rw: list[str]) -> tuple[ImageWriter, RescueMap, array]:
    new_uuid = fmt.new_image_uuid()
    digest = opts.digest or fmt.DEFAULT_DIGEST
    keys = slots = None
    from diskimg.crypto import keyring
    if keyring.explicit() and not opts.encrypt:
        raise UsageError("a key was given but not --encrypt: add --encrypt to encrypt the "
                         "rescue image with it")
    if opts.encrypt:
        from diskimg.crypto import keys as crypto_keys
        master = crypto_keys.new_master()
        slots = crypto_keys.new_slots(master, keyring.given())
        keys = crypto_keys.ImageKeys(master, new_uuid, source.size, opts.block_size, digest)
    transforms = keys.writing_chain(opts.level) if keys else writing_chain(opts.level)
    header = fmt.Header(
        uuid=new_uuid, kind="full", size=source.size, block_size=opts.block_size,
        source=identity, created=utc_now(opts.clock), tool_version=__version__, parent=None,
        chain=(new_uuid,), compression={"codec": "zstd", "level": opts.level},
        extra={**opts.extra, "rescue": True, **({"source_mounted_rw": mounted_rw} if mounted_rw else {})},
        transforms=transforms.table, digest=digest,
        **with_features(parity_fields(opts.parity), (fmt.ENCRYPTED,) if keys else ()),
    )
    if keys is not None:
        header = keys.seal_header(header, slots)
    return (ImageWriter(image, header), RescueMap.new(source.size),
            array("q", [NO_RECORD]) * header.blocks)


def rescue_image(source_path: str, image_path: str, opts: RescueOptions = RescueOptions(),
                 progress: RescueProgress | None = None) -> RescueResult:
    """Image a failing source past its read errors into a full image.  Resumes when
    IMAGE.partial and the map of an interrupted run exist (always: not even opts.force throws
    an interrupted rescue away).  Raises Interrupted (keeping the partial image and the map),
    DiskIOError (the image, the mapfile, or a source read the system refuses: a ReadError) and
    the errors of imaging.create_image."""
    if is_remote(image_path):
        raise UsageError(f"{image_path}: a rescue writes a local image (it resumes from what "
                         f"an interrupted run kept); rescue to a local disk, then copy the "
                         f"image to object storage")
    check_block_size(opts.block_size)
    if opts.digest is not None and opts.digest not in fmt.KNOWN_DIGESTS:
        raise UsageError(f"--digest {opts.digest}: one of {', '.join(fmt.KNOWN_DIGESTS)} "
                         f"expected")
    if opts.retries < 0:
        raise UsageError(f"--retries {opts.retries}: must be 0 or more")
    started = time.monotonic()
    probe = open_source(source_path)
    direct = opts.direct if opts.direct is not None else probe.is_block
    probe.close()
    source = open_source(source_path, direct=direct)
    try:
        if not direct:  # no read-ahead: it would turn one bad sector into a bad 128 KiB
            os.posix_fadvise(source.fd, 0, 0, os.POSIX_FADV_RANDOM)
        mapfile = opts.mapfile or image_path + ".map"
        check_image_path(image_path, source, opts.force, extra=(mapfile,), rescue=True)
        check_no_children(image_path, opts.search)
        # a failing disk may well be mounted: the same rule as any source
        mounted_rw = check_source_mounted(source, opts.force)
        # model, serial, WWN only: no reads of a failing disk before the rescue proper
        identity = devices.identify(source_path)
        # an interrupted rescue is always resumed, never thrown away (not even by --force)
        store, name = open_store(image_path)
        resumed = store.exists(store.partial_name(name))
        if resumed:
            writer, rmap, offsets = _resume(image_path, source, mapfile, identity,
                                            opts.encrypt)
        else:
            writer, rmap, offsets = _new(image_path, source, opts, identity, mounted_rw)
        if source.is_block:
            sector = source.logical_sector
        else:
            sector = 4096 if direct else 512
        align = max(sector, 512) if direct else 1
        s = _Session(source, writer, rmap, offsets, sector, align, opts.level, opts, mapfile,
                     progress)
        try:
            if progress:
                progress.start(source.size, "B")
            s.save_map()   # at once: a map left by an earlier run must not outlive this start
            s.copy_pass(1, skipping=True)
            s.copy_pass(2, skipping=False)
            s.sector_pass(3, NON_TRIMMED)
            s.sector_pass(4, NON_SCRAPED)
            if opts.retries:
                s.sector_pass(5, BAD, tries=opts.retries)
            rmap.current_pass = 6
            s.write_index()
            unreadable = s.unreadable()
        except KeyboardInterrupt:
            _save_on_exit(s)
            writer.close_partial()
            raise Interrupted(f"rescue of {source_path} interrupted; run the same command "
                              f"again to resume from {writer.partial} and {mapfile}") from None
        except BaseException:
            _save_on_exit(s)
            writer.close_partial()
            raise
        finally:
            s.close()
        stats = writer.stats
        meta = {
            "completed": utc_now(opts.clock),
            "stats": {
                "stored_blocks": stats.stored_blocks, "stored_bytes": stats.stored_bytes,
                "zero_blocks": stats.zero_blocks, "unused_blocks": 0, "unchanged_blocks": 0,
                "changed_blocks": writer.header.blocks, "unchanged_zero_blocks": 0,
                "read_bytes": s.read_bytes,
                "unreadable_blocks": stats.unreadable_blocks,
            },
            "rescue": {"retries": opts.retries, "direct": direct, "sector": sector,
                       "mapfile": os.path.abspath(mapfile), "resumed": resumed},
            "unreadable": [list(r) for r in unreadable],
        }
        writer.finish(meta)
        try:
            # the map left behind still names its image (now IMAGE, no longer .partial)
            rmap.save(mapfile, opts.command, s.started,
                      notes=_image_notes(writer, complete=True))
        except OSError as err:  # the image is complete; only the final map is missing
            log.warning("%s: could not write the final mapfile: %s", mapfile, err.strerror)
        h = writer.header
        result = ImageResult(
            path=image_path, uuid=h.uuid, kind="full", size=h.size, block_size=h.block_size,
            blocks=h.blocks, stored_blocks=stats.stored_blocks, zero_blocks=stats.zero_blocks,
            unused_blocks=0, unchanged_blocks=0, changed_blocks=h.blocks,
            stored_bytes=stats.stored_bytes, image_bytes=os.path.getsize(image_path),
            read_bytes=s.read_bytes, seconds=time.monotonic() - started, parent=None,
            chain=h.chain, unreadable_blocks=stats.unreadable_blocks)
        return RescueResult(result, unreadable, mapfile, resumed)
    finally:
        source.close()


def _save_on_exit(s: _Session) -> None:
    try:
        s.save_map()
    except (DiskimgError, OSError) as err:
        log.error("could not save the rescue map: %s", err)
