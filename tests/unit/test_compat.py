"""Images written by every released format version stay readable.

fixtures/compat/vN/ holds images made once by scripts/make_compat_fixture.py when format version N
was released (vN-FEATURE/: images using a format feature of version N, e.g. v3-delta), with expected.json recording what they are and what they restore to.  For every
version directory and every image in it: the image file is the one recorded, `diskimg verify`
passes, `diskimg info --json` reports the recorded UUID, kind, parent and chain, and restoring
it gives contents with the recorded SHA-256.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from diskimg.cli.main import main
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
        feature = expected.get("feature")
        assert vdir.name == f"v{expected['format_version']}" + (f"-{feature}" if feature else "")
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("vdir, image", CASES)
def test_fixture_is_unchanged(vdir, image):
    # fixtures are never regenerated: the file must be the one that was recorded
    assert sha256(vdir / image["file"]) == image["image_sha256"]


@pytest.mark.parametrize("vdir, image", CASES)
def test_verify(vdir, image, copy, capsys):
    d = copy(vdir)
    result = verify_image(str(d / image["file"]), threads=1)
    assert result.ok, result.errors
    assert [uuid for uuid, _ in result.chain] == image["chain"]
    capsys.readouterr()
    assert main(["verify", str(d / image["file"]), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("vdir, image", CASES)
def test_info(vdir, image, copy, capsys):
    d = copy(vdir)
    capsys.readouterr()
    assert main(["info", "--json", str(d / image["file"])]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("uuid", "kind", "parent", "parent_name", "chain", "size", "block_size",
                "index_sha256"):
        assert info[key] == image[key], key
    # fixtures before version 2 recorded no digest: their blocks are SHA-256
    assert info["digest"] == image.get("digest", "sha256")
    # vN/: every image is version N; vN-FEATURE/ (images of a format feature): each image
    # records its own version and features (a full image beside delta incrementals needs none)
    assert info["format_version"] == image.get("format_version", int(vdir.name[1:].split("-")[0]))
    assert info.get("features", []) == image.get("features", [])


@pytest.mark.parametrize("vdir, image", CASES)
def test_restore(vdir, image, copy, tmp_path):
    d = copy(vdir)
    target = tmp_path / "restored"
    result = restore_image(str(d / image["file"]), str(target), threads=1)
    assert list(result.chain) == image["chain"]
    assert target.stat().st_size == image["raw_size"]
    assert sha256(target) == image["raw_sha256"]
