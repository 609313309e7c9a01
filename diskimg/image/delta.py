"""What an incremental needs of its parent to store deltas: the page hashes of the parent's
state of a block, found through the parent's chain without reading any block's data.

`ParentPages(chain, level)` answers for the state of image `level` of `chain` (the reference
image an incremental or differential is compared with): it follows PARENT entries down to the
image that holds the block and reads the page-hash record beside that block's record (2 KiB per
1 MiB block, read only for blocks whose digest changed).  A block that reads as zeros has the
page hashes of zeros.  None means "no page hashes": an image written before them, a rescued
block, a damaged page-hash record: the block is then stored whole.

Nothing is cached here beyond the index segment each ImageReader keeps: memory stays bounded
whatever the size of the disk.  Safe to call from several worker threads at once (preads, and
the readers' one-segment caches, which tolerate races).
"""
from __future__ import annotations

import functools
import logging

from diskimg import format as fmt
from diskimg.errors import DiskimgError
from diskimg.format import delta
from diskimg.image.chain import Chain

log = logging.getLogger(__name__)


@functools.cache
def zero_page_hashes(length: int) -> bytes:
    """The page-hash vector of `length` zero bytes."""
    return delta.page_hashes(bytes(length))


class ParentPages:
    """Page hashes of the state of image `level` of `chain`."""

    def __init__(self, chain: Chain, level: int | None = None) -> None:
        self.chain = chain
        self.level = len(chain.images) - 1 if level is None else level

    @property
    def available(self) -> bool:
        """Whether any image the lookup can reach records page hashes."""
        return any("page_hashes" in img.header.extra
                   for img in self.chain.images[:self.level + 1])

    def lookup(self, block: int, entry: fmt.IndexEntry) -> bytes | None:
        """The page hashes of `block` in the reference's state, given the reference's index
        entry for it, or None (see the module's docstring)."""
        try:
            _, img, held = self.chain.resolve_from(self.level, block, entry)
            if held.sha256 != entry.sha256:
                return None           # chain inconsistent: verify reports it; store whole
            if held.kind in (fmt.ZERO, fmt.UNUSED):
                return zero_page_hashes(img.header.block_length(block))
            if held.flags & fmt.FLAG_UNREADABLE:
                return None
            return img.page_hashes(block, held)
        except DiskimgError as err:   # damage in the parent: the block is stored whole
            log.debug("no page hashes for block %d: %s", block, err)
            return None
