"""The on-disk image format, version 1: header, block records, index, footer and trailer.

This module owns (de)serialisation and the integrity checks of metadata; it knows nothing of
devices, chains or pipelines.  docs/FORMAT.md is the specification; keep the two in step.

Layout of an image file::

    header    magic "DISKIMG\\0", version, JSON metadata, CRC-32C
    records   one per stored block: a 60-byte record header (CRC-32C) + the block's content
              as its transform chain stored it (zstd, or raw); the header's `transforms`
              table says which chain each record's one-byte id names
    index     segments of 48-byte entries, one entry per block of the device, zstd-compressed,
              each segment CRC-32C'd
    footer    JSON: statistics, the index segment table, the index digest, unreadable ranges
    trailer   32 bytes at the very end; written last, so a file without it is incomplete

Why shaped so: records are appended in one sequential pass, each readable on its own (seekable
restore, damage confined to one block); the index comes last because it is only known at the end,
and it is segmented and compressed so that a multi-terabyte device's index neither has to sit
uncompressed in memory nor be read whole to find one block.  CRC-32C guards metadata (cheap,
but crcmod holds the GIL); the block digest in the index and record header guards data (the
algorithm the header's `digest` names, diskimg.format.digest: SHA-256 in format version 1,
BLAKE3 in version 2).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import crcmod.predefined

from diskimg.defaults import DEFAULT_LEVEL
from diskimg.errors import CorruptImage  # noqa: F401  (verify catches fmt.CorruptImage)
from diskimg.errors import IncompleteImage, MetadataError, NotAnImage, SegmentError
from diskimg.errors import UnknownDigest, UnknownFeature, UnknownTransform
from diskimg.format.digest import (
    DEFAULT_DIGEST,
    KNOWN_DIGESTS,
    LEGACY_DIGEST,
    digest_fn,
    zero_digest,
)
from diskimg.format.parity import Geometry, ParityLayoutError
from diskimg.transforms import (
    FIXED_IDS,
    IMPLICIT_TABLE,
    KNOWN_TRANSFORMS,
    MAX_CHAIN_ID,
    max_stored_length,
)
from diskimg.transforms import zstd

crc32c = crcmod.predefined.mkCrcFun("crc-32c")

# Version 1: block digests are SHA-256.  Version 2: the header's `digest` names the algorithm
# (an image whose digest is not SHA-256 is written as version 2, so that a diskimg older than
# the key refuses it instead of reporting every block as damaged; a SHA-256 image is still
# written as version 1, readable by every diskimg).
# Version 3: the header's `features` lists what a reader must understand to read the image
# (encryption, parity, delta records...); a reader refuses a feature it does not know, so that an
# image is never read as if it were something simpler.  An image without features is written as
# version 1 or 2, as before.
FORMAT_VERSION = 3                 # the newest version this diskimg reads and writes
SUPPORTED_VERSIONS = (1, 2, 3)
# the required features this diskimg reads (section 13 of docs/FORMAT.md); each feature that
# changes how bytes are read adds its name here, with its section in docs/FORMAT.md
KNOWN_FEATURES: frozenset[str] = frozenset({"parity", "encrypted", "delta"})  # sections 16-18
ENCRYPTED = "encrypted"
# room left in an encrypted image's header JSON (padded with spaces) so that `diskimg key`
# can add key slots by rewriting the header in place, never moving a record
HEADER_SLOT_ROOM = 4096
FEATURE_DELTA = "delta"
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
ENTRIES_PER_SEGMENT = 16384
INDEX_LEVEL = 3          # zstd level of index segments (small, written once: level 3 is cheap)

# header: magic, version u16, flags u16, json length u32 | json | crc32c u32
HEADER_MAGIC = b"DISKIMG\x00"
_HEADER_FIXED = struct.Struct("<8sHHI")
MAX_HEADER_JSON = 1 << 20

# record header: magic, block u64, stored length u32, raw length u32, codec u8 (the
# transform-chain id), flags u8, reserved u16, sha256 32s | crc32c u32 over the preceding 56 bytes
RECORD_MAGIC = b"DIBK"
_RECORD = struct.Struct("<4sQIIBBH32s")
RECORD_HEADER_SIZE = _RECORD.size + 4  # 60

# index entry: kind u8, codec u8, flags u16, stored length u32, record offset u64, sha256 32s
_ENTRY = struct.Struct("<BBHIQ32s")
ENTRY_SIZE = _ENTRY.size  # 48

# index segment header: magic, first block u64, entry count u32, stored length u32,
# crc32c of the stored payload u32 | crc32c u32 over the preceding 24 bytes
SEGMENT_MAGIC = b"DIIX"
_SEGMENT = struct.Struct("<4sQIII")
SEGMENT_HEADER_SIZE = _SEGMENT.size + 4  # 28

# footer: magic, json length u32 | json | crc32c u32 over magic, length and json
FOOTER_MAGIC = b"DIFT"
_FOOTER_FIXED = struct.Struct("<4sI")

# trailer: magic, footer offset u64, footer length u32, version u16, reserved u16 and u32 |
# crc32c u32 over the preceding 28 bytes
TRAILER_MAGIC = b"DIMGEND\x00"
_TRAILER = struct.Struct("<8sQIHHI")
TRAILER_SIZE = _TRAILER.size + 4  # 32

# block kinds in the index
ZERO = 0      # all zero bytes; no record
DATA = 1      # a record in this image holds the block
PARENT = 2    # unchanged since the parent image: resolve through the chain
UNUSED = 3    # free space of a recognised filesystem; not read, restored as zeros
DELTA = 4     # a record in this image holds the changed pages; the rest is the parent's block
              # (only in images with the "delta" feature, section 18)
KIND_NAMES = {ZERO: "zero", DATA: "data", PARENT: "parent", UNUSED: "unused", DELTA: "delta"}
STORED_KINDS = (DATA, DELTA)   # the kinds whose entry points at a record

KINDS_OF_IMAGE = ("full", "incremental", "differential")

# a record's `codec` is its transform-chain id (diskimg.transforms): these two mean the same in
# every image (the implicit table of images without a `transforms` key)
CODEC_RAW = FIXED_IDS[()]          # 0: no transform, the content itself
CODEC_ZSTD = FIXED_IDS[("zstd",)]  # 1: one zstd frame

# entry and record flags
FLAG_UNREADABLE = 0x1  # the block has unreadable sectors, stored as zeros (rescue mode)
# record flags of the "delta" feature (section 18): a page-hash record follows the record of a
# block stored whole or as a delta; a delta record holds a delta payload, not the block
FLAG_PAGE_HASHES = 0x2
FLAG_DELTA = 0x4


# -- validation of the JSON metadata ---------------------------------------------------------
# Header and footer JSON are checked field by field when they are read (read_header,
# read_footer), so that no later code meets a value of the wrong type or range: a CRC only
# proves that the bytes are what was written, not that what was written makes sense.  Keys this
# version does not know are ignored (section 13 of docs/FORMAT.md); keys it knows must be
# right.

U63 = (1 << 63) - 1           # largest size or offset accepted (a signed 64-bit file offset)
MAX_ENTRIES_PER_SEGMENT = 1 << 20   # a reader's limit: one segment decompresses to <= 48 MiB
_SOURCE_STRINGS = ("path", "model", "serial", "wwn", "backing_file", "ptable_id", "fs_uuid",
                   "fs_type")
_HEX = frozenset("0123456789abcdef")


class MetadataInvalid(ValueError):
    """A field of header or footer JSON that does not fit the format (raised by the checks
    below, turned into MetadataError, with the file named, where the JSON is read)."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        super().__init__(f"{name} is {_show(value)}, {expected} expected")
        self.name = name


