"""Images with Reed-Solomon parity (format feature "parity", docs/FORMAT.md section 16): round
trips of every kind, damage within the documented capacity restored byte-identical, damage
beyond it named exactly with nothing unverified written, `diskimg repair`, and a property test
of the container (any erasures within capacity decode to the original).

The window size is made small here (1 MiB of data per window instead of 32 MiB, so depth 8 at
the default 32+2) so that a few-MiB source spans several windows; every other parameter is the
default's.  Capacity, as the README states it: in each window, any `m` damaged slices (4 KiB
sectors), or one burst of up to (m * depth - 1) slices."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from helpers import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskimg.format import parity as pf
from diskimg.image.imagefile import ImageReader
from diskimg.image.parity import HealingReader, ParitySink, find_tail
from diskimg.store.local import LocalStore

S = pf.SLICE
SIZE = 6 * 1024 * 1024 + 12345        # a short last block, and a short last window


@pytest.fixture(scope="module")
def small_windows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf, "WINDOW_DATA", 1 << 20)
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Mostly incompressible data (so the image is about as big as the source), some text and
    zeros."""
    rnd = random.Random(13)
    path = tmp_path_factory.mktemp("src") / "disk.raw"
    with open(path, "wb") as f:
        f.write(b"diskimg parity\n" * 20000)
        f.write(bytes(200000))
        f.write(rnd.randbytes(SIZE - 300000 - 200000 - 100000))
        f.write(rnd.randbytes(100000).replace(b"\x00", b"\x01"))
    assert path.stat().st_size == SIZE
    return path


@pytest.fixture(scope="module")
def image(small_windows, source, tmp_path_factory) -> Path:
    img = tmp_path_factory.mktemp("img") / "full.img"
    res = cli("image", source, img, "--block-size", "64K", "--no-progress")
    assert res.rc == 0, res.err
    return img


def geometry(img: Path) -> pf.Layout:
    store = LocalStore(str(img.parent))
    with store.open(img.name) as raw:
        return find_tail(raw).layout


