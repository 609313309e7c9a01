"""The block view (diskimg/image/view.py) on real images made by `diskimg image`: a full image
and two incrementals of a file of random, zero and text blocks whose size is not a multiple of
the block size.  Every block and many random byte ranges of each state read back as the source
was; the cache decodes a block read piece by piece once; damage raises what restore raises."""
from __future__ import annotations

import dataclasses
import mmap
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from diskimg import format as fmt
from diskimg.errors import BlockError, CorruptImage, RestoreFailed
from diskimg.image.chain import open_chain
from diskimg.image.imagefile import ImageReader
from diskimg.image.view import BlockView
from diskimg.ops.restore import restore_image
from helpers import cli, compressible, flip_byte
from imagecraft import rewrite_index

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
NBLOCKS = 13
SIZE = NBLOCKS * BS + 1234          # a short last block of 1234 bytes
LAST = NBLOCKS                      # its number
RANDOM_BLOCKS = (0, 6, 9)           # stored raw: zstd does not shrink them
ZERO_BLOCKS = (3, 4, 5, 11)


def _state0() -> bytes:
    rnd = random.Random(1)
    out = bytearray()
    for b in range(NBLOCKS + 1):
        n = min(BS, SIZE - b * BS)
        out += (bytes(n) if b in ZERO_BLOCKS else
                rnd.randbytes(n) if b in RANDOM_BLOCKS else compressible(rnd, n))
    return bytes(out)


def _patch(data: bytes, changes: dict[int, bytes]) -> bytes:
    out = bytearray(data)
    for off, new in changes.items():
        out[off:off + len(new)] = new
    assert len(out) == SIZE
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class Images:
    dir: Path
    paths: tuple[Path, ...]          # full, inc1, inc2
    states: tuple[bytes, ...]        # the source when each was taken


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Images:
    d = tmp_path_factory.mktemp("view")
    s0 = _state0()
    rnd = random.Random(2)
    # inc1: text in block 1, a zero block gets data, a data block becomes zeros, the short
    # last block changes
    s1 = _patch(s0, {1 * BS + 500: b"changed in inc1" * 10, 4 * BS: rnd.randbytes(BS),
                     7 * BS: bytes(BS), LAST * BS + 1000: b"tail!"})
    # inc2: block 1 again, a range across blocks 8-9, block 3 (zero in both before)
    s2 = _patch(s1, {1 * BS + 9000: b"changed in inc2", 9 * BS - 300: rnd.randbytes(700),
                     3 * BS + 17: b"x"})
    names = ("full.img", "inc1.img", "inc2.img")
    for i, (state, name) in enumerate(zip((s0, s1, s2), names)):
        (d / "src").write_bytes(state)
        args = ["image", d / "src", d / name, "--block-size", "64K"]
        if i:
            args += ["--incremental", d / names[i - 1]]
        res = cli(*args)
        assert res.rc == 0, res.err
    with ImageReader(str(d / "inc2.img")) as r:
        kinds = {fmt.KIND_NAMES[e.kind] for _, e in r.iter_entries()}
    # the chain is really used: blocks of the parent, and blocks stored whole or as deltas
    assert "parent" in kinds and kinds & {"data", "delta"}, kinds
    return Images(d, tuple(d / n for n in names), (s0, s1, s2))


def _view(path: Path, **kw):
    chain = open_chain(str(path))
    return chain, BlockView(chain, **kw)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["full", "inc1", "inc2"])
def test_read_block_of_every_block_equals_the_source(images, level):
    state = images.states[level]
    chain, view = _view(images.paths[level])
    with chain:
        assert (view.size, view.block_size, view.blocks) == (SIZE, BS, NBLOCKS + 1)
        assert len(chain.images) == level + 1
        out = mmap.mmap(-1, BS)          # one reused page-aligned buffer, as restore uses
        out[:] = b"\xff" * BS            # zero blocks must overwrite what is in it
        for n in range(view.blocks):
            got = view.read_block(n, out)
            assert bytes(got) == state[n * BS:(n + 1) * BS], f"block {n}"
            got.release()
        assert len(view.read_block(LAST, out)) == SIZE - LAST * BS


@pytest.mark.parametrize("level", [0, 1, 2], ids=["full", "inc1", "inc2"])
def test_read_of_random_ranges_equals_the_source(images, level):
    state = images.states[level]
    rnd = random.Random(100 + level)
    ranges = [(rnd.randrange(SIZE), rnd.choice([1, 512, 4096, 5000, BS, 3 * BS + 17]))
              for _ in range(300)]
    ranges += [(b * BS - 10, 20) for b in range(1, NBLOCKS + 1)]   # across each boundary
    ranges += [(LAST * BS, 1234), (LAST * BS + 1000, 10_000), (SIZE - 1, 1), (0, SIZE),
               (SIZE, 10), (SIZE + 5, 10), (7, 0)]
    chain, view = _view(images.paths[level])
    with chain:
        for off, length in ranges:
            got = view.read(off, length)
            assert isinstance(got, bytes)
            assert got == state[off:off + length], f"read({off}, {length})"
        with pytest.raises(ValueError):
            view.read(-1, 10)


