"""Encrypted images (issue 12, feature "encrypted", docs/FORMAT.md section 14) on files: keys
(key file, passphrase file, $DISKIMG_PASSPHRASE_FILE, wrong or missing keys, a key of another
chain), the attacks the issue lists (each detected, the block named), downgrade refusal,
`verify --no-key` and `info`.  The ext4 round trips on loop devices are in
tests/root/test_encrypted.py."""
from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.crypto.keyring import Credentials, using
from diskimg.image.imagefile import ImageReader
from helpers import cli, compressible, flip_byte, read_at, write_at
from imagecraft import footer_json, header_json, write_header_json

K64 = 64 * 1024
# these tests tamper with bytes at places of the layout of images without parity; encrypted
# images with parity (the default) are made by tests/root/test_encrypted_root.py and
# test_encrypted_with_parity below
pytestmark = pytest.mark.usefixtures("no_default_parity")

MARKER = b"TOP-SECRET-MARKER-7f3a"


def _source(path: Path, seed: int = 1, blocks: int = 12) -> Path:
    """Blocks 0-3 random (stored raw then sealed), 4-7 compressible text with the marker,
    8-9 zeros, 10-11 random: both chain variants (zstd+aes, aes) appear."""
    rnd = random.Random(seed)
    parts = [rnd.randbytes(K64) for _ in range(4)]
    for _ in range(4):
        text = (MARKER + b" " + compressible(rnd, 1000)) * (K64 // 1023 + 1)
        parts.append(text[:K64])
    parts += [bytes(K64)] * 2 + [rnd.randbytes(K64) for _ in range(blocks - 10)]
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture
def keyed(tmp_path):
    """(source, image, key file) of an encrypted full image in 64 KiB blocks."""
    src = _source(tmp_path / "src.bin")
    kf = tmp_path / "kf"
    kf.write_bytes(os.urandom(32))
    img = tmp_path / "a.dimg"
    res = cli("image", src, img, "--block-size", "64K", "--encrypt", "--key-file", kf,
              "--no-progress")
    assert res.rc == 0, res.err
    return src, img, kf


def _entries(img: Path, kf: Path) -> list[fmt.IndexEntry]:
    creds = Credentials(key_file=str(kf), key_file_bytes=kf.read_bytes())
    with using(creds), ImageReader(str(img)) as r:
        return [e for _, e in r.iter_entries()]


def test_round_trip_and_nothing_in_the_clear(keyed, tmp_path):
    src, img, kf = keyed
    data = img.read_bytes()
    assert MARKER not in data and MARKER in src.read_bytes()
    assert str(src).encode() not in data      # the source path is sealed too
    h = header_json(img)
    assert h["features"] == ["encrypted"] and h["source"] == {}
    assert struct.unpack_from("<H", data, 8)[0] == 3
    out = tmp_path / "out.bin"
    res = cli("restore", img, out, "--key-file", kf, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert out.read_bytes() == src.read_bytes()
    chains = {e.codec for e in _entries(img, kf) if e.kind == fmt.DATA}
    assert {h["transforms"][str(c)][-1] for c in chains} == {"aes-256-gcm"}
    assert len(chains) == 2       # compressed and incompressible blocks both sealed


def test_incremental_and_differential(keyed, tmp_path):
    src, img, kf = keyed
    buf = bytearray(src.read_bytes())
    buf[5 * K64 + 100:5 * K64 + 120] = b"changed-block-five!!"
    src.write_bytes(bytes(buf))
    inc = tmp_path / "b.dimg"
    res = cli("image", src, inc, "--incremental", img, "--key-file", kf, "--json",
              "--no-progress")
    assert res.rc == 0, res.err
    assert res.json["stored_blocks"] == 1 and res.json["changed_blocks"] == 1
    buf[10 * K64:10 * K64 + 5] = b"eleven"[:5]
    src.write_bytes(bytes(buf))
    diff = tmp_path / "c.dimg"
    res = cli("image", src, diff, "--differential", inc, "--key-file", kf, "--json",
              "--no-progress")
    assert res.rc == 0, res.err
    assert res.json["stored_blocks"] == 2
    for child in (inc, diff):
        assert header_json(child)["encryption"]["key_id"] == header_json(img)["encryption"]["key_id"]
        assert MARKER not in child.read_bytes()
    out = tmp_path / "out.bin"
    assert cli("restore", diff, out, "--key-file", kf, "--yes", "--no-progress").rc == 0
    assert out.read_bytes() == bytes(buf)
    # the index holds keyed digests: no plain digest of any block of the source
    from blake3 import blake3
    plain = {blake3(bytes(buf[i:i + K64])).digest() for i in range(0, len(buf), K64)}
    keyed_digests = {e.sha256 for e in _entries(diff, kf)}
    assert not plain & keyed_digests


def test_key_errors_exit_2_before_anything(keyed, tmp_path):
    src, img, kf = keyed
    other = tmp_path / "other-kf"
    other.write_bytes(os.urandom(32))
    cases = {
        "no key": [],
        "another chain's key file": ["--key-file", other],
        "missing key file": ["--key-file", tmp_path / "nope"],
    }
    for what, opts in cases.items():
        for cmd in (["verify", img], ["restore", img, tmp_path / "t.bin", "--yes"],
                    ["image", src, tmp_path / "inc.dimg", "--incremental", img]):
            res = cli(*cmd, *opts, "--no-progress")
            assert res.rc == 2, (what, cmd, res.err)
            assert len(res.err_lines) == 1 and res.err.startswith("diskimg: error: "), res.err
            assert not (tmp_path / "t.bin").exists()
            assert not (tmp_path / "inc.dimg").exists() and \
                not (tmp_path / "inc.dimg.partial").exists()
    res = cli("verify", img, "--key-file", other)
    assert "opens none of its 1 key slots" in res.err and str(other) in res.err
    res = cli("verify", img, "--key-file", tmp_path / "nope")
    assert "no such key file" in res.err
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    assert cli("verify", img, "--key-file", short).rc == 2


def test_encrypt_needs_a_key_and_writes_nothing(tmp_path):
    src = _source(tmp_path / "src.bin")
    img = tmp_path / "a.dimg"
    res = cli("image", src, img, "--encrypt", "--no-progress")
    assert res.rc == 2 and "--encrypt needs a key" in res.err
    assert not img.exists() and not Path(str(img) + ".partial").exists()
    kf = tmp_path / "kf"
    kf.write_bytes(os.urandom(32))
    res = cli("image", src, img, "--key-file", kf, "--no-progress")
    assert res.rc == 2 and "not --encrypt" in res.err and not img.exists()


def test_passphrase_file_and_environment(tmp_path, monkeypatch):
    src = _source(tmp_path / "src.bin")
    pf = tmp_path / "pass"
    pf.write_text("correct horse battery staple\n")
    img = tmp_path / "a.dimg"
    res = cli("image", src, img, "--block-size", "64K", "--encrypt", "--passphrase-file", pf,
              "--no-progress")
    assert res.rc == 0, res.err
    assert b"correct horse" not in img.read_bytes()
    slot = header_json(img)["encryption"]["slots"][0]
    assert slot["type"] == "passphrase" and slot["kdf"]["name"] == "argon2id"
    assert slot["kdf"]["memory_kib"] == 65536
    wrong = tmp_path / "wrong"
    wrong.write_text("incorrect horse\n")
    res = cli("verify", img, "--passphrase-file", wrong)
    assert res.rc == 2 and "the passphrase opens none" in res.err
    assert "incorrect" not in res.err
    monkeypatch.setenv("DISKIMG_PASSPHRASE_FILE", str(pf))
    assert cli("verify", img).rc == 0
    out = tmp_path / "out.bin"
    assert cli("restore", img, out, "--yes", "--no-progress").rc == 0
    assert out.read_bytes() == src.read_bytes()
    # the environment alone does not make plain images suspect
    plain = tmp_path / "plain.dimg"
    assert cli("image", src, plain, "--no-progress").rc == 0
    assert cli("verify", plain).rc == 0


def _record(img: Path, kf: Path, block: int) -> tuple[int, int]:
    """(offset of the payload, its length) of block `block`'s record."""
    e = _entries(img, kf)[block]
    assert e.kind == fmt.DATA
    return e.offset + fmt.RECORD_HEADER_SIZE, e.stored_len


def _bad_blocks(res) -> list[int]:
    return sorted(e["block"] for e in res.json["errors"] if e["block"] is not None)


def test_flipped_ciphertext_bit_named(keyed, tmp_path):
    src, img, kf = keyed
    off, n = _record(img, kf, 2)
    flip_byte(img, off + n // 2, 0x01)
    res = cli("verify", img, "--key-file", kf, "--json")
    assert res.rc == 1 and _bad_blocks(res) == [2]
    assert "fails authentication" in res.json["errors"][0]["reason"]
    # restore never writes it: refused, and with --salvage written as zeros, listed
    out = tmp_path / "out.bin"
    res = cli("restore", img, out, "--key-file", kf, "--yes", "--no-progress")
    assert res.rc == 1 and "block 2" in res.err
    res = cli("restore", img, out, "--key-file", kf, "--yes", "--salvage", "--no-progress")
    assert res.rc == 1
    data = out.read_bytes()
    assert data[2 * K64:3 * K64] == bytes(K64)
    assert data[:2 * K64] == src.read_bytes()[:2 * K64]
    # without the key, the structure is intact: verify --no-key says so, and what it did not do
    res = cli("verify", img, "--no-key")
    assert res.rc == 0 and "NOT checked" in res.out


def test_swapped_records_named(keyed):
    _, img, kf = keyed
    a, n = _record(img, kf, 0)
    b, m = _record(img, kf, 1)
    assert n == m          # random blocks: sealed raw, the same length
    pa, pb = read_at(img, a, n), read_at(img, b, m)
    write_at(img, a, pb)
    write_at(img, b, pa)
    res = cli("verify", img, "--key-file", kf, "--json")
    assert res.rc == 1 and _bad_blocks(res) == [0, 1]


def test_record_from_another_image_of_the_same_key(keyed, tmp_path):
    src, img, kf = keyed
    buf = bytearray(src.read_bytes())
    buf[K64:2 * K64] = random.Random(9).randbytes(K64)      # block 1 changes: stored anew
    src.write_bytes(bytes(buf))
    inc = tmp_path / "b.dimg"
    assert cli("image", src, inc, "--incremental", img, "--key-file", kf,
               "--no-progress").rc == 0
    a, n = _record(img, kf, 1)
    b, m = _record(inc, kf, 1)
    assert n == m
    write_at(img, a, read_at(inc, b, m))
    res = cli("verify", img, "--key-file", kf, "--json")
    assert res.rc == 1 and _bad_blocks(res) == [1]


def test_truncated(keyed):
    _, img, kf = keyed
    off, _ = _record(img, kf, 3)
    os.truncate(img, off + 10)
    res = cli("verify", img, "--key-file", kf, "--json")
    assert res.rc == 1
    assert any("truncated" in e["reason"] and e["block"] == 3 for e in res.json["errors"])


def test_index_from_another_image(keyed, tmp_path):
    """Another image's index (same key, same chain) put in place of this one's, the footer's
    segment table and every CRC made right: the footer fails authentication (its clear index
    table is bound to the sealed part); a forged segment of the right length fails its own,
    naming its blocks."""
    src, img, kf = keyed
    inc = tmp_path / "b.dimg"
    assert cli("image", src, inc, "--incremental", img, "--key-file", kf,
               "--no-progress").rc == 0
    victim = tmp_path / "victim.dimg"
    victim.write_bytes(img.read_bytes())
    (s_off, s_len), = footer_json(victim)["index"]["segments"]
    (o_off, o_len), = footer_json(inc)["index"]["segments"]
    seg = read_at(inc, o_off, o_len)
    buf = victim.read_bytes()
    meta = footer_json(victim)
    meta["index"]["segments"] = [[s_off, len(seg)]]
    footer_at = s_off + len(seg)
    body = json.dumps(meta, sort_keys=True).encode()
    fixed = struct.pack("<4sI", fmt.FOOTER_MAGIC, len(body))
    footer = fixed + body + struct.pack("<I", fmt.crc32c(fixed + body))
    victim.write_bytes(buf[:s_off] + seg + footer +
                       fmt.pack_trailer(footer_at, len(footer), version=3))
    res = cli("verify", victim, "--key-file", kf)
    assert res.rc == 1 and "footer damaged: fails authentication" in res.out + res.err
    # a segment of the right length, its CRCs right, but not sealed by this image's key
    forged = tmp_path / "forged.dimg"
    forged.write_bytes(img.read_bytes())
    payload = os.urandom(s_len - fmt.SEGMENT_HEADER_SIZE)
    head = struct.pack("<4sQIII", fmt.SEGMENT_MAGIC, 0, 12, len(payload), fmt.crc32c(payload))
    write_at(forged, s_off, head + struct.pack("<I", fmt.crc32c(head)) + payload)
    res = cli("verify", forged, "--key-file", kf, "--json")
    assert res.rc == 1
    err, = [e for e in res.json["errors"] if e["block"] is not None]
    assert err["block"] == 0 and err["last_block"] == 11
    assert "fails authentication" in err["reason"]
    assert cli("verify", forged, "--no-key").rc == 0     # its CRCs are right


def test_header_tampering_and_downgrade(keyed, tmp_path):
    src, img, kf = keyed
    # a field changed, CRC made right: the HMAC fails
    changed = tmp_path / "changed.dimg"
    changed.write_bytes(img.read_bytes())
    write_header_json(changed, {**header_json(img), "created": "1999-01-01T00:00:00Z"})
    res = cli("verify", changed, "--key-file", kf)
    assert res.rc == 1 and "header damaged: fails authentication" in res.out + res.err
    # the encryption stripped: a plain version-2 header, trailer made to agree
    stripped = tmp_path / "stripped.dimg"
    stripped.write_bytes(img.read_bytes())
    h = header_json(img)
    del h["features"], h["encryption"]
    h["transforms"] = {"0": [], "1": ["zstd"], "2": ["zstd"], "3": ["zstd"]}
    write_header_json(stripped, h)
    buf = bytearray(stripped.read_bytes())
    struct.pack_into("<H", buf, 8, 2)
    fixed_len = 16
    jlen = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<I", buf, fixed_len + jlen, fmt.crc32c(bytes(buf[:fixed_len + jlen])))
    trailer = fmt.TRAILER_SIZE
    f_off, f_len = struct.unpack_from("<QI", buf, len(buf) - trailer + 8)
    buf[len(buf) - trailer:] = fmt.pack_trailer(f_off, f_len, version=2)
    stripped.write_bytes(bytes(buf))
    res = cli("verify", stripped, "--key-file", kf)
    assert res.rc == 2 and "is not encrypted, but a key was given" in res.err
    res = cli("restore", stripped, tmp_path / "t.bin", "--key-file", kf, "--yes")
    assert res.rc == 2 and not (tmp_path / "t.bin").exists()
    # without a key it is never read as plain data: its sealed index does not decode
    res = cli("verify", stripped, "--json")
    assert res.rc == 1 and res.json["blocks_checked"] < 12


def test_verify_no_key_finds_bit_rot(keyed):
    _, img, kf = keyed
    e = _entries(img, kf)[4]
    flip_byte(img, e.offset + 5)        # a record header
    res = cli("verify", img, "--no-key", "--json")
    assert res.rc == 1 and res.json["scope"] == "structure"
    assert cli("verify", img, "--no-key", "--key-file", kf).rc == 2


def test_info_shows_keys_never_secrets(keyed):
    src, img, kf = keyed
    res = cli("info", img, "--json")
    assert res.rc == 0, res.err
    enc = res.json["encryption"]
    assert enc["cipher"] == "aes-256-gcm" and not enc["unlocked"]
    assert len(enc["key_fingerprint"]) == 32
    assert enc["slots"] == [{"id": 0, "type": "keyfile", "kdf": {"name": "hkdf-sha256"},
                             "created": enc["slots"][0]["created"]}]
    assert res.json["source"] == {}
    res = cli("info", img, "--json", "--key-file", kf)
    assert res.json["encryption"]["unlocked"] and res.json["source"]["path"] == str(src)
    assert res.json["stored_blocks"] == 10
    text = cli("info", img, "--key-file", kf).out
    assert "aes-256-gcm" in text and enc["key_fingerprint"] in text
    assert kf.read_bytes().hex() not in text + json.dumps(res.json)


def test_key_slots_and_paper_key(keyed, tmp_path):
    src, img, kf = keyed
    records = img.read_bytes()[len(_head(img)):]
    pf = tmp_path / "pass"
    pf.write_text("first passphrase\n")
    res = cli("key", "add", img, "--key-file", kf, "--new-passphrase-file", pf, "--json")
    assert res.rc == 0, res.err
    assert res.json["changed_slots"] == [1]
    assert [s["type"] for s in res.json["images"][0]["slots"]] == ["keyfile", "passphrase"]
    assert cli("verify", img, "--passphrase-file", pf).rc == 0
    # adding a slot needs the key
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    assert cli("key", "add", img, "--key-file", other, "--new-key-file", other).rc == 2
    # change the passphrase: the old one stops working, the new one works; no record moved
    new = tmp_path / "new"
    new.write_text("second passphrase\n")
    res = cli("key", "change-passphrase", img, "--passphrase-file", pf,
              "--new-passphrase-file", new)
    assert res.rc == 0, res.err
    assert cli("verify", img, "--passphrase-file", pf).rc == 2
    assert cli("verify", img, "--passphrase-file", new).rc == 0
    assert img.read_bytes()[len(_head(img)):] == records
    # remove the key-file slot: the key file no longer opens it; the last slot stays
    res = cli("key", "remove", img, "--slot", "0", "--passphrase-file", new)
    assert res.rc == 0, res.err
    assert cli("verify", img, "--key-file", kf).rc == 2
    res = cli("key", "remove", img, "--slot", "1", "--passphrase-file", new)
    assert res.rc == 2 and "only key slot" in res.err
    res = cli("key", "list", img, "--json")
    assert [s["id"] for s in res.json["images"][0]["slots"]] == [1]
    # the paper key, typed back, restores the image (and names a typo's line)
    res = cli("key", "export", img, "--paper", "--passphrase-file", new)
    assert res.rc == 0, res.err
    typed = tmp_path / "typed"
    typed.write_text(res.out)
    out = tmp_path / "out.bin"
    res = cli("restore", img, out, "--paper-key", typed, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert out.read_bytes() == src.read_bytes()
    lines = typed.read_text().splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("3:"))
    lines[i] = "3: " + ("0" if lines[i][3] != "0" else "1") + lines[i][4:]
    typed.write_text("\n".join(lines))
    res = cli("verify", img, "--paper-key", typed)
    assert res.rc == 2 and "line 3's checksum" in res.err


def _head(img: Path) -> bytes:
    jlen = struct.unpack_from("<I", img.read_bytes(), 12)[0]
    return img.read_bytes()[:16 + jlen + 4]


def test_rescue_encrypted_and_resumed_without_nonce_reuse(tmp_path):
    """An encrypted rescue cut short after a few records (what a crash leaves: IMAGE.partial
    without trailer) resumes with the same key: the records written before and after all have
    distinct nonces, and the image restores the source."""
    src = _source(tmp_path / "src.bin", blocks=24)
    data = src.read_bytes()
    kf = tmp_path / "kf"
    kf.write_bytes(os.urandom(32))
    img = tmp_path / "r.dimg"
    res = cli("image", src, img, "--rescue", "--encrypt", "--key-file", kf, "--block-size",
              "64K", "--no-progress")
    assert res.rc == 0, res.err
    assert MARKER not in img.read_bytes()
    entries = _entries(img, kf)
    cut = sorted(e.offset for e in entries if e.kind == fmt.DATA)[5]
    partial = Path(f"{img}.partial")
    partial.write_bytes(img.read_bytes()[:cut])
    img.unlink()
    Path(f"{img}.map").unlink()
    res = cli("image", src, img, "--rescue", "--block-size", "64K", "--no-progress")
    assert res.rc == 2 and "is encrypted; give its key" in res.err
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32))
    res = cli("image", src, img, "--rescue", "--encrypt", "--key-file", other, "--block-size",
              "64K", "--no-progress")
    assert res.rc == 2 and partial.exists()
    res = cli("image", src, img, "--rescue", "--encrypt", "--key-file", kf, "--block-size",
              "64K", "--no-progress", "--json")
    assert res.rc == 0, res.err
    assert res.json["resumed"] is True
    buf = img.read_bytes()
    nonces = []
    pos = len(_head(img))
    end = min(o for o, _ in footer_json(img)["index"]["segments"])
    while pos < end:
        rec = fmt.unpack_record(buf[pos:pos + fmt.RECORD_HEADER_SIZE])
        nonces.append(buf[pos + fmt.RECORD_HEADER_SIZE:pos + fmt.RECORD_HEADER_SIZE + 12])
        pos += fmt.RECORD_HEADER_SIZE + rec.stored_len
    assert len(nonces) >= 20 and len(set(nonces)) == len(nonces)
    out = tmp_path / "out.bin"
    assert cli("restore", img, out, "--key-file", kf, "--yes", "--no-progress").rc == 0
    assert out.read_bytes() == data


def test_salvage_of_a_truncated_encrypted_image(keyed, tmp_path):
    """restore --salvage of an encrypted image cut short: the records that survived are
    decrypted (with the key) and restored, the rest zeros."""
    src, img, kf = keyed
    off, _ = _record(img, kf, 6)
    os.truncate(img, off + 10)
    out = tmp_path / "out.bin"
    res = cli("restore", img, out, "--key-file", kf, "--yes", "--salvage", "--no-progress")
    assert res.rc == 1, res.err
    data, want = out.read_bytes(), src.read_bytes()
    assert data[:6 * K64] == want[:6 * K64] and data[6 * K64:] == bytes(len(want) - 6 * K64)
    assert cli("restore", img, out, "--yes", "--salvage", "--no-progress").rc == 2


def test_encrypted_with_parity_key_change(tmp_path):
    """An encrypted image with parity (both defaults together): a changed passphrase is not
    undone by the parity (which covers the header), the image verifies with no repair, the old
    passphrase no longer opens it, and it restores byte-identical."""
    from diskimg import defaults
    src = tmp_path / "src.bin"
    src.write_bytes(compressible(random.Random(5), 3 * 1024 * 1024) + MARKER * 1000)
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("old passphrase\n")
    new.write_text("new passphrase\n")
    img = tmp_path / "p.dimg"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(defaults, "DEFAULT_PARITY", 6.25)
        res = cli("image", src, img, "--encrypt", "--passphrase-file", old, "--block-size",
                  "64K", "--json")
        assert res.rc == 0, res.err
    assert MARKER not in img.read_bytes()
    info = cli("info", img, "--passphrase-file", old, "--json").json
    assert info["parity"] and info["encryption"]
    res = cli("key", "change-passphrase", img, "--passphrase-file", old,
              "--new-passphrase-file", new)
    assert res.rc == 0, res.err
    res = cli("verify", img, "--passphrase-file", new, "--no-progress")
    assert res.rc == 0 and "REPAIRABLE" not in res.out, res.out
    assert cli("verify", img, "--passphrase-file", old).rc == 2
    out = tmp_path / "out.bin"
    res = cli("restore", img, out, "--passphrase-file", new, "--yes", "--no-progress")
    assert res.rc == 0, res.err
    assert out.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob("*.rekey"))