def _show(value: object) -> str:
    """A value as a message shows it: short, in JSON's words."""
    if value is None:
        return "null"
    if value is _Missing:
        return "missing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10 ** 30 else f"a {len(str(abs(value)))}-digit number"
        return text
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _obj(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise MetadataInvalid(name, value, "an object")
    return value


def _opt(d: dict, key: str, typ: type, default: object, where: str = ""):
    """d[key] when present (of type `typ`), else `default`."""
    if key not in d:
        return default
    value = d[key]
    if not isinstance(value, typ):
        raise MetadataInvalid(where + key, value, "an object" if typ is dict else "a list")
    return value


def _int(d: dict, key: str, lo: int, hi: int, *, required: bool = True, where: str = "",
         what: str = "a count") -> int | None:
    """d[key], an integer (not a boolean, not a float) in [lo, hi]."""
    if key not in d and not required:
        return None
    value = d.get(key)
    if key not in d or not isinstance(value, int) or isinstance(value, bool):
        raise MetadataInvalid(where + key, value if key in d else _Missing, what)
    if not lo <= value <= hi:
        raise MetadataInvalid(where + key, value, f"{what} from {lo} to {hi}")
    return value


def _str(d: dict, key: str, *, required: bool = True, nullable: bool = False,
         nonempty: bool = False, where: str = "") -> str | None:
    if key not in d:
        if required:
            raise MetadataInvalid(where + key, _Missing, "a string")
        return None
    value = d[key]
    if value is None and nullable:
        return None
    if not isinstance(value, str) or (nonempty and not value):
        raise MetadataInvalid(where + key, value, "a non-empty string" if nonempty else
                              "a string" + (" or null" if nullable else ""))
    return value


def _sha256_hex(d: dict, key: str, where: str = "") -> str:
    value = d.get(key, _Missing)
    if not isinstance(value, str) or len(value) != 64 or not _HEX.issuperset(value):
        raise MetadataInvalid(where + key, value, "64 lower-case hex digits")
    return value


def _list_of_pairs(value: object, name: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """A list of [offset, length] integer pairs, each inside [lo, hi]."""
    if not isinstance(value, list):
        raise MetadataInvalid(name, value, "a list of [offset, length] pairs")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise MetadataInvalid(f"{name}[{i}]", pair, "an [offset, length] pair")
        off, length = pair
        for what, v in (("offset", off), ("length", length)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MetadataInvalid(f"{name}[{i}] {what}", v, "a non-negative integer")
        if off < lo or off + length > hi:
            raise MetadataInvalid(f"{name}[{i}]", pair, f"a range inside bytes {lo}-{hi}")
        out.append((off, length))
    return out


class _MissingType:
    def __repr__(self) -> str:
        return "missing"


_Missing = _MissingType()


def _parent(d: dict) -> dict | None:
    """The parent reference (section 4.3), or None."""
    ref = d.get("parent")
    if ref is None:
        return None
    ref = _obj(ref, "parent")
    _str(ref, "uuid", nonempty=True, where="parent.")
    name = _str(ref, "name", nonempty=True, where="parent.")
    if "/" in name or "\0" in name or name in (".", ".."):
        raise MetadataInvalid("parent.name", name, "a file name (no directory)")
    _sha256_hex(ref, "index_sha256", where="parent.")
    if _str(ref, "kind", where="parent.") not in KINDS_OF_IMAGE:
        raise MetadataInvalid("parent.kind", ref["kind"], "one of " + ", ".join(KINDS_OF_IMAGE))
    return ref


def _transforms(d: dict) -> dict[int, tuple[str, ...]]:
    """The transform-chain table (section 4.4): the implicit one when the header has none."""
    if "transforms" not in d:
        return dict(IMPLICIT_TABLE)
    table = {}
    for key, names in _obj(d["transforms"], "transforms").items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key
                and int(key) <= MAX_CHAIN_ID):
            raise MetadataInvalid("transforms key", key, f"a chain id from 0 to {MAX_CHAIN_ID}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MetadataInvalid(f"transforms.{key}", names, "a list of transform names")
        for name in names:
            if name not in KNOWN_TRANSFORMS:
                raise UnknownTransform(name)
        cid = int(key)
        fixed = IMPLICIT_TABLE.get(cid)
        if fixed is not None and tuple(names) != fixed:
            # readers older than the table read ids 0 and 1 so: they may not mean anything else
            raise MetadataInvalid(f"transforms.{key}", names,
                                  f"{list(fixed)} (what chain id {cid} means in every image)")
        if len(set(names)) != len(names):
            raise MetadataInvalid(f"transforms.{key}", names, "transform names without repeats")
        table[cid] = tuple(names)
    return table


def _encryption(d: dict, features: tuple[str, ...]) -> dict | None:
    """The header's `encryption` object (section 17.2): present exactly when the "encrypted"
    feature is; its structure is checked here, its keys and MAC by diskimg.crypto."""
    if ENCRYPTED not in features:
        if "encryption" in d:
            raise MetadataInvalid("encryption", d["encryption"], "no encryption object in an "
                                                                 "image without the feature")
        return None
    enc = _obj(d.get("encryption", _Missing), "encryption")
    try:
        import uuid as uuidlib   # here: imaging's start-up does not need the module
        uuidlib.UUID(str(d.get("uuid")))
    except ValueError:
        raise MetadataInvalid("uuid", d.get("uuid"), "a UUID in an encrypted image") from None
    if enc.get("cipher") != "aes-256-gcm":
        raise MetadataInvalid("encryption.cipher", enc.get("cipher", _Missing),
                              "'aes-256-gcm'")
    kid = enc.get("key_id", _Missing)
    if not isinstance(kid, str) or len(kid) != 32 or not _HEX.issuperset(kid):
        raise MetadataInvalid("encryption.key_id", kid, "32 lower-case hex digits")
    _sha256_hex(enc, "mac", where="encryption.")
    _str(enc, "sealed", nonempty=True, where="encryption.")
    slots = enc.get("slots", _Missing)
    if not isinstance(slots, list):
        raise MetadataInvalid("encryption.slots", slots, "a list of key slots")
    for i, slot in enumerate(slots):
        where = f"encryption.slots[{i}]."
        _obj(slot, where[:-1])
        _int(slot, "id", 0, 1 << 16, where=where)
        if slot.get("type") not in ("passphrase", "keyfile"):
            raise MetadataInvalid(where + "type", slot.get("type", _Missing),
                                  "'passphrase' or 'keyfile'")
        kdf = _obj(slot.get("kdf", _Missing), where + "kdf")
        _str(kdf, "name", nonempty=True, where=where + "kdf.")
        salt = kdf.get("salt", _Missing)
        if not isinstance(salt, str) or len(salt) != 32 or not _HEX.issuperset(salt):
            raise MetadataInvalid(where + "kdf.salt", salt, "32 lower-case hex digits")
        _str(slot, "wrapped", nonempty=True, where=where)
    return enc


def version_for_digest(name: str) -> int:
    """The format version an image without required features, whose blocks are hashed with
    `name`, is written as."""
    return 1 if name == LEGACY_DIGEST else 2


def _features(d: dict, version: int | None) -> tuple[str, ...]:
    """The header's required features (section 13), checked against the fixed part's version:
    present and non-empty exactly in version 3, each one known to this diskimg."""
    if "features" not in d:
        if version is not None and version >= 3:
            raise MetadataInvalid("features", _Missing, f"a list of features in a "
                                                        f"version-{version} image")
        return ()
    names = d["features"]
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise MetadataInvalid("features", names, "a non-empty list of distinct feature names")
    if version is not None and version < 3:
        raise MetadataInvalid("features", names, f"no features in a version-{version} image")
    for name in names:
        if name not in KNOWN_FEATURES:
            raise UnknownFeature(name)
    return tuple(sorted(names))


def _digest(d: dict, version: int | None) -> str:
    """The header's block digest algorithm (section 3.2), checked against the format version
    the fixed part gave (None: not known, the JSON alone is checked)."""
    if "digest" not in d:
        if version is not None and version >= 2:
            raise MetadataInvalid("digest", _Missing, f"a digest name in a version-{version} "
                                                      f"image")
        return LEGACY_DIGEST
    name = _str(d, "digest", nonempty=True)
    if version == 1 and name != LEGACY_DIGEST:
        # a writer that knows the key writes any other digest as version 2: this is damage
        raise MetadataInvalid("digest", name, f"{LEGACY_DIGEST!r} in a version-1 image")
    if name not in KNOWN_DIGESTS:
        raise UnknownDigest(name)
    if version is not None and version < 3 and version != version_for_digest(name):
        raise MetadataInvalid("digest", name, f"a digest other than {LEGACY_DIGEST!r} in a "
                                              f"version-{version} image")
    return name


def new_image_uuid() -> str:
    """A random (version 4) UUID for a new image, as `str(uuid.uuid4())` gives it; made here
    because the uuid module loads libuuid and the platform module, a few milliseconds of every
    imaging run's start-up (issue 20)."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40      # version 4
    b[8] = b[8] & 0x3F | 0x80      # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_block_size(size: int) -> None:
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise ValueError(
            f"block size {size} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )


@dataclass(frozen=True)
class IndexEntry:
    """One block's index entry.  `sha256` holds the block's digest under the image's
    algorithm (Header.digest: SHA-256 or BLAKE3); the name predates the choice."""

    kind: int
    sha256: bytes
    offset: int = 0
    stored_len: int = 0
    codec: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return _ENTRY.pack(self.kind, self.codec, self.flags, self.stored_len, self.offset,
                           self.sha256)

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, pos: int) -> IndexEntry:
        kind, codec, flags, stored_len, offset, sha = _ENTRY.unpack_from(buf, pos)
        return cls(kind, sha, offset, stored_len, codec, flags)


@dataclass(frozen=True)
class Header:
    """What the image is: written first, never changed."""

    uuid: str
    kind: str                      # "full", "incremental", "differential"
    size: int                      # bytes of the source device
    block_size: int
    source: dict                   # path, model, serial, wwn (None when unknown)
    created: str                   # ISO 8601 UTC
    tool_version: str
    parent: dict | None = None     # uuid, name, index_sha256, kind
    chain: tuple[str, ...] = ()    # uuids from the root full image to this one
    compression: dict = field(default_factory=lambda: {"codec": "zstd", "level": DEFAULT_LEVEL})
    extra: dict = field(default_factory=dict)
    # chain id -> transform names, in the order applied when writing (section 4.4)
    transforms: dict[int, tuple[str, ...]] = field(default_factory=lambda: dict(IMPLICIT_TABLE))
    # the block digest algorithm (diskimg.format.digest); absent in the JSON means SHA-256
    digest: str = LEGACY_DIGEST
    # what a reader must understand to read this image (section 13), sorted; empty for most
    features: tuple[str, ...] = ()
    # the parity geometry (feature "parity", section 16; diskimg.format.parity), or None
    parity: Geometry | None = None
    # an encrypted image's cipher, key id, key slots, sealed fields and MAC (section 17)
    encryption: dict | None = None
    # not in the JSON: the image's keys once unlocked (diskimg.crypto.keys.ImageKeys), which
    # make `hash` and `zero_digest` keyed; and the JSON as read (the MAC covers it)
    keys: object = field(default=None, compare=False, repr=False)
    raw: dict | None = field(default=None, compare=False, repr=False)

    @property
    def format_version(self) -> int:
        """The version written in the header's fixed part and the trailer."""
        return 3 if self.features else version_for_digest(self.digest)

    @property
    def encrypted(self) -> bool:
        return ENCRYPTED in self.features

    @property
    def hash(self):
        """The function hashing a block's content to its digest under this image's algorithm
        (keyed under the chain's id key in an unlocked encrypted image)."""
        if self.keys is not None:
            return self.keys.hash
        return digest_fn(self.digest)

    def zero_digest(self, length: int) -> bytes:
        """The digest of `length` zero bytes under this image's algorithm."""
        if self.keys is not None:
            return self.keys.zero_digest(length)
        return zero_digest(self.digest, length)

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def block_length(self, block: int) -> int:
        return min(self.block_size, self.size - block * self.block_size)

    def zero_run_ok(self, first: int, last: int, sha256: bytes) -> bool:
        """Whether a zero or unused entry shared by blocks first..last has the checksum of
        zeros (a short last block has its own)."""
        return sha256 == self.zero_digest(self.block_length(first)) == \
            self.zero_digest(self.block_length(last))

    def to_json(self) -> dict:
        return {
            "uuid": self.uuid, "kind": self.kind, "size": self.size,
            "block_size": self.block_size, "source": self.source, "created": self.created,
            "tool_version": self.tool_version, "parent": self.parent, "chain": list(self.chain),
            "compression": self.compression, "extra": self.extra,
            "transforms": {str(cid): list(names)
                           for cid, names in sorted(self.transforms.items())},
            "digest": self.digest,
            **({"features": list(self.features)} if self.features else {}),
            **({"parity": self.parity.to_json()} if self.parity is not None else {}),
            **({"encryption": self.encryption} if self.encryption is not None else {}),
        }

    @classmethod
    def from_json(cls, d: object, version: int | None = None) -> Header:
        """The header described by parsed header JSON, every field checked against section 4 of
        docs/FORMAT.md (and the `digest` against the fixed part's `version`, when given); raises
        MetadataInvalid (a ValueError) naming the first bad field, or UnknownTransform or
        UnknownDigest (ValueErrors) for a transform or digest this diskimg does not know."""
        d = _obj(d, "the header JSON")
        digest = _digest(d, version)
        features = _features(d, version)
        kind = _str(d, "kind")
        if kind not in KINDS_OF_IMAGE:
            raise MetadataInvalid("kind", d["kind"], "one of " + ", ".join(KINDS_OF_IMAGE))
        block_size = _int(d, "block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        if block_size & (block_size - 1):
            raise MetadataInvalid("block_size", block_size, "a power of two")
        parent = _parent(d)
        if (kind == "full") != (parent is None):
            raise MetadataInvalid("parent", d.get("parent"),
                                  "null for a full image" if kind == "full"
                                  else f"a parent reference for an {kind} image")
        chain = _opt(d, "chain", list, [])
        for i, u in enumerate(chain):
            if not isinstance(u, str) or not u:
                raise MetadataInvalid(f"chain[{i}]", u, "an image UUID")
        source = _opt(d, "source", dict, {})
        for key in _SOURCE_STRINGS:
            _str(source, key, required=False, nullable=True, where="source.")
        compression = _opt(d, "compression", dict, {})
        _str(compression, "codec", required=False, where="compression.")
        _int(compression, "level", -(1 << 31), (1 << 31) - 1, required=False,
             where="compression.")
        extra = _opt(d, "extra", dict, {})
        for key in ("rescue", "all_blocks"):
            if key in extra and not isinstance(extra[key], bool):
                raise MetadataInvalid(f"extra.{key}", extra[key], "true or false")
        mounted_rw = extra.get("source_mounted_rw", [])
        if not isinstance(mounted_rw, list) or not all(isinstance(m, str) for m in mounted_rw):
            raise MetadataInvalid("extra.source_mounted_rw", mounted_rw,
                                  "a list of mountpoints (strings)")
        transforms = _transforms(d)
        parity = None
        if "parity" in features:
            try:
                parity = Geometry.from_json(d.get("parity", _Missing))
            except ParityLayoutError as err:
                raise MetadataInvalid("parity", d.get("parity", _Missing),
                                      f"the parity geometry ({err})") from None
        encryption = _encryption(d, features)
        if encryption is None and any("aes-256-gcm" in names for names in transforms.values()):
            raise MetadataInvalid("transforms", d.get("transforms"), "no aes-256-gcm chain in "
                                  "an image without the \"encrypted\" feature")
        return cls(
            uuid=_str(d, "uuid", nonempty=True), kind=kind, size=_int(d, "size", 0, U63), block_size=block_size,
            source=source, created=_str(d, "created"), tool_version=_str(d, "tool_version"),
            parent=parent, chain=tuple(chain), compression=compression, extra=extra,
            transforms=transforms, digest=digest, features=features, parity=parity,
            encryption=encryption, raw=d if encryption is not None else None,
        )

    def pack(self, json_length: int | None = None) -> bytes:
        """The header's bytes.  An encrypted image's JSON is padded with spaces (to
        `json_length`, or with HEADER_SLOT_ROOM bytes to spare) so that its key slots can be
        rewritten in place; raises ValueError when it does not fit `json_length`."""
        body = json.dumps(self.to_json(), sort_keys=True).encode()
        if json_length is None and self.encryption is not None:
            json_length = -(-(len(body) + HEADER_SLOT_ROOM) // 4096) * 4096
        if json_length is not None:
            if len(body) > json_length:
                raise ValueError(f"header JSON of {len(body)} bytes does not fit in "
                                 f"{json_length}")
            body += b" " * (json_length - len(body))
        fixed = _HEADER_FIXED.pack(HEADER_MAGIC, self.format_version, 0, len(body))
        return fixed + body + struct.pack("<I", crc32c(fixed + body))


def pack_record(block: int, stored: bytes, raw_len: int, codec: int, flags: int,
                sha256: bytes) -> bytes:
    head = _RECORD.pack(RECORD_MAGIC, block, len(stored), raw_len, codec, flags, 0, sha256)
    return head + struct.pack("<I", crc32c(head))


@dataclass(frozen=True)
class RecordHeader:
    """A record's header.  `sha256` holds the block's digest under the image's algorithm
    (Header.digest), like IndexEntry's."""

    block: int
    stored_len: int
    raw_len: int
    codec: int
    flags: int
    sha256: bytes


def unpack_record(buf: bytes) -> RecordHeader | None:
    """The record header in `buf`, or None when its magic or CRC is wrong."""
    if len(buf) < RECORD_HEADER_SIZE:
        return None
    magic, block, stored_len, raw_len, codec, flags, _, sha = _RECORD.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, _RECORD.size)
    if magic != RECORD_MAGIC or crc != crc32c(buf[: _RECORD.size]):
        return None
    return RecordHeader(block, stored_len, raw_len, codec, flags, sha)


def pack_segment(first_block: int, entries: bytes, level: int = INDEX_LEVEL,
                 seal=None) -> bytes:
    """One index segment; `seal(first, count, payload)` (an encrypted image's) seals the
    compressed entries, and the CRCs cover the sealed bytes."""
    payload = zstd.compress(entries, level)
    if seal is not None:
        payload = seal(first_block, len(entries) // ENTRY_SIZE, payload)
    head = _SEGMENT.pack(SEGMENT_MAGIC, first_block, len(entries) // ENTRY_SIZE, len(payload),
                         crc32c(payload))
    return head + struct.pack("<I", crc32c(head)) + payload


def pack_footer(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    fixed = _FOOTER_FIXED.pack(FOOTER_MAGIC, len(body))
    return fixed + body + struct.pack("<I", crc32c(fixed + body))


def pack_trailer(footer_offset: int, footer_len: int, *, version: int) -> bytes:
    """The trailer; `version` is the header's (Header.format_version)."""
    head = _TRAILER.pack(TRAILER_MAGIC, footer_offset, footer_len, version, 0, 0)
    return head + struct.pack("<I", crc32c(head))


@dataclass(frozen=True)
class Footer:
    """The footer metadata (section 7 of docs/FORMAT.md), checked when read.

    Typed fields for what readers use; `json` is the whole validated JSON for informational
    keys (`rescue`, ...) and `get` reads it like the dict the footer used to be."""

    entries_per_segment: int
    segments: tuple[tuple[int, int], ...]      # (offset, length) of each index segment
    index_sha256: str
    unreadable: tuple[tuple[int, int], ...]    # byte ranges of the source, sorted, disjoint
    completed: str | None
    stats: dict                                # name -> non-negative integer
    used: dict | None
    offset: int                                # where the footer starts in the file
    json: dict

    def get(self, key: str, default: object = None) -> object:
        return self.json.get(key, default)

    @classmethod
    def from_json(cls, d: object, header: Header, data_start: int, offset: int) -> Footer:
        """The footer described by parsed footer JSON of an image with `header`, whose records
        start at `data_start` and whose footer is at `offset`; raises MetadataInvalid."""
        d = _obj(d, "the footer JSON")
        index = _obj(d.get("index", _Missing), "index")
        eps = _int(index, "entries_per_segment", 1, MAX_ENTRIES_PER_SEGMENT, where="index.",
                   what="a number of entries")
        segments = _list_of_pairs(index.get("segments", _Missing), "index.segments",
                                  data_start, offset)
        expected = -(-header.blocks // eps)
        if len(segments) != expected:
            raise ValueError(f"index.segments lists {len(segments)} segments, {expected} "
                             f"expected for {header.blocks} blocks")
        for i, (_, length) in enumerate(segments):
            if length < SEGMENT_HEADER_SIZE:
                raise MetadataInvalid(f"index.segments[{i}] length", length,
                                      f"at least {SEGMENT_HEADER_SIZE} bytes")
        unreadable = _list_of_pairs(_opt(d, "unreadable", list, []), "unreadable", 0,
                                    header.size)
        end = 0
        for i, (off, length) in enumerate(unreadable):
            if length == 0 or off < end:
                raise ValueError(f"unreadable[{i}] [{off}, {length}] is empty, or overlaps or "
                                 f"comes before the range listed before it")
            end = off + length
        stats = _opt(d, "stats", dict, {})
        for key in stats:
            _int(stats, key, 0, U63, where="stats.")
        used = d.get("used")
        if used is not None:
            _obj(used, "used")
            _int(used, "used_bytes", 0, header.size, required=False, where="used.",
                 what="a number of bytes")
        if "rescue" in d:
            _obj(d["rescue"], "rescue")
        return cls(entries_per_segment=eps, segments=tuple(segments),
                   index_sha256=_sha256_hex(index, "sha256", where="index."),
                   unreadable=tuple(unreadable),
                   completed=_str(d, "completed", required=False), stats=stats, used=used,
                   offset=offset, json=d)


class Readable(Protocol):
    """What the readers below need of an image: bytes at an offset (a store.StoreReader, whose
    pread raises the diskimg error for an I/O error, naming the path)."""

    def pread(self, length: int, offset: int) -> bytes: ...


def _load_json(body: bytes) -> object:
    """Parsed JSON; raises ValueError for anything that is not (too deep a nesting included,
    which json.loads answers with RecursionError)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_header(image: Readable, path: str) -> tuple[Header, int]:
    """The header of `image` (named `path` in errors), and the offset where records start.
    Raises NotAnImage, IncompleteImage (cut inside the header), MetadataError, and the error
    of `image.pread` (a DiskIOError or PermissionDenied)."""
    fixed = image.pread(_HEADER_FIXED.size, 0)
    if not fixed:
        raise NotAnImage(path, "is empty, not a diskimg image")
    if fixed[:8] != HEADER_MAGIC and not HEADER_MAGIC.startswith(fixed):
        raise NotAnImage(path, "not a diskimg image (no DISKIMG magic at the start)")
    if len(fixed) < _HEADER_FIXED.size:
        raise IncompleteImage(path, f"image is truncated inside its header (the file is "
                                    f"{len(fixed)} bytes)")
    _, version, _, jlen = _HEADER_FIXED.unpack(fixed)
    if version not in SUPPORTED_VERSIONS:
        raise NotAnImage(path, f"image format version {version} is not supported "
                               f"(this diskimg reads versions "
                               f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    if jlen > MAX_HEADER_JSON:
        raise MetadataError(path, "header", f"metadata length {jlen} is implausible")
    body = image.pread(jlen + 4, _HEADER_FIXED.size)
    if len(body) < jlen + 4:
        raise IncompleteImage(path, f"image is truncated inside its header (the file is "
                                    f"{_HEADER_FIXED.size + len(body)} bytes, the header "
                                    f"{_HEADER_FIXED.size + jlen + 4})")
    (crc,) = struct.unpack_from("<I", body, jlen)
    if crc != crc32c(fixed + body[:jlen]):
        raise MetadataError(path, "header", "CRC-32C mismatch; the image cannot be trusted")
    try:
        header = Header.from_json(_load_json(body[:jlen]), version)
    except (UnknownTransform, UnknownDigest, UnknownFeature) as err:
        raise NotAnImage(path, str(err)) from err
    except ValueError as err:
        raise MetadataError(path, "header", str(err)) from err
    return header, _HEADER_FIXED.size + jlen + 4


def read_footer(image: Readable, path: str, file_size: int, header: Header, data_start: int) -> Footer:
    """The footer metadata, found through the trailer and checked against `header` (whose
    records start at `data_start`).  Raises IncompleteImage (no valid trailer), MetadataError
    (trailer or footer damaged) and the error of `image.pread`."""
    partial_hint = ("image is incomplete (no trailer): it is still being written, was "
                    "interrupted, or was cut short")
    if file_size < data_start + TRAILER_SIZE:
        raise IncompleteImage(path, partial_hint)
    buf = image.pread(TRAILER_SIZE, file_size - TRAILER_SIZE)
    if len(buf) < TRAILER_SIZE:
        raise IncompleteImage(path, partial_hint)
    magic, f_off, f_len, version, _, _ = _TRAILER.unpack_from(buf)
    (crc,) = struct.unpack_from("<I", buf, _TRAILER.size)
    if magic != TRAILER_MAGIC:
        raise IncompleteImage(path, partial_hint)
    if crc != crc32c(buf[: _TRAILER.size]):
        raise MetadataError(path, "trailer", "CRC-32C mismatch")
    if version != header.format_version:
        raise MetadataError(path, "trailer", f"it says format version {version}, the header "
                                             f"says {header.format_version}")
    if f_off + f_len + TRAILER_SIZE != file_size or f_len < _FOOTER_FIXED.size + 4 \
            or f_off < data_start:
        raise MetadataError(path, "trailer", f"it points outside the file (footer at {f_off}, "
                                             f"{f_len} bytes)")
    fbuf = image.pread(f_len, f_off)
    if len(fbuf) < f_len:
        raise IncompleteImage(path, partial_hint)
    fmagic, jlen = _FOOTER_FIXED.unpack_from(fbuf)
    if fmagic != FOOTER_MAGIC or jlen + _FOOTER_FIXED.size + 4 != f_len:
        raise MetadataError(path, "footer", "bad magic or length")
    (fcrc,) = struct.unpack_from("<I", fbuf, f_len - 4)
    if fcrc != crc32c(fbuf[: f_len - 4]):
        raise MetadataError(path, "footer", "CRC-32C mismatch")
    try:
        return Footer.from_json(_load_json(fbuf[_FOOTER_FIXED.size: f_len - 4]), header,
                                data_start, f_off)
    except ValueError as err:
        raise MetadataError(path, "footer", str(err)) from err


def read_segment(image: Readable, path: str, offset: int, length: int, first: int,
                 count: int, unseal=None) -> bytes:
    """The raw entries of one index segment, checked against its CRCs and expected place.
    Raises SegmentError and the error of `image.pread`."""
    return check_segment(image.pread(length, offset), path, length, first, count, unseal)


def check_segment(buf: bytes, path: str, length: int, first: int, count: int,
                  unseal=None) -> bytes:
    """The raw entries of the index segment read into `buf` (`length` bytes were asked for),
    checked against its CRCs and expected place.  Raises SegmentError."""
    if len(buf) != length or length < SEGMENT_HEADER_SIZE:
        raise SegmentError(path, first, count, "is truncated")
    magic, s_first, s_count, s_len, s_crc = _SEGMENT.unpack_from(buf)
    (hcrc,) = struct.unpack_from("<I", buf, _SEGMENT.size)
    if magic != SEGMENT_MAGIC or hcrc != crc32c(buf[: _SEGMENT.size]):
        raise SegmentError(path, first, count, "header damaged (CRC-32C mismatch)")
    if s_first != first or s_count != count or s_len + SEGMENT_HEADER_SIZE != length:
        raise SegmentError(path, first, count, "does not match the footer's segment table")
    payload = buf[SEGMENT_HEADER_SIZE:]
    if crc32c(payload) != s_crc:
        raise SegmentError(path, first, count, "damaged (CRC-32C mismatch)")
    if unseal is False:      # the structure only (verify --no-key)
        return b""
    if unseal is not None:   # an encrypted image's: authenticated, then decompressed
        try:
            payload = unseal(first, count, payload)
        except ValueError as err:   # DecodeError
            raise SegmentError(path, first, count, f"fails authentication ({err})") from err
    try:
        raw = zstd.decompress(payload, count * ENTRY_SIZE)
    except zstd.Error as err:
        raise SegmentError(path, first, count, f"does not decompress: {err}") from err
    if len(raw) != count * ENTRY_SIZE:
        raise SegmentError(path, first, count, "has the wrong number of entries")
    return raw


def iter_entries(raw: bytes) -> Iterator[IndexEntry]:
    for pos in range(0, len(raw), ENTRY_SIZE):
        yield IndexEntry.unpack_from(raw, pos)