def test_cache_decodes_a_block_read_piece_by_piece_once(images):
    state = images.states[2]
    chain, view = _view(images.paths[2], cache_bytes=2 * BS)
    with chain:
        block = 1            # DATA in inc2
        for off in range(block * BS, (block + 1) * BS, 4096):
            assert view.read(off, 4096) == state[off:off + 4096]
        assert (view.stats.decoded, view.stats.cache_hits) == (1, BS // 4096 - 1)
        # zero blocks are never decoded, nor cached
        assert view.read(5 * BS, 8192) == bytes(8192)
        assert view.stats.decoded == 1
        # a block held by the full image, through two PARENT entries: decoded once too
        for _ in range(3):
            assert view.read(2 * BS + 100, 50) == state[2 * BS + 100:2 * BS + 150]
        assert (view.stats.decoded, view.stats.cache_hits) == (2, BS // 4096 - 1 + 2)
        # read_block serves a cached block by copy, without decoding it again
        out = bytearray(BS)
        assert bytes(view.read_block(block, out)) == state[block * BS:(block + 1) * BS]
        assert view.stats.decoded == 2
        # bounded: two blocks fit; a third evicts the least recently used (block 2: block 1
        # was used last, by read_block)
        assert view.read(8 * BS, 10) == state[8 * BS:8 * BS + 10]
        assert view.stats.decoded == 3
        assert view.read(block * BS, 10) == state[block * BS:block * BS + 10]   # still cached
        assert view.stats.decoded == 3
        assert view.read(2 * BS, 10) == state[2 * BS:2 * BS + 10]
        assert view.stats.decoded == 4


def test_no_cache_decodes_every_read(images):
    state = images.states[0]
    chain, view = _view(images.paths[0], cache_bytes=0)
    with chain:
        for _ in range(3):
            assert view.read(BS + 10, 100) == state[BS + 10:BS + 110]
        assert (view.stats.decoded, view.stats.cache_hits) == (3, 0)


def test_concurrent_readers_with_their_own_buffers(images):
    """Restore's workers call read_block from several threads, each with its own buffer;
    mount-like readers call read concurrently."""
    state = images.states[2]
    chain, view = _view(images.paths[2], cache_bytes=3 * BS)
    failures: list[str] = []
    data_reads: list[int] = []      # reads of data blocks: each is decoded or served cached
    with chain:
        zero = [view.locate(n).zero for n in range(view.blocks)]

        def worker(seed: int) -> None:
            rnd = random.Random(seed)
            out = mmap.mmap(-1, BS)
            reads = 0
            for _ in range(200):
                n = rnd.randrange(view.blocks)
                if bytes(view.read_block(n, out)) != state[n * BS:(n + 1) * BS]:
                    failures.append(f"read_block({n})")
                off, length = rnd.randrange(SIZE), rnd.randrange(1, 2 * BS)
                if view.read(off, length) != state[off:off + length]:
                    failures.append(f"read({off}, {length})")
                blocks = range(off // BS, (min(off + length, SIZE) - 1) // BS + 1)
                reads += (not zero[n]) + sum(not zero[b] for b in blocks)
            data_reads.append(reads)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    stats = view.stats     # every thread's counts, none lost
    assert stats.decoded + stats.cache_hits == sum(data_reads) and stats.cache_hits > 0


def _restore_error(image: Path, target: Path) -> BaseException:
    with pytest.raises(RestoreFailed) as exc:
        restore_image(str(image), str(target), threads=1)
    return exc.value.cause


def test_damaged_record_raises_the_blockerror_restore_raises(images, tmp_path):
    full = tmp_path / "full.img"
    shutil.copy(images.paths[0], full)
    block = 2
    with ImageReader(str(full)) as r:
        entry = r.entry(block)
    assert entry.kind == fmt.DATA
    flip_byte(full, entry.offset + fmt.RECORD_HEADER_SIZE + entry.stored_len // 2)
    chain, view = _view(full)
    with chain:
        with pytest.raises(BlockError) as got:
            view.read_block(block, bytearray(BS))
        with pytest.raises(BlockError) as got_read:
            view.read(block * BS + BS - 5, 10)       # a range crossing into block 3
        assert view.read(0, 100) == images.states[0][:100]     # the other blocks read
    restore = _restore_error(full, tmp_path / "out.raw")
    assert type(restore) is BlockError
    assert str(got.value) == str(got_read.value) == str(restore)
    assert (got.value.image, got.value.block) == (str(full), block)


def test_parent_entry_with_a_wrong_checksum_is_chain_inconsistent(images, tmp_path):
    for p in images.paths[:2]:
        shutil.copy(p, tmp_path / p.name)
    inc = tmp_path / "inc1.img"
    block = 2                     # unchanged in inc1: a PARENT entry
    with ImageReader(str(inc)) as r:
        assert r.entry(block).kind == fmt.PARENT

    def wrong_checksum(entries: list[fmt.IndexEntry]) -> list[fmt.IndexEntry]:
        entries[block] = dataclasses.replace(entries[block], sha256=bytes(32))
        return entries
    rewrite_index(inc, wrong_checksum)
    chain, view = _view(inc)
    with chain:
        with pytest.raises(CorruptImage, match="chain inconsistent") as got:
            view.read_block(block, bytearray(BS))
        assert f"block {block} " in str(got.value)
        assert str(tmp_path / "full.img") in str(got.value)   # the image holding it
        with pytest.raises(CorruptImage, match="chain inconsistent"):
            view.read(block * BS, 1)
        assert view.read((block + 1) * BS, BS) == images.states[1][(block + 1) * BS:
                                                                    (block + 2) * BS]
    restore = _restore_error(inc, tmp_path / "out.raw")
    assert str(restore) == str(got.value)


def test_zero_entry_with_a_nonzero_checksum_is_refused(images, tmp_path):
    """A damaged zero entry must not pass for a block of zeros (restore refuses it too)."""
    full = tmp_path / "full.img"
    shutil.copy(images.paths[0], full)
    block = ZERO_BLOCKS[0]

    def damaged(entries: list[fmt.IndexEntry]) -> list[fmt.IndexEntry]:
        assert entries[block].kind == fmt.ZERO
        entries[block] = dataclasses.replace(entries[block], sha256=b"\x01" * 32)
        return entries
    rewrite_index(full, damaged)
    chain, view = _view(full)
    with chain:
        with pytest.raises(BlockError, match="zero block with a non-zero checksum") as got:
            view.read_block(block, bytearray(BS))
        with pytest.raises(BlockError, match="zero block with a non-zero checksum"):
            view.read(block * BS + 10, 10)
    assert got.value.block == block
    assert str(_restore_error(full, tmp_path / "out.raw")) == str(got.value)


@pytest.mark.parametrize("level", [0, 1, 2], ids=["full", "inc1", "inc2"])
def test_read_into_equals_the_source(images, level):
    """read_into fills the caller's buffer with what read returns: whole blocks decoded
    straight into it (not cached), pieces of blocks through the cache."""
    state = images.states[level]
    rnd = random.Random(200 + level)
    ranges = [(rnd.randrange(SIZE), rnd.choice([1, 512, 4096, 5000, BS, 3 * BS + 17]))
              for _ in range(300)]
    ranges += [(b * BS, BS) for b in range(NBLOCKS)] + [(b * BS - 10, 20) for b in
                                                        range(1, NBLOCKS + 1)]
    ranges += [(LAST * BS, 1234), (0, SIZE), (SIZE - 1, 1), (7, 0)]
    chain, view = _view(images.paths[level])
    with chain:
        for off, length in ranges:
            length = min(length, SIZE - off)
            out = bytearray(b"\xff" * (length + 3))         # zero blocks must overwrite it
            view.read_into(off, memoryview(out)[:length])
            assert out[:length] == state[off:off + length], f"read_into({off}, {length})"
            assert out[length:] == b"\xff" * 3               # nothing written past the range
        for off, length in ((-1, 10), (SIZE - 5, 10)):
            with pytest.raises(ValueError):
                view.read_into(off, memoryview(bytearray(length)))


def test_read_into_a_whole_block_bypasses_the_cache(images):
    state = images.states[2]
    chain, view = _view(images.paths[2], cache_bytes=4 * BS)
    with chain:
        out = bytearray(BS)
        for _ in range(2):          # a whole block: decoded into `out` each time, not cached
            view.read_into(BS, memoryview(out))
            assert out == state[BS:2 * BS]
        assert (view.stats.decoded, view.stats.cache_hits) == (2, 0)
        view.read_into(BS + 100, memoryview(out)[:100])     # a piece: decoded into the cache
        view.read_into(BS, memoryview(out))                 # now the whole block is copied
        assert out == state[BS:2 * BS]
        assert (view.stats.decoded, view.stats.cache_hits) == (3, 1)


def test_threads_missing_the_same_block_decode_it_once(images, monkeypatch):
    """A FUSE mount has several requests for pieces of one block in flight at once: the
    threads that miss a block another one is decoding wait for that decode."""
    state = images.states[0]
    chain, view = _view(images.paths[0], cache_bytes=4 * BS)
    decode = view._decode_into
    started = threading.Barrier(4)

    def slow_decode(src, out):      # the real decode, made slow enough for the others to miss
        time.sleep(0.2)
        return decode(src, out)

    monkeypatch.setattr(view, "_decode_into", slow_decode)
    got: dict[int, bytes] = {}

    def reader(i: int) -> None:
        off = 2 * BS + i * 4096
        started.wait()
        got[i] = view.read(off, 4096)

    with chain:
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(got[i] == state[2 * BS + i * 4096:2 * BS + (i + 1) * 4096] for i in range(4))
        assert (view.stats.decoded, view.stats.cache_hits) == (1, 3)
