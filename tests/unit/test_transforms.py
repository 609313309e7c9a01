"""The block-transform seam: TransformChain encode/decode, the header's transform-chain table,
and the one decode-and-verify every reader uses (diskimg/transforms, diskimg/image/records.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct

import pytest

from diskimg import defaults
from diskimg import format as fmt
from diskimg.errors import BlockError, DecodeError, NotAnImage, UnknownTransform
from diskimg.image.imagefile import ImageReader, ImageWriter, read_record_data
from diskimg.image.records import decode_verified
from diskimg.transforms import (
    IMPLICIT_TABLE,
    TransformChain,
    reading_chain,
    writing_chain,
)
from diskimg.transforms import zstd
from helpers import cli

BS = 64 * 1024


def _text(n: int) -> bytes:
    lines = (f"line {i:08d} of a compressible block\n".encode() for i in range(n // 30 + 1))
    return b"".join(lines)[:n]


BLOCKS = {
    "random": lambda: os.urandom(BS),
    "zero": lambda: bytes(BS),
    "text": lambda: _text(BS),
    "short text": lambda: _text(4464),
    "short random": lambda: os.urandom(17),
    "one byte": lambda: b"\x07",
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_round_trip(name):
    data = BLOCKS[name]()
    chain = writing_chain()
    stored, cid = chain.encode(5, memoryview(data))
    out = bytearray(len(data))
    assert chain.decode_into(5, stored, cid, memoryview(out)) == len(data)
    assert out == data
    # a reader knows the chain from the header's table alone
    reader = reading_chain(chain.table)
    out2 = bytearray(len(data))
    reader.decode_into(5, stored, cid, memoryview(out2))
    assert out2 == data


def test_zstd_is_left_out_where_it_does_not_pay_off():
    chain = writing_chain()
    assert chain.table == {0: (), 1: ("zstd",)} == IMPLICIT_TABLE
    random_block = memoryview(os.urandom(BS))
    stored, cid = chain.encode(0, random_block)
    assert cid == fmt.CODEC_RAW == 0
    assert stored is random_block          # the caller's buffer itself: no copy
    text = _text(BS)
    stored, cid = chain.encode(0, text)
    assert cid == fmt.CODEC_ZSTD == 1 and len(stored) < len(text)
    assert zstd.decompress(stored, len(text)) == text      # one plain zstd frame


def test_decode_into_a_reused_buffer_longer_than_the_block():
    chain = writing_chain()
    data = _text(4464)
    stored, cid = chain.encode(1, data)
    buf = bytearray(BS)                    # a pool buffer of a whole block
    view = memoryview(buf)[:len(data)]
    chain.decode_into(1, stored, cid, view)
    assert bytes(view) == data


def _reason(chain, stored, cid, length):
    with pytest.raises(DecodeError) as exc:
        chain.decode_into(0, stored, cid, memoryview(bytearray(length)))
    return exc.value.reason


def test_zstd_chain_holding_garbage_says_what_it_said_before():
    chain = reading_chain(IMPLICIT_TABLE)
    assert _reason(chain, os.urandom(300), 1, BS).startswith("data does not decompress (")
    longer = zstd.compress(_text(BS + 10), 3)
    assert _reason(chain, longer, 1, BS) == f"data does not decompress: more bytes, {BS} expected"
    shorter = zstd.compress(_text(100), 3)
    assert _reason(chain, shorter, 1, BS) == f"data does not decompress: 100 bytes, {BS} expected"
    assert _reason(chain, b"abc", 0, BS) == f"data is 3 bytes, {BS} expected"


def test_unknown_chain_id():
    assert _reason(reading_chain(IMPLICIT_TABLE), b"x" * 10, 7, 10) == "unknown codec 7"
    # an id is known only when the image's table names it
    assert _reason(reading_chain({1: ("zstd",)}), b"x" * 10, 0, 10) == "unknown codec 0"


@pytest.mark.parametrize("name", ["sha256", "blake3"])
def test_decode_verified_checks_the_digest(name):
    import blake3
    digest = {"sha256": lambda b: hashlib.sha256(b).digest(),
              "blake3": lambda b: blake3.blake3(b).digest()}[name]
    chain = writing_chain()
    data = _text(BS)
    stored, cid = chain.encode(3, data)
    out = memoryview(bytearray(BS))
    fn = fmt.digest_fn(name)
    assert decode_verified(chain, 3, stored, cid, digest(data), out, digest=fn) == data
    wrong = digest(b"other")
    with pytest.raises(DecodeError) as exc:
        decode_verified(chain, 3, stored, cid, wrong, out, digest=fn)
    assert exc.value.reason == (f"checksum mismatch: calculated "
                                f"{digest(data).hex()}, should be {wrong.hex()}")
    # the other algorithm's digest of the very same content is a mismatch
    other = fmt.digest_fn("sha256" if name == "blake3" else "blake3")
    with pytest.raises(DecodeError):
        decode_verified(chain, 3, stored, cid, digest(data), out, digest=other)


class _Xor:
    """A second transform for the seam's own test: XOR with the block number (a stand-in for
    encryption's binding of the block number, not for anything under test)."""

    name = "xor-block"
    optional = False

    def encode(self, block_no, data):
        return bytes(b ^ (block_no & 0xFF) for b in data)

    def decode(self, block_no, stored, limit):
        return self.encode(block_no, stored)[:limit]

    def decode_into(self, block_no, stored, out):
        if len(stored) != len(out):
            raise DecodeError("wrong length")
        out[:] = self.encode(block_no, stored)
        return len(out)


