"""The block digest is versioned (docs/FORMAT.md section 3.2): new images hash their blocks with
BLAKE3 (format version 2), `--digest sha256` images are version 1 as before, a child takes its
parent's algorithm, and every image made before the choice keeps verifying with SHA-256.

Everything runs through the CLI on regular files; restores are compared with `cmp`, and the
digests an image holds are checked against hashlib and the `blake3` package, not diskimg."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from pathlib import Path

import blake3
import pytest

from diskimg import format as fmt
from diskimg.errors import UnknownDigest
from diskimg.image.imagefile import ImageReader
from helpers import cli, cmp_same, compressible
from imagecraft import header_json, write_header_json

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
COMPAT_V1 = Path(__file__).resolve().parents[2] / "fixtures" / "compat" / "v1"
DIGESTS = {"sha256": lambda b: hashlib.sha256(b).digest(),
           "blake3": lambda b: blake3.blake3(b).digest()}
RAW_BLOCK = 2                       # incompressible: stored as it is, so a flip reaches the digest


def contents(seed: int) -> bytes:
    """Nine blocks and a short tail: text, zeros, random (stored raw), text..."""
    rnd = random.Random(seed)
    blocks = [compressible(rnd, BS), bytes(BS), rnd.randbytes(BS), compressible(rnd, BS),
              bytes(BS), compressible(rnd, BS), compressible(rnd, BS), bytes(BS),
              compressible(rnd, BS), compressible(rnd, 5000)]
    return b"".join(blocks)


def changed(data: bytes, seed: int) -> bytes:
    rnd = random.Random(seed)
    out = bytearray(data)
    out[BS:BS + 100] = rnd.randbytes(100)          # zero -> data
    out[5 * BS:6 * BS] = bytes(BS)                 # data -> zero
    out[-10:] = b"0123456789"                      # the short last block
    return bytes(out)


def image(src: Path, img: Path, data: bytes, *extra) -> None:
    src.write_bytes(data)
    res = cli("image", src, img, "--block-size", "64K", "--no-progress", *extra)
    assert res.rc == 0, res.err


def info(img: Path) -> dict:
    res = cli("info", img, "--json")
    assert res.rc == 0, res.err
    return res.json


def version_on_disk(img: Path) -> tuple[int, int]:
    """The format version in the header's fixed part and in the trailer."""
    buf = img.read_bytes()
    return struct.unpack_from("<H", buf, 8)[0], struct.unpack_from("<H", buf, len(buf) - 12)[0]


def assert_digests(img: Path, data: bytes, name: str) -> None:
    """Every index entry holds `name`'s digest of its block, computed here from the source."""
    with ImageReader(str(img)) as r:
        for block, entry in r.iter_entries():
            want = DIGESTS[name](data[block * BS:(block + 1) * BS])
            assert entry.sha256 == want, (img, block)


def restore_and_cmp(img: Path, src: Path, tmp_path: Path) -> None:
    target = tmp_path / f"restored-{img.stem}"
    res = cli("restore", img, target, "--no-progress", "--verify")
    assert res.rc == 0, res.err
    cmp_same(target, src)


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_round_trips_full_incremental_differential(tmp_path, digest):
    states = [contents(1)]
    states.append(changed(states[0], 2))
    states.append(changed(states[1], 3))
    extra = () if digest == "blake3" else ("--digest", "sha256")   # blake3 is the default
    image(tmp_path / "s0", tmp_path / "full.img", states[0], *extra)
    image(tmp_path / "s1", tmp_path / "inc1.img", states[1], "--incremental",
          tmp_path / "full.img")
    image(tmp_path / "s2", tmp_path / "inc2.img", states[2], "--incremental",
          tmp_path / "inc1.img")
    image(tmp_path / "s3", tmp_path / "diff.img", states[2], "--differential",
          tmp_path / "inc2.img")
    version = 2 if digest == "blake3" else 1
    for n, (name, state) in enumerate([("full", 0), ("inc1", 1), ("inc2", 2), ("diff", 3)]):
        img = tmp_path / f"{name}.img"
        got = info(img)
        # a changed-block image may hold delta records: format feature "delta", version 3
        want = version if name == "full" else 3
        assert (got["digest"], got["format_version"]) == (digest, want), name
        assert version_on_disk(img) == (want, want)
        assert header_json(img)["digest"] == digest
        assert cli("verify", img, "--no-progress").rc == 0
        restore_and_cmp(img, tmp_path / f"s{state}", tmp_path)
    assert_digests(tmp_path / "full.img", states[0], digest)
    assert_digests(tmp_path / "inc2.img", states[2], digest)
    assert "digest:      " + digest in cli("info", tmp_path / "inc1.img").out.splitlines()


