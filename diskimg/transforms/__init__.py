"""Block transforms: how a block's bytes become a record's stored bytes and back.

A *transform* is one reversible step over a block's bytes: zstd now; authenticated encryption
and Reed-Solomon parity plug in next.  A `TransformChain` is the ordered list of transforms an
image is written with.  Each record names the transforms its payload went through by a one-byte
*chain id* (the record's and index entry's ``codec`` field); the header's ``transforms`` table
says which names each id stands for (docs/FORMAT.md, section 4.4).  Images written before the
table existed have the implicit table ``{0: (), 1: ("zstd",)}``, and ids 0 and 1 keep that
meaning in every table, so that readers older than the table read every image that uses only
them.

Why shaped so:
- A transform that does not pay off for a block (zstd output not smaller) is left out of that
  block's chain, here and only here: the writer's table holds an id for every variant of its
  chain with optional transforms left out, and `encode` names the variant it used.
- The block number is passed to every transform: encryption binds it as associated data, so a
  record copied to another block's place fails to decode instead of restoring wrong data.
- No copies on the per-block path: `encode` returns the caller's buffer itself when no
  transform applies and the transform's output otherwise; `decode_into` has the innermost
  transform write straight into the caller's reused buffer.

This package depends on nothing in diskimg but `defaults` and `errors` (its DecodeError and
UnknownTransform live there); format/ imports the names it knows (to validate a header's table)
and the zstd contexts (for index segments) from here.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from diskimg.defaults import DEFAULT_LEVEL
from diskimg.errors import DecodeError, UnknownTransform

# ids whose meaning is fixed in every table: they are all a reader older than the table knows
FIXED_IDS: dict[tuple[str, ...], int] = {(): 0, ("zstd",): 1}
# the table of an image whose header has none (every image written before the table existed)
IMPLICIT_TABLE: dict[int, tuple[str, ...]] = {cid: names for names, cid in FIXED_IDS.items()}
# the transform names this diskimg can decode; an image naming another was made by a newer one
KNOWN_TRANSFORMS = ("zstd", "aes-256-gcm")
# transforms that need a key: made by whoever holds it (diskimg.crypto), passed in `keyed`
KEYED_TRANSFORMS = ("aes-256-gcm",)
MAX_CHAIN_ID = 255   # the id is one byte in records and index entries


class Transform(Protocol):
    """One reversible step over a block's bytes."""

    name: str          # as the header's table names it
    optional: bool     # may be left out of a block's chain when it does not pay off

    def encode(self, block_no: int, data: bytes | memoryview) -> bytes | None:
        """The encoded bytes, or None when an optional transform does not pay off for this
        block (it is then left out of the block's chain)."""

    def decode_into(self, block_no: int, stored: bytes | memoryview, out: memoryview) -> int:
        """Decode into `out`, exactly the block's length: fills all of it and returns
        len(out), or raises DecodeError (wrong length included)."""

    def decode(self, block_no: int, stored: bytes | memoryview, limit: int) -> bytes:
        """The decoded bytes, at most `limit` of them (for a transform that is not the first of
        its chain); raises DecodeError."""


def max_stored_length(length: int) -> int:
    """The largest stored length a record of a `length`-byte block can have: raw is `length`,
    and one zstd frame of it is at most a few bytes per 128 KiB more (ZSTD_compressBound);
    this bound is generous, and leaves room for the few bytes a tag or parity would add."""
    return length + (length >> 7) + 1024


def make(name: str, level: int = DEFAULT_LEVEL) -> Transform:
    """The transform called `name` (the zstd module is imported only when it is needed)."""
    if name == "zstd":
        from diskimg.transforms.zstd import Zstd
        return Zstd(level)
    if name in KEYED_TRANSFORMS:
        raise DecodeError(f"{name} needs the image's key")
    raise UnknownTransform(name)