def test_a_chain_of_two_names_every_variant_and_passes_the_block_number():
    chain = TransformChain.for_writing([zstd.Zstd(3), _Xor()])
    # zstd may be left out, the required transform may not: two variants, ids from 2
    assert chain.table == {2: ("xor-block",), 3: ("zstd", "xor-block")}
    for data in (_text(BS), os.urandom(BS)):
        stored, cid = chain.encode(9, data)
        assert cid == (3 if data[:4] == b"line" else 2)
        out = bytearray(len(data))
        chain.decode_into(9, stored, cid, memoryview(out))
        assert out == data
        if cid == 2:    # the block number is part of the encoding
            chain.decode_into(10, stored, cid, memoryview(out))
            assert out != data


# -- the header's table ------------------------------------------------------------------------

def _header_json(**extra) -> dict:
    return {"uuid": "u", "kind": "full", "size": 10, "block_size": BS, "created": "c",
            "tool_version": "t", **extra}


def test_header_without_a_table_has_the_implicit_one():
    assert fmt.Header.from_json(_header_json()).transforms == {0: (), 1: ("zstd",)}


def test_header_table_round_trips():
    d = _header_json(transforms={"0": [], "1": ["zstd"]})
    h = fmt.Header.from_json(d)
    assert h.transforms == IMPLICIT_TABLE
    assert fmt.Header.from_json(json.loads(json.dumps(h.to_json()))).transforms == IMPLICIT_TABLE
    assert fmt.Header.from_json(_header_json(transforms={"1": ["zstd"]})).transforms == \
        {1: ("zstd",)}


@pytest.mark.parametrize("table, words", [
    ([], "transforms is a list, an object expected"),
    ({"x": []}, "transforms key is 'x', a chain id from 0 to 255 expected"),
    ({"01": []}, "a chain id"),
    ({"256": []}, "a chain id"),
    ({"2": "zstd"}, "transforms.2 is 'zstd', a list of transform names expected"),
    ({"2": [1]}, "a list of transform names"),
    ({"1": []}, "transforms.1 is a list, ['zstd'] (what chain id 1 means in every image)"),
    ({"0": ["zstd"]}, "what chain id 0 means"),
    ({"2": ["zstd", "zstd"]}, "without repeats"),
])
def test_header_table_is_validated(table, words):
    with pytest.raises(fmt.MetadataInvalid) as exc:
        fmt.Header.from_json(_header_json(transforms=table))
    assert words in str(exc.value)


def test_unknown_transform_name_in_the_header():
    with pytest.raises(UnknownTransform) as exc:
        fmt.Header.from_json(_header_json(transforms={"0": [], "2": ["zstd", "xchacha20-poly1305"]}))
    assert str(exc.value) == "made by a newer diskimg: transform 'xchacha20-poly1305' unknown"


def test_header_default_level_is_the_one_default():
    h = fmt.Header(uuid="u", kind="full", size=1, block_size=BS, source={}, created="c",
                   tool_version="t")
    assert h.compression["level"] == defaults.DEFAULT_LEVEL


# -- images ------------------------------------------------------------------------------------

