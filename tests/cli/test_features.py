"""Required format features (version 3, section 13 of docs/FORMAT.md): an image naming a feature
this diskimg does not know is refused, never read as if the feature were absent."""

from __future__ import annotations

import random
import struct

import pytest

from diskimg import format as fmt
from diskimg.errors import UnknownFeature
from helpers import cli, compressible
from imagecraft import header_json, write_header_json

BASE = {"uuid": "u", "kind": "full", "size": 1, "block_size": 64 * 1024, "created": "c",
        "tool_version": "t", "parent": None, "digest": "blake3"}


def test_features_rules():
    assert fmt.Header.from_json(BASE, 2).features == ()
    assert fmt.Header.from_json(BASE, 2).format_version == 2
    for features, version in ((["x"], 2), ([], 3), (None, 3), ([""], 3), (["a", "a"], 3),
                              ("a", 3), ([1], 3)):
        d = dict(BASE) if features is None else {**BASE, "features": features}
        with pytest.raises(fmt.MetadataInvalid):
            fmt.Header.from_json(d, version)
    with pytest.raises(UnknownFeature):
        fmt.Header.from_json({**BASE, "features": ["from-the-future"]}, 3)


@pytest.mark.parametrize("command", ["info", "verify", "restore"])
def test_unknown_feature_refused(tmp_path, command):
    src = tmp_path / "src.bin"
    src.write_bytes(compressible(random.Random(1), 256 * 1024))
    img = tmp_path / "a.dimg"
    assert cli("image", src, img, "--block-size", "64K").rc == 0
    write_header_json(img, {**header_json(img), "features": ["from-the-future"]})
    buf = bytearray(img.read_bytes())
    struct.pack_into("<H", buf, 8, 3)
    # the CRC covers the fixed part too: recompute it over the new version
    jlen = struct.unpack_from("<I", buf, 12)[0]
    struct.pack_into("<I", buf, 16 + jlen, fmt.crc32c(bytes(buf[:16 + jlen])))
    img.write_bytes(bytes(buf))
    out = tmp_path / "out.bin"
    res = cli(command, img, *([out] if command == "restore" else []))
    assert res.rc == 2
    assert len(res.err_lines) == 1, res.err
    line = res.err_lines[0]
    assert line.startswith(f"diskimg: error: {img}: ")
    assert "format feature 'from-the-future' unknown" in line
    assert not out.exists()
