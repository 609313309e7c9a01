"""Errors carry typed fields (issue 11): ChecksumMismatch names the image, the block and both
digests; DiskIOError the path, the operation, the byte, errno and strerror, raised from the
OSError; every error class lives in diskimg/errors.py, which imports nothing from diskimg.

The errors come from real failures: a byte flipped in a record of an image made by the CLI, and
a restore into a tmpfs too small for it (root only: it mounts the tmpfs)."""
from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import blake3
import pytest

import diskimg
from diskimg import errors
from diskimg import format as fmt
from diskimg.errors import BlockError, ChecksumMismatch, DiskIOError, OperationFailed
from diskimg.image.imagefile import ImageReader
from helpers import KiB, MiB, cli, flip_byte, run

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * KiB
BLOCKS = 8
BAD = 5            # the damaged block
POS = 1234         # the byte flipped inside it


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, bytes, bytes]:
    """An image of random blocks (stored raw: they do not compress) made by the CLI, with one
    byte of block BAD's record flipped.  Returns the image and the block before and after."""
    src = tmp_path / "disk.raw"
    data = os.urandom(BLOCKS * BS)
    src.write_bytes(data)
    img = tmp_path / "disk.dimg"
    res = cli("image", src, img, "--block-size", "64K", "--no-progress")
    assert res.rc == 0, res.err
    with ImageReader(str(img)) as r:
        entry = r.entry(BAD)
    assert entry.kind == fmt.DATA and entry.codec == fmt.CODEC_RAW
    flip_byte(img, entry.offset + fmt.RECORD_HEADER_SIZE + POS)
    good = data[BAD * BS:(BAD + 1) * BS]
    bad = bytearray(good)
    bad[POS] ^= 0xFF
    return img, good, bytes(bad)


