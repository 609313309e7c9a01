"""Decode-and-verify of one block record: the one place where a record's stored bytes become
the block's content and are checked against its digest (the image's algorithm, Header.hash).

`ImageReader.read_block` (reading through the index) and `read_record_data` (walking the
records of an image without an index: rescue's resume, salvage of a truncated image) both call
`decode_verified`, so every reader applies the same transforms and the same checks and says the
same words when they fail.
"""
from __future__ import annotations

from typing import Callable

from diskimg.errors import DigestMismatch
from diskimg.transforms import TransformChain


def decode_verified(transforms: TransformChain, block: int, stored: bytes | memoryview,
                    chain_id: int, sha256: bytes, out: memoryview, *,
                    digest: Callable[[memoryview], bytes]) -> memoryview:
    """Decode block `block`'s stored bytes (encoded by chain `chain_id` of `transforms`) into
    `out`, exactly the block's length, and check them against `sha256`, the digest `digest`
    (the image's Header.hash) must give; returns `out`.  Raises DecodeError, whose reason a
    caller puts after the block it names: a DigestMismatch (with the expected and actual
    digests) when the content's digest differs."""
    transforms.decode_into(block, stored, chain_id, out)
    actual = digest(out)
    if actual != sha256:
        raise DigestMismatch(sha256, actual)
    return out
