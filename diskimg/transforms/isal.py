"""Intel ISA-L (libisal, Debian package libisal2) through ctypes: the Reed-Solomon encoder and the
CRC-32 of the parity (docs/FORMAT.md section 16), an order of magnitude faster than zfec and
zlib here.  Optional: `load()` returns None when the library is not there, and the callers
(diskimg.transforms.parity) fall back to zfec and zlib, which give the same bytes.

Why ISA-L and why like this:
- RS parity is linear: each parity byte is a fixed GF(2^8) combination of the data bytes at the
  same position.  ISA-L's `ec_encode_data` multiplies by ANY coefficient matrix over the same
  field (polynomial 0x11D, as zfec's), with AVX2/AVX-512 kernels, so fed zfec's parity rows it
  produces zfec's parity.  Measured on a 32 MiB window, 32+2 (4 KiB slices interleaved, one call
  per window): 4.4 GB/s per core against zfec's 0.48 GB/s.
- `ec_encode_data` runs through the `CDLL` handle, which releases the GIL for the call (one call
  per window, ~8 ms): the compressing workers go on meanwhile.
- `crc32_gzip_refl(0, buf, len)` is zlib's CRC-32 (ISO-HDLC) exactly, 5.6 GB/s over 4 KiB slices
  against zlib's 2.0 GB/s.  It is called once per slice (thousands of calls per window) through
  the `PyDLL` handle, which keeps the GIL: a call that released it would have to win it back
  each time from busy threads, waiting up to the interpreter's switch interval (5 ms) per call.
- No copies: the caller's buffers are passed by address (`from_buffer`), and the references to
  them are dropped before returning, so that the caller may resize its bytearrays afterwards.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Sequence

log = logging.getLogger(__name__)

_NAMES = ("libisal.so.2", "libisal.so")


class Isal:
    """The loaded library: `encode` and `crc32_slices`."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)                 # releases the GIL during calls
        held = ctypes.PyDLL(path)               # keeps it (many short calls)
        self._init_tables = lib.ec_init_tables
        self._init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                      ctypes.c_char_p]
        self._init_tables.restype = None
        self._encode = lib.ec_encode_data
        self._encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_void_p)]
        self._encode.restype = None
        self._crc = held.crc32_gzip_refl
        self._crc.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
        self._crc.restype = ctypes.c_uint32
        self._tables: dict[bytes, ctypes.Array] = {}

    def tables(self, matrix: bytes, k: int, rows: int) -> ctypes.Array:
        """ISA-L's expanded tables for a `rows` x `k` coefficient matrix (row-major bytes)."""
        key = bytes([k, rows]) + matrix
        t = self._tables.get(key)
        if t is None:
            t = ctypes.create_string_buffer(32 * k * rows)
            self._init_tables(k, rows, matrix, t)
            self._tables[key] = t
        return t

    def encode(self, matrix: bytes, data: Sequence, out: bytearray, length: int) -> None:
        """out[j*length:(j+1)*length] = sum over i of matrix[j*k+i] * data[i] over GF(2^8),
        for the k = len(data) rows of `length` bytes each in `data` (writable buffers:
        bytearray or memoryviews of one) and the len(matrix)/k rows of `out`."""
        k = len(data)
        rows = len(matrix) // k
        if len(out) < rows * length:
            raise ValueError("parity buffer too small")
        arrays = [_array(d, length) for d in data]
        outa = (ctypes.c_char * (rows * length)).from_buffer(out)
        try:
            dp = (ctypes.c_void_p * k)(*[_address(a) for a in arrays])
            base = ctypes.addressof(outa)
            cp = (ctypes.c_void_p * rows)(*[base + j * length for j in range(rows)])
            self._encode(length, k, rows, self.tables(matrix, k, rows), dp, cp)
        finally:
            del arrays, outa      # release the buffer exports

    def crc32_slices(self, buf, size: int) -> list[int]:
        """The CRC-32 (zlib's) of each `size`-byte slice of `buf` (a multiple of `size`)."""
        n = len(buf)
        if n % size:
            raise ValueError("not a whole number of slices")
        if not n:
            return []
        arr = _array(buf, n)
        try:
            base = _address(arr)
            crc = self._crc
            return [crc(0, a, size) for a in range(base, base + n, size)]
        finally:
            del arr


def _array(buf, length: int):
    """A ctypes object whose address is the first of the first `length` bytes of `buf`, valid
    while it lives: no copy of a writable buffer or of a bytes object (c_char_p points into it),
    a copy of another read-only buffer."""
    if type(buf) is bytes:
        if len(buf) < length:
            raise ValueError("buffer shorter than its row")
        return ctypes.c_char_p(buf)
    mv = memoryview(buf).cast("B")
    if len(mv) < length:
        raise ValueError("buffer shorter than its row")
    if mv.readonly:
        return (ctypes.c_char * length).from_buffer_copy(mv[:length])
    return (ctypes.c_char * length).from_buffer(mv)


def _address(obj) -> int:
    if isinstance(obj, ctypes.c_char_p):
        return ctypes.cast(obj, ctypes.c_void_p).value
    return ctypes.addressof(obj)


_loaded: list[Isal | None] = []


def load() -> Isal | None:
    """The library, loaded once; None when it is not installed (logged at -v)."""
    if not _loaded:
        lib = None
        for name in _NAMES:      # not ctypes.util.find_library: it runs ldconfig and gcc
            try:
                lib = Isal(name)
                break
            except (OSError, AttributeError):
                continue
        if lib is None:
            log.info("libisal (ISA-L) not found: parity is encoded with zfec and its checksums "
                     "with zlib, about 10x the CPU time (install libisal2 for the fast path)")
        else:
            log.debug("parity encoded with ISA-L (%s)", lib.path)
        _loaded.append(lib)
    return _loaded[0]