def _check_mismatch(err: ChecksumMismatch, img: Path, uuid: str, good: bytes,
                    bad: bytes) -> None:
    assert isinstance(err, BlockError) and err.exit_code == errors.EXIT_PROBLEM
    assert (err.image, err.path, err.uuid) == (str(img), str(img), uuid)
    assert (err.block, err.offset) == (BAD, BAD * BS)
    # the image's block digest (BLAKE3 for a new image), computed here independently
    assert err.expected == blake3.blake3(good).digest()
    assert err.actual == blake3.blake3(bad).digest()
    # the message and the reason verify reports are as before the fields existed, with the
    # damaged page named from the page hashes recorded with the block (format feature delta)
    assert err.reason == (f"checksum mismatch: calculated {err.actual.hex()}, "
                          f"should be {err.expected.hex()}; page 0 (bytes {BAD * BS}-"
                          f"{BAD * BS + 4095}) of 16 differs from the page hash recorded "
                          f"with the block")
    assert err.pages == (POS // 4096,)
    assert str(err) == f"{img}: block {BAD} (byte {BAD * BS}): {err.reason}"


def test_checksum_mismatch_fields_from_a_damaged_image(damaged, tmp_path):
    img, good, bad = damaged
    with ImageReader(str(img)) as r:
        uuid = r.uuid
        assert r.header.digest == "blake3"
        with pytest.raises(ChecksumMismatch) as exc:
            r.read_block(BAD, r.entry(BAD))
    _check_mismatch(exc.value, img, uuid, good, bad)

    # through the library's restore: the RestoreFailed carries it as its cause
    out = tmp_path / "out.raw"
    with pytest.raises(diskimg.RestoreFailed) as exc:
        diskimg.restore_image(str(img), str(out), confirm=lambda q: True)
    assert isinstance(exc.value.cause, ChecksumMismatch)
    _check_mismatch(exc.value.cause, img, uuid, good, bad)
    assert exc.value.exit_code == errors.EXIT_PROBLEM

    # and verify reports the same reason for the same block
    report = diskimg.verify_image(str(img))
    assert [(e.block, e.reason) for e in report.errors] == [(BAD, exc.value.cause.reason)]

    # the CLI's JSON names the damaged image as the error's path
    res = cli("restore", img, tmp_path / "out2.raw", "--json", "--no-progress")
    assert res.rc == errors.EXIT_PROBLEM
    assert res.json["error"]["path"] == str(img)
    assert "checksum mismatch" in res.json["error"]["message"]


@pytest.fixture
def small_tmpfs(loops, tmp_path) -> Path:
    """A 1 MiB tmpfs, unmounted by the loops fixture even when the test fails."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(path))
    loops.mounts.append(str(path))
    return path


@pytest.mark.root
def test_disk_io_error_fields_from_a_full_filesystem(small_tmpfs, tmp_path):
    src = tmp_path / "disk.raw"
    size = 4 * MiB
    src.write_bytes(os.urandom(size))
    img = tmp_path / "disk.dimg"
    assert cli("image", src, img, "--block-size", "64K", "--no-progress").rc == 0

    target = small_tmpfs / "out.raw"
    with pytest.raises(diskimg.RestoreFailed) as exc:
        diskimg.restore_image(str(img), str(target), confirm=lambda q: True)
    err = exc.value.cause
    assert isinstance(err, DiskIOError) and isinstance(err, OperationFailed)
    assert exc.value.exit_code == err.exit_code == errors.EXIT_FAILED
    assert (err.path, err.operation, err.context) == (str(target), "write", "")
    assert err.errno == errno.ENOSPC and err.strerror == os.strerror(errno.ENOSPC)
    # the block whose write failed: inside the image, past what 1 MiB could hold
    assert err.offset is not None and err.offset % BS == 0 and 0 < err.offset <= 1 * MiB
    assert exc.value.torn_block == err.offset // BS
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert str(err) == f"{target}: write error at byte {err.offset}: {err.strerror}"
    assert not target.exists()      # the restore created it, so it removed it

    res = cli("restore", img, target, "--json", "--no-progress")
    assert res.rc == errors.EXIT_FAILED, res.err
    error = res.json["error"]
    assert error["exit_code"] == errors.EXIT_FAILED and error["path"] == str(target)
    assert error["message"].startswith(f"{target}: write error at byte ")
    assert os.strerror(errno.ENOSPC) in error["message"]

    # an image written into it fails the same way, on the partial file, at no given byte
    with pytest.raises(DiskIOError) as exc:
        diskimg.create_image(str(src), str(small_tmpfs / "x.dimg"))
    err = exc.value
    assert (err.path, err.operation, err.offset) == (str(small_tmpfs / "x.dimg.partial"),
                                                     "write", None)
    assert err.errno == errno.ENOSPC
    assert str(err) == f"{err.path}: write failed: {err.strerror}"
    assert list(small_tmpfs.iterdir()) == []


def test_disk_io_error_messages(tmp_path):
    """The message of each kind of operation, from a real OSError (a missing file)."""
    try:
        os.open(tmp_path / "missing", os.O_RDONLY)
    except OSError as caught:
        oserr = caught
    why = os.strerror(errno.ENOENT)
    p = "/dev/x"
    cases = [
        (DiskIOError(p, "read", oserr, 4096), f"{p}: read error at byte 4096: {why}"),
        (DiskIOError(p, "read", oserr, 0, context="while verifying"),
         f"{p}: read error at byte 0 while verifying: {why}"),
        (DiskIOError(p, "write", oserr), f"{p}: write failed: {why}"),
        (DiskIOError(p, "fsync", oserr), f"{p}: fsync failed: {why}"),
        (DiskIOError(p, "open for writing", oserr), f"{p}: cannot open for writing: {why}"),
        (errors.ReadError(p, 512, 4096, oserr, "use --rescue"),
         f"{p}: read error at byte 512 (4096 bytes): {why}; use --rescue"),
    ]
    for err, message in cases:
        assert str(err) == message
        assert err.path == p and err.errno == errno.ENOENT and err.strerror == why
        assert err.exit_code == errors.EXIT_FAILED


def test_every_error_has_a_path():
    """The JSON error object needs `path` (or null) from every error class."""
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.DiskimgError)]
    assert ChecksumMismatch in classes and DiskIOError in classes
    assert all(hasattr(c, "path") for c in classes)


def test_errors_module_imports_nothing_from_diskimg():
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append("." * node.level + (node.module or ""))
    assert [m for m in imported if m.startswith(("diskimg", "."))] == [], imported


# Signals that never leave their package, so not errors of diskimg's:
# - format/v1's MetadataInvalid, raised by the JSON field checks and turned into MetadataError
#   (with the file named) where the JSON is read; its message shows values in the format's own
#   words (v1._show);
# - disk/used's Unrecognised, "this area cannot be analysed": the used-block scan catches it and
#   reads the area whole instead.
# - format/parity's ParityLayoutError, a parity structure (tail, checksum table, geometry) that
#   does not check out: the reader then uses the structure's other copy, or reports the image
#   as not healable there.
INTERNAL = {"format/v1.py: MetadataInvalid", "disk/used/raw.py: Unrecognised",
            "format/parity.py: ParityLayoutError"}


def test_every_error_class_lives_in_errors_py():
    """No module of diskimg but errors.py defines an exception class (private control-flow
    exceptions, named _Something, and INTERNAL excepted)."""
    pkg = Path(errors.__file__).parent
    names = {n for n, c in vars(errors).items() if isinstance(c, type)
             and issubclass(c, BaseException)}
    found = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name == "errors.py" and path.parent == pkg:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                     for b in node.bases}
            if bases & names or bases & {"Exception", "ValueError", "OSError"} \
                    or node.name.endswith("Error") and bases:
                found.append(f"{path.relative_to(pkg)}: {node.name}")
    assert set(found) == INTERNAL, found
