"""The parallel stage: results in input order, errors raised once and after the good results
before them, and the pool of reused, page-aligned block buffers."""
from __future__ import annotations

import ctypes
import mmap
import threading
import time

import pytest
import zstandard

from diskimg.transforms.zstd import decompress_into
from diskimg.ops.pipeline import BufferPool, ordered_map, prefetch


def test_results_come_in_input_order_whatever_the_finishing_order():
    def slow_for_small(n: int) -> int:
        time.sleep((10 - n % 10) / 1000)
        return n * n

    assert list(ordered_map(slow_for_small, range(50), threads=4, depth=8)) == \
        [n * n for n in range(50)]


def test_inline_items_run_on_the_calling_thread_in_order():
    caller = threading.get_ident()
    seen = []

    def work(n: int) -> int:
        if n % 3 == 0:
            seen.append(threading.get_ident() == caller)
        return n

    out = list(ordered_map(work, range(30), threads=3, inline=lambda n: n % 3 == 0))
    assert out == list(range(30)) and all(seen)


def test_a_worker_error_is_raised_once_and_stops_the_rest():
    done = []

    def work(n: int) -> int:
        if n == 5:
            raise ValueError("bad item 5")
        done.append(n)
        return n

    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for r in ordered_map(work, range(1000), threads=2, depth=4):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]
    assert len(done) < 50    # the queued work was cancelled, not run to the end


def test_a_producer_error_comes_after_every_result_before_it():
    def items():
        yield from range(7)
        raise OSError("read error at item 7")

    got = []
    with pytest.raises(OSError, match="item 7"):
        for r in ordered_map(lambda n: n + 100, prefetch(items(), depth=3), threads=2, depth=4):
            got.append(r)
    assert got == [100 + n for n in range(7)]


def test_buffer_pool_reuses_page_aligned_buffers():
    pool = BufferPool(1 << 20)
    a, b = pool.get(), pool.get()
    assert a is not b and len(a) == len(b) == 1 << 20
    for buf in (a, b):
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % mmap.PAGESIZE == 0
    pool.put(a)
    assert pool.get() is a


def test_decompress_into_a_buffer_says_when_the_frame_does_not_fit():
    data = bytes(range(256)) * 4096               # 1 MiB
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    out = bytearray(len(data))
    assert decompress_into(frame, memoryview(out)) == len(data) and out == data
    short = bytearray(len(data) - 1)
    assert decompress_into(frame, memoryview(short)) == len(short) + 1   # "more than fits"
    assert decompress_into(frame[:len(frame) // 2], memoryview(out)) < len(data)


def test_a_single_thread_map_closes_its_source_when_it_fails():
    """With one thread the work runs inline; a failure must still stop the stage feeding it
    (reader threads that would otherwise go on reading from a descriptor about to be closed),
    even while the exception's traceback keeps the map's frame alive."""
    closed = []

    def items():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    def work(n: int) -> int:
        if n == 3:
            raise ValueError("bad item 3")
        return n

    try:
        list(ordered_map(work, items(), threads=1))
    except ValueError as err:
        kept = err          # holds the traceback, and with it the map's frame
    assert kept.__traceback__ is not None
    assert closed == [True]
