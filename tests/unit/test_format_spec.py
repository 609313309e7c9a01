"""docs/FORMAT.md is enough to read an image: an independent reader written only from it.

The reader below (`SpecReader`, `read_chain`) uses struct, hashlib, hmac, blake3, json, zstandard,
the `cryptography` package's AES-GCM and HKDF (encrypted images, section 17) and a pure Python
CRC-32C built from the parameters in the document; it does not import diskimg.  It
checks every CRC, every block digest (SHA-256 in version 1, the header's `digest` in version 2)
and the index digest, and must reproduce the source bytes of images made by diskimg (full,
incremental, a chain of incrementals, differential; with either digest; with delta records,
section 16: page hashes checked, deltas applied on their parent's block), and reject truncated
and damaged files.  diskimg itself is only used to *make* the images.  The page hashes are
XXH3-64 (section 16.1), computed with the `xxhash` package.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid as uuidlib
import os
import random
import struct
from pathlib import Path

import zlib

import blake3
import pytest
import zstandard

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

# ------------------------------------------------------------------------------------------------
# the reader, from docs/FORMAT.md only


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        x = i
        for _ in range(8):
            x = (x >> 1) ^ 0x82F63B78 if x & 1 else x >> 1
        table.append(x)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), reflected, init 0xFFFFFFFF, final xor 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class SpecError(Exception):
    """The file is not a readable image (or a block of it is not)."""


ZERO, DATA, PARENT, UNUSED, DELTA = 0, 1, 2, 3, 4
# section 18: record flags and the page size of delta records
FLAG_PAGE_HASHES, FLAG_DELTA = 0x2, 0x4
PAGE = 4096
HEADER_FIXED = struct.Struct("<8sHHI")           # magic, version, flags, json length
RECORD = struct.Struct("<4sQIIBBH32sI")          # ... sha256, crc
ENTRY = struct.Struct("<BBHIQ32s")
SEGMENT = struct.Struct("<4sQIIII")              # magic, first, count, stored, payload crc, crc
FOOTER_FIXED = struct.Struct("<4sI")
TRAILER = struct.Struct("<8sQIHHII")
HEADER_REQUIRED = ("uuid", "kind", "size", "block_size", "created", "tool_version")
# section 4.4: the transforms this reader knows, the table of an image without one, and the ids
# every table must leave as they are
KNOWN_TRANSFORMS = {"zstd", "aes-256-gcm"}
# section 13: the features this reader knows
KNOWN_FEATURES = {"parity", "encrypted", "delta"}
IMPLICIT_TRANSFORMS = {0: [], 1: ["zstd"]}
# section 3.2: the block digests, by the header's `digest` name
DIGESTS = {"sha256": lambda b: hashlib.sha256(b).digest(),
           "blake3": lambda b: blake3.blake3(b).digest()}


def features(h: dict, version: int) -> set[str]:
    """The header's required features (section 13): exactly in version 3, each one known."""
    if version < 3:
        if "features" in h:
            raise SpecError(f"features in a version-{version} image")
        return set()
    names = h.get("features")
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise SpecError("version-3 image without a non-empty list of distinct features")
    for n in names:
        if n not in KNOWN_FEATURES:
            raise SpecError(f"made by a newer program: format feature {n!r} unknown")
    return set(names)


def page_hash_vector(data: bytes) -> bytes:
    """Section 16.1: XXH3-64 (seed 0) of each 4096-byte page, u64 little-endian."""
    import xxhash
    return b"".join(struct.pack("<Q", xxhash.xxh3_64_intdigest(data[i:i + PAGE]))
                    for i in range(0, len(data), PAGE))


def block_digest(h: dict, version: int) -> str:
    """The header's block digest algorithm, checked against the format version (section 3.2)."""
    if version == 1:
        if h.get("digest", "sha256") != "sha256":
            raise SpecError("header digest is not sha256 in a version-1 image")
        return "sha256"
    name = h.get("digest")
    if not isinstance(name, str):
        raise SpecError(f"header digest missing in a version-{version} image")
    if name not in DIGESTS:
        raise SpecError(f"made by a newer program: digest {name!r} unknown")
    if name == "sha256" and version == 2:
        raise SpecError("header digest sha256 in a version-2 image")
    return name


