"""Exporting any point of a chain as a VM disk: raw (sparse), qcow2 (written here, in one
forward pass), vmdk and vhdx (through ``qemu-img convert``).

Every block is read through the block view (`ImageDisk`), verified like restore; a damaged
block fails the export (exit 1) and nothing is left under OUT.  Zero and unused blocks are
never read: they become holes in a raw file and unallocated clusters in qcow2.

**qcow2** (version 3, 64 KiB clusters, 16-bit refcounts, no backing file) is laid out up front
from the leaf's index: which clusters hold data is known before any block is read, so the
header, the L1 table, the refcount table and blocks and the L2 tables are written first and the
data clusters follow in guest order.  Nothing is ever written twice or out of order, so OUT may
be a pipe (``-`` is standard output) or, later, an object-storage upload.  A data block is
stored whole (its clusters are all allocated, zeros inside it included): cheaper than looking
at every cluster, and what a block holds is decided by the image, not re-guessed here.

**vmdk, vhdx**: ``qemu-img convert`` reads the image from this process over NBD
(`diskimg.ops.nbd`, on a private unix socket), with holes reported, so nothing is written
twice and no temporary file is needed.

OUT is written as ``OUT.partial`` next to it and renamed when complete (a pipe is written as it
goes); an existing OUT is refused unless `force`.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from diskimg.disk.outfile import OutputFile
from diskimg.errors import OperationFailed, UsageError
from diskimg.ops.imagedisk import Extent, ImageDisk
from diskimg.ops.pipeline import BufferPool, default_threads, depth_for, ordered_map
from diskimg.ops.progress import Progress

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2", "vmdk", "vhdx")

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_COPIED = 1 << 63              # refcount is exactly one: the cluster may be written in place


@dataclass(frozen=True)
class ExportResult:
    image: str
    out: str
    format: str
    size: int                  # the virtual disk's size
    data_bytes: int            # bytes of data blocks read from the image
    zero_bytes: int            # bytes left as holes / unallocated
    written_bytes: int         # bytes written to OUT (qemu-img's output for vmdk/vhdx)
    seconds: float


# --------------------------------------------------------------------------------------------
# the qcow2 layout

@dataclass(frozen=True)
class Qcow2Layout:
    """Where everything of a qcow2 file goes, computed before anything is written."""

    size: int
    l1_entries: int
    l1_offset: int
    rt_offset: int
    rt_clusters: int
    rb_offset: int
    rb_count: int
    l2_offset: int
    l2_tables: tuple[int, ...]        # L1 index of each L2 table, in file order
    data_offset: int
    data_clusters: int
    total_clusters: int

    @property
    def file_size(self) -> int:
        return self.total_clusters * CLUSTER


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def data_clusters(extents: Iterable[Extent]) -> Iterator[tuple[int, int]]:
    """(first guest cluster, count) of each data extent."""
    for e in extents:
        if not e.zero:
            first = e.offset // CLUSTER
            yield first, _ceil(e.offset + e.length, CLUSTER) - first


def qcow2_layout(size: int, runs: list[tuple[int, int]]) -> Qcow2Layout:
    """The layout of a qcow2 of `size` bytes whose allocated guest clusters are `runs`."""
    per_l2 = CLUSTER // 8
    l1_entries = max(1, _ceil(_ceil(size, CLUSTER), per_l2))
    l2: list[int] = []
    for first, count in runs:
        for t in range(first // per_l2, (first + count - 1) // per_l2 + 1):
            if not l2 or l2[-1] != t:
                l2.append(t)
    n_data = sum(c for _, c in runs)
    l1_clusters = _ceil(l1_entries * 8, CLUSTER)
    per_rb = CLUSTER * 8 // 16          # 16-bit refcounts
    rb, rt = 1, 1
    while True:                         # the refcount blocks count themselves
        total = 1 + l1_clusters + rt + rb + len(l2) + n_data
        need_rb = _ceil(total, per_rb)
        need_rt = _ceil(need_rb * 8, CLUSTER)
        if (need_rb, need_rt) == (rb, rt):
            break
        rb, rt = max(rb, need_rb), max(rt, need_rt)
    l1_offset = CLUSTER
    rt_offset = l1_offset + l1_clusters * CLUSTER
    rb_offset = rt_offset + rt * CLUSTER
    l2_offset = rb_offset + rb * CLUSTER
    data_offset = l2_offset + len(l2) * CLUSTER
    return Qcow2Layout(size, l1_entries, l1_offset, rt_offset, rt, rb_offset, rb, l2_offset,
                       tuple(l2), data_offset, n_data, total)


def qcow2_metadata(lay: Qcow2Layout, runs: list[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of the qcow2 file before its data clusters, in order, cluster by cluster."""
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, lay.size,
                         0, lay.l1_entries, lay.l1_offset, lay.rt_offset, lay.rt_clusters, 0, 0,
                         0, 0, 0, 4, 104)
    header += struct.pack(">II", 0, 0)           # end of header extensions
    yield header + bytes(CLUSTER - len(header))
    # L1
    l1 = bytearray(_ceil(lay.l1_entries * 8, CLUSTER) * CLUSTER)
    for i, t in enumerate(lay.l2_tables):
        struct.pack_into(">Q", l1, t * 8, (lay.l2_offset + i * CLUSTER) | _COPIED)
    yield bytes(l1)
    # refcount table and blocks: every cluster of the file is used exactly once
    rt = bytearray(lay.rt_clusters * CLUSTER)
    for i in range(lay.rb_count):
        struct.pack_into(">Q", rt, i * 8, lay.rb_offset + i * CLUSTER)
    yield bytes(rt)
    per_rb = CLUSTER // 2
    one = b"\x00\x01"
    for i in range(lay.rb_count):
        used = max(0, min(per_rb, lay.total_clusters - i * per_rb))
        yield one * used + bytes((per_rb - used) * 2)
    # L2 tables: the data clusters are numbered in guest order
    per_l2 = CLUSTER // 8
    host = lay.data_offset
    it = iter(runs)
    pending: list[int] = []   # [first, count] of the run being placed

    for t in lay.l2_tables:
        table = bytearray(CLUSTER)
        lo, hi = t * per_l2, (t + 1) * per_l2
        while True:
            if not pending:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending = list(nxt)
            first, count = pending
            if first >= hi:
                break
            take = min(count, hi - first)
            for g in range(first, first + take):
                struct.pack_into(">Q", table, (g - lo) * 8, host | _COPIED)
                host += CLUSTER
            pending = [first + take, count - take] if count > take else []
        yield bytes(table)


