"""Page hashes and delta records (format feature "delta", docs/FORMAT.md section 18).

A block's *pages* are its 4 KiB pieces (the last one shorter when the block is).  Two structures
live here, both as the decoded content of ordinary records (so every transform, zstd or
encryption, applies to them unchanged):

- the *page-hash vector* of a block: one little-endian u64 per page, XXH3-64 (seed 0) of the
  page's bytes.  Written as its own record right after the record of every block stored whole or
  as a delta (record flag FLAG_PAGE_HASHES), so that an incremental reads 2 KiB of its parent per
  changed 1 MiB block, never the parent's data, and no table is ever loaded whole.
- the *delta payload* of a block stored as a delta (index kind DELTA, record flag FLAG_DELTA): a
  bitmap of the pages that changed, then those pages' bytes in ascending order.  Applied onto
  the block's content in the parent image's state, it gives the block; the whole block's digest
  (the index entry's) is checked after applying, so a delta on a wrong or damaged parent is
  caught exactly like a damaged block.

Why XXH3-64: measured on the benchmark machine (2 cores, 1 MiB blocks of random data, one page
at a time from Python, scripts in the commit message): XXH3-64 hashes 5.7 GB/s, XXH3-128 4.6,
XXH64 3.0, zlib.crc32 1.1, BLAKE3 truncated to 8 bytes 0.64 (4 KiB is too short for its SIMD),
BLAKE2b-64 0.32; the block digest itself (BLAKE3 over 1 MiB) runs at 1.75 GB/s, so page hashes
add about a third to the hashing of a stored block, and nothing to an unchanged one.  8 bytes
per page is 2 KiB per 1 MiB block (0.2 %).  A page hash only chooses which pages a delta
carries; it never vouches for data (the block digest does), so a collision costs at worst a
block that fails its digest on read, and a zero-page difference with a changed digest (the only
collision the writer can see) stores the whole block.

xxhash is imported when page hashes are first computed, not with this module.
"""
from __future__ import annotations

import sys
from array import array

from diskimg.errors import DecodeError

PAGE_SIZE = 4096
PAGE_HASH_SIZE = 8
PAGE_HASH_ALGORITHM = "xxh3_64"
# what the header's extra.page_hashes says of an image whose stored blocks carry page hashes
PAGE_HASH_INFO = {"algorithm": PAGE_HASH_ALGORITHM, "page_size": PAGE_SIZE}

# A block is stored as a delta when at most this fraction of its pages changed (64 of a 1 MiB
# block's 256).  Measured (scripts/bench_delta_threshold.py; README "Delta records"): with k
# random pages changed, the delta stores k/256 of the block's bytes (zstd, text or random), and
# reading it back (the parent's block decoded, the delta decoded and applied, one hash) takes
# 1.03-1.16x the time of reading the whole block up to 32 pages, 1.3x at 64, 1.5x at 96, 1.74x
# at 128.  Past a quarter of the pages the delta is no longer much smaller (0.36 of the whole
# block's bytes at 64, 0.5 at 96) and every restore of it pays a third more or worse.
DELTA_MAX_FRACTION = 0.25

_LITTLE = sys.byteorder == "little"
_xxh3 = None


