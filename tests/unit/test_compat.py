"""Images written by every released format version stay readable.

fixtures/compat/vN/ holds images made once by scripts/make_compat_fixture.py when format version N
was released (vN-FEATURE/: images using a format feature of version N, e.g. v3-delta), with expected.json recording what they are and what they restore to.  For every
version directory and every image in it: the image file is the one recorded, `diskimg verify`
passes, `diskimg info --json` reports the recorded UUID, kind, parent and chain, and restoring
it gives contents with the recorded SHA-256.  A ``vN-FEATURE`` directory holds the images of one
format feature (``v3-encrypted``: encrypted with the key file ``key.bin`` it keeps).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from contextlib import nullcontext

from diskimg.cli.main import main
from diskimg.crypto.keyring import Credentials, using
from diskimg.ops.restore import restore_image
from diskimg.ops.verify import verify_image

COMPAT = Path(__file__).resolve().parents[2] / "fixtures" / "compat"


def _cases() -> list:
    cases = []
    for vdir in sorted(COMPAT.glob("v*")):
        expected = json.loads((vdir / "expected.json").read_text())
        for image in expected["images"]:
            cases.append(pytest.param(vdir, image, id=f"{vdir.name}/{image['file']}"))
    return cases


CASES = _cases()


def test_there_are_fixtures():
    assert (COMPAT / "v1" / "expected.json").is_file()
    assert CASES


def test_every_version_directory_is_complete():
    for vdir in sorted(COMPAT.glob("v*")):
        expected = json.loads((vdir / "expected.json").read_text())
        # vN, or vN-FEATURE for the images of a format feature (docs/FORMAT.md section 13)
        assert vdir.name.split("-")[0] == f"v{expected['format_version']}"
        kinds = {i["kind"] for i in expected["images"]}
        assert {"full", "incremental"} <= kinds, vdir


@pytest.fixture
def copy(tmp_path):
    """The version directory copied to tmp_path (so nothing can touch the fixtures)."""
    def make(vdir: Path) -> Path:
        dest = tmp_path / vdir.name
        shutil.copytree(vdir, dest)
        return dest
    return make


def _key(vdir: Path) -> list[str]:
    """The key options the fixtures of `vdir` need (none for a plain one)."""
    expected = json.loads((vdir / "expected.json").read_text())
    return ["--key-file", str(vdir / expected["key_file"])] if "key_file" in expected else []


def _keyed(vdir: Path):
    """The library's key context for the fixtures of `vdir`."""
    key = _key(vdir)
    if not key:
        return nullcontext()
    return using(Credentials(key_file=key[1], key_file_bytes=Path(key[1]).read_bytes()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("vdir, image", CASES)
def test_fixture_is_unchanged(vdir, image):
    # fixtures are never regenerated: the file must be the one that was recorded
    assert sha256(vdir / image["file"]) == image["image_sha256"]


@pytest.mark.parametrize("vdir, image", CASES)
def test_verify(vdir, image, copy, capsys):
    d = copy(vdir)
    with _keyed(d):
        result = verify_image(str(d / image["file"]), threads=1)
    assert result.ok, result.errors
    assert [uuid for uuid, _ in result.chain] == image["chain"]
    capsys.readouterr()
    assert main(["verify", str(d / image["file"]), "--json", "--no-progress", *_key(d)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("vdir, image", CASES)
def test_info(vdir, image, copy, capsys):
    d = copy(vdir)
    capsys.readouterr()
    assert main(["info", "--json", str(d / image["file"]), *_key(d)]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("uuid", "kind", "parent", "parent_name", "chain", "size", "block_size",
                "index_sha256"):
        assert info[key] == image[key], key
    # fixtures before version 2 recorded no digest: their blocks are SHA-256
    assert info["digest"] == image.get("digest", "sha256")
    # vN/: every image is version N; vN-FEATURE/: each image records its own version when it
    # is not N (a full image beside delta incrementals needs no feature)
    assert info["format_version"] == image.get("format_version", int(vdir.name[1:].split("-")[0]))
    if "features" in image:   # recorded per image since v3-delta
        assert info.get("features", []) == image["features"]


@pytest.mark.parametrize("vdir, image", CASES)
def test_restore(vdir, image, copy, tmp_path):
    d = copy(vdir)
    target = tmp_path / "restored"
    with _keyed(d):
        result = restore_image(str(d / image["file"]), str(target), threads=1)
    assert list(result.chain) == image["chain"]
    assert target.stat().st_size == image["raw_size"]
    assert sha256(target) == image["raw_sha256"]
