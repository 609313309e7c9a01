"""Crafted and inconsistent images through `info`, `verify` and `restore` in-process: metadata
that passes its CRC but not the format's schema, index entries that point outside the image,
a chain whose PARENT entries disagree with the parent, damage in parent blocks that the child
overrides, and images cut short.  Every one must end in a one-line error naming the file and
what is wrong (exit 1), never in "internal error" (exit 3)."""
from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.errors import MetadataError
from diskimg.image.imagefile import ImageReader
from helpers import cli, compressible, flip_byte
from imagecraft import (
    footer_json,
    header_json,
    rewrite_index,
    write_footer_json,
    write_header_json,
)

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
NBLOCKS = 12
SIZE = NBLOCKS * BS + 1000          # a short last block
ZERO_BLOCKS = (4, 5)
CHANGED = (1, 7)                    # the blocks the incremental stores


def _source(seed: int) -> bytes:
    rnd = random.Random(seed)
    out = bytearray()
    for b in range(-(-SIZE // BS)):
        n = min(BS, SIZE - b * BS)
        out += bytes(n) if b in ZERO_BLOCKS else (rnd.randbytes(n) if b == 9
                                                    else compressible(rnd, n))
    return bytes(out)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """full.img and inc.img (blocks 1 and 7 changed), made once; tests work on copies."""
    d = tmp_path_factory.mktemp("pristine")
    old = _source(1)
    new = bytearray(old)
    for b in CHANGED:
        new[b * BS + 100:b * BS + 110] = b"0123456789"
    (d / "src").write_bytes(old)
    assert cli("image", d / "src", d / "full.img", "--block-size", "64K").rc == 0
    (d / "src").write_bytes(bytes(new))
    # --no-delta: the changed blocks stored whole, so that damage in the parent's copy of them
    # does not matter to the child (tests/root/test_delta.py covers deltas on damaged parents)
    assert cli("image", d / "src", d / "inc.img", "--incremental", d / "full.img",
               "--no-delta").rc == 0
    return d, old, bytes(new)


@pytest.fixture
def imgs(tmp_path, pristine) -> tuple[Path, Path, bytes, bytes]:
    d, old, new = pristine
    shutil.copy(d / "full.img", tmp_path / "full.img")
    shutil.copy(d / "inc.img", tmp_path / "inc.img")
    return tmp_path / "full.img", tmp_path / "inc.img", old, new


def _one_error(res, *names) -> str:
    assert "Traceback" not in res.err + res.out
    assert "internal error" not in res.err, res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskimg: error: "), res.err
    for n in names:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _all_commands_fail(image: Path, out: Path, *names: str) -> None:
    """info and restore end in one error line naming `names` (exit 1), verify reports it
    (exit 1), and nothing is written."""
    for args in (["info", image], ["restore", image, out]):
        res = cli(*args)
        assert res.rc == 1, (args, res.rc, res.err)
        _one_error(res, image, *names)
    res = cli("verify", image, "--json")
    assert res.rc == 1, res.err
    assert any(all(n in e["reason"] for n in names) for e in res.json["errors"]), res.json
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# header JSON that passes its CRC

def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


HEADER_CASES = {
    # name: (mutation of the header dict, or raw bytes; words the message must contain)
    "not an object": (b'["x"]', "the header JSON is a list"),
    "deep json": (_deep(200_000), "nested too deeply"),
    "size null": (lambda h: h.update(size=None), "size is null"),
    "size 2^63": (lambda h: h.update(size=1 << 63), "size is 9223372036854775808"),
    "size negative": (lambda h: h.update(size=-1), "size is -1"),
    "size float": (lambda h: h.update(size=1.5), "size is the number 1.5"),
    "size a string": (lambda h: h.update(size="70000"), "size is '70000'"),
    "block size not a power of two": (lambda h: h.update(block_size=65537), "block_size"),
    "block size bool": (lambda h: h.update(block_size=True), "block_size is true"),
    "uuid missing": (lambda h: h.pop("uuid"), "uuid is missing"),
    "uuid a list": (lambda h: h.update(uuid=[]), "uuid is a list"),
    "kind unknown": (lambda h: h.update(kind="snapshot"), "kind is 'snapshot'"),
    "created null": (lambda h: h.update(created=None), "created is null"),
    "source a list": (lambda h: h.update(source=[]), "source is a list"),
    "source.serial a number": (lambda h: h["source"].update(serial=5), "source.serial is 5"),
    "chain of numbers": (lambda h: h.update(chain=[1, 2]), "chain[0] is 1"),
    "chain null": (lambda h: h.update(chain=None), "chain is null"),
    "compression a list": (lambda h: h.update(compression=[]), "compression is a list"),
    "compression.level text": (lambda h: h["compression"].update(level="x"),
                               "compression.level is 'x'"),
    "extra null": (lambda h: h.update(extra=None), "extra is null"),
    "extra.rescue a string": (lambda h: h["extra"].update(rescue="yes"), "extra.rescue"),
    "source.ptable_id a number": (lambda h: h["source"].update(ptable_id=5),
                                  "source.ptable_id is 5"),
    "source.fs_uuid a list": (lambda h: h["source"].update(fs_uuid=[]), "source.fs_uuid"),
    "source.fs_type a number": (lambda h: h["source"].update(fs_type=1), "source.fs_type is 1"),
    "extra.all_blocks a string": (lambda h: h["extra"].update(all_blocks="yes"),
                                  "extra.all_blocks"),
    "extra.source_mounted_rw a string": (lambda h: h["extra"].update(source_mounted_rw="/mnt"),
                                         "extra.source_mounted_rw"),
    "extra.source_mounted_rw of numbers": (lambda h: h["extra"].update(source_mounted_rw=[1]),
                                           "extra.source_mounted_rw"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_crafted_header_of_full_image(imgs, tmp_path, case):
    full, _, _, _ = imgs
    change, words = HEADER_CASES[case]
    if isinstance(change, bytes):
        write_header_json(full, None, raw=change)
    else:
        h = header_json(full)
        change(h)
        write_header_json(full, h)
    _all_commands_fail(full, tmp_path / "out.raw", "header damaged", words)


PARENT_CASES = {
    "parent a list": (lambda h: h.update(parent=[]), "parent is a list"),
    "parent null in an incremental": (lambda h: h.update(parent=None), "parent is null"),
    "parent without name": (lambda h: h["parent"].pop("name"), "parent.name is missing"),
    "parent name with a directory": (lambda h: h["parent"].update(name="../full.img"),
                                     "parent.name is '../full.img', a file name"),
    "parent uuid null": (lambda h: h["parent"].update(uuid=None), "parent.uuid is null"),
    "parent digest not hex": (lambda h: h["parent"].update(index_sha256="Z" * 64),
                              "parent.index_sha256"),
    "parent kind unknown": (lambda h: h["parent"].update(kind=7), "parent.kind is 7"),
}


@pytest.mark.parametrize("case", sorted(PARENT_CASES))
def test_crafted_parent_reference(imgs, tmp_path, case):
    _, inc, _, _ = imgs
    change, words = PARENT_CASES[case]
    h = header_json(inc)
    change(h)
    write_header_json(inc, h)
    _all_commands_fail(inc, tmp_path / "out.raw", "header damaged", words)


# --------------------------------------------------------------------------------------------
# footer JSON that passes its CRC

def _footer_cases(blocks: int, size: int) -> dict:
    return {
        "not an object": (b'"footer"', "the footer JSON is 'footer'"),
        "deep json": (_deep(200_000), "nested too deeply"),
        "index missing": (lambda f: f.pop("index"), "index is missing"),
        "index a list": (lambda f: f.update(index=[]), "index is a list"),
        "stats a list": (lambda f: f.update(stats=[1]), "stats is a list"),
        "stored_blocks null": (lambda f: f["stats"].update(stored_blocks=None),
                               "stats.stored_blocks is null, a count expected"),
        "stored_blocks negative": (lambda f: f["stats"].update(stored_blocks=-3),
                                   "stats.stored_blocks is -3"),
        "entries per segment 0": (lambda f: f["index"].update(entries_per_segment=0),
                                  "index.entries_per_segment is 0"),
        "entries per segment 2^40": (lambda f: f["index"].update(entries_per_segment=1 << 40),
                                     "index.entries_per_segment"),
        "entries per segment null": (lambda f: f["index"].update(entries_per_segment=None),
                                     "index.entries_per_segment is null"),
        "segments an object": (lambda f: f["index"].update(segments={}),
                               "index.segments is an object"),
        "segment not a pair": (lambda f: f["index"]["segments"].__setitem__(0, [1]),
                               "index.segments[0] is a list, an [offset, length] pair"),
        "segment offset negative": (lambda f: f["index"]["segments"][0].__setitem__(0, -1),
                                    "index.segments[0] offset is -1"),
        "segment offset 2^63": (lambda f: f["index"]["segments"][0].__setitem__(0, 1 << 63),
                                "index.segments[0]"),
        "segment in the header": (lambda f: f["index"]["segments"][0].__setitem__(0, 3),
                                  "index.segments[0]"),
        "segment past the footer": (lambda f: f["index"]["segments"][0].__setitem__(1, 1 << 40),
                                    "index.segments[0]"),
        "segment too short": (lambda f: f["index"]["segments"][0].__setitem__(1, 5),
                              "index.segments[0] length is 5"),
        "two segments listed": (lambda f: f["index"]["segments"].append(
            list(f["index"]["segments"][0])), "index.segments lists 2 segments, 1 expected"),
        "digest null": (lambda f: f["index"].update(sha256=None), "index.sha256 is null"),
        "unreadable null": (lambda f: f.update(unreadable=None), "unreadable is null"),
        "unreadable past the end": (lambda f: f.update(unreadable=[[size - 10, 20]]),
                                    "unreadable[0]"),
        "unreadable overlapping": (lambda f: f.update(unreadable=[[0, 100], [50, 10]]),
                                   "unreadable[1]"),
        "unreadable unsorted": (lambda f: f.update(unreadable=[[500, 10], [0, 10]]),
                                "unreadable[1]"),
        "unreadable not pairs": (lambda f: f.update(unreadable=[5]), "unreadable[0] is 5"),
        "completed a number": (lambda f: f.update(completed=5), "completed is 5"),
        "used a list": (lambda f: f.update(used=[]), "used is a list"),
        "rescue a string": (lambda f: f.update(rescue="x"), "rescue is 'x'"),
    }


FOOTER_CASES = sorted(_footer_cases(0, 0))


@pytest.mark.parametrize("case", FOOTER_CASES)
def test_crafted_footer(imgs, tmp_path, case):
    full, _, _, _ = imgs
    change, words = _footer_cases(NBLOCKS + 1, SIZE)[case]
    if isinstance(change, bytes):
        write_footer_json(full, None, raw=change)
    else:
        f = footer_json(full)
        change(f)
        write_footer_json(full, f)
    _all_commands_fail(full, tmp_path / "out.raw", "footer damaged", words)


def test_valid_unreadable_ranges_still_read(imgs, tmp_path):
    """Validation rejects only what is wrong: sorted, disjoint ranges inside the device (a
    rescued image's) are listed by info and restore as before."""
    full, _, old, _ = imgs
    f = footer_json(full)
    f["unreadable"] = [[0, 512], [512, 512], [SIZE - 512, 512]]
    write_footer_json(full, f)
    info = cli("info", full, "--json")
    assert info.rc == 0, info.err
    assert info.json["unreadable"] == [{"offset": 0, "length": 512}, {"offset": 512, "length": 512},
                                       {"offset": SIZE - 512, "length": 512}]
    assert cli("verify", full).rc == 0
    res = cli("restore", full, tmp_path / "out.raw", "--json")
    assert res.rc == 1 and res.json["unreadable"] == [[0, 512], [512, 512], [SIZE - 512, 512]]
    assert (tmp_path / "out.raw").read_bytes() == old


def test_unknown_keys_are_ignored(imgs, tmp_path):
    """Section 13: a reader ignores keys it does not know, of any type."""
    full, _, old, _ = imgs
    h = header_json(full)
    before = len(json.dumps(h, sort_keys=True))
    h["zz"] = [None]
    h["source"]["id"] = {"g": 1}
    grown = len(json.dumps(h, sort_keys=True)) - before
    h["source"]["path"] = h["source"]["path"][grown:]   # same length: the records stay put
    write_header_json(full, h)
    f = footer_json(full)
    f["future"] = None
    write_footer_json(full, f)
    assert cli("verify", full).rc == 0
    assert cli("restore", full, tmp_path / "out.raw").rc == 0
    assert (tmp_path / "out.raw").read_bytes() == old


# --------------------------------------------------------------------------------------------
# index entries that pass their CRCs

def _set(block: int, **fields):
    def mutate(entries: list[fmt.IndexEntry]) -> list[fmt.IndexEntry]:
        e = entries[block]
        entries[block] = fmt.IndexEntry(**{**e.__dict__, **fields})
        return entries
    return mutate


INDEX_CASES = {
    "record offset 2^64-1": (0, dict(offset=(1 << 64) - 1), "outside the records area"),
    "record offset 2^63": (0, dict(offset=1 << 63), "outside the records area"),
    "record in the header": (0, dict(offset=4), "outside the records area"),
    "stored length 4 GiB": (0, dict(stored_len=(1 << 32) - 1), "stored length"),
    "unknown codec": (0, dict(codec=9), "unknown codec 9"),
    "unknown kind with zero digest": (4, dict(kind=9), "unknown kind 9"),
    "parent in a full image": (0, dict(kind=fmt.PARENT), "refers to a parent"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_crafted_index_entry(imgs, tmp_path, case):
    full, _, _, _ = imgs
    block, fields, words = INDEX_CASES[case]
    rewrite_index(full, _set(block, **fields))
    res = cli("restore", full, tmp_path / "out.raw")
    assert res.rc == 1, res.err
    _one_error(res, full, f"block {block}", words)
    res = cli("verify", full, "--json")
    assert res.rc == 1
    bad = [e for e in res.json["errors"] if e["block"] == block]
    assert bad and words in bad[0]["reason"], res.json


def test_record_overlapping_the_index(imgs, tmp_path):
    full, _, _, _ = imgs
    with ImageReader(str(full)) as r:
        (seg_off, _), = r.segments
        last = max(b for b, e in r.iter_entries() if e.kind == fmt.DATA)
        e = r.entry(last)
    rewrite_index(full, _set(last, offset=seg_off - fmt.RECORD_HEADER_SIZE - e.stored_len + 1))
    res = cli("restore", full, tmp_path / "out.raw")
    assert res.rc == 1
    _one_error(res, full, f"block {last}", "outside the records area")


# --------------------------------------------------------------------------------------------
# chains

def test_parent_entry_with_another_checksum(imgs, tmp_path):
    """A child whose PARENT entry carries a SHA-256 that is not the parent block's (CRCs and
    digest recomputed): verify names the block, as restore refuses it.  (verify passed it.)"""
    _, inc, _, _ = imgs
    block = 2
    rewrite_index(inc, _set(block, sha256=bytes(32)))
    res = cli("verify", inc, "--json")
    assert res.rc == 1
    errors = res.json["errors"]
    assert [(e["block"], e["path"]) for e in errors] == [(block, str(inc))], errors
    assert "chain inconsistent" in errors[0]["reason"] and errors[0]["affects_restore"]
    text = cli("verify", inc)
    assert f"block {block} (byte {block * BS})" in text.out and "chain inconsistent" in text.out
    res = cli("restore", inc, tmp_path / "out.raw")
    assert res.rc == 1
    _one_error(res, f"block {block}", "chain inconsistent")


def test_parent_run_with_another_checksum_is_named_as_a_range(imgs, tmp_path):
    """A run of PARENT entries (the zero blocks 4-5) that disagrees with the parent's run."""
    _, inc, _, _ = imgs

    def mutate(entries):
        for b in ZERO_BLOCKS:
            entries[b] = fmt.IndexEntry(fmt.PARENT, b"\x01" * 32)
        return entries
    rewrite_index(inc, mutate)
    errors = cli("verify", inc, "--json").json["errors"]
    assert [(e["block"], e.get("last_block")) for e in errors] == [(4, 5)], errors


def _record(image: Path, block: int) -> tuple[int, fmt.IndexEntry]:
    with ImageReader(str(image)) as r:
        e = r.entry(block)
    assert e.kind == fmt.DATA
    return e.offset, e


def test_damage_the_child_overrides_does_not_affect_restore(imgs, tmp_path):
    full, inc, _, new = imgs
    off, e = _record(full, CHANGED[0])            # the child stores this block itself
    flip_byte(full, off + fmt.RECORD_HEADER_SIZE + e.stored_len // 2)
    res = cli("verify", inc, "--json")
    assert res.rc == 1
    errors = res.json["errors"]
    assert [(e["path"], e["block"]) for e in errors] == [(str(full), CHANGED[0])]
    assert errors[0]["affects_restore"] is False and errors[0]["overridden_by"] == str(inc)
    assert res.json["errors_affecting_restore"] == 0
    text = cli("verify", inc).out
    assert f"(overridden by {inc}: does not affect restoring {inc})" in text
    assert "none of them affect restoring it" in text
    res = cli("restore", inc, tmp_path / "out.raw")
    assert res.rc == 0, res.err
    assert (tmp_path / "out.raw").read_bytes() == new
    # the full image itself cannot be restored: there it matters
    res = cli("verify", full, "--json")
    assert res.rc == 1 and res.json["errors"][0]["affects_restore"] is True


def test_damage_in_a_parent_block_the_child_uses_affects_restore(imgs, tmp_path):
    full, inc, _, _ = imgs
    off, e = _record(full, 3)                      # PARENT in the child
    flip_byte(full, off + fmt.RECORD_HEADER_SIZE + e.stored_len // 2)
    res = cli("verify", inc, "--json")
    assert res.rc == 1
    errors = res.json["errors"]
    assert [(e["block"], e["affects_restore"]) for e in errors] == [(3, True)]
    assert res.json["errors_affecting_restore"] == 1
    text = cli("verify", inc).out
    assert "overridden" not in text and "FAILED: 1 error(s)" in text
    assert cli("restore", inc, tmp_path / "out.raw").rc == 1


def test_damaged_parent_segment_partly_overridden(imgs, tmp_path):
    """A damaged index segment of the parent covers every block; the child still takes most
    of them from it, so the damage matters."""
    full, inc, _, _ = imgs
    with ImageReader(str(full)) as r:
        (off, _), = r.segments
    flip_byte(full, off + fmt.SEGMENT_HEADER_SIZE + 3)
    errors = cli("verify", inc, "--json").json["errors"]
    seg = [e for e in errors if e["path"] == str(full) and e.get("last_block") is not None]
    assert seg and seg[0]["affects_restore"] is True


# --------------------------------------------------------------------------------------------
# images cut short

def test_cut_inside_the_records_says_nothing_survived(imgs, tmp_path):
    full, _, _, _ = imgs
    with ImageReader(str(full)) as r:
        start = r.data_start
    data = full.read_bytes()
    full.write_bytes(data[:start + 30])            # inside the first record's header
    res = cli("verify", full)
    assert res.rc == 1
    assert "no stored block survived" in res.out
    assert "block -1" not in res.out and "0 stored blocks" not in res.out


@pytest.mark.parametrize("keep", [3, 8, 12, 100])
def test_cut_inside_the_header_says_so(imgs, tmp_path, keep):
    """A short file that starts like an image is cut inside its header, not "no magic"."""
    full, _, _, _ = imgs
    full.write_bytes(full.read_bytes()[:keep])
    for args in (["info", full], ["restore", full, tmp_path / "out.raw"]):
        res = cli(*args)
        assert res.rc == 1, res.err
        line = _one_error(res, full, "truncated inside its header")
        assert "magic" not in line
    res = cli("verify", full)
    assert res.rc == 1 and "truncated inside its header" in res.out


def test_empty_file_is_not_an_image(tmp_path):
    (tmp_path / "empty.img").write_bytes(b"")
    res = cli("info", tmp_path / "empty.img")
    assert res.rc == 2
    _one_error(res, tmp_path / "empty.img", "is empty")


def test_info_of_a_truncated_image(imgs, tmp_path):
    """info shows the header and what survived, and exits 1."""
    full, _, _, _ = imgs
    block = 3
    off, _ = _record(full, block)
    data = full.read_bytes()
    full.write_bytes(data[:off + 10])              # blocks 0-2 survive
    uuid = header_json(full)["uuid"]
    res = cli("info", full, "--json")
    assert res.rc == 1
    info = res.json
    assert info["ok"] is False and info["truncated"] is True
    assert info["error"]["exit_code"] == 1 and info["error"]["path"] == str(full)
    assert "truncated" in info["error"]["message"]
    assert (info["uuid"], info["kind"], info["size"], info["block_size"]) == \
        (uuid, "full", SIZE, BS)
    assert info["survived"] == {"records": 3, "blocks": 3, "bytes": 3 * BS, "up_to_byte": off,
                                "last_block": 2}
    res = cli("info", full)
    assert res.rc == 1
    assert f"uuid:        {uuid}" in res.out and "TRUNCATED" in res.out
    assert f"3 whole records of 3 blocks (192.0 KiB), up to byte {off}" in res.out
    _one_error(res, full, "truncated")


def test_info_of_a_truncated_image_with_nothing_left(imgs, tmp_path):
    full, _, _, _ = imgs
    with ImageReader(str(full)) as r:
        start = r.data_start
    full.write_bytes(full.read_bytes()[:start])
    res = cli("info", full, "--json")
    assert res.rc == 1 and res.json["survived"]["records"] == 0
    assert res.json["survived"]["last_block"] is None
    assert "survived:    no stored block" in cli("info", full).out


def test_metadata_error_is_a_corrupt_image(imgs):
    """The library raises MetadataError (a CorruptImage) with the file, the part and the
    field, so a caller can tell which part is damaged."""
    full, _, _, _ = imgs
    f = footer_json(full)
    f["stats"]["zero_blocks"] = None
    write_footer_json(full, copy.deepcopy(f))
    with pytest.raises(MetadataError) as exc:
        ImageReader(str(full))
    assert exc.value.path == str(full) and exc.value.part == "footer"
    assert str(exc.value) == (f"{full}: footer damaged: stats.zero_blocks is null, a count "
                              f"expected")
