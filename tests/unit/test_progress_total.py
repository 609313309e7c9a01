"""Progress carries its total: each operation says how much there is to do (start) before it
reports what it did (advance), so that no caller has to open the source or the chain again to
size a bar; and a rescue takes its own options."""
from __future__ import annotations

import os

from diskimg.ops.imaging import ImageOptions, create_image
from diskimg.ops.rescue import RescueOptions, rescue_image
from diskimg.ops.restore import restore_image
from diskimg.ops.verify import verify_image

from helpers import cli

BS = 64 << 10


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, total: int, unit: str = "B") -> None:
        self.calls.append(("start", total, unit))

    def advance(self, n: int) -> None:
        assert self.calls and self.calls[0][0] == "start", "advance before start"
        self.calls.append(("advance", n))

    def status(self, st) -> None:
        self.calls.append(("status", st.rescued + st.bad, st.size))

    def started(self) -> list[tuple]:
        return [c for c in self.calls if c[0] == "start"]

    def advanced(self) -> int:
        return sum(c[1] for c in self.calls if c[0] == "advance")


def _source(tmp_path):
    src = tmp_path / "src.raw"
    # data, a hole, data, and a short last block: runs and blocks, every kind of job
    with open(src, "wb") as f:
        f.write(os.urandom(3 * BS))
        f.seek(10 * BS)
        f.write(bytes(BS) + os.urandom(BS + 1234))
    return src


def test_image_restore_verify_report_their_totals(tmp_path):
    src = _source(tmp_path)
    size = src.stat().st_size
    p = Recorder()
    create_image(str(src), str(tmp_path / "full.img"), ImageOptions(block_size=BS), progress=p)
    assert p.started() == [("start", size, "B")] and p.advanced() == size
    with open(src, "r+b") as f:
        f.write(b"changed")
    p = Recorder()
    create_image(str(src), str(tmp_path / "inc.img"),
                 ImageOptions(incremental=str(tmp_path / "full.img")), progress=p)
    assert p.started() == [("start", size, "B")] and p.advanced() == size

    p = Recorder()
    result = verify_image(str(tmp_path / "inc.img"), progress=p)
    assert result.ok
    # every image of the chain is checked: the device size once per image
    assert p.started() == [("start", 2 * size, "B")] and p.advanced() == 2 * size

    p = Recorder()
    out = tmp_path / "out.raw"
    restore_image(str(tmp_path / "inc.img"), str(out), progress=p)
    assert p.started() == [("start", size, "B")] and p.advanced() == size
    assert out.read_bytes() == src.read_bytes()


def test_restore_starts_its_progress_only_after_the_question(tmp_path):
    src = _source(tmp_path)
    create_image(str(src), str(tmp_path / "a.img"), ImageOptions(block_size=BS))
    target = tmp_path / "target.raw"
    target.write_bytes(b"x" * src.stat().st_size)
    p = Recorder()

    def confirm(question) -> bool:
        assert p.calls == []   # no bar yet while the question is asked
        return True
    restore_image(str(tmp_path / "a.img"), str(target), confirm=confirm, progress=p)
    assert p.started() == [("start", src.stat().st_size, "B")]
    assert target.read_bytes() == src.read_bytes()


def test_rescue_takes_its_own_options_and_reports_its_total(tmp_path):
    src = _source(tmp_path)
    size = src.stat().st_size
    p = Recorder()
    res = rescue_image(str(src), str(tmp_path / "r.img"),
                       RescueOptions(block_size=BS, level=3, retries=0), progress=p)
    assert p.calls[0] == ("start", size, "B") and len(p.started()) == 1
    assert res.unreadable == () and res.image.size == size
    out = tmp_path / "out.raw"
    restore_image(str(tmp_path / "r.img"), str(out))
    assert out.read_bytes() == src.read_bytes()


def test_rescue_with_a_parent_is_refused_by_the_cli(tmp_path):
    src = _source(tmp_path)
    create_image(str(src), str(tmp_path / "a.img"), ImageOptions(block_size=BS))
    r = cli("image", src, tmp_path / "r.img", "--rescue", "--incremental", tmp_path / "a.img")
    assert r.rc == 2 and "--rescue makes full images only" in r.err
    assert not (tmp_path / "r.img").exists()
