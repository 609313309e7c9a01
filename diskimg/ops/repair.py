"""`diskimg repair`: rewrite an image with parity healed.

The image is checked whole first (every slice against its checksum, every block against its
digest, as `verify` does).  Damage beyond what parity repairs is refused, naming the lost blocks,
and nothing is written.  Otherwise the healed logical stream (header, records, index, footer,
trailer) is written again with fresh parity to ``IMAGE.repair`` (itself written as
``IMAGE.repair.partial`` and published only when complete), which is then verified the same way;
only an image that verifies clean, with the same index digest, is renamed over the damaged one.
The original is never written to.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from diskimg.errors import BeyondRepair, DiskimgError, OperationFailed, UsageError
from diskimg.image.imagefile import ImageReader
from diskimg.image.parity import rewrite
from diskimg.ops.progress import Progress
from diskimg.ops.verify import _verify_one
from diskimg.ops.pipeline import default_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairResult:
    image: str
    damaged: int                 # damage found (verify's errors, all repairable)
    slices: int                  # slices rebuilt
    slice_bytes: int
    blocks: tuple[int, ...]      # blocks whose records were damaged and rebuilt
    parts: tuple[str, ...]       # what else was damaged: header, index, parity data...
    image_bytes: int
    seconds: float
    written: bool                # False: nothing was damaged, the file was left alone

    @property
    def bytes(self) -> int:
        return self.slices * self.slice_bytes


def _ranges(blocks: list[int]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][1] + 1 == b:
            out[-1][1] = b
        else:
            out.append([b, b])
    return tuple((a, b) for a, b in out)


def repair_image(path: str, threads: int | None = None,
                 progress: Progress | None = None) -> RepairResult:
    """Repair `path` (see the module docstring).  Raises UsageError (no parity), BeyondRepair
    (exit 1, nothing written), OperationFailed when the rewritten image does not verify, and
    the errors of opening and reading the image."""
    started = time.monotonic()
    threads = threads or default_threads()
    with ImageReader(path) as img:
        if img.healing is None:
            raise UsageError(f"{path}: this image has no parity (made with --parity 0 or by an "
                             f"older diskimg): nothing can repair it; `diskimg verify` names "
                             f"its damage")
        if progress:
            progress.start(img.header.size, "B")
        errors, _, _ = _verify_one(img, threads, progress)
        lost = [e for e in errors if not e.repairable]
        if lost:
            blocks = []
            for e in lost:
                if e.block is not None:
                    blocks += range(e.block, (e.last_block if e.last_block is not None
                                              else e.block) + 1)
            parts = tuple(e.reason for e in lost if e.block is None)
            raise BeyondRepair(img.path, _ranges(blocks), parts)
        h = img.healing
        result = dict(
            image=path, damaged=len(errors), slices=len(h.repairs.repaired),
            slice_bytes=h.geom.slice,
            blocks=tuple(sorted({e.block for e in errors if e.block is not None})),
            parts=tuple(e.reason for e in errors if e.block is None),
        )
        if not errors:
            return RepairResult(**result, image_bytes=img.physical_size,
                                seconds=time.monotonic() - started, written=False)
        store, name = img.store, img.name
        new = name + ".repair"
        header_bytes = h.tail.header or img.reader.pread(img.data_start, 0)
        rewrite(store, new, h.geom, header_bytes, img.reader, img.file_size, img.path)
        index_sha256 = img.index_sha256
    try:
        with ImageReader(new, store=store) as check:
            errors2, _, _ = _verify_one(check, threads, None)
            if errors2 or check.index_sha256 != index_sha256 or check.healing.repairs.repaired:
                raise OperationFailed(
                    f"{store.path(new)}: the rewritten image does not verify "
                    f"({errors2[0].reason if errors2 else 'index digest differs'}); "
                    f"{path} left as it was")
            image_bytes = check.physical_size
        store.rename(new, name)
    except BaseException:
        try:
            store.delete(new)
        except DiskimgError:
            pass
        raise
    log.info("%s repaired: %d slices rebuilt", path, result["slices"])
    return RepairResult(**result, image_bytes=image_bytes, seconds=time.monotonic() - started,
                        written=True)