# --------------------------------------------------------------------------------------------
# output

def _blocks(disk: ImageDisk, extents: list[Extent], threads: int
            ) -> Iterator[tuple[Extent, int, memoryview | None]]:
    """(extent, block, content) in disk order: zero extents once (block -1, content None),
    data extents block by block, decoded by `threads` workers into pooled buffers that are
    reused once the caller asks for the next item."""
    bs = disk.block_size
    pool = BufferPool(bs)

    def items():
        for e in extents:
            if e.zero:
                yield e, None
                continue
            for b in range(e.offset // bs, _ceil(e.offset + e.length, bs)):
                yield e, b

    def work(item):
        e, b = item
        if b is None:
            return e, -1, None, None
        buf = pool.get()
        try:
            view = disk.view.read_block(b, buf)
        except BaseException:
            pool.put(buf)
            raise
        return e, b, view, buf

    for e, b, view, buf in ordered_map(work, items(), threads, depth=depth_for(bs, threads),
                                       inline=lambda item: item[1] is None):
        yield e, b, view
        if buf is not None:
            pool.put(buf)


def _export_raw(disk: ImageDisk, extents: list[Extent], out: OutputFile, threads: int,
                progress: Progress | None) -> tuple[int, int]:
    data = zero = 0
    bs = disk.block_size
    if not out.stream:
        out.truncate(disk.size)              # holes everywhere no data is written
    for e, b, view in _blocks(disk, extents, threads):
        if view is None:
            zero += e.length
            if out.stream:
                out.write_zeros(e.length)
            if progress:
                progress.advance(e.length)
            continue
        data += len(view)
        if out.stream:
            out.write(view)
        else:
            out.pwrite(view, b * bs)
        if progress:
            progress.advance(len(view))
    return data, zero


def _export_qcow2(disk: ImageDisk, extents: list[Extent], out: OutputFile, threads: int,
                  progress: Progress | None) -> tuple[int, int]:
    runs = list(data_clusters(extents))
    lay = qcow2_layout(disk.size, runs)
    for chunk in qcow2_metadata(lay, runs):
        out.write(chunk)
    data = zero = 0
    for e, _, view in _blocks(disk, extents, threads):
        if view is None:
            zero += e.length
            if progress:
                progress.advance(e.length)
            continue
        out.write(view)
        data += len(view)
        if len(view) % CLUSTER:
            out.write_zeros(CLUSTER - len(view) % CLUSTER)
        if progress:
            progress.advance(len(view))
    if out.written != lay.file_size:
        raise OperationFailed(f"{out.path}: internal error: wrote {out.written} bytes of a "
                              f"{lay.file_size}-byte qcow2 layout")
    return data, zero


def _export_qemu(disk: ImageDisk, out: OutputFile, fmt_name: str, progress: Progress | None
                 ) -> tuple[int, int]:
    import shutil               # here: raw and qcow2 exports start faster without them
    import subprocess
    import tempfile
    import threading
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise OperationFailed(f"{out.out}: exporting to {fmt_name} needs qemu-img, which is not "
                              f"installed (Debian: apt install qemu-utils); raw and qcow2 are "
                              f"written without it")
    from diskimg.ops.nbd import NbdServer
    data = sum(e.length for e in disk.extents() if not e.zero)
    with tempfile.TemporaryDirectory(prefix="diskimg-export-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        with NbdServer(disk, unix=sock) as server:
            thread = threading.Thread(target=server.serve_forever, name="nbd", daemon=True)
            thread.start()
            opts = ["-o", "subformat=streamOptimized"] if fmt_name == "vmdk" and out.stream \
                else []
            proc = subprocess.run([qemu_img, "convert", "-f", "raw", "-O", fmt_name, *opts,
                                   f"nbd+unix:///?socket={sock}", out.path],
                                  capture_output=True, text=True)
            server.shutdown()
            thread.join(10)
    if server.error is not None:
        raise server.error
    if proc.returncode != 0:
        raise OperationFailed(f"{out.out}: qemu-img convert -O {fmt_name} failed: "
                              f"{(proc.stderr or proc.stdout).strip()}")
    if progress:
        progress.advance(disk.size)
    out.written = os.fstat(out.fd).st_size
    return data, disk.size - data


def export_image(image: str, out: str, fmt_name: str, *, search: Iterable[str] = (),
                 threads: int | None = None, force: bool = False,
                 progress: Progress | None = None) -> ExportResult:
    """Write the state of `image`'s chain to `out` ("-": standard output) as a `fmt_name`
    disk.  Raises UsageError (unknown format, OUT exists, a device, a pipe for vmdk/vhdx),
    what opening the chain raises, CorruptImage for a damaged block (OUT is removed),
    OperationFailed when writing fails or qemu-img is missing or fails."""
    if fmt_name not in FORMATS:
        raise UsageError(f"--format {fmt_name}: must be one of {', '.join(FORMATS)}")
    started = time.monotonic()
    threads = threads or default_threads()
    with ImageDisk(image, search, cache_bytes=0) as disk:
        sink = OutputFile(out, force, seekable_needed=fmt_name in ("vmdk", "vhdx"))
        try:
            if progress:
                progress.start(disk.size, "B")
            extents = list(disk.extents())
            if fmt_name == "raw":
                data, zero = _export_raw(disk, extents, sink, threads, progress)
            elif fmt_name == "qcow2":
                data, zero = _export_qcow2(disk, extents, sink, threads, progress)
            else:
                data, zero = _export_qemu(disk, sink, fmt_name, progress)
            written = sink.written
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    return ExportResult(image, out, fmt_name, disk.size, data, zero, written,
                        time.monotonic() - started)