def _u32(buf: bytes, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def transform_table(h: dict) -> dict[int, list[str]]:
    """The header's chain id -> transform names table, checked as section 4.4 says."""
    if "transforms" not in h:
        return dict(IMPLICIT_TRANSFORMS)
    raw = h["transforms"]
    if not isinstance(raw, dict):
        raise SpecError("header transforms is not an object")
    table = {}
    for key, names in raw.items():
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key or int(key) > 255:
            raise SpecError(f"header transforms: bad chain id {key!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names):
            raise SpecError(f"header transforms: chain {key} is not a list of distinct names")
        unknown = [n for n in names if n not in KNOWN_TRANSFORMS]
        if unknown:
            raise SpecError(f"made by a newer program: transform {unknown[0]!r} unknown")
        cid = int(key)
        if cid in IMPLICIT_TRANSFORMS and names != IMPLICIT_TRANSFORMS[cid]:
            raise SpecError(f"header transforms: chain id {cid} redefined")
        table[cid] = names
    return table


# section 17: encrypted images
def hkdf(ikm: bytes, info: bytes, salt: bytes = b"", length: int = 32) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None,
                info=info).derive(ikm)


def aes_open(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    if len(blob) < 28:
        raise SpecError(f"{what}: sealed data too short")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise SpecError(f"{what}: fails authentication") from None


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Keys:
    """The keys of an encrypted image (16.1), its master key opened from a key-file slot
    (16.5) with `key_file` (the key file's bytes)."""

    def __init__(self, h: dict, key_file: bytes | None) -> None:
        enc = h.get("encryption")
        if not isinstance(enc, dict) or enc.get("cipher") != "aes-256-gcm":
            raise SpecError("encrypted image without a valid encryption object")
        if key_file is None:
            raise SpecError("encrypted image: no key")
        master = None
        for slot in enc.get("slots", []):
            if slot.get("type") != "keyfile" or slot["kdf"].get("name") != "hkdf-sha256":
                continue
            kek = hkdf(key_file, b"diskimg keyfile slot v1", bytes.fromhex(slot["kdf"]["salt"]))
            aad = b"diskimg-slot-v1" + canonical({k: slot[k] for k in ("id", "type", "kdf")})
            try:
                mk = aes_open(kek, base64.b64decode(slot["wrapped"]), aad, "slot")
            except SpecError:
                continue
            if hkdf(mk, b"diskimg key id v1", length=16).hex() == enc["key_id"]:
                master = mk
                break
        if master is None:
            raise SpecError("wrong key: no key slot opens")
        self.uuid16 = uuidlib.UUID(h["uuid"]).bytes
        self.id_key = hkdf(master, b"diskimg block-id key v1")
        self.data = hkdf(master, b"diskimg data key v1", self.uuid16)
        self.meta = hkdf(master, b"diskimg metadata key v1", self.uuid16)
        mac_key = hkdf(master, b"diskimg header mac v1", self.uuid16)
        covered = dict(h)
        covered["encryption"] = {k: v for k, v in enc.items() if k not in ("slots", "mac")}
        mac = hmac.new(mac_key, b"diskimg-header-v1" + canonical(covered), "sha256").hexdigest()
        if not hmac.compare_digest(mac, enc.get("mac", "")):
            raise SpecError("header fails authentication")
        sealed = json.loads(aes_open(self.meta, base64.b64decode(enc["sealed"]),
                                     b"diskimg-header-v1" + self.uuid16, "header"))
        self.source = sealed["source"]

    def digest(self, name: str):
        if name == "sha256":
            return lambda b: hmac.digest(self.id_key, b, "sha256")
        return lambda b: blake3.blake3(b, key=self.id_key).digest()


def _unzstd(payload: bytes, expected: int, what: str) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as err:
        raise SpecError(f"{what}: does not decompress: {err}") from err
    if len(out) != expected:
        raise SpecError(f"{what}: decompresses to {len(out)} bytes, {expected} expected")
    return out


# ------------------------------------------------------------------------------------------------
# section 16: the parity container, from docs/FORMAT.md only

def _gf_tables() -> tuple[list[int], list[int]]:
    exp, log = [0] * 512, [0] * 256
    x = 1
    for i in range(255):
        exp[i], log[x] = x, i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


GF_EXP, GF_LOG = _gf_tables()


def gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else GF_EXP[GF_LOG[a] + GF_LOG[b]]


def gf_inverse(matrix: list[list[int]]) -> list[list[int]]:
    n = len(matrix)
    a = [row[:] + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c])
        a[c], a[p] = a[p], a[c]
        inv = GF_EXP[255 - GF_LOG[a[c][c]]]
        a[c] = [gf_mul(v, inv) for v in a[c]]
        for r in range(n):
            if r != c and a[r][c]:
                f = a[r][c]
                a[r] = [v ^ gf_mul(f, w) for v, w in zip(a[r], a[c])]
    return [row[n:] for row in a]


def encoding_matrix(k: int, m: int) -> list[list[int]]:
    """E = V * inverse(V[0..k-1]), V as section 16.4 says."""
    v = [[1] + [0] * (k - 1)] + [[GF_EXP[(r - 1) * c % 255] for c in range(k)]
                                 for r in range(1, k + m)]
    top = gf_inverse(v[:k])
    return [[_dot(row, [top[j][c] for j in range(k)]) for c in range(k)] for row in v]


def _dot(a: list[int], b: list[int]) -> int:
    out = 0
    for x, y in zip(a, b):
        out ^= gf_mul(x, y)
    return out


_MUL_TABLES = [bytes(gf_mul(c, b) for b in range(256)) for c in range(256)]


def combine(coefs: list[int], shares: list[bytes]) -> bytes:
    """sum of coef * share, byte by byte, over GF(2^8)."""
    acc = 0
    for c, share in zip(coefs, shares):
        if c:
            acc ^= int.from_bytes(share.translate(_MUL_TABLES[c]), "little")
    return acc.to_bytes(len(shares[0]), "little")


def crc32(data: bytes) -> int:
    """The slice checksum (section 16.3): zlib's CRC-32."""
    return zlib.crc32(data)


def unwrap_parity(buf: bytes, geom: dict, heal: bool = False) -> bytes:
    """The logical stream of a parity image (section 16), every slot checked against its table
    and every parity slot against the code; with `heal`, groups with bad slots are rebuilt from
    any k good ones instead of failing."""
    try:
        s, k, m, depth = (geom[key] for key in ("slice", "data", "parity", "depth"))
    except (KeyError, TypeError) as err:
        raise SpecError(f"header parity invalid: {err}") from err
    if geom.get("checksum") != "crc32" or k < 1 or m < 1 or k + m > 256:
        raise SpecError("header parity invalid")
    if len(buf) < 32 or buf[-32:-24] != b"DIPTEND\0":
        raise SpecError("no parity trailer")
    t_off, t_len, t_version, _, _, t_crc = struct.unpack_from("<QIHHII", buf, len(buf) - 24)
    if t_crc != crc32(buf[-32:-4]) or t_version != 1 or t_off + 2 * t_len + 32 != len(buf):
        raise SpecError("parity trailer damaged")
    tail = buf[t_off:t_off + t_len]
    magic, jlen, hlen, tlen = struct.unpack_from("<8sIII", tail)
    if magic != b"DIPARITY" or 24 + jlen + hlen + tlen != t_len or \
            _u32(tail, t_len - 4) != crc32(tail[:-4]):
        raise SpecError("tail damaged")
    meta = json.loads(tail[20:20 + jlen])
    if any(meta[key] != geom[key] for key in ("slice", "data", "parity", "depth")):
        raise SpecError("tail and header disagree on the geometry")
    size = meta["logical_size"]
    cap = k * depth * s
    windows = size // cap + 1
    assert meta["windows"] == windows

    def table_len(x: int) -> int:
        return 28 + 4 * x + 4

    def pad(x: int) -> int:
        return -(-x // s) * s

    full = (k + m) * depth * s + 2 * pad(table_len((k + m) * depth))
    matrix = encoding_matrix(k, m)
    out = bytearray()
    for w in range(windows):
        if w < windows - 1:
            d, n = depth, k
        else:
            slots = max(1, -(-(size - w * cap) // s))
            d = depth if w else min(depth, -(-slots // k))
            n = -(-slots // d)
        phys = w * full
        count = (n + m) * d
        data = buf[phys:phys + n * d * s]
        table_at = phys + n * d * s
        parity_at = table_at + pad(table_len(count))
        parity = buf[parity_at:parity_at + m * d * s]
        table = buf[table_at:table_at + table_len(count)]
        if table[:4] != b"DIPC" or struct.unpack_from("<QIHHII", table, 4) != \
                (w, count, k, m, depth, s) or \
                _u32(table, len(table) - 4) != crc32(table[:-4]):
            raise SpecError(f"window {w}: checksum table damaged")
        crcs = struct.unpack_from(f"<{count}I", table, 28)
        slot = [data[i * s:(i + 1) * s] for i in range(n * d)] + \
               [parity[i * s:(i + 1) * s] for i in range(m * d)]
        good = [crc32(x) == crcs[i] for i, x in enumerate(slot)]
        for g in range(d):
            members = [g + i * d for i in range(n)] + [n * d + g + i * d for i in range(m)]
            shares = {i if i < n else k + (i - n): slot[p] for i, p in enumerate(members)
                      if good[p]}
            shares.update({i: bytes(s) for i in range(n, k)})
            if len(shares) == k + m:
                for i in range(m):   # the stored parity is the code's
                    if combine(matrix[k + i], [shares[c] for c in range(k)]) != shares[k + i]:
                        raise SpecError(f"window {w} group {g}: parity is not the code's")
                continue
            if not heal or len(shares) < k:
                raise SpecError(f"window {w} group {g}: {k + m - len(shares)} bad slots")
            use = sorted(shares)[:k]
            inv = gf_inverse([matrix[j] for j in use])
            for i in range(n):
                if not good[members[i]]:
                    slot[members[i]] = combine(inv[i], [shares[j] for j in use])
        out += b"".join(slot[:n * d])
        if w:   # the previous window's table, again, after this one's parity
            at = parity_at + m * d * s
            assert buf[at:at + 12] == b"DIPC" + struct.pack("<Q", w - 1)
    assert out[size:] == bytes(len(out) - size)
    return bytes(out[:size])


class SpecReader:
    """One complete image, opened and checked as FORMAT.md sections 4, 7, 8 and 9 say (and
    section 16 for an image with parity, whose logical stream is read)."""

    def __init__(self, path: str | Path, key_file: bytes | None = None,
                 heal: bool = False) -> None:
        self.path = Path(path)
        self.key_file = key_file
        self.buf = self.path.read_bytes()
        self.heal = heal
        if heal:   # section 16.6: the geometry from the tail, whatever the header at 0 holds
            tail_at, = struct.unpack_from("<Q", self.buf, len(self.buf) - 24)
            jlen, = struct.unpack_from("<I", self.buf, tail_at + 8)
            geom = json.loads(self.buf[tail_at + 20:tail_at + 20 + jlen])
            self.buf = unwrap_parity(self.buf, geom, heal=True)
            self.logical = True
        self._read_header()
        self._read_trailer_and_footer()
        self._entries: list[tuple] | None = None

    # section 4
    def _read_header(self) -> None:
        buf = self.buf
        if len(buf) < HEADER_FIXED.size or buf[:8] != b"DISKIMG\0":
            raise SpecError("not an image: no DISKIMG magic")
        _, version, _flags, jlen = HEADER_FIXED.unpack_from(buf)
        if version not in (1, 2, 3):
            raise SpecError(f"unsupported format version {version}")
        if jlen > 1 << 20:
            raise SpecError("header JSON length implausible")
        if len(buf) < 20 + jlen:
            raise SpecError("truncated inside the header")
        if _u32(buf, 16 + jlen) != crc32c(buf[:16 + jlen]):
            raise SpecError("header CRC mismatch")
        try:
            h = json.loads(buf[16:16 + jlen])
        except ValueError as err:
            raise SpecError(f"header JSON invalid: {err}") from err
        if not isinstance(h, dict) or any(k not in h for k in HEADER_REQUIRED):
            raise SpecError("header JSON lacks a required key")
        features = h.get("features")
        if version == 3:   # section 13
            if not isinstance(features, list) or not features:
                raise SpecError("unsupported format version 3 without a features list")
            if any(f not in KNOWN_FEATURES for f in features):
                raise SpecError(f"made by a newer program: features {features}")
        elif features is not None:
            raise SpecError(f"features in a version-{version} image")
        if version == 3 and "parity" in features and not getattr(self, "logical", False):
            self.buf = unwrap_parity(self.buf, h.get("parity"), heal=self.heal)
            self.logical = True
            return self._read_header()
        bs = h["block_size"]
        if not isinstance(bs, int) or bs < 65536 or bs > 16 << 20 or bs & (bs - 1):
            raise SpecError(f"bad block size {bs!r}")
        self.version = version
        self.header = h
        self.uuid: str = h["uuid"]
        self.size: int = h["size"]
        self.block_size: int = bs
        self.blocks = -(-self.size // bs)
        self.data_start = 20 + jlen
        self.transforms = transform_table(h)
        self.digest = block_digest(h, version)
        self.hash = DIGESTS[self.digest]
        self.features = set(features or ())   # checked above (section 13)
        extra = h.get("extra") if isinstance(h.get("extra"), dict) else {}
        self.page_hashes = "page_hashes" in extra
        features = h.get("features")
        if (version == 3) != (features is not None):
            raise SpecError("features present exactly in version 3")
        if features is not None:
            if not isinstance(features, list) or not features:
                raise SpecError("features is not a non-empty list")
            unknown = [f for f in features if f not in KNOWN_FEATURES]
            if unknown:
                raise SpecError(f"made by a newer program: feature {unknown[0]!r} unknown")
        self.keys = None
        if "encrypted" in (features or ()):
            self.keys = Keys(h, self.key_file)
            self.hash = self.keys.digest(self.digest)
        elif self.key_file is not None:
            raise SpecError("a key was given for an image that is not encrypted")

    # sections 7, 8, 9 (opening)
    def _read_trailer_and_footer(self) -> None:
        buf, n = self.buf, len(self.buf)
        if n < 32 or buf[n - 32:n - 24] != b"DIMGEND\0":
            raise SpecError("incomplete image: no trailer")
        t = buf[n - 32:]
        _, f_off, f_len, t_version, _, _, t_crc = TRAILER.unpack(t)
        if t_crc != crc32c(t[:28]):
            raise SpecError("trailer CRC mismatch")
        if t_version != self.version:
            raise SpecError("trailer version differs from the header's")
        if f_off + f_len + 32 != n:
            raise SpecError("footer does not end where the trailer starts")
        if f_len < 12:
            raise SpecError("footer too short")
        f = buf[f_off:f_off + f_len]
        magic, jlen = FOOTER_FIXED.unpack_from(f)
        if magic != b"DIFT" or jlen + 12 != f_len:
            raise SpecError("footer magic or length wrong")
        if _u32(f, 8 + jlen) != crc32c(f[:8 + jlen]):
            raise SpecError("footer CRC mismatch")
        try:
            self.footer = json.loads(f[8:8 + jlen])
            index = self.footer["index"]
            self.eps = int(index["entries_per_segment"])
            self.segments = [(int(o), int(n_)) for o, n_ in index["segments"]]
            self.index_sha256 = index["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise SpecError(f"footer JSON invalid: {err}") from err
        if self.eps < 1 or len(self.segments) != -(-self.blocks // self.eps):
            raise SpecError("segment table does not fit the number of blocks")
        if self.keys is not None:           # 16.6: the sealed rest of the footer
            clear = {k: v for k, v in self.footer.items() if k != "sealed"}
            rest = json.loads(aes_open(self.keys.meta, base64.b64decode(self.footer["sealed"]),
                                       b"diskimg-footer-v1" + self.keys.uuid16 +
                                       canonical(clear), "footer"))
            self.footer = {**rest, **clear}

    # section 9: entries
    def segment(self, s: int) -> bytes:
        off, length = self.segments[s]
        first = s * self.eps
        count = min(self.eps, self.blocks - first)
        seg = self.buf[off:off + length]
        if length < 28 or len(seg) != length:
            raise SpecError(f"segment {s} truncated")
        magic, s_first, s_count, s_len, p_crc, h_crc = SEGMENT.unpack_from(seg)
        if magic != b"DIIX" or h_crc != crc32c(seg[:24]):
            raise SpecError(f"segment {s} header damaged")
        if s_first != first or s_count != count or s_len + 28 != length:
            raise SpecError(f"segment {s} does not match the footer's table")
        payload = seg[28:]
        if crc32c(payload) != p_crc:
            raise SpecError(f"segment {s} payload CRC mismatch")
        if self.keys is not None:
            payload = aes_open(self.keys.meta, payload, b"diskimg-index-v1" + self.keys.uuid16
                               + struct.pack("<QI", first, count), f"segment {s}")
        return _unzstd(payload, count * 48, f"segment {s}")

    def entries(self) -> list[tuple]:
        """(kind, codec, flags, stored_length, offset, sha256) per block; checks the digest."""
        if self._entries is None:
            raw = b"".join(self.segment(s) for s in range(len(self.segments)))
            if hashlib.sha256(raw).hexdigest() != self.index_sha256:
                raise SpecError("index digest differs from the footer's")
            self._entries = [ENTRY.unpack_from(raw, i * 48) for i in range(self.blocks)]
        return self._entries

    def length(self, n: int) -> int:
        return min(self.block_size, self.size - n * self.block_size)

    # section 9: one block of this image
    def _record(self, n: int, entry: tuple, raw_len: int | None, flags: int) -> tuple[bytes, int]:
        """The stored bytes of the record `entry` points at, undone (section 4.4); with
        `raw_len` None (a delta, 16.3) the record's own raw length, at most `limit`."""
        _kind, e_codec, _flags, e_stored, e_off, e_sha = entry
        if e_codec not in self.transforms:
            raise SpecError(f"block {n}: unknown codec {e_codec}")
        rec = self.buf[e_off:e_off + 60 + e_stored]
        if len(rec) < 60:
            raise SpecError(f"block {n}: record truncated")
        magic, block, stored, r_raw, codec, rflags, _res, r_sha, r_crc = RECORD.unpack_from(rec)
        if magic != b"DIBK" or r_crc != crc32c(rec[:56]):
            raise SpecError(f"block {n}: record header damaged")
        if block != n or stored != e_stored or codec != e_codec or r_sha != e_sha or \
                (raw_len is not None and r_raw != raw_len) or rflags & FLAG_DELTA != flags:
            raise SpecError(f"block {n}: record does not match the index")
        if len(rec) != 60 + stored:
            raise SpecError(f"block {n}: record truncated")
        return self._undo(n, rec[60:], codec, r_raw), e_off + 60 + stored

    def _undo(self, n: int, data: bytes, codec: int, length: int) -> bytes:
        chain = self.transforms[codec]
        stored = len(data)           # the record's stored length (bound by encryption, 17.4)
        for i in reversed(range(len(chain))):      # undo the transforms, the last one first
            limit = length if i == 0 else length + length // 128 + 1024
            if chain[i] == "zstd":
                data = _unzstd(data, limit, f"block {n}")
            elif chain[i] == "aes-256-gcm":          # 17.4
                if self.keys is None:
                    raise SpecError(f"block {n}: encrypted record in a plain image")
                # the block's length, also for its page-hash and delta records (18.1, 18.3)
                aad = b"diskimg-record-v1" + self.keys.uuid16 + struct.pack(
                    "<QIIB", n, self.length(n), stored, codec)
                data = aes_open(self.keys.data, data, aad, f"block {n}")
        if len(data) != length:
            raise SpecError(f"block {n}: {len(data)} bytes, {length} expected")
        return data

    def check_page_hashes(self, n: int, at: int, content: bytes) -> None:
        """Section 16.1: the page-hash record right after a stored block's record."""
        count = -(-self.length(n) // PAGE)
        rec = self.buf[at:at + 60]
        if len(rec) < 60:
            raise SpecError(f"block {n}: page-hash record truncated")
        magic, block, stored, raw_len, codec, rflags, _res, r_sha, r_crc = RECORD.unpack_from(rec)
        if magic != b"DIBK" or r_crc != crc32c(rec[:56]) or not rflags & FLAG_PAGE_HASHES:
            raise SpecError(f"block {n}: page-hash record missing or damaged")
        if block != n or raw_len != 8 * count or codec not in self.transforms:
            raise SpecError(f"block {n}: page-hash record does not match the block")
        vector = self._undo(n, self.buf[at + 60:at + 60 + stored], codec, raw_len)
        if self.hash(vector) != r_sha:
            raise SpecError(f"block {n}: page-hash record digest mismatch")
        if vector != page_hash_vector(content):
            raise SpecError(f"block {n}: page hashes differ from the block's pages")

    def read_data(self, n: int, entry: tuple) -> bytes:
        assert entry[0] == DATA
        length = self.length(n)
        data, after = self._record(n, entry, length, 0)
        if self.hash(data) != entry[5]:
            raise SpecError(f"block {n}: {self.digest} mismatch")
        if self.page_hashes:
            self.check_page_hashes(n, after, data)
        return data

    def read_delta(self, n: int, entry: tuple, base: bytes) -> bytes:
        """Section 16.3: the delta payload applied to `base`, the parent's block."""
        if "delta" not in self.features:
            raise SpecError(f"block {n}: unknown kind {DELTA}")
        length = self.length(n)
        payload, after = self._record(n, entry, None, FLAG_DELTA)
        count = -(-length // PAGE)                 # pages in the block
        nmap = -(-count // 8)                      # bitmap bytes
        pages = [p for p in range(count) if payload[p // 8] >> (p % 8) & 1] \
            if len(payload) >= nmap else []
        sizes = [min(PAGE, length - p * PAGE) for p in pages]
        if count % 8 and len(payload) >= nmap and payload[nmap - 1] >> (count % 8):
            raise SpecError(f"block {n}: delta bitmap names pages past the block")
        if not pages or len(payload) != nmap + sum(sizes):
            raise SpecError(f"block {n}: delta payload malformed")
        out = bytearray(base)
        pos = nmap
        for p, size in zip(pages, sizes):
            out[p * PAGE:p * PAGE + size] = payload[pos:pos + size]
            pos += size
        if self.hash(bytes(out)) != entry[5]:
            raise SpecError(f"block {n}: {self.digest} mismatch after applying the delta")
        if self.page_hashes:
            self.check_page_hashes(n, after, bytes(out))
        return bytes(out)


def open_chain(path: str | Path, key_file: bytes | None = None) -> list[SpecReader]:
    """The images from the root full image to `path` (FORMAT.md section 10; parents looked for
    in the child's directory by name, then by UUID)."""
    images = [SpecReader(path, key_file)]
    while images[0].header.get("parent"):
        child = images[0]
        ref = child.header["parent"]
        d = child.path.parent
        candidates = [d / ref["name"]] + sorted(p for p in d.iterdir() if p.name != ref["name"])
        parent = None
        for cand in candidates:
            if not cand.is_file() or cand.resolve() == child.path.resolve():
                continue
            try:
                img = SpecReader(cand, key_file)
            except SpecError:
                continue
            if img.uuid == ref["uuid"]:
                parent = img
                break
        if parent is None:
            raise SpecError(f"parent {ref['uuid']} ({ref['name']}) not found")
        # the digest over the parent's entries as read (entries() also checks its footer)
        computed = hashlib.sha256(b"".join(ENTRY.pack(*e) for e in parent.entries())).hexdigest()
        if computed != ref["index_sha256"]:
            raise SpecError("parent's index digest differs from the child's reference")
        if parent.size != child.size or parent.block_size != child.block_size \
                or parent.digest != child.digest:
            raise SpecError("parent's size, block size or digest differs")
        images.insert(0, parent)
        if len(images) > 10000:
            raise SpecError("chain too long")
    return images


def read_chain(path: str | Path, key_file: bytes | None = None) -> bytes:
    """The source contents the image at `path` stands for, every block checked."""
    chain = open_chain(path, key_file)
    leaf = chain[-1]
    out = bytearray()
    for n, entry in enumerate(leaf.entries()):
        out += block_state(chain, len(chain) - 1, n, entry)
    if len(out) != leaf.size:
        raise SpecError("restored size differs from the header's")
    return bytes(out)


def block_state(chain: list[SpecReader], level: int, n: int, entry: tuple) -> bytes:
    """Block n as image `level` of the chain has it, given that image's entry (section 10,
    and 16.3 for a delta: its parent's block with the delta's pages written over it)."""
    e = entry
    while e[0] == PARENT:
        level -= 1
        if level < 0:
            raise SpecError(f"block {n}: PARENT in an image without a parent")
        e = chain[level].entries()[n]
    if e[5] != entry[5]:
        raise SpecError(f"block {n}: chain inconsistent")
    img = chain[level]
    length = img.length(n)
    if e[0] in (ZERO, UNUSED):
        if e[5] != img.hash(bytes(length)):
            raise SpecError(f"block {n}: zero block with a non-zero checksum")
        return bytes(length)
    if e[0] == DATA:
        return img.read_data(n, e)
    if e[0] == DELTA:
        if level == 0:
            raise SpecError(f"block {n}: a delta in an image without a parent")
        base = block_state(chain, level - 1, n, chain[level - 1].entries()[n])
        return img.read_delta(n, e, base)
    raise SpecError(f"block {n}: unknown kind {e[0]}")


# ------------------------------------------------------------------------------------------------
# tests: diskimg makes the images, the reader above reads them

BS = 64 * 1024
REPO = Path(__file__).resolve().parents[2]


def make_image(src: Path, img: Path, *extra: str) -> None:
    from diskimg.cli.main import main
    rc = main(["image", str(src), str(img), "--block-size", "64K", "--no-progress", *extra])
    assert rc == 0


def text(tag: str, n: int) -> bytes:
    line = f"{tag}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (n // len(line) + 1))[:n]


def base_contents() -> bytes:
    rnd = random.Random(1)
    return b"".join([
        text("zero", BS),            # 0 data (zstd)
        bytes(BS),                   # 1 zero
        rnd.randbytes(BS),           # 2 data, incompressible (stored raw)
        bytes(2 * BS),               # 3, 4 zero
        text("four", BS),            # 5 data
        text("tail", 12345),         # 6 short last block
    ])


def test_crc32c_parameters():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_full_image(tmp_path):
    data = base_contents()
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "full.img")
    img = SpecReader(tmp_path / "full.img")
    assert img.header["kind"] == "full" and img.header.get("parent") is None
    assert img.blocks == 7 and img.length(6) == 12345
    entries = img.entries()
    assert [e[0] for e in entries] == [DATA, ZERO, DATA, ZERO, ZERO, DATA, DATA]
    assert {e[1] for e in entries if e[0] == DATA} == {0, 1}       # raw and zstd records
    assert read_chain(tmp_path / "full.img") == data


def test_incremental_chain_and_differential(tmp_path):
    states = [base_contents()]
    s = bytearray(states[0])
    s[BS:BS + 10] = b"now data.."            # zero -> data
    s[5 * BS:6 * BS] = bytes(BS)             # data -> zero
    s[-5:] = b"12345"                        # short last block changed
    states.append(bytes(s))
    s = bytearray(states[1])
    s[3 * BS + 7] = 1                        # another zero block gets data
    states.append(bytes(s))
    names = ["full.img", "inc1.img", "inc2.img"]
    for i, state in enumerate(states):
        (tmp_path / "src").write_bytes(state)
        extra = ("--incremental", str(tmp_path / names[i - 1])) if i else ()
        make_image(tmp_path / "src", tmp_path / names[i], *extra)
    (tmp_path / "src").write_bytes(states[2])
    make_image(tmp_path / "src", tmp_path / "diff.img", "--differential",
               str(tmp_path / "inc1.img"))

    for name, state in zip(names, states):
        assert read_chain(tmp_path / name) == state, name
    assert read_chain(tmp_path / "diff.img") == states[2]

    inc2 = SpecReader(tmp_path / "inc2.img")
    assert inc2.header["kind"] == "incremental"
    assert inc2.header["parent"]["name"] == "inc1.img"
    assert PARENT in [e[0] for e in inc2.entries()]
    chain = open_chain(tmp_path / "inc2.img")
    assert [c.uuid for c in chain] == inc2.header["chain"]
    diff = open_chain(tmp_path / "diff.img")
    assert [c.path.name for c in diff] == ["full.img", "diff.img"]
    # a block unchanged since the full image resolves through two PARENT levels
    assert inc2.entries()[0][0] == PARENT
    # section 16: a few changed bytes are stored as deltas (inc1: block 6's short tail; inc2:
    # block 3, a zero block that got one byte: a delta on zeros); a version-3 image
    assert SpecReader(tmp_path / "inc1.img").entries()[6][0] == DELTA
    assert inc2.entries()[3][0] == DELTA and inc2.features == {"delta"} and inc2.version == 3


def test_delta_on_delta_on_full_and_every_flipped_byte_of_a_delta_image(tmp_path):
    """Section 16: a delta whose parent's block is itself a delta; page-straddling changes; a
    flip anywhere in the incremental (records, page hashes, index...) fails the read."""
    states = [base_contents()]
    for step, (off, n) in enumerate([(100, 10), (4096 - 3, 6), (2 * BS + 40000, 9000)]):
        s = bytearray(states[-1])
        s[off:off + n] = bytes([0x41 + step]) * n
        states.append(bytes(s))
    names = ["full.img", "inc1.img", "inc2.img", "inc3.img"]
    for i, state in enumerate(states):
        (tmp_path / "src").write_bytes(state)
        extra = ("--incremental", str(tmp_path / names[i - 1])) if i else ()
        make_image(tmp_path / "src", tmp_path / names[i], *extra)
    for name, state in zip(names, states):
        assert read_chain(tmp_path / name) == state, name
    assert SpecReader(tmp_path / "inc2.img").entries()[0][0] == DELTA
    assert SpecReader(tmp_path / "inc1.img").entries()[0][0] == DELTA
    assert SpecReader(tmp_path / "inc3.img").entries()[2][0] == DELTA   # pages 9-12 of 16
    path = tmp_path / "inc2.img"
    buf = path.read_bytes()
    survived = []
    for pos in range(len(buf)):
        flipped = bytearray(buf)
        flipped[pos] ^= 0x40
        path.write_bytes(flipped)
        try:
            got = read_chain(path)
        except SpecError:
            continue
        if got != states[2]:
            survived.append(pos)
    path.write_bytes(buf)
    # (a flip inside a zstd frame may decode to the same bytes: harmless, and no wrong byte
    # is ever read)
    assert not survived, f"flips at {survived} went unnoticed"


def test_parent_found_by_uuid_after_rename(tmp_path):
    data = base_contents()
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "full.img")
    (tmp_path / "src").write_bytes(data[:-1] + b"!")
    make_image(tmp_path / "src", tmp_path / "inc.img", "--incremental", str(tmp_path / "full.img"))
    os.rename(tmp_path / "full.img", tmp_path / "renamed.img")
    assert read_chain(tmp_path / "inc.img") == data[:-1] + b"!"


def test_replaced_parent_is_rejected(tmp_path):
    data = base_contents()
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "full.img")
    make_image(tmp_path / "src", tmp_path / "inc.img", "--incremental", str(tmp_path / "full.img"))
    make_image(tmp_path / "src", tmp_path / "other.img")
    os.replace(tmp_path / "other.img", tmp_path / "full.img")   # same name, another image
    with pytest.raises(SpecError, match="not found"):
        read_chain(tmp_path / "inc.img")


def test_transform_table(tmp_path):
    """Section 4.4: new images name their chains; an image without a table has the implicit
    one; a name the reader does not know refuses the whole image."""
    data = base_contents()
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "full.img")
    img = SpecReader(tmp_path / "full.img")
    assert img.header["transforms"] == {"0": [], "1": ["zstd"]}
    assert img.transforms == {0: [], 1: ["zstd"]}
    assert transform_table({}) == {0: [], 1: ["zstd"]}
    for table, words in [({"1": []}, "redefined"), ({"01": []}, "bad chain id"),
                         ({"2": ["zstd", "zstd"]}, "distinct"),
                         ({"2": ["zstd", "xchacha20-poly1305"]}, "transform 'xchacha20-poly1305' unknown")]:
        with pytest.raises(SpecError, match=words):
            transform_table({"transforms": table})


def _rewrite_header_json(buf: bytes, change) -> bytes:
    """`buf` with its header JSON changed by `change(dict)` and every offset the longer or
    shorter header moves (entries' record offsets, segment table, trailer) put right, as
    sections 4 to 8 lay them out (and the index digest recomputed)."""
    jlen = struct.unpack_from("<I", buf, 12)[0]
    h = json.loads(buf[16:16 + jlen])
    change(h)
    body = json.dumps(h, sort_keys=True).encode()
    version = struct.unpack_from("<H", buf, 8)[0]    # kept, as the trailer's
    fixed = HEADER_FIXED.pack(b"DISKIMG\0", version, 0, len(body))
    head = fixed + body + struct.pack("<I", crc32c(fixed + body))
    shift = len(head) - (20 + jlen)
    n = len(buf)
    _, f_off, f_len, _, _, _, _ = TRAILER.unpack(buf[n - 32:])
    footer = json.loads(buf[f_off + 8:f_off + f_len - 4])
    out = bytearray(head + buf[20 + jlen:footer["index"]["segments"][0][0]])
    table, digest = [], hashlib.sha256()
    for off, length in footer["index"]["segments"]:
        seg = buf[off:off + length]
        _, first, count, _, _, _ = SEGMENT.unpack_from(seg)
        raw = bytearray(_unzstd(seg[28:], count * 48, "segment"))
        for i in range(count):
            e = list(ENTRY.unpack_from(raw, i * 48))
            if e[0] == DATA:
                e[4] += shift
            ENTRY.pack_into(raw, i * 48, *e)
        digest.update(raw)
        payload = zstandard.ZstdCompressor().compress(bytes(raw))
        sh = SEGMENT.pack(b"DIIX", first, count, len(payload), crc32c(payload), 0)[:24]
        table.append([len(out), 28 + len(payload)])
        out += sh + struct.pack("<I", crc32c(sh)) + payload
    footer["index"]["segments"] = table
    footer["index"]["sha256"] = digest.hexdigest()
    fbody = json.dumps(footer, sort_keys=True).encode()
    ffixed = FOOTER_FIXED.pack(b"DIFT", len(fbody))
    f_off = len(out)
    out += ffixed + fbody + struct.pack("<I", crc32c(ffixed + fbody))
    t = struct.pack("<8sQIHHI", b"DIMGEND\0", f_off, len(out) - f_off, version, 0, 0)
    return bytes(out + t + struct.pack("<I", crc32c(t)))


def test_image_naming_an_unknown_transform_is_refused_whole(small_image, tmp_path):
    path, data = small_image
    buf = path.read_bytes()
    same = tmp_path / "same.img"
    same.write_bytes(_rewrite_header_json(buf, lambda h: None))
    assert read_chain(same) == data                  # the rewriting itself is right
    older = tmp_path / "older.img"                   # as written before the table existed
    older.write_bytes(_rewrite_header_json(buf, lambda h: h.pop("transforms")))
    assert read_chain(older) == data
    newer = tmp_path / "newer.img"
    newer.write_bytes(_rewrite_header_json(
        buf, lambda h: h["transforms"].update({"2": ["zstd", "xchacha20-poly1305"]})))
    with pytest.raises(SpecError, match="made by a newer program"):
        read_chain(newer)
    # and diskimg itself says so in one line, exit 2
    from helpers import cli
    for img, rc in ((same, 0), (older, 0), (newer, 2)):
        res = cli("verify", img, "--no-progress")
        assert res.rc == rc, (img, res.err)
    assert cli("verify", newer, "--no-progress").err_lines == [
        f"diskimg: error: {newer}: made by a newer diskimg: transform 'xchacha20-poly1305' unknown"]


def test_parity_image_read_from_the_spec_alone(tmp_path):
    """Section 16: the logical stream found from the layout, every slot's checksum and every
    parity slot checked against the code computed here in pure Python, the source reproduced;
    and with slots destroyed (within a group's m), rebuilt from the code alone."""
    rnd = random.Random(16)
    data = base_contents() + rnd.randbytes(5 * BS) + text("end", 777)
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "p.img", "--parity", "6.25")
    img = SpecReader(tmp_path / "p.img")
    assert img.version == 3 and img.header["features"] == ["parity"]
    assert img.header["parity"] == {"slice": 4096, "data": 32, "parity": 2, "depth": 256,
                                    "checksum": "crc32"}
    assert read_chain(tmp_path / "p.img") == data
    buf = bytearray((tmp_path / "p.img").read_bytes())
    # the small image is one short window: depth d = ceil(slots / k), n = ceil(slots / d) data
    # slices per group (16.2); damage slot 0 (the header; group 0), slot 1 (group 1) and a byte
    # of the first parity slot (group 0): two bad slots in group 0, m = 2
    slots = -(-len(img.buf) // 4096)
    d = -(-slots // 32)
    n = -(-slots // d)
    assert d > 1
    for slot in (0, 1):
        buf[slot * 4096:(slot + 1) * 4096] = rnd.randbytes(4096)
    table = n * d * 4096
    parity_at = table + -(-(28 + 4 * ((n + 2) * d) + 4) // 4096) * 4096
    buf[parity_at + 5] ^= 0xFF
    (tmp_path / "bad.img").write_bytes(buf)
    with pytest.raises(SpecError):
        SpecReader(tmp_path / "bad.img")
    assert _read_healed(tmp_path / "bad.img") == data


def _read_healed(path: Path) -> bytes:
    img = SpecReader(path, heal=True)
    out = bytearray()
    for n, e in enumerate(img.entries()):
        out += img.read_data(n, e) if e[0] == DATA else bytes(img.length(n))
    return bytes(out)


def test_compat_fixtures_read_by_the_spec_reader():
    for expected_file in sorted((REPO / "fixtures" / "compat").glob("v*/expected.json")):
        expected = json.loads(expected_file.read_text())
        key = (expected_file.parent / expected["key_file"]).read_bytes() \
            if "key_file" in expected else None
        for image in expected["images"]:
            data = read_chain(expected_file.parent / image["file"], key)
            assert hashlib.sha256(data).hexdigest() == image["raw_sha256"], image["file"]


@pytest.fixture
def small_image(tmp_path) -> tuple[Path, bytes]:
    """A small image (3 blocks: data, zero, short data) to damage."""
    data = text("a", BS) + bytes(BS) + text("b", 1000)
    (tmp_path / "src").write_bytes(data)
    make_image(tmp_path / "src", tmp_path / "small.img")
    assert read_chain(tmp_path / "small.img") == data
    return tmp_path / "small.img", data


@pytest.mark.parametrize("cut", [1, 4, 31, 32, 33, 100, "half", "header"])
def test_truncated_file_is_rejected(small_image, tmp_path, cut):
    path, _ = small_image
    buf = path.read_bytes()
    keep = {"half": len(buf) // 2, "header": 10}.get(cut, None)
    keep = len(buf) - cut if keep is None else keep
    bad = tmp_path / "cut.img"
    bad.write_bytes(buf[:keep])
    with pytest.raises(SpecError):
        read_chain(bad)


def test_flipped_header_bytes_are_rejected(small_image, tmp_path):
    path, _ = small_image
    buf = path.read_bytes()
    jlen = struct.unpack_from("<I", buf, 12)[0]
    bad = tmp_path / "bad.img"
    for pos in range(20 + jlen):                       # every byte of the header
        flipped = bytearray(buf)
        flipped[pos] ^= 0x01
        bad.write_bytes(flipped)
        with pytest.raises(SpecError):
            read_chain(bad)


def test_version_is_refused(small_image, tmp_path):
    path, _ = small_image
    buf = bytearray(path.read_bytes())
    jlen = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<H", buf, 8, 4)
    struct.pack_into("<I", buf, 16 + jlen, crc32c(bytes(buf[:16 + jlen])))  # CRC made right
    (tmp_path / "v4.img").write_bytes(buf)
    with pytest.raises(SpecError, match="unsupported format version 4"):
        read_chain(tmp_path / "v4.img")
    struct.pack_into("<H", buf, 8, 3)          # version 3 without a features list
    struct.pack_into("<I", buf, 16 + jlen, crc32c(bytes(buf[:16 + jlen])))
    (tmp_path / "v3.img").write_bytes(buf)
    with pytest.raises(SpecError, match="without a (non-empty list|features)"):
        read_chain(tmp_path / "v3.img")


def test_every_flipped_byte_is_detected(small_image, tmp_path):
    """No byte of an image is unprotected: a flip anywhere makes the full read fail."""
    path, _ = small_image
    buf = path.read_bytes()
    bad = tmp_path / "bad.img"
    survived = []
    for pos in range(len(buf)):
        flipped = bytearray(buf)
        flipped[pos] ^= 0x40
        bad.write_bytes(flipped)
        try:
            read_chain(bad)
        except SpecError:
            continue
        survived.append(pos)
    assert not survived, f"flips at {survived} went unnoticed"


def test_encrypted_chain_read_with_the_key_file(tmp_path):
    """Section 17: an encrypted full image and an incremental, read with the key file by the
    reader above; refused without the key, with another key, and as plain."""
    data = bytearray(base_contents())
    src = tmp_path / "src"
    src.write_bytes(bytes(data))
    kf = tmp_path / "kf"
    kf.write_bytes(os.urandom(32))
    make_image(src, tmp_path / "full.img", "--encrypt", "--key-file", str(kf))
    data[3 * BS + 7:3 * BS + 20] = b"changed bytes"
    src.write_bytes(bytes(data))
    make_image(src, tmp_path / "inc.img", "--incremental", str(tmp_path / "full.img"),
               "--key-file", str(kf))
    key = kf.read_bytes()
    assert read_chain(tmp_path / "full.img", key) == base_contents()
    assert read_chain(tmp_path / "inc.img", key) == bytes(data)
    img = SpecReader(tmp_path / "inc.img", key)
    assert img.keys.source["path"] == str(src) and img.header["source"] == {}
    assert {n for names in img.transforms.values() for n in names} == {"zstd", "aes-256-gcm"}
    with pytest.raises(SpecError, match="no key"):
        SpecReader(tmp_path / "inc.img")
    with pytest.raises(SpecError, match="no key slot opens"):
        SpecReader(tmp_path / "inc.img", os.urandom(32))
