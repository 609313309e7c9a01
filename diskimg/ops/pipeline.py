"""The parallel stage shared by imaging, restore and verify: a bounded, ordered map.

The caller's generator produces work items (reading the source on the calling thread); worker
threads run the CPU-heavy part (SHA-256 and zstd both release the GIL); results come back in
input order so that the consumer can append records or write blocks sequentially.  At most
`depth` items are in flight, so memory stays flat whatever the size of the device.  An exception
in a worker is re-raised in the consumer, once, and the remaining work is cancelled.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


# Blocks in flight per stage are bounded by bytes, not count, so that memory stays flat for any
# block size: 16 MiB blocks get fewer slots than 64 KiB ones.
IN_FLIGHT_BYTES = 24 << 20


def depth_for(block_size: int, threads: int) -> int:
    """How many blocks one stage may hold: at least one per worker plus one."""
    return max(threads + 1, IN_FLIGHT_BYTES // block_size)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _done(result: R) -> Future[R]:
    fut: Future[R] = Future()
    fut.set_result(result)
    return fut


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int,
                depth: int | None = None,
                inline: Callable[[T], bool] | None = None) -> Iterator[R]:
    """func(item) for each item, computed by `threads` workers, yielded in order.  Items for
    which `inline(item)` is true are cheap: computed on the calling thread, in order.

    When `items` itself fails, the results of the items before the failure are still yielded
    first (a restore writes every good block before the damage), then the error is raised."""
    if threads <= 1:
        source = iter(items)
        try:
            for item in source:
                yield func(item)
        finally:
            close = getattr(source, "close", None)   # stop a prefetch or reader stage feeding us
            if close is not None:
                close()
        return
    depth = depth or threads * 3
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diskimg") as pool:
        try:
            source = iter(items)
            while True:
                try:
                    item = next(source)
                except StopIteration:
                    break
                except Exception:
                    while pending:
                        yield pending.popleft().result()
                    raise
                if inline is not None and inline(item):
                    if not pending:
                        yield func(item)
                        continue
                    pending.append(_done(func(item)))
                else:
                    pending.append(pool.submit(func, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            close = getattr(source, "close", None)   # stop a prefetch thread feeding us
            if close is not None:
                close()


class BufferPool:
    """Reusable page-aligned buffers of one size, for the blocks in flight.

    Taking a fresh buffer for every block means touching fresh memory for every block: page
    faults and zeroing that cost as much as decompressing it (much more on a virtual machine
    whose host reclaims freed memory).  A pool holds at most as many buffers as blocks are in
    flight.  Page alignment also makes them usable for O_DIRECT I/O."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)


_END = object()


def prefetch(items: Iterable[T], depth: int = 8) -> Iterator[T]:
    """Iterate `items` on a background thread, up to `depth` ahead, so that reading the source
    overlaps hashing, compressing and writing.  An exception in the producer is re-raised here;
    closing this generator stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            q.put((_END, err))

    t = threading.Thread(target=run, name="diskimg-reader", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)