def test_blake3_digests_are_blake3s():
    """The library's BLAKE3 is the reference algorithm (the known answer for no input)."""
    assert fmt.digest_fn("blake3")(b"").hex() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert fmt.zero_digest("blake3", 4464) == blake3.blake3(bytes(4464)).digest()
    assert fmt.zero_digest("sha256", 4464) == hashlib.sha256(bytes(4464)).digest()


def test_child_takes_its_parents_digest_and_refuses_another(tmp_path):
    data = contents(4)
    image(tmp_path / "src", tmp_path / "old.img", data, "--digest", "sha256")
    image(tmp_path / "src", tmp_path / "new.img", data)
    image(tmp_path / "src", tmp_path / "inc-old.img", changed(data, 5), "--incremental",
          tmp_path / "old.img", "--no-delta")    # no delta records: stays version 1
    assert info(tmp_path / "inc-old.img")["digest"] == "sha256"
    assert version_on_disk(tmp_path / "inc-old.img") == (1, 1)
    for parent, wrong in (("new.img", "sha256"), ("old.img", "blake3")):
        for kind in ("--incremental", "--differential"):
            res = cli("image", tmp_path / "src", tmp_path / "child.img", "--block-size", "64K",
                      "--no-progress", kind, tmp_path / parent, "--digest", wrong)
            assert res.rc == 2
            assert res.err_lines == [
                f"diskimg: error: --digest {wrong} differs from {tmp_path / parent}'s block "
                f"digest {'blake3' if wrong == 'sha256' else 'sha256'}; a changed-block image "
                f"uses its parent's"]
            assert not (tmp_path / "child.img").exists()
    # the parent's own algorithm, named, is fine
    image(tmp_path / "src", tmp_path / "inc-new.img", data, "--incremental",
          tmp_path / "new.img", "--digest", "blake3")
    assert info(tmp_path / "inc-new.img")["digest"] == "blake3"


def test_unknown_digest_option_is_a_usage_error(tmp_path):
    (tmp_path / "src").write_bytes(contents(6))
    res = cli("image", tmp_path / "src", tmp_path / "x.img", "--digest", "md5")
    assert res.rc == 2 and "invalid choice: 'md5'" in res.err
    assert not (tmp_path / "x.img").exists()


def test_corruption_is_found_with_blake3(tmp_path):
    data = contents(7)
    img = tmp_path / "full.img"
    image(tmp_path / "src", img, data)
    with ImageReader(str(img)) as r:
        entry = r.entry(RAW_BLOCK)
    assert entry.codec == fmt.CODEC_RAW
    raw = bytearray(img.read_bytes())
    raw[entry.offset + fmt.RECORD_HEADER_SIZE + 1000] ^= 0x01    # inside the stored block
    img.write_bytes(raw)
    res = cli("verify", img, "--no-progress", "--json")
    assert res.rc == 1
    bad = [e for e in res.json["errors"] if e.get("block") is not None]
    assert [e["block"] for e in bad] == [RAW_BLOCK]
    assert "checksum mismatch" in bad[0]["reason"]
    assert blake3.blake3(data[RAW_BLOCK * BS:(RAW_BLOCK + 1) * BS]).hexdigest() in bad[0]["reason"]
    target = tmp_path / "restored"
    res = cli("restore", img, target, "--no-progress")
    assert res.rc == 1
    assert len(res.err_lines) == 1 and f"block {RAW_BLOCK}" in res.err_lines[0]
    # restore stopped at the bad block: the damaged content was never written
    flipped = data[RAW_BLOCK * BS + 1000] ^ 0x01
    assert not target.exists() or target.read_bytes()[RAW_BLOCK * BS + 1000:][:1] != \
        bytes([flipped])


def test_only_changed_restore_compares_with_the_images_digest(tmp_path):
    """--only-changed hashes the target's blocks with the image's algorithm: with BLAKE3, the
    unchanged blocks are recognised (skipped) and the result is the source, byte for byte."""
    data = contents(8)
    img = tmp_path / "full.img"
    image(tmp_path / "src", img, data)
    target = tmp_path / "target"
    target.write_bytes(changed(data, 9))
    res = cli("restore", img, target, "--yes", "--only-changed", "--verify", "--no-progress",
              "--json")
    assert res.rc == 0, res.err
    cmp_same(target, tmp_path / "src")
    # blocks 1, 5 and the last differ; of the others, the data blocks are skipped
    assert res.json["skipped_blocks"] >= 4


