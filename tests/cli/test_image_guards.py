"""Guards around the image file: its .partial file and a rescue's leftovers are never
destroyed, options that belong to --rescue are refused without it, and a log file that cannot
be written is a one-line usage error."""
from __future__ import annotations

import os

from diskimg import format as fmt
from diskimg.cli.main import main
from diskimg.image.imagefile import ImageWriter


def _source(tmp_path, size=3 << 20):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(size))
    return src


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diskimg: error: "), err
    return err[0]


def test_image_refuses_to_write_its_partial_file_over_the_source(tmp_path, capsys):
    src = tmp_path / "x.partial"
    src.write_bytes(os.urandom(1 << 20))
    before = src.read_bytes()
    assert main(["image", str(src), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "is the source" in _one_error(capsys)
    assert src.read_bytes() == before


def test_plain_image_keeps_an_interrupted_rescue(tmp_path, capsys):
    src = _source(tmp_path)
    image = tmp_path / "a.img"
    header = fmt.Header(uuid="u", kind="full", size=src.stat().st_size, block_size=1 << 20,
                        source={}, created="2026-01-01T00:00:00Z", tool_version="t",
                        chain=("u",), extra={"rescue": True})
    writer = ImageWriter(str(image), header)
    writer.close_partial()
    partial = tmp_path / "a.img.partial"
    kept = partial.read_bytes()
    assert main(["image", str(src), str(image), "--no-progress"]) == 2
    msg = _one_error(capsys)
    assert str(partial) in msg and "--rescue" in msg
    assert partial.read_bytes() == kept and not image.exists()


def test_rescue_options_need_rescue(tmp_path, capsys):
    src = _source(tmp_path)
    for extra in (["--retries", "3"], ["--mapfile", str(tmp_path / "m")], ["--direct"]):
        assert main(["image", str(src), str(tmp_path / "a.img"), "--no-progress", *extra]) == 2
        assert "go with --rescue" in _one_error(capsys)
    assert not (tmp_path / "a.img").exists()


def test_unwritable_log_file_is_a_usage_error(tmp_path, capsys):
    src = _source(tmp_path)
    log = tmp_path / "no" / "such" / "dir" / "log"
    assert main(["info", str(src), "--log-file", str(log)]) == 2
    assert str(log) in _one_error(capsys)


def test_unexpected_failure_is_one_line_and_a_traceback_with_debug(tmp_path, capsys,
                                                                   monkeypatch):
    """A bug must not greet a sysadmin with a traceback: one line, exit 3; --debug shows it."""
    from diskimg.ops import imaging

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(imaging, "create_image", broken)
    src = _source(tmp_path)
    assert main(["image", str(src), str(tmp_path / "a.img"), "--no-progress"]) == 3
    msg = _one_error(capsys)
    assert "internal error: ZeroDivisionError: simulated bug" in msg
    assert main(["image", str(src), str(tmp_path / "a.img"), "--no-progress", "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err
