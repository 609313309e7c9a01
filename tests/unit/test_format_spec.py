"""docs/FORMAT.md is enough to read an image: an independent reader written only from it.

The reader below (`SpecReader`, `read_chain`) uses struct, hashlib, blake3, json, zstandard and a
pure Python CRC-32C built from the parameters in the document; it does not import diskimg.  It
checks every CRC, every block digest (SHA-256 in version 1, the header's `digest` in version 2)
and the index digest, and must reproduce the source bytes of images made by diskimg (full,
incremental, a chain of incrementals, differential; with either digest; with delta records,
section 16: page hashes checked, deltas applied on their parent's block), and reject truncated
and damaged files.  diskimg itself is only used to *make* the images.  The page hashes are
XXH3-64 (section 16.1), computed with the `xxhash` package.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

import blake3
import pytest
import zstandard

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
# section 16: record flags, the page size, the features this reader knows
FLAG_PAGE_HASHES, FLAG_DELTA = 0x2, 0x4
PAGE = 4096
KNOWN_FEATURES = {"delta"}
HEADER_FIXED = struct.Struct("<8sHHI")           # magic, version, flags, json length
RECORD = struct.Struct("<4sQIIBBH32sI")          # ... sha256, crc
ENTRY = struct.Struct("<BBHIQ32s")
SEGMENT = struct.Struct("<4sQIIII")              # magic, first, count, stored, payload crc, crc
FOOTER_FIXED = struct.Struct("<4sI")
TRAILER = struct.Struct("<8sQIHHII")
HEADER_REQUIRED = ("uuid", "kind", "size", "block_size", "created", "tool_version")
# section 4.4: the transforms this reader knows, the table of an image without one, and the ids
# every table must leave as they are
KNOWN_TRANSFORMS = {"zstd"}
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
        raise SpecError("header digest missing in a version-2 image")
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


def _unzstd(payload: bytes, expected: int, what: str) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as err:
        raise SpecError(f"{what}: does not decompress: {err}") from err
    if len(out) != expected:
        raise SpecError(f"{what}: decompresses to {len(out)} bytes, {expected} expected")
    return out


class SpecReader:
    """One complete image, opened and checked as FORMAT.md sections 4, 7, 8 and 9 say."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.buf = self.path.read_bytes()
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
        self.features = features(h, version)
        extra = h.get("extra") if isinstance(h.get("extra"), dict) else {}
        self.page_hashes = "page_hashes" in extra

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
        for i in reversed(range(len(chain))):      # undo the transforms, the last one first
            limit = length if i == 0 else length + length // 128 + 1024
            if chain[i] == "zstd":
                data = _unzstd(data, limit, f"block {n}")
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


def open_chain(path: str | Path) -> list[SpecReader]:
    """The images from the root full image to `path` (FORMAT.md section 10; parents looked for
    in the child's directory by name, then by UUID)."""
    images = [SpecReader(path)]
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
                img = SpecReader(cand)
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


def read_chain(path: str | Path) -> bytes:
    """The source contents the image at `path` stands for, every block checked."""
    chain = open_chain(path)
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
                         ({"2": ["zstd", "aes-256-gcm"]}, "transform 'aes-256-gcm' unknown")]:
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
        buf, lambda h: h["transforms"].update({"2": ["zstd", "aes-256-gcm"]})))
    with pytest.raises(SpecError, match="made by a newer program"):
        read_chain(newer)
    # and diskimg itself says so in one line, exit 2
    from helpers import cli
    for img, rc in ((same, 0), (older, 0), (newer, 2)):
        res = cli("verify", img, "--no-progress")
        assert res.rc == rc, (img, res.err)
    assert cli("verify", newer, "--no-progress").err_lines == [
        f"diskimg: error: {newer}: made by a newer diskimg: transform 'aes-256-gcm' unknown"]


def test_compat_fixtures_read_by_the_spec_reader():
    for expected_file in sorted((REPO / "fixtures" / "compat").glob("v*/expected.json")):
        expected = json.loads(expected_file.read_text())
        for image in expected["images"]:
            data = read_chain(expected_file.parent / image["file"])
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
    struct.pack_into("<H", buf, 8, 3)                  # version 3 names its features
    struct.pack_into("<I", buf, 16 + jlen, crc32c(bytes(buf[:16 + jlen])))
    (tmp_path / "v3.img").write_bytes(buf)
    with pytest.raises(SpecError, match="without a non-empty list"):
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