def test_v1_fixture_keeps_verifying_and_its_child_stays_sha256(tmp_path):
    """Images from before the choice have no digest key: SHA-256, version 1; an incremental on
    top of one is SHA-256 and version 1 too, so the chain stays readable by the old diskimg."""
    d = tmp_path / "v1"
    shutil.copytree(COMPAT_V1, d)
    expected = json.loads((d / "expected.json").read_text())
    for img in expected["images"]:
        assert "digest" not in header_json(d / img["file"])
        assert info(d / img["file"])["digest"] == "sha256"
        assert cli("verify", d / img["file"], "--no-progress").rc == 0
        target = tmp_path / f"restored-{img['file']}"
        assert cli("restore", d / img["file"], target, "--no-progress").rc == 0
        assert hashlib.sha256(target.read_bytes()).hexdigest() == img["raw_sha256"]
    src = tmp_path / "src"
    src.write_bytes((tmp_path / "restored-incremental.img").read_bytes())
    res = cli("image", src, d / "next.img", "--no-progress", "--incremental",
              d / "incremental.img", "--force")   # --force: another file than the fixture's
    assert res.rc == 0, res.err
    assert info(d / "next.img")["digest"] == "sha256"
    assert version_on_disk(d / "next.img") == (1, 1)
    assert header_json(d / "next.img")["digest"] == "sha256"
    restore_and_cmp(d / "next.img", src, tmp_path)


def _set_version(path: Path, version: int) -> None:
    """The header's fixed-part version changed, its CRC made right."""
    buf = bytearray(path.read_bytes())
    jlen = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<H", buf, 8, version)
    struct.pack_into("<I", buf, 16 + jlen, fmt.crc32c(bytes(buf[:16 + jlen])))
    path.write_bytes(bytes(buf))


def test_unknown_digest_name_is_refused_in_one_line(tmp_path):
    img = tmp_path / "newer.img"
    image(tmp_path / "src", img, contents(10))
    meta = header_json(img)
    meta["digest"] = "sha3"                     # shorter: the records do not move
    write_header_json(img, meta)
    for command in ("verify", "info", "restore"):
        args = [command, img] + ([tmp_path / "out"] if command == "restore" else [])
        res = cli(*args)
        assert res.rc == 2, command
        assert res.err_lines == [
            f"diskimg: error: {img}: made by a newer diskimg: digest 'sha3' unknown"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["v1 claims blake3", "v2 without digest", "v2 says sha256",
                                  "digest not a string"])
def test_digest_contradicting_the_version_is_header_damage(tmp_path, case):
    img = tmp_path / "bad.img"
    image(tmp_path / "src", img, contents(11))
    meta = header_json(img)
    if case == "v1 claims blake3":
        _set_version(img, 1)
    elif case == "v2 without digest":
        del meta["digest"]
    elif case == "v2 says sha256":
        meta["digest"] = "sha256"
    else:
        meta["digest"] = 3
    if case != "v1 claims blake3":
        write_header_json(img, meta)
    res = cli("info", img)
    assert res.rc == 1
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith(
        f"diskimg: error: {img}: header damaged: digest is ")
    res = cli("verify", img, "--no-progress")
    assert res.rc == 1 and f"{img}: header damaged: digest is " in res.out


def test_header_json_rules():
    """Header.from_json checks `digest` against the fixed part's version (section 3.2)."""
    base = {"uuid": "u", "kind": "full", "size": 1, "block_size": BS, "created": "c",
            "tool_version": "t", "parent": None}
    assert fmt.Header.from_json(base).digest == "sha256"
    assert fmt.Header.from_json(base, 1).digest == "sha256"
    assert fmt.Header.from_json({**base, "digest": "sha256"}, 1).format_version == 1
    assert fmt.Header.from_json({**base, "digest": "blake3"}, 2).format_version == 2
    for d, version in (({}, 2), ({"digest": "blake3"}, 1), ({"digest": "sha256"}, 2),
                       ({"digest": "x"}, 1), ({"digest": None}, 2)):
        with pytest.raises(fmt.MetadataInvalid):
            fmt.Header.from_json({**base, **d}, version)
    with pytest.raises(UnknownDigest):
        fmt.Header.from_json({**base, "digest": "x"}, 2)
    h = fmt.Header.from_json({**base, "digest": "blake3"}, 2)
    assert fmt.Header.from_json(json.loads(json.dumps(h.to_json())), 2) == h


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
def test_rescue_hashes_with_its_digest(tmp_path, digest):
    data = contents(12)
    src = tmp_path / "src"
    src.write_bytes(data)
    img = tmp_path / "rescued.img"
    extra = () if digest == "blake3" else ("--digest", "sha256")
    res = cli("image", src, img, "--rescue", "--block-size", "64K", "--no-progress", *extra)
    assert res.rc == 0, res.err
    assert info(img)["digest"] == digest
    assert_digests(img, data, digest)
    assert cli("verify", img, "--no-progress").rc == 0
    restore_and_cmp(img, src, tmp_path)
