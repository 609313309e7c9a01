"""Property tests of the format and the chain: restore(image(x)) == x for any contents and size,
and applying a chain of incrementals gives the last state."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskimg import format as fmt
from diskimg.image.imagefile import ImageReader
from diskimg.ops.imaging import ImageOptions, create_image
from diskimg.ops.restore import restore_image

BS = fmt.MIN_BLOCK_SIZE

# contents made of runs: zeros, random bytes, a repeated byte; sizes around block boundaries
runs = st.lists(
    st.tuples(st.sampled_from(["zero", "random", "fill"]), st.integers(1, 3 * BS)),
    min_size=1, max_size=6,
)


def build(spec, rnd) -> bytes:
    out = bytearray()
    for kind, n in spec:
        out += bytes(n) if kind == "zero" else rnd.randbytes(n) if kind == "random" else bytes([7]) * n
    return bytes(out)


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


settings.register_profile("diskimg", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("diskimg")


@given(spec=runs, seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([1, 2, 3]))
def test_restore_of_image_is_identity(tmp_path_factory, spec, seed, threads):
    import random
    tmp = tmp_path_factory.mktemp("rt")
    data = build(spec, random.Random(seed))
    write(tmp / "src", data)
    res = create_image(str(tmp / "src"), str(tmp / "a.img"),
                       ImageOptions(block_size=BS, threads=threads))
    assert res.size == len(data)
    assert res.blocks == -(-len(data) // BS)
    restore_image(str(tmp / "a.img"), str(tmp / "out"), threads=threads)
    assert (tmp / "out").read_bytes() == data
    assert not (tmp / "a.img.partial").exists()


@given(seed=st.integers(0, 2**32 - 1), nblocks=st.integers(1, 6), extra=st.integers(0, BS - 1),
       steps=st.lists(st.lists(st.tuples(st.integers(0, 10 * BS), st.integers(1, BS // 2)),
                               max_size=4), min_size=1, max_size=4),
       differential=st.booleans())
def test_chain_gives_every_state(tmp_path_factory, seed, nblocks, extra, steps, differential):
    """Each image of a chain restores exactly the state it was taken of."""
    import random
    rnd = random.Random(seed)
    tmp = tmp_path_factory.mktemp("chain")
    size = nblocks * BS + extra
    state = bytearray(rnd.randbytes(size))
    src = tmp / "src"
    write(src, bytes(state))
    images = [(str(tmp / "0.img"), bytes(state))]
    create_image(str(src), images[0][0], ImageOptions(block_size=BS))
    for i, writes in enumerate(steps, 1):
        for off, n in writes:
            off %= size
            state[off:off + n] = (bytes(n) if rnd.random() < 0.3 else rnd.randbytes(n))[:size - off]
        write(src, bytes(state))
        path = str(tmp / f"{i}.img")
        parent = images[-1][0]
        opts = (ImageOptions(block_size=BS, differential=parent) if differential
                else ImageOptions(block_size=BS, incremental=parent))
        create_image(str(src), path, opts)
        images.append((path, bytes(state)))
    for i, (path, expected) in enumerate(images):
        out = tmp / f"out{i}"
        restore_image(path, str(out))
        assert out.read_bytes() == expected, f"state {i} of {path}"
        with ImageReader(path) as r:
            assert len(r.header.chain) == (1 if i == 0 else 2 if differential else i + 1)


def test_incremental_stores_only_changed_blocks(tmp_path):
    data = bytearray(os.urandom(10 * BS))
    write(tmp_path / "src", bytes(data))
    create_image(str(tmp_path / "src"), str(tmp_path / "full.img"), ImageOptions(block_size=BS))
    for b in (1, 4, 9):
        data[b * BS + 100] ^= 0xFF
    write(tmp_path / "src", bytes(data))
    res = create_image(str(tmp_path / "src"), str(tmp_path / "inc.img"),
                       ImageOptions(block_size=BS, incremental=str(tmp_path / "full.img")))
    assert (res.stored_blocks, res.changed_blocks, res.unchanged_blocks) == (3, 3, 7)
    with ImageReader(str(tmp_path / "inc.img")) as r:
        kinds = [e.kind for _, e in r.iter_entries()]
    # one changed byte of 16 pages: stored as deltas (format feature "delta")
    assert [i for i, k in enumerate(kinds) if k == fmt.DELTA] == [1, 4, 9]
    assert res.delta_blocks == 3 and res.stored_bytes < 3 * (4096 + 1024)
    res = create_image(str(tmp_path / "src"), str(tmp_path / "inc-whole.img"),
                       ImageOptions(block_size=BS, incremental=str(tmp_path / "full.img"),
                                    delta=False, parity=0))
    with ImageReader(str(tmp_path / "inc-whole.img")) as r:
        assert r.header.features == ()
        kinds = [e.kind for _, e in r.iter_entries()]
    assert [i for i, k in enumerate(kinds) if k == fmt.DATA] == [1, 4, 9]


def test_sparse_file_holes_not_read_and_restored_as_holes(tmp_path):
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB of holes
        f.seek(123 * BS)
        f.write(b"x" * 5000)
    res = create_image(str(src), str(tmp_path / "s.img"), ImageOptions(block_size=fmt.MAX_BLOCK_SIZE))
    assert res.read_bytes <= fmt.MAX_BLOCK_SIZE  # only the block holding data was read
    assert res.stored_blocks == 1 and res.zero_blocks == res.blocks - 1
    out = tmp_path / "out"
    restore_image(str(tmp_path / "s.img"), str(out))
    assert os.stat(out).st_blocks * 512 <= 2 * fmt.MAX_BLOCK_SIZE  # holes stayed holes
    with open(out, "rb") as f:
        f.seek(123 * BS)
        assert f.read(5001) == b"x" * 5000 + b"\0"