def damaged(image: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / "damaged.img"
    shutil.copyfile(image, out)
    layout = geometry(out)
    with open(out, "r+b") as f:
        damage(f, layout, out.stat().st_size)
    return out


def restored_identical(img: Path, source: Path, tmp_path: Path) -> str:
    target = tmp_path / "restored.raw"
    res = cli("restore", img, target, "--yes", "--no-progress")
    assert res.rc == 0, res.err + res.out
    assert target.read_bytes() == source.read_bytes()
    return res.out


def write(f, offset: int, data: bytes) -> None:
    f.seek(offset)
    f.write(data)


def flip(f, offset: int) -> None:
    f.seek(offset)
    b = f.read(1)
    write(f, offset, bytes([b[0] ^ 0x5A]))


def burst_len(layout: pf.Layout) -> int:
    """The longest burst the README promises to survive anywhere in this image."""
    depth = min(layout.window(w).depth for w in range(layout.windows))
    return (layout.geom.m * depth - 1) * S


# -- round trips -----------------------------------------------------------------------------

def test_full_image_has_parity_by_default_and_round_trips(image, source, tmp_path):
    with ImageReader(str(image)) as r:
        assert r.header.features == ("parity",)
        assert r.header.format_version == 3
        assert r.header.parity == pf.Geometry(32, 2, 8)
        assert r.healing.layout.windows >= 6
        logical = r.file_size
    # parity + checksums: about 6.25% + 0.7% of the image at these small windows
    assert 1.06 < image.stat().st_size / logical < 1.09
    assert cli("verify", image, "--no-progress").rc == 0
    restored_identical(image, source, tmp_path)


def test_incremental_and_differential_with_parity(small_windows, image, source, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    full = work / "full.img"
    shutil.copyfile(image, full)
    changed = tmp_path / "changed.raw"
    data = bytearray(source.read_bytes())
    data[3 << 20:(3 << 20) + 70000] = os.urandom(70000)
    changed.write_bytes(bytes(data))
    assert cli("image", changed, work / "inc.img", "--incremental", full, "--block-size", "64K",
               "--no-progress").rc == 0
    assert cli("image", changed, work / "diff.img", "--differential", work / "inc.img",
               "--parity", "3", "--no-progress").rc == 0
    with ImageReader(str(work / "diff.img")) as r:
        assert r.header.parity.m * 100 / r.header.parity.k == pytest.approx(3, rel=0.1)
    # damage the parent inside capacity: the children restore through it, healed
    with open(full, "r+b") as f:
        for off in (5000, 1 << 20, 3 << 20):
            flip(f, off)
    for child in ("inc.img", "diff.img"):
        out = restored_identical(work / child, changed, tmp_path)
        assert "REPAIRED on the fly by parity" in out
        assert "full.img" in out


def test_incremental_reads_a_damaged_parent_index_healed_and_says_so(small_windows, image,
                                                                     source, tmp_path):
    parent = tmp_path / "full.img"
    shutil.copyfile(image, parent)
    with ImageReader(str(parent)) as r:
        seg_off, _ = r.segments[0]
        layout = r.healing.layout
    with open(parent, "r+b") as f:
        flip(f, _logical_to_phys(layout, seg_off + 40))
    res = cli("image", source, tmp_path / "inc.img", "--incremental", parent, "--no-progress")
    assert res.rc == 0, res.err
    assert "parity repaired 1 damaged slice(s)" in res.err and "diskimg repair" in res.err
    restored_identical(tmp_path / "inc.img", source, tmp_path)


def test_parity_zero_writes_the_old_layout(small_windows, source, tmp_path):
    img = tmp_path / "plain.img"
    assert cli("image", source, img, "--parity", "0", "--no-progress").rc == 0
    with ImageReader(str(img)) as r:
        assert r.header.features == () and r.header.format_version == 2
        assert r.healing is None


@pytest.mark.parametrize("pct, message", [("101", "from 0.5 to 100"), ("0.1", "from 0.5"),
                                          ("abc", "not a percentage"),
                                          ("-3", "not a percentage")])
def test_bad_parity_percent_is_refused(source, tmp_path, pct, message):
    res = cli("image", source, tmp_path / "x.img", "--parity", pct, "--no-progress")
    assert res.rc == 2 and message in res.err
    assert not list(tmp_path.glob("x.img*"))


# -- damage within capacity: restored byte-identical -----------------------------------------

def test_scattered_byte_flips(image, source, tmp_path):
    """A flipped byte in m slices of every window (data, parity or checksum table alike)."""
    rnd = random.Random(1)

    def damage(f, layout, size):
        for w in range(layout.windows):
            win = layout.window(w)
            end = win.table_phys + layout.geom.padded(layout.geom.table_len(win.slots))
            for slot in rnd.sample(range((end - win.phys) // S), layout.geom.m):
                flip(f, win.phys + slot * S + rnd.randrange(S))
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--json", "--no-progress")
    assert res.rc == 1
    errors = json.loads(res.out)["errors"]
    assert errors and all(e["repairable"] for e in errors)
    assert json.loads(res.out)["errors_affecting_restore"] == 0
    out = restored_identical(img, source, tmp_path)
    assert "REPAIRED on the fly by parity" in out


def test_zeroed_4k_sectors(image, source, tmp_path):
    rnd = random.Random(2)

    def damage(f, layout, size):
        for w in range(layout.windows):
            win = layout.window(w)
            for slot in rnd.sample(range(win.slots), layout.geom.m):
                write(f, win.slot_phys(slot), bytes(S))
    restored_identical(damaged(image, tmp_path, damage), source, tmp_path)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_burst(image, source, tmp_path, where):
    """One contiguous burst of the documented maximum, unaligned where it can be."""
    def damage(f, layout, size):
        n = burst_len(layout)
        at = {"start": 0, "middle": size // 2 + 1234, "end": size - n}[where]
        write(f, at, os.urandom(n))
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--no-progress")
    assert res.rc == 1 and "REPAIRABLE" in res.out and "LOST" not in res.out
    restored_identical(img, source, tmp_path)


def _logical_to_phys(layout: pf.Layout, offset: int) -> int:
    win, _ = layout.locate(offset)
    return win.phys + offset - win.logical


def test_index_footer_and_trailer(image, source, tmp_path):
    with ImageReader(str(image)) as r:
        seg_off, seg_len = r.segments[0]
        footer = r.footer.offset
        end = r.file_size

    def damage(f, layout, size):
        for off in (seg_off + 5, seg_off + seg_len - 3, footer + 20, end - 10):
            flip(f, _logical_to_phys(layout, off))
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--json", "--no-progress")
    reasons = [e["reason"] for e in json.loads(res.out)["errors"]]
    assert any(r.startswith("index segment 0:") for r in reasons)
    assert any(r.startswith("footer and trailer:") for r in reasons)
    restored_identical(img, source, tmp_path)


def test_one_header_copy(image, source, tmp_path):
    """The header at the start destroyed beyond its group's parity: its copy in the tail."""
    def damage(f, layout, size):
        write(f, 0, b"\xff" * 600)
        # the header's group loses more than m slices: the copy at the end must serve
        win = layout.window(0)
        for slot in win.group_slots(0)[0][1:layout.geom.m + 1]:
            write(f, win.slot_phys(slot), bytes(S))
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--json", "--no-progress")
    reasons = [e["reason"] for e in json.loads(res.out)["errors"]]
    assert any("its copy in the parity tail is intact" in r for r in reasons)
    assert cli("info", img).rc == 0
    # the block of the header's group beyond repair is named; the others restore
    res = cli("restore", img, tmp_path / "t.raw", "--yes", "--no-progress")
    assert res.rc == 1 and "beyond what parity repairs" in res.err


def test_tail_copy_and_the_parity_itself(image, source, tmp_path):
    def damage(f, layout, size):
        write(f, layout.tail_phys + 30, b"junk")              # first tail copy
        win = layout.window(1)
        write(f, win.parity_phys, bytes(layout.geom.m * win.depth * S))   # all of a parity area
        write(f, win.table_phys + 100, b"junk")               # its own checksum table
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--json", "--no-progress")
    reasons = [e["reason"] for e in json.loads(res.out)["errors"]]
    assert any("parity tail: its first copy is damaged" in r for r in reasons)
    assert any(r.startswith("parity data: 16 parity slice(s) damaged") for r in reasons)
    assert any("checksum table of window(s) 1 damaged" in r for r in reasons)
    restored_identical(img, source, tmp_path)


def test_both_tails_and_the_parity_trailer(image, source, tmp_path):
    def damage(f, layout, size):
        write(f, layout.tail_phys, bytes(size - layout.tail_phys))
    img = damaged(image, tmp_path, damage)
    res = cli("verify", img, "--json", "--no-progress")
    assert any("both copies damaged" in e["reason"] for e in json.loads(res.out)["errors"])
    restored_identical(img, source, tmp_path)


# -- beyond capacity ------------------------------------------------------------------------

def test_beyond_capacity_is_named_exactly_and_nothing_unverified_is_written(image, tmp_path):
    """m + 1 slices of one group: the blocks whose records they hold are named as lost, in
    verify, restore (which writes nothing past the last good block) and repair (which writes
    nothing at all)."""
    with ImageReader(str(image)) as r:
        layout = r.healing.layout
        win = layout.window(2)
        slots = win.group_slots(1)[0][:layout.geom.m + 1]
        hit = [(win.logical + sl * S, S) for sl in slots]
        lost = sorted(b for b, e in r.iter_entries() if e.kind == 1 and any(
            o < e.offset + 60 + e.stored_len and e.offset < o + n for o, n in hit))
    assert lost

    def damage(f, layout, size):
        for sl in slots:
            write(f, win.slot_phys(sl), os.urandom(S))
    img = damaged(image, tmp_path, damage)
    before = img.read_bytes()
    res = cli("verify", img, "--json", "--no-progress")
    errors = json.loads(res.out)["errors"]
    assert sorted(e["block"] for e in errors if e["repairable"] is False) == lost
    assert all("beyond what parity repairs" in e["reason"] for e in errors
               if e["repairable"] is False)
    target = tmp_path / "t.raw"
    res = cli("restore", img, target, "--yes", "--no-progress", "--keep-partial")
    assert res.rc == 1 and f"block {lost[0]} " in res.err
    assert target.stat().st_size <= lost[0] * 65536 or \
        target.read_bytes()[lost[0] * 65536:] == bytes(target.stat().st_size - lost[0] * 65536)
    res = cli("repair", img, "--no-progress")
    assert res.rc == 1
    assert f"block {lost[0]}" in res.err or f"blocks {lost[0]}-" in res.err
    assert "nothing written" in res.err
    assert img.read_bytes() == before
    assert not list(img.parent.glob("*.repair*"))


# -- repair ----------------------------------------------------------------------------------

def test_repair_rewrites_the_image_byte_identical(image, tmp_path):
    def damage(f, layout, size):
        write(f, 70000, os.urandom(3000))
        write(f, size // 3, bytes(S))
        write(f, layout.tail_phys + 10, b"x")
    img = damaged(image, tmp_path, damage)
    res = cli("repair", img, "--no-progress")
    assert res.rc == 0, res.err
    assert "REPAIRED" in res.out and "verified clean" in res.out
    assert img.read_bytes() == image.read_bytes()
    res = cli("repair", img, "--json", "--no-progress")
    assert res.rc == 0 and json.loads(res.out)["written"] is False


def test_repair_refuses_an_image_without_parity(small_windows, source, tmp_path):
    img = tmp_path / "plain.img"
    assert cli("image", source, img, "--parity", "0", "--no-progress").rc == 0
    res = cli("repair", img)
    assert res.rc == 2 and "has no parity" in res.err


# -- the container: property test ------------------------------------------------------------

GEOM = pf.Geometry(k=5, m=2, depth=3, slice=512)


def _container(tmp: Path, data: bytes) -> Path:
    store = LocalStore(str(tmp))
    sink = ParitySink(store.create("c.img"), GEOM, b"HEADERCOPY")
    for i in range(0, len(data), 1000):
        sink.write([data[i:i + 1000]])
    sink.commit()
    return tmp / "c.img"


@st.composite
def erasures_within_capacity(draw):
    """Data, and damage that costs no group more than m slices: per window, either m slots
    anywhere or one burst of up to m * depth slots."""
    data = draw(st.binary(min_size=1, max_size=40000))
    layout = pf.Layout(GEOM, len(data))
    plan = []
    for w in range(layout.windows):
        win = layout.window(w)
        if draw(st.booleans()):
            slots = draw(st.lists(st.integers(0, win.slots - 1), max_size=GEOM.m, unique=True))
            plan += [(w, sl) for sl in slots]
        else:
            n = draw(st.integers(0, GEOM.m * win.depth))
            first = draw(st.integers(0, max(0, win.slots - n)))
            plan += [(w, sl) for sl in range(first, min(win.slots, first + n))]
    return data, plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=erasures_within_capacity())
def test_any_erasures_within_capacity_decode_to_the_original(tmp_path_factory, case):
    data, plan = case
    tmp = tmp_path_factory.mktemp("c")
    path = _container(tmp, data)
    layout = pf.Layout(GEOM, len(data))
    with open(path, "r+b") as f:
        for w, sl in plan:
            write(f, layout.window(w).slot_phys(sl), os.urandom(GEOM.slice))
    store = LocalStore(str(tmp))
    with store.open("c.img") as raw:
        tail = find_tail(raw)
        assert tail.layout == layout and tail.header == b"HEADERCOPY"
        reader = HealingReader(raw, tail)
        reader.heal(0, len(data))
        assert reader.pread(len(data), 0) == data
        assert not reader.repairs.lost


# -- the encoder: ISA-L gives zfec's bytes ---------------------------------------------------

def test_isal_is_there_for_the_tests():
    """scripts/test installs libisal2: the fast encoder is the one the tests above ran."""
    from diskimg.transforms import isal
    assert isal.load() is not None


@st.composite
def rows_to_encode(draw):
    k = draw(st.integers(1, 80))
    m = draw(st.integers(1, min(16, 256 - k)))
    n = draw(st.integers(1, k))
    length = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**32))
    rnd = random.Random(seed)
    return k, m, [bytearray(rnd.randbytes(length)) for _ in range(n)], length


@settings(max_examples=150, deadline=None)
@given(case=rows_to_encode())
def test_isal_parity_is_zfecs_for_any_code(case):
    """For any k + m, any number of data rows (the rest zeros: a short group) and any row
    length: ISA-L's encoding with zfec's parity rows is zfec's encoding, byte for byte, and
    both equal zfec run group by group (one byte position is one group)."""
    from diskimg.transforms import isal
    from diskimg.transforms import parity as rs
    k, m, rows, length = case
    fast = rs.encode_rows(rows, k, m, length)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(isal, "load", lambda: None)
        slow = rs.encode_rows(rows, k, m, length)
    assert fast == slow
    for x in sorted({0, length // 2, length - 1}):     # a few groups by zfec directly
        shares = [bytes([r[x]]) for r in rows] + [bytes(1)] * (k - len(rows))
        assert b"".join(rs.encode(shares, m)) == bytes(fast[x::length])


def test_the_default_codes_rows_are_zfecs():
    """parity_matrix keeps the default code's rows as a constant (no zfec import while imaging):
    they are zfec's."""
    import zfec
    from diskimg.defaults import DEFAULT_PARITY
    from diskimg.transforms import parity as rs
    geom = pf.Geometry.for_percent(DEFAULT_PARITY)
    k, m = geom.k, geom.m
    assert (k, m) == (32, 2)
    units = [bytes(c) + b"\x01" + bytes(k - 1 - c) for c in range(k)]
    rows = zfec.Encoder(k, k + m).encode(units, list(range(k, k + m)))
    assert rs.parity_matrix(k, m) == b"".join(rows)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20 * 512), size=st.sampled_from([1, 7, 512, 4096]))
def test_isal_slice_crcs_are_zlibs(data, size):
    import zlib
    from diskimg.transforms import parity as rs
    data = data[:len(data) - len(data) % size]
    want = [zlib.crc32(data[i:i + size]) for i in range(0, len(data), size)]
    assert rs.slice_crcs(bytearray(data), size) == want        # writable: no copy
    assert rs.slice_crcs(data, size) == want                   # read-only bytes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=40000))
def test_containers_with_and_without_isal_are_identical(tmp_path_factory, data):
    from diskimg.transforms import isal
    fast = _container(tmp_path_factory.mktemp("fast"), data).read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(isal, "load", lambda: None)
        slow = _container(tmp_path_factory.mktemp("slow"), data).read_bytes()
    assert fast == slow


def test_the_compat_image_is_written_again_byte_for_byte(tmp_path):
    """fixtures/compat/v3-parity/full.img was written with zfec: its logical stream written again
    through today's encoder gives the same file (the format did not change)."""
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "compat" / "v3-parity"
    store = LocalStore(str(fixture))
    with store.open("full.img") as raw:
        tail = find_tail(raw)
        logical = HealingReader(raw, tail).pread(tail.layout.logical_size, 0)
    out = LocalStore(str(tmp_path))
    sink = ParitySink(out.create("again.img"), tail.layout.geom, tail.header)
    sink.write([logical])
    sink.commit()
    assert (tmp_path / "again.img").read_bytes() == (fixture / "full.img").read_bytes()


def test_image_without_isal_says_so_at_v_and_is_the_same(small_windows, source, tmp_path,
                                                         monkeypatch):
    from diskimg.transforms import isal
    monkeypatch.setattr(isal, "_NAMES", ("libisal-not-here.so.0",))
    monkeypatch.setattr(isal, "_loaded", [])
    img = tmp_path / "zfec.img"
    res = cli("image", source, img, "--block-size", "64K", "--no-progress", "-v")
    assert res.rc == 0, res.err
    assert "libisal (ISA-L) not found: parity is encoded with zfec" in res.err
    res = cli("verify", img, "--no-progress")
    assert res.rc == 0, res.err
