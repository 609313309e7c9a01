"""The library API re-exported by ``diskimg`` (no CLI): image, verify and restore a file."""
from __future__ import annotations

import os
import subprocess
import sys

import diskimg


def test_public_api_round_trip(tmp_path):
    src = tmp_path / "disk.raw"
    data = os.urandom(300_000) + bytes(700_000) + os.urandom(48_576)
    src.write_bytes(data)
    full = diskimg.create_image(str(src), str(tmp_path / "full.dimg"))
    assert isinstance(full, diskimg.ImageResult) and full.kind == "full"
    with open(src, "r+b") as f:
        f.seek(500_000)
        f.write(b"changed")
    inc = diskimg.create_image(str(src), str(tmp_path / "inc.dimg"),
                               diskimg.ImageOptions(incremental=str(tmp_path / "full.dimg")))
    assert inc.kind == "incremental" and inc.stored_blocks == 1
    report = diskimg.verify_image(str(tmp_path / "inc.dimg"))
    assert report.ok, report.errors
    with diskimg.open_chain(str(tmp_path / "inc.dimg")) as chain:
        assert [i.uuid for i in chain.images] == [full.uuid, inc.uuid]
    out = tmp_path / "restored.raw"
    diskimg.restore_image(str(tmp_path / "inc.dimg"), str(out), confirm=lambda q: True)
    assert out.read_bytes() == src.read_bytes()


def test_errors_are_exported_and_carry_exit_codes(tmp_path):
    try:
        diskimg.verify_image(str(tmp_path / "missing.dimg"))
    except diskimg.DiskimgError as err:
        assert isinstance(err, diskimg.NotAnImage) and err.exit_code == 2
    else:
        raise AssertionError("verify of a missing image did not raise")


def test_import_is_cheap():
    """`import diskimg` loads no operation, codec or device library until a name is used."""
    code = ("import sys, diskimg; print(sorted(m for m in sys.modules if m.startswith("
            "('diskimg.', 'zstandard', 'pySMART', 'pyudev'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_new_image_uuid_is_a_random_rfc4122_uuid():
    """Images get their UUID from format.new_image_uuid (not the uuid module, for start-up time):
    the same text as str(uuid.uuid4()) gives, version 4, RFC 4122 variant, never repeated."""
    import uuid

    from diskimg import format as fmt
    seen = set()
    for _ in range(2000):
        text = fmt.new_image_uuid()
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000