class TransformChain:
    """The transforms of one image: `encode` for its writer, `decode_into` for its readers.

    Build one with `for_writing` (from the transforms to apply, in order; its `table` goes into
    the header) or `for_reading` (from a header's table)."""

    def __init__(self, table: dict[int, tuple[Transform, ...]],
                 steps: tuple[Transform, ...] = (), encode_ids: Sequence[int | None] = ()
                 ) -> None:
        self._decode = table
        self.table: dict[int, tuple[str, ...]] = {
            cid: tuple(t.name for t in ts) for cid, ts in sorted(table.items())}
        self._steps = tuple((1 << i, t) for i, t in enumerate(steps))
        self._encode_ids = tuple(encode_ids)   # mask of the steps applied -> chain id
        # a transform that binds its record's chain id (encryption: associated data) is given
        # it; only the last transform may (the id is known once the optional ones are decided)
        self._binds = any(getattr(t, "binds_chain", False) for t in steps)

    @classmethod
    def for_writing(cls, transforms: Sequence[Transform]) -> TransformChain:
        """The chain that applies `transforms` in order, each optional one only where it pays
        off: one chain id per variant, ids 0 and 1 where the variant is () or ("zstd",)."""
        transforms = tuple(transforms)
        table: dict[int, tuple[Transform, ...]] = {}
        encode_ids: list[int | None] = []
        next_id = max(FIXED_IDS.values()) + 1
        for mask in range(1 << len(transforms)):
            used = tuple(t for i, t in enumerate(transforms) if mask & (1 << i))
            if any(not t.optional and t not in used for t in transforms):
                encode_ids.append(None)       # a required transform left out: never happens
                continue
            cid = FIXED_IDS.get(tuple(t.name for t in used))
            if cid is None:
                cid, next_id = next_id, next_id + 1
                if cid > MAX_CHAIN_ID:
                    raise ValueError(f"{len(transforms)} transforms have more variants than "
                                     f"a chain id can name")
            table[cid] = used
            encode_ids.append(cid)
        return cls(table, transforms, encode_ids)

    @classmethod
    def for_reading(cls, table: dict[int, tuple[str, ...]],
                    keyed: dict[str, Transform] | None = None) -> TransformChain:
        """The chain that decodes records of an image whose header has `table`, with `keyed`
        the image's keyed transforms by name; raises UnknownTransform for a name this diskimg
        does not know, DecodeError for a keyed one not given."""
        made: dict[str, Transform] = dict(keyed or {})
        decode = {}
        for cid, names in table.items():
            decode[cid] = tuple(made[n] if n in made else made.setdefault(n, make(n))
                                for n in names)
        return cls(decode)

    def __contains__(self, chain_id: int) -> bool:
        return chain_id in self._decode

    def encode(self, block_no: int, data: bytes | memoryview
               ) -> tuple[bytes | memoryview, int]:
        """(stored bytes, chain id) of block `block_no`'s content.  The stored bytes are `data`
        itself when no transform applies (a raw block: no copy), else the last transform's
        output."""
        stored, mask = data, 0
        if self._binds:
            for bit, t in self._steps:
                if getattr(t, "binds_chain", False):
                    out = t.encode(block_no, stored, chain_id=self._encode_ids[mask | bit])
                else:
                    out = t.encode(block_no, stored)
                if out is not None:
                    stored, mask = out, mask | bit
            return stored, self._encode_ids[mask]
        for bit, t in self._steps:
            out = t.encode(block_no, stored)
            if out is not None:
                stored, mask = out, mask | bit
        return stored, self._encode_ids[mask]

    def decode_into(self, block_no: int, stored: bytes | memoryview, chain_id: int,
                    out: memoryview) -> int:
        """Decode a record's stored bytes, encoded by chain `chain_id`, into `out` (exactly the
        block's length); returns len(out).  Raises DecodeError when the id is not in the table
        or the bytes do not decode to exactly len(out) bytes."""
        steps = self._decode.get(chain_id)
        if steps is None:
            raise DecodeError(f"unknown codec {chain_id}")
        if not steps:
            if len(stored) != len(out):
                raise DecodeError(f"data is {len(stored)} bytes, {len(out)} expected")
            out[:] = stored
            return len(out)
        if len(steps) > 1:
            limit = max_stored_length(len(out))
            for t in reversed(steps[1:]):
                if getattr(t, "binds_chain", False):
                    stored = t.decode(block_no, stored, limit, chain_id=chain_id)
                else:
                    stored = t.decode(block_no, stored, limit)
        if getattr(steps[0], "binds_chain", False):
            return steps[0].decode_into(block_no, stored, out, chain_id=chain_id)
        return steps[0].decode_into(block_no, stored, out)


def writing_chain(level: int = DEFAULT_LEVEL, cipher: Transform | None = None) -> TransformChain:
    """The chain diskimg writes images with: zstd at `level`, left out of a block's chain where
    it does not make the block smaller; then `cipher` (an encrypted image's), on every
    block."""
    return TransformChain.for_writing([make("zstd", level), *([cipher] if cipher else [])])


_READING: dict[tuple, TransformChain] = {}


def reading_chain(table: dict[int, tuple[str, ...]]) -> TransformChain:
    """TransformChain.for_reading(table), made once per distinct table."""
    key = tuple(sorted(table.items()))
    chain = _READING.get(key)
    if chain is None:
        chain = _READING[key] = TransformChain.for_reading(table)
    return chain
