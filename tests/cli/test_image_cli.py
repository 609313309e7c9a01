"""`diskimg image/restore/verify/info` in-process on regular files (no root): every exit code of
the table that needs no device, the one-line error messages, the JSON shapes, incremental
chains whose parents go missing or are replaced, and damage anywhere in an image file."""
from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.image.imagefile import ImageReader
from helpers import PYTHON, REPO, cli, compressible, flip_byte, read_at

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
NBLOCKS = 24
TAIL = 1000                        # the source is not a multiple of the block size
SIZE = NBLOCKS * BS + TAIL
ZERO_BLOCKS = (5, 6, 15)
RANDOM_BLOCKS = (2, 9, 17)         # incompressible: stored raw
PATTERN = b"\xaa"                  # what a pre-filled restore target holds


def make_source(path: Path, seed: int = 1, size: int = SIZE) -> bytes:
    rnd = random.Random(seed)
    data = bytearray()
    for b in range(-(-size // BS)):
        n = min(BS, size - b * BS)
        if b in ZERO_BLOCKS:
            data += bytes(n)
        elif b in RANDOM_BLOCKS:
            data += rnd.randbytes(n)
        else:
            data += compressible(rnd, n)
    path.write_bytes(bytes(data))
    return bytes(data)


def block_of(data: bytes, b: int) -> bytes:
    return data[b * BS:(b + 1) * BS]


def entries(image: Path) -> dict[int, fmt.IndexEntry]:
    with ImageReader(str(image)) as r:
        return dict(r.iter_entries())


def assert_one_error_line(res, *names: str) -> str:
    """The CLI failed with exactly one `diskimg: error:` line naming each of `names`."""
    lines = res.err_lines
    assert len(lines) == 1, f"expected one error line, got:\n{res.err}"
    assert lines[0].startswith("diskimg: error: "), lines[0]
    assert "Traceback" not in res.err
    for name in names:
        assert str(name) in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def src(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "source.raw"
    return path, make_source(path)


@pytest.fixture
def image(tmp_path, src) -> Path:
    img = tmp_path / "full.img"
    res = cli("image", src[0], img, "--block-size", "64K", "--no-progress")
    assert res.rc == 0, res.err
    return img


def prefilled(path: Path, size: int = SIZE) -> Path:
    path.write_bytes(PATTERN * size)
    return path


# --------------------------------------------------------------------------------------------
# the happy path the other tests build on

def test_image_restore_verify_round_trip_leaves_no_partial(tmp_path, src, image):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.img", "source.raw"]
    assert cli("verify", image).rc == 0
    out = tmp_path / "restored.raw"
    res = cli("restore", image, out, "--no-progress")
    assert res.rc == 0, res.err
    assert out.read_bytes() == src[1]
    assert not list(tmp_path.glob("*.partial"))


def test_info_json_keys_and_values(image, src):
    res = cli("info", image, "--json")
    assert res.rc == 0
    info = res.json
    for key in ("uuid", "kind", "parent", "chain", "size", "block_size", "blocks",
                "stored_blocks", "zero_blocks", "changed_blocks", "source", "created",
                "tool_version"):
        assert key in info, key
    for key in ("path", "model", "serial"):
        assert key in info["source"], key
    assert info["kind"] == "full" and info["parent"] is None
    assert info["chain"] == [info["uuid"]]
    assert info["size"] == SIZE and info["block_size"] == BS
    assert info["blocks"] == NBLOCKS + 1
    assert info["zero_blocks"] == len(ZERO_BLOCKS)
    assert info["stored_blocks"] == NBLOCKS + 1 - len(ZERO_BLOCKS)
    assert info["changed_blocks"] == NBLOCKS + 1
    assert info["source"]["path"] == str(src[0].resolve())
    assert info["created"].endswith("Z")


def test_info_text(image):
    res = cli("info", image)
    assert res.rc == 0
    assert "kind:        full" in res.out
    assert f"size:        {SIZE} bytes" in res.out


def test_verify_json_shape_of_good_image(image):
    res = cli("verify", image, "--json")
    assert res.rc == 0
    out = res.json
    assert out["ok"] is True and out["errors"] == []
    assert out["blocks_checked"] == NBLOCKS + 1
    assert [c["path"] for c in out["chain"]] == [str(image)]


# --------------------------------------------------------------------------------------------
# exit 2: invalid input, unsafe operations

def test_nonexistent_source(tmp_path):
    res = cli("image", tmp_path / "nope", tmp_path / "x.img")
    assert res.rc == 2
    assert_one_error_line(res, tmp_path / "nope", "no such file")
    assert list(tmp_path.iterdir()) == []


def test_directory_source(tmp_path):
    (tmp_path / "dir").mkdir()
    res = cli("image", tmp_path / "dir", tmp_path / "x.img")
    assert res.rc == 2
    assert_one_error_line(res, tmp_path / "dir", "directory")
    assert not (tmp_path / "x.img").exists() and not (tmp_path / "x.img.partial").exists()


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_not_an_image(tmp_path, src, command):
    args = [command, src[0]] + ([tmp_path / "out"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 2
    assert_one_error_line(res, src[0], "not a diskimg image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_missing_image(tmp_path, command):
    args = [command, tmp_path / "nope.img"] + ([tmp_path / "out"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 2
    assert_one_error_line(res, tmp_path / "nope.img", "no such file")


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_partial_image_refused(tmp_path, image, command):
    partial = tmp_path / "half.img.partial"
    data = image.read_bytes()
    partial.write_bytes(data[: len(data) // 2])
    args = [command, partial] + ([tmp_path / "out"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 2
    line = assert_one_error_line(res, partial)
    assert "incomplete" in line
    assert not (tmp_path / "out").exists()


def _set_version(path: Path, version: int) -> None:
    """Patch the header's version field and fix the header CRC, so only the version is wrong."""
    buf = bytearray(path.read_bytes())
    fixed = struct.Struct("<8sHHI")
    magic, _, flags, jlen = fixed.unpack_from(buf)
    assert magic == fmt.HEADER_MAGIC
    fixed.pack_into(buf, 0, magic, version, flags, jlen)
    end = fixed.size + jlen
    struct.pack_into("<I", buf, end, fmt.crc32c(bytes(buf[:end])))
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_wrong_format_version(tmp_path, image, command):
    other = tmp_path / "v9.img"
    shutil.copy(image, other)
    original = struct.unpack_from("<H", other.read_bytes(), 8)[0]
    _set_version(other, 9)
    args = [command, other] + ([tmp_path / "out"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 2
    line = assert_one_error_line(res, other)
    assert "version 9" in line and "not supported" in line
    # the same patch back to the image's version gives a valid image: only the version was wrong
    _set_version(other, original)
    assert cli("verify", other).rc == 0


def test_existing_image_needs_force(tmp_path, src, image):
    before = image.read_bytes()
    res = cli("image", src[0], image, "--block-size", "64K")
    assert res.rc == 2
    line = assert_one_error_line(res, image, "already exists")
    assert "--force" in line
    assert image.read_bytes() == before
    uuid_before = cli("info", image, "--json").json["uuid"]
    res = cli("image", src[0], image, "--block-size", "64K", "--force", "--json")
    assert res.rc == 0, res.err
    assert res.json["uuid"] != uuid_before
    assert cli("info", image, "--json").json["uuid"] == res.json["uuid"]
    assert not list(tmp_path.glob("*.partial"))


def test_force_replaces_only_images(tmp_path, src):
    """--force replaces a diskimg image, never another file that happens to have the name
    (a VM's disk file, a document): exit 2, the file untouched."""
    other = tmp_path / "vm.img"
    other.write_bytes(b"not an image, somebody's data" * 1000)
    before = other.read_bytes()
    res = cli("image", src[0], other, "--force", "--no-progress")
    assert res.rc == 2
    assert_one_error_line(res, str(other), "is not a diskimg image", "replaces only images")
    assert other.read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))
    # an empty file is not an image either
    empty = tmp_path / "empty.img"
    empty.touch()
    assert cli("image", src[0], empty, "--force", "--no-progress").rc == 2
    assert empty.stat().st_size == 0


@pytest.mark.parametrize("size, why", [
    ("96K", "power of two"), ("3K", "power of two"), ("32K", "between"), ("32M", "between"),
    ("1", "between"), ("0", "between"),
])
def test_bad_block_size(tmp_path, src, size, why):
    res = cli("image", src[0], tmp_path / "x.img", "--block-size", size)
    assert res.rc == 2
    line = assert_one_error_line(res, "--block-size")
    assert "65536" in line and "16777216" in line and "power of two" in line
    assert not (tmp_path / "x.img").exists()


def test_unparsable_block_size(tmp_path, src):
    res = cli("image", src[0], tmp_path / "x.img", "--block-size", "lots")
    assert res.rc == 2
    assert "invalid size 'lots'" in res.err
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("size", ["64K", "16M", "1MiB"])
def test_good_block_sizes(tmp_path, src, size):
    res = cli("image", src[0], tmp_path / "x.img", "--block-size", size, "--json")
    assert res.rc == 0, res.err
    expected = {"64K": BS, "16M": 16 << 20, "1MiB": 1 << 20}[size]
    assert res.json["block_size"] == expected
    assert res.json["blocks"] == -(-SIZE // expected)


def test_bad_level_and_threads(tmp_path, src):
    res = cli("image", src[0], tmp_path / "x.img", "--level", "0")
    assert res.rc == 2
    assert_one_error_line(res, "--level")
    res = cli("image", src[0], tmp_path / "x.img", "--threads", "-1")
    assert res.rc == 2
    assert_one_error_line(res, "--threads")
    assert not (tmp_path / "x.img").exists()


def test_restore_to_too_small_file(tmp_path, image):
    target = prefilled(tmp_path / "small.raw", SIZE - 1)
    res = cli("restore", image, target, "--yes")
    assert res.rc == 2
    line = assert_one_error_line(res, target, "too small")
    assert str(SIZE) in line
    assert target.read_bytes() == PATTERN * (SIZE - 1)


def test_restore_to_existing_file_needs_yes_without_terminal(tmp_path, image, src, monkeypatch):
    target = prefilled(tmp_path / "target.raw")
    # stdin is not a terminal: even a "yes" waiting on it must not count as consent
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    res = cli("restore", image, target)
    assert res.rc == 2
    assert str(target) in res.err and "--yes" in res.err
    assert res.err_lines[-1].startswith("diskimg: error: ")
    assert target.read_bytes() == PATTERN * SIZE
    res = cli("restore", image, target, "--yes")
    assert res.rc == 0, res.err
    assert target.read_bytes() == src[1]


def test_restore_to_larger_file_keeps_the_rest(tmp_path, image, src):
    target = prefilled(tmp_path / "big.raw", SIZE + 5000)
    res = cli("restore", image, target, "--yes")
    assert res.rc == 0, res.err
    assert "larger than the image" in res.out
    data = target.read_bytes()
    assert data[:SIZE] == src[1] and data[SIZE:] == PATTERN * 5000


def test_debug_shows_traceback_normal_mode_one_line(tmp_path, src):
    normal = cli("info", src[0])
    assert normal.rc == 2
    assert_one_error_line(normal, src[0])
    debug = cli("info", "--debug", src[0])
    assert debug.rc == 2
    assert "Traceback (most recent call last)" in debug.err
    assert "NotAnImage" in debug.err
    assert debug.err_lines[-1] == normal.err_lines[0]


# --------------------------------------------------------------------------------------------
# incremental chains: parents missing, moved, replaced; sources of another size

@pytest.fixture
def chain(tmp_path, src, image):
    """full.img, then inc.img taken after blocks 1, 12 and 24 (the short tail) changed."""
    path, data = src
    new = bytearray(data)
    for b in (1, 12, 24):
        new[b * BS + 10: b * BS + 20] = b"0123456789"
    path.write_bytes(bytes(new))
    inc = tmp_path / "inc.img"
    res = cli("image", path, inc, "--block-size", "64K", "--incremental", image, "--json")
    assert res.rc == 0, res.err
    assert res.json["changed_blocks"] == 3 and res.json["stored_blocks"] == 3
    return image, inc, data, bytes(new)


def test_incremental_restores_new_state(tmp_path, chain):
    full, inc, old, new = chain
    info = cli("info", inc, "--json").json
    assert info["kind"] == "incremental"
    assert info["parent"] == cli("info", full, "--json").json["uuid"]
    assert info["parent_name"] == "full.img"
    assert len(info["chain"]) == 2
    assert cli("restore", inc, tmp_path / "new.raw").rc == 0
    assert (tmp_path / "new.raw").read_bytes() == new


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_missing_parent(tmp_path, chain, command):
    full, inc, _, _ = chain
    parent_uuid = cli("info", full, "--json").json["uuid"]
    full.unlink()
    args = [command, inc] + ([tmp_path / "out.raw"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 2
    line = assert_one_error_line(res, parent_uuid, "full.img", tmp_path)
    assert "not found" in line and "looked in" in line
    assert not (tmp_path / "out.raw").exists()


def test_missing_parent_when_imaging_a_grandchild(tmp_path, chain):
    full, inc, _, new = chain
    parent_uuid = cli("info", full, "--json").json["uuid"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(full, elsewhere / "full.img")
    res = cli("image", tmp_path / "source.raw", tmp_path / "inc2.img", "--block-size", "64K",
              "--differential", inc)
    assert res.rc == 2
    assert_one_error_line(res, parent_uuid, "full.img")
    assert not (tmp_path / "inc2.img").exists()
    assert not (tmp_path / "inc2.img.partial").exists()
    res = cli("image", tmp_path / "source.raw", tmp_path / "inc2.img", "--block-size", "64K",
              "--differential", inc, "--search", elsewhere, "--json")
    assert res.rc == 0, res.err
    assert res.json["kind"] == "differential"
    assert res.json["changed_blocks"] == 3  # against the full image at the root


def test_search_finds_moved_parent(tmp_path, chain):
    full, inc, _, new = chain
    moved = tmp_path / "archive"
    moved.mkdir()
    shutil.move(full, moved / "full.img")
    assert cli("verify", inc).rc == 2
    res = cli("verify", inc, "--search", moved, "--json")
    assert res.rc == 0, res.err
    assert [c["path"] for c in res.json["chain"]] == [str(moved / "full.img"), str(inc)]
    res = cli("restore", inc, tmp_path / "out.raw", "--search", moved)
    assert res.rc == 0, res.err
    assert (tmp_path / "out.raw").read_bytes() == new


def test_search_finds_renamed_parent_by_uuid(tmp_path, chain):
    full, inc, _, new = chain
    moved = tmp_path / "archive"
    moved.mkdir()
    shutil.move(full, moved / "monday.img")
    res = cli("restore", inc, tmp_path / "out.raw", "--search", moved)
    assert res.rc == 0, res.err
    assert (tmp_path / "out.raw").read_bytes() == new


def test_parent_replaced_by_another_image(tmp_path, chain, src):
    full, inc, _, _ = chain
    old_uuid = cli("info", full, "--json").json["uuid"]
    # another image under the same name (moved there: --force never replaces a parent)
    res = cli("image", src[0], tmp_path / "other.img", "--block-size", "64K")
    assert res.rc == 0, res.err
    os.replace(tmp_path / "other.img", full)
    for args in (["verify", inc], ["restore", inc, tmp_path / "out.raw"]):
        res = cli(*args)
        assert res.rc == 2
        line = assert_one_error_line(res, old_uuid, "full.img")
        assert "replaced" in line
    assert not (tmp_path / "out.raw").exists()


def test_parent_with_same_uuid_but_other_index(tmp_path, chain):
    """A parent file whose UUID matches but whose index is not the one the child recorded."""
    full, inc, _, _ = chain
    with ImageReader(str(full)) as r:
        size = r.file_size
    buf = bytearray(full.read_bytes())
    # rewrite the footer's index digest and fix the footer CRC: a consistent but different image
    f_off, f_len = struct.unpack_from("<QI", buf, size - fmt.TRAILER_SIZE + 8)
    footer = buf[f_off: f_off + f_len]
    meta = json.loads(footer[8:-4])
    meta["index"]["sha256"] = "0" * 64
    new_footer = fmt.pack_footer(meta)
    assert len(new_footer) == f_len  # same length: the trailer still points at it
    buf[f_off: f_off + f_len] = new_footer
    full.write_bytes(bytes(buf))
    res = cli("restore", inc, tmp_path / "out.raw")
    assert res.rc == 2
    line = assert_one_error_line(res, full)
    assert "different index" in line


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_parent_with_damaged_header_is_damage_not_missing(tmp_path, chain, command):
    """The parent is where the child says, but its header is damaged: that is a corrupt chain
    (exit 1, naming the damaged file), not a parent that cannot be found (exit 2)."""
    full, inc, _, _ = chain
    jlen = struct.unpack_from("<I", full.read_bytes(), 12)[0]
    flip_byte(full, 16 + jlen // 2, mask=0x01)
    args = [command, inc] + ([tmp_path / "out.raw"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 1, res.out + res.err
    text = res.out + res.err
    assert str(full) in text and "header damaged" in text


def test_incremental_of_a_different_size_source(tmp_path, image):
    other = tmp_path / "bigger.raw"
    make_source(other, seed=2, size=SIZE + BS)
    res = cli("image", other, tmp_path / "inc.img", "--block-size", "64K", "--incremental", image)
    assert res.rc == 2
    assert_one_error_line(res, other, str(SIZE), str(SIZE + BS))
    assert not (tmp_path / "inc.img").exists()
    assert not (tmp_path / "inc.img.partial").exists()


def test_incremental_parent_is_not_an_image(tmp_path, src):
    res = cli("image", src[0], tmp_path / "inc.img", "--incremental", src[0])
    assert res.rc == 2
    assert_one_error_line(res, src[0], "not a diskimg image")
    res = cli("image", src[0], tmp_path / "inc.img", "--incremental", tmp_path / "nope.img")
    assert res.rc == 2
    assert_one_error_line(res, tmp_path / "nope.img")


# --------------------------------------------------------------------------------------------
# exit 1: damage.  Restore must stop at the first bad block and never write its data.

def _restore_stops_at(tmp_path, image: Path, data: bytes, bad: int) -> str:
    """Restore onto a target full of PATTERN: exit 1, blocks before `bad` restored, `bad` and
    every later block untouched.  Returns the error line."""
    target = prefilled(tmp_path / "target.raw")
    res = cli("restore", image, target, "--yes", "--no-progress")
    assert res.rc == 1, res.err
    line = assert_one_error_line(res, image, f"block {bad}")
    got = target.read_bytes()
    assert got[: bad * BS] == data[: bad * BS], "blocks before the bad one were not restored"
    assert got[bad * BS:] == PATTERN * (SIZE - bad * BS), \
        "the bad block or a later one was written"
    return line


def _verify_errors(image: Path, *extra) -> list[dict]:
    res = cli("verify", image, "--json", *extra)
    assert res.rc == 1, res.err
    out = res.json
    assert out["ok"] is False
    for e in out["errors"]:
        assert {"block", "offset", "image", "reason"} <= set(e)
    return out["errors"]


def _record_offset(image: Path, block: int) -> tuple[int, fmt.IndexEntry]:
    e = entries(image)[block]
    assert e.kind == fmt.DATA
    return e.offset, e


def test_damaged_compressed_data(tmp_path, image, src):
    bad = 11
    off, e = _record_offset(image, bad)
    assert e.codec == fmt.CODEC_ZSTD
    flip_byte(image, off + fmt.RECORD_HEADER_SIZE + e.stored_len // 2)
    errors = _verify_errors(image)
    assert [x["block"] for x in errors] == [bad]
    assert errors[0]["offset"] == bad * BS
    assert errors[0]["image"] == cli("info", image, "--json").json["uuid"]
    text = cli("verify", image)
    assert text.rc == 1
    assert f"block {bad} (byte {bad * BS})" in text.out and "FAILED: 1 error(s)" in text.out
    _restore_stops_at(tmp_path, image, src[1], bad)


def test_damaged_raw_data_is_never_written(tmp_path, image, src):
    bad = 9  # random, stored uncompressed: the flipped byte would restore as plausible data
    off, e = _record_offset(image, bad)
    assert e.codec == fmt.CODEC_RAW
    pos = 1234
    flip_byte(image, off + fmt.RECORD_HEADER_SIZE + pos)
    corrupt = bytearray(block_of(src[1], bad))
    corrupt[pos] ^= 0xFF
    errors = _verify_errors(image)
    assert [x["block"] for x in errors] == [bad]
    assert "checksum mismatch" in errors[0]["reason"]
    line = _restore_stops_at(tmp_path, image, src[1], bad)
    assert "checksum mismatch" in line
    got = read_at(tmp_path / "target.raw", bad * BS, BS)
    assert got != bytes(corrupt)
    # also onto a new file: the bad block and later ones stay holes (zeros)
    out = tmp_path / "new.raw"
    assert cli("restore", image, out).rc == 1
    if out.exists():
        assert read_at(out, bad * BS, SIZE) == bytes(SIZE - bad * BS)


def test_damaged_record_header(tmp_path, image, src):
    bad = 3
    off, _ = _record_offset(image, bad)
    flip_byte(image, off + 5)  # inside the block number
    errors = _verify_errors(image)
    assert [x["block"] for x in errors] == [bad]
    assert "record header damaged" in errors[0]["reason"]
    _restore_stops_at(tmp_path, image, src[1], bad)


def test_several_damaged_blocks_all_listed(tmp_path, image, src):
    bad = {4: "data", 9: "raw", 13: "header", 24: "data"}  # 24 is the short last block
    for b, where in bad.items():
        off, e = _record_offset(image, b)
        flip_byte(image, off + 8 if where == "header" else off + fmt.RECORD_HEADER_SIZE + 7)
    errors = _verify_errors(image)
    assert [x["block"] for x in errors] == sorted(bad)
    assert [x["offset"] for x in errors] == [b * BS for b in sorted(bad)]
    text = cli("verify", image).out
    for b in bad:
        assert f"block {b} (byte {b * BS})" in text
    assert "FAILED: 4 error(s)" in text
    _restore_stops_at(tmp_path, image, src[1], min(bad))


def test_damaged_index_segment_payload(tmp_path, image):
    """A flipped byte in the compressed index is caught by the segment CRC; the error names
    every block the segment describes."""
    with ImageReader(str(image)) as r:
        (off, length), = r.segments
    flip_byte(image, off + fmt.SEGMENT_HEADER_SIZE + (length - fmt.SEGMENT_HEADER_SIZE) // 2)
    errors = _verify_errors(image)
    assert len(errors) == 1
    assert errors[0]["block"] == 0 and errors[0]["last_block"] == NBLOCKS
    assert "index segment" in errors[0]["reason"]
    res = cli("restore", image, tmp_path / "out.raw")
    assert res.rc == 1
    assert_one_error_line(res, image, "index segment")


def test_damaged_second_index_segment_names_its_blocks(tmp_path):
    """A sparse source of more than one index segment: damage in segment 1 names exactly the
    blocks it describes; restore writes segment 0's blocks and stops."""
    nblocks = fmt.ENTRIES_PER_SEGMENT + 100
    source = tmp_path / "sparse.raw"
    rnd = random.Random(3)
    marks = {7: compressible(rnd, BS), fmt.ENTRIES_PER_SEGMENT + 50: compressible(rnd, BS)}
    with open(source, "wb") as f:
        f.truncate(nblocks * BS)
        for b, d in marks.items():
            f.seek(b * BS)
            f.write(d)
    img = tmp_path / "sparse.img"
    assert cli("image", source, img, "--block-size", "64K").rc == 0
    with ImageReader(str(img)) as r:
        assert len(r.segments) == 2
        off, length = r.segments[1]
    flip_byte(img, off + fmt.SEGMENT_HEADER_SIZE + 3)
    errors = _verify_errors(img)
    assert len(errors) == 1
    assert (errors[0]["block"], errors[0]["last_block"]) == (fmt.ENTRIES_PER_SEGMENT, nblocks - 1)
    assert errors[0]["offset"] == fmt.ENTRIES_PER_SEGMENT * BS
    out = tmp_path / "out.raw"
    # issue 10: a target file the failed restore created is removed unless --keep-partial
    res = cli("restore", img, out, "--keep-partial")
    assert res.rc == 1
    assert_one_error_line(res, img, f"blocks {fmt.ENTRIES_PER_SEGMENT}-{nblocks - 1}")
    assert read_at(out, 7 * BS, BS) == marks[7]
    assert read_at(out, (fmt.ENTRIES_PER_SEGMENT + 50) * BS, BS) == bytes(BS)


def test_damaged_index_segment_header(tmp_path, image):
    with ImageReader(str(image)) as r:
        (off, _), = r.segments
    flip_byte(image, off + 6)  # first block field
    errors = _verify_errors(image)
    assert [(e["block"], e.get("last_block")) for e in errors] == [(0, NBLOCKS)]
    assert "header damaged" in errors[0]["reason"]


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_damaged_header_json(tmp_path, image, command):
    fixed = struct.Struct("<8sHHI")
    jlen = fixed.unpack_from(image.read_bytes())[3]
    flip_byte(image, fixed.size + jlen // 2, mask=0x01)
    args = [command, image] + ([tmp_path / "out.raw"] if command == "restore" else [])
    res = cli(*args)
    assert res.rc == 1
    if command == "verify":
        assert "header damaged" in res.out
    else:
        assert_one_error_line(res, image, "header damaged")
    assert not (tmp_path / "out.raw").exists()


def test_damaged_footer(tmp_path, image):
    with ImageReader(str(image)) as r:
        size = r.file_size
    flip_byte(image, size - fmt.TRAILER_SIZE - 10)  # inside the footer's JSON
    res = cli("verify", image, "--json")
    assert res.rc == 1
    assert "footer damaged" in res.json["errors"][0]["reason"]
    res = cli("restore", image, tmp_path / "out.raw")
    assert res.rc == 1
    assert_one_error_line(res, image, "footer")


def test_truncated_image(tmp_path, image, src):
    cut_block = 12
    off, e = _record_offset(image, cut_block)
    cut = off + fmt.RECORD_HEADER_SIZE + e.stored_len // 2  # in the middle of block 12's data
    os.truncate(image, cut)
    res = cli("verify", image, "--json")
    assert res.rc == 1
    errors = res.json["errors"]
    assert errors and {e["block"] for e in errors} == {cut_block}
    assert any("truncated" in e["reason"] for e in errors)
    for args in (["info", image], ["restore", image, tmp_path / "out.raw"]):
        res = cli(*args)
        assert res.rc == 1
        assert_one_error_line(res, image, "truncated")
    assert not (tmp_path / "out.raw").exists()


# --------------------------------------------------------------------------------------------
# exit 3: the operation failed; exit 130: interrupted

def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_write_failure_exit_3_no_partial(tmp_path, src):
    """A write that fails part way (EFBIG under RLIMIT_FSIZE, as a full disk would) exits 3,
    names the file and leaves nothing behind."""
    img = tmp_path / "x.img"
    proc = subprocess.run([PYTHON, "-m", "diskimg", "image", str(src[0]), str(img),
                           "--block-size", "64K", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO,
                          preexec_fn=_limit_file_size(200_000))
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: ")
    assert "x.img" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.raw"]


def test_image_partial_path_unwritable_exit_3(tmp_path, src):
    img = tmp_path / "x.img"
    (tmp_path / "x.img.partial").mkdir()  # something in the way of the partial file
    res = cli("image", src[0], img, "--block-size", "64K")
    assert res.rc == 3
    assert_one_error_line(res, "x.img.partial")
    assert not img.exists()


def test_interrupt_exits_130_and_leaves_nothing(tmp_path):
    source = tmp_path / "big.raw"
    with open(source, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    img = tmp_path / "big.img"
    proc = subprocess.Popen([PYTHON, "-m", "diskimg", "image", str(source), str(img),
                             "--level", "19", "--threads", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 10
        while not Path(str(img) + ".partial").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, "imaging finished before it could be interrupted"
        assert Path(str(img) + ".partial").exists()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines == ["diskimg: error: interrupted"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.raw"]


# --------------------------------------------------------------------------------------------
# targets that are the very files being read

def test_image_onto_the_source_itself(tmp_path, src):
    res = cli("image", src[0], src[0], "--force")
    assert res.rc == 2
    assert_one_error_line(res, src[0], "source itself")
    assert src[0].read_bytes() == src[1]


@pytest.fixture
def random_image(tmp_path) -> tuple[Path, bytes]:
    """An image of random data: larger than its source, so no 'too small' check can save a
    restore onto the image file itself."""
    source = tmp_path / "noise.raw"
    data = os.urandom(SIZE)
    source.write_bytes(data)
    img = tmp_path / "noise.img"
    assert cli("image", source, img, "--block-size", "64K").rc == 0
    assert img.stat().st_size > SIZE
    return img, data


def test_restore_onto_the_image_itself_refused(tmp_path, random_image):
    img, _ = random_image
    before = img.read_bytes()
    res = cli("restore", img, img, "--yes")
    assert res.rc == 2, f"restore onto its own image file exited {res.rc}:\n{res.out}{res.err}"
    assert_one_error_line(res, img)
    assert img.read_bytes() == before, "the image was overwritten by its own restore"


def test_restore_onto_a_parent_image_refused(tmp_path, random_image):
    img, data = random_image
    changed = bytearray(data)
    changed[5 * BS] ^= 1
    (tmp_path / "noise.raw").write_bytes(bytes(changed))
    inc = tmp_path / "inc.img"
    assert cli("image", tmp_path / "noise.raw", inc, "--block-size", "64K",
               "--incremental", img).rc == 0
    before = img.read_bytes()
    res = cli("restore", inc, img, "--yes")
    assert res.rc == 2, f"restore onto its parent image exited {res.rc}:\n{res.out}{res.err}"
    assert_one_error_line(res, img)
    assert img.read_bytes() == before, "the parent image was overwritten"


def test_restore_into_a_missing_directory_is_a_usage_error(tmp_path, image):
    """As for `image`, a target whose directory does not exist is invalid input (2), not a
    failed operation (3)."""
    res = cli("restore", image, tmp_path / "nodir" / "out.raw")
    assert res.rc == 2, res.err
    assert_one_error_line(res, tmp_path / "nodir")


@pytest.mark.parametrize("parent_bs, child_bs", [("64K", "1M"), ("1M", "64K")])
def test_incremental_with_another_block_size_than_its_parent(tmp_path, src, parent_bs,
                                                              child_bs):
    """A child must either be refused (2, naming the parent) or be made so that it restores;
    never a crash, never an image that can not be restored."""
    parent = tmp_path / "parent.img"
    assert cli("image", src[0], parent, "--block-size", parent_bs).rc == 0
    changed = bytearray(src[1])
    changed[3 * BS + 7] ^= 1
    src[0].write_bytes(bytes(changed))
    child = tmp_path / "child.img"
    res = cli("image", src[0], child, "--block-size", child_bs, "--incremental", parent)
    assert "Traceback" not in res.err
    if res.rc == 2:
        assert_one_error_line(res, parent)
        assert not child.exists()
        return
    assert res.rc == 0, res.err
    assert cli("verify", child).rc == 0
    out = cli("restore", child, tmp_path / "out.raw")
    assert out.rc == 0, f"the incremental just made cannot be restored: {out.err}"
    assert (tmp_path / "out.raw").read_bytes() == bytes(changed)


def test_info_of_a_truncated_image_reports_the_same_header(tmp_path, image):
    """info of a complete image and of the same image cut short report the header alike."""
    cut = tmp_path / "cut.img"
    cut.write_bytes(image.read_bytes()[:-4096])
    whole = cli("info", image, "--json").json
    res = cli("info", cut, "--json")
    assert res.rc == 1 and res.json["truncated"] is True
    part = res.json
    for key in ("uuid", "kind", "parent", "parent_name", "chain", "size", "block_size",
                "blocks", "source", "created", "tool_version", "compression", "digest",
                "format_version"):
        assert part[key] == whole[key], key
