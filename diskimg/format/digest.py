"""Block digests: the one place that knows which algorithms hash a block's content.

Every 32-byte digest field of a record header and an index entry holds the digest of the
algorithm the image's header names (`"digest"`, docs/FORMAT.md section 3.2); images written
before the key existed use SHA-256.  Everything that hashes a block (imaging, rescue, the
parent comparison, decoding a record, restore's comparison and read-back, verify) asks this
module for the image's function, so that no caller hard-codes an algorithm.

Why BLAKE3 for new images: measured on the benchmark machine, SHA-256 (OpenSSL with SHA-NI)
hashes 1.6 GB per CPU second, BLAKE3 (the `blake3` package, one thread) 3.8 GB; hashing is most
of the CPU of an unchanged incremental.  BLAKE3's default output is 32 bytes, the size of the
existing fields.  The index digest (footer `index.sha256`) stays SHA-256: one hash over the
index, not per block.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable

from diskimg.defaults import DEFAULT_DIGEST, DIGESTS  # noqa: F401  (DEFAULT_DIGEST: new full images)
from diskimg.errors import UnknownDigest

SHA256 = "sha256"
BLAKE3 = "blake3"
# the algorithms this diskimg can compute; an image naming another was made by a newer one
KNOWN_DIGESTS = DIGESTS
LEGACY_DIGEST = SHA256    # images whose header has no `digest` key
DIGEST_SIZE = 32          # bytes in every record header and index entry

Buffer = bytes | bytearray | memoryview


def _sha256(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


@functools.cache
def digest_fn(name: str) -> Callable[[Buffer], bytes]:
    """The function that hashes a block's content to its 32-byte digest under `name`; raises
    UnknownDigest for a name not in KNOWN_DIGESTS."""
    if name == SHA256:
        return _sha256
    if name == BLAKE3:
        # imported here: only commands that hash blocks of a BLAKE3 image pay for it
        from blake3 import blake3

        def _blake3(data: Buffer) -> bytes:
            # one thread per block: the pipeline already hashes blocks in parallel workers
            # (blake3 releases the GIL)
            return blake3(data).digest()
        return _blake3
    raise UnknownDigest(name)


@functools.cache
def zero_digest(name: str, length: int) -> bytes:
    """The digest under `name` of `length` zero bytes (cached: an image has at most two block
    lengths)."""
    return digest_fn(name)(bytes(length))