def pages_in(length: int) -> int:
    """The number of pages of a block of `length` bytes."""
    return -(-length // PAGE_SIZE)


def page_hashes(data: bytes | bytearray | memoryview) -> bytes:
    """The page-hash vector of a block's content: one u64 (little-endian) per page."""
    global _xxh3
    if _xxh3 is None:
        from xxhash import xxh3_64_intdigest
        _xxh3 = xxh3_64_intdigest
    h = _xxh3
    mv = memoryview(data)
    vec = array("Q", [h(mv[i:i + PAGE_SIZE]) for i in range(0, len(mv), PAGE_SIZE)])
    if not _LITTLE:
        vec.byteswap()
    return vec.tobytes()


def changed_pages(old: bytes, new: bytes) -> list[int]:
    """The pages whose hashes differ between two page-hash vectors of the same length."""
    a = memoryview(old).cast("Q")
    b = memoryview(new).cast("Q")
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def use_delta(changed: int, pages: int) -> bool:
    """Whether a block with `changed` of its `pages` pages changed is stored as a delta (none
    changed but a different digest: a page-hash collision, stored whole)."""
    return 0 < changed <= pages * DELTA_MAX_FRACTION


def bitmap_size(length: int) -> int:
    return -(-pages_in(length) // 8)


def pack_delta(data: bytes | bytearray | memoryview, pages: list[int]) -> bytes:
    """The delta payload carrying `pages` (ascending) of the block content `data`."""
    length = len(data)
    bitmap = bytearray(bitmap_size(length))
    mv = memoryview(data)
    parts = [bitmap]
    for p in pages:
        bitmap[p >> 3] |= 1 << (p & 7)
        parts.append(mv[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
    return b"".join(parts)


def delta_pages(payload: bytes | memoryview, length: int) -> list[int]:
    """The pages a delta payload for a block of `length` bytes carries, checked against the
    payload's length; raises DecodeError.  (Walks the set bits only: a delta of 10 pages costs
    10 steps, not 256.)"""
    nbits = pages_in(length)
    nmap = bitmap_size(length)
    if len(payload) < nmap:
        raise DecodeError(f"delta payload is {len(payload)} bytes, shorter than its bitmap")
    bits = int.from_bytes(payload[:nmap], "little")
    if bits >> nbits:
        raise DecodeError("delta bitmap names pages past the end of the block")
    pages = []
    while bits:
        low = bits & -bits
        pages.append(low.bit_length() - 1)
        bits ^= low
    want = nmap + len(pages) * PAGE_SIZE
    if pages and pages[-1] == nbits - 1:
        want -= nbits * PAGE_SIZE - length        # the short last page
    if len(payload) != want or not pages:
        raise DecodeError(f"delta payload is {len(payload)} bytes, its bitmap ({len(pages)} "
                          f"pages) says {want}")
    return pages


def apply_delta(out: memoryview, payload: bytes | memoryview,
                pages: list[int] | None = None) -> int:
    """Write the pages of a delta payload over `out` (the parent's content of the block, exactly
    the block's length); returns the number of pages.  `pages` are the payload's pages when the
    caller has them already (delta_pages).  Raises DecodeError."""
    length = len(out)
    if pages is None:
        pages = delta_pages(payload, length)
    pos = bitmap_size(length)
    src = memoryview(payload)
    for p in pages:
        start = p * PAGE_SIZE
        n = min(PAGE_SIZE, length - start)
        out[start:start + n] = src[pos:pos + n]
        pos += n
    return len(pages)


def max_delta_length(length: int) -> int:
    """The largest decoded delta payload of a block of `length` bytes."""
    return bitmap_size(length) + length


def plausible_length(raw_len: int, length: int) -> bool:
    """Whether a decoded delta payload of `raw_len` bytes can be one of a block of `length`
    bytes: more than its page bitmap, at most max_delta_length."""
    return bitmap_size(length) < raw_len <= max_delta_length(length)


def differing_pages(data: bytes | bytearray | memoryview, vector: bytes) -> list[int]:
    """The pages of `data` whose hashes differ from `vector` (what verify names in a damaged
    block)."""
    return changed_pages(vector, page_hashes(data))


def page_ranges(pages: list[int]) -> str:
    """Pages as a short list of ranges: "3, 17-19"."""
    out: list[str] = []
    start = prev = None
    for p in pages + [None]:
        if start is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = p
    return ", ".join(out)


def describe_pages(pages: list[int], length: int, start: int) -> str:
    """Words naming the damaged `pages` of a block of `length` bytes at device byte `start`:
    "page 5 of 256 (bytes 2117632-2121727) differs from ...", at most 8 ranges listed."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][1] == p - 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    shown = []
    for a, b in runs[:8]:
        lo, hi = start + a * PAGE_SIZE, start + min((b + 1) * PAGE_SIZE, length) - 1
        shown.append(f"{a} (bytes {lo}-{hi})" if a == b else f"{a}-{b} (bytes {lo}-{hi})")
    more = f" and {len(runs) - 8} more ranges" if len(runs) > 8 else ""
    one = len(pages) == 1
    return (f"page{'' if one else 's'} {', '.join(shown)}{more} of {pages_in(length)} "
            f"differ{'s' if one else ''} from the page hash{'' if one else 'es'} recorded "
            f"with the block")