def _write_image(path, blocks: list[bytes], transforms=None, payload=None) -> fmt.Header:
    """An image of `blocks` written through ImageWriter with the writing chain; `transforms`
    replaces the header's table, `payload(block, stored)` the stored bytes."""
    size = sum(len(b) for b in blocks)
    header = fmt.Header(uuid="u", kind="full", size=size, block_size=BS, source={},
                        created="2026-01-01T00:00:00Z", tool_version="t", chain=("u",),
                        **({"transforms": transforms} if transforms else {}))
    chain = writing_chain()
    writer = ImageWriter(str(path), header)
    for n, data in enumerate(blocks):
        stored, cid = chain.encode(n, data)
        if payload is not None:
            stored = payload(n, stored)
        writer.add_data(n, bytes(stored), cid, hashlib.sha256(data).digest())
    writer.finish({"stats": {}, "unreadable": []})
    return header


def test_new_images_name_their_table(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(_text(3 * BS) + os.urandom(BS))
    assert cli("image", src, tmp_path / "a.img", "--block-size", "64K", "--no-progress").rc == 0
    raw = (tmp_path / "a.img").read_bytes()
    (jlen,) = struct.unpack_from("<I", raw, 12)
    assert json.loads(raw[16:16 + jlen])["transforms"] == {"0": [], "1": ["zstd"]}
    with ImageReader(str(tmp_path / "a.img")) as r:
        assert {e.codec for _, e in r.iter_entries()} == {0, 1}


def test_garbage_in_a_zstd_record_is_a_block_error(tmp_path):
    img = tmp_path / "g.img"
    blocks = [_text(BS), _text(BS)[::-1]]
    _write_image(img, blocks, payload=lambda n, s: os.urandom(len(s)) if n == 1 else s)
    with ImageReader(str(img)) as r:
        e = r.entry(1)
        assert e.codec == fmt.CODEC_ZSTD
        assert bytes(r.read_block(0, r.entry(0))) == blocks[0]
        with pytest.raises(BlockError) as exc:
            r.read_block(1, e)
        assert str(exc.value).startswith(f"{img}: block 1 (byte {BS}): data does not decompress")
        rec = fmt.unpack_record(r.reader.pread(fmt.RECORD_HEADER_SIZE, e.offset))
        assert read_record_data(r.reader, e.offset, rec, r.header) is None
        e0 = r.entry(0)
        rec0 = fmt.unpack_record(r.reader.pread(fmt.RECORD_HEADER_SIZE, e0.offset))
        assert read_record_data(r.reader, e0.offset, rec0, r.header) == blocks[0]
    res = cli("verify", img, "--json", "--no-progress")
    assert res.rc == 1
    assert [x["block"] for x in res.json["errors"]] == [1]
    assert "data does not decompress" in res.json["errors"][0]["reason"]


def test_an_id_the_table_does_not_name_is_a_damaged_entry(tmp_path):
    img = tmp_path / "t.img"
    # a table without id 0: the raw (random) block's id is not in it
    _write_image(img, [_text(BS), os.urandom(BS)], transforms={1: ("zstd",)})
    with ImageReader(str(img)) as r:
        assert bytes(r.read_block(0, r.entry(0))) == _text(BS)
        with pytest.raises(BlockError) as exc:
            r.read_block(1, r.entry(1))
        assert "index entry damaged: unknown codec 0" in str(exc.value)


def test_image_made_by_a_newer_diskimg_is_refused_in_one_line(tmp_path):
    img = tmp_path / "new.img"
    _write_image(img, [_text(BS)], transforms={0: (), 1: ("zstd",), 2: ("xchacha20-poly1305",)})
    with pytest.raises(NotAnImage):
        ImageReader(str(img))
    for argv in (["info", img], ["verify", img, "--no-progress"],
                 ["restore", img, tmp_path / "out.raw", "--no-progress"]):
        res = cli(*argv)
        assert res.rc == 2, (argv, res.err)
        assert res.err_lines == [f"diskimg: error: {img}: made by a newer diskimg: transform "
                                 f"'xchacha20-poly1305' unknown"], argv
    assert not (tmp_path / "out.raw").exists()


def test_records_and_segments_share_one_context_per_thread():
    assert zstd.compressor(3) is zstd.compressor(3)
    assert zstd.compressor(3) is not zstd.compressor(2)
    assert zstd.decompressor() is zstd.decompressor()
    data = random.Random(1).randbytes(1000) * 8
    assert zstd.decompress(zstd.compress(data, 2), len(data)) == data
