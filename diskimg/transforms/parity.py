"""Reed-Solomon parity over GF(2^8) for groups of equal slices, and the slice checksum.

The code is zfec's (Luigi Rizzo's fec, as Tahoe-LAFS uses it): systematic, any `k` of the
`k + m` shares of a group give back the `k` data slices, so a reader that knows which slices are
bad (their CRC-32 says so) only ever fills known erasures.  zfec was measured against pyeclib
(ISA-L) on this machine for 4 KiB slices (see the commit adding it): zfec 600 MB/s per core at
64+4, pyeclib isa_l_rs_vand 626 MB/s; zfec releases the GIL (1.5x on 2 cores with 2 threads),
takes the slices as separate buffers without copying them together, and writes no header of its
own into the shares, so the format stays ours to specify (docs/FORMAT.md section 16).

The slice checksum is zlib's CRC-32 (ISO-HDLC): 3.3 GB/s on 4 KiB memoryview slices here,
google-crc32c 7 GB/s but only on bytes (a copy per slice) and crcmod 0.43 GB/s holding the GIL;
at 3.3 GB/s the checksum is noise beside the code itself, and it needs no dependency.
"""
from __future__ import annotations

import zlib
from typing import Sequence

MAX_SHARES = 256    # zfec's limit (GF(2^8)): data + parity slices of one group


def slice_crc(data: bytes | bytearray | memoryview) -> int:
    """The CRC-32 (zlib, ISO-HDLC) of one slice."""
    return zlib.crc32(data)


def slice_crcs(buf: bytes | bytearray | memoryview, size: int) -> list[int]:
    """slice_crc of each `size`-byte slice of `buf` (a whole number of them): ISA-L's CRC-32
    when libisal is there (the same function, 2.8x zlib's speed on 4 KiB slices), else zlib's."""
    from diskimg.transforms import isal
    lib = isal.load()
    if lib is not None:
        return lib.crc32_slices(buf, size)
    mv = memoryview(buf).cast("B")
    return [zlib.crc32(mv[i:i + size]) for i in range(0, len(mv), size)]


# the default code's (32+2) rows, so that imaging with the default parity never imports zfec
# (tests/unit/test_parity.py checks them against zfec)
_MATRICES: dict[tuple[int, int], bytes] = {(32, 2): bytes.fromhex(
    "9258f4c34d59a42e368f3c1387639ea9929e7fba0a97b69735f7e799af013575"
    "6380807ffcb88e0e08f7cca05d12d47a58254e07df47a9fb2e72b3065edab880")}


def parity_matrix(k: int, parity: int) -> bytes:
    """zfec's parity rows for `k` data shares: `parity` x `k` GF(2^8) coefficients, row-major
    (docs/FORMAT.md 16.4: rows k .. k+parity-1 of E).  Read off zfec itself, so that whatever
    encodes with them gives zfec's bytes: the code is linear, so encoding share c = a single 1
    at byte c gives, at byte c of parity share j, the coefficient E[k+j][c]."""
    key = (k, parity)
    mat = _MATRICES.get(key)
    if mat is None:
        import zfec
        units = [bytes(c) + b"\x01" + bytes(k - 1 - c) for c in range(k)]
        rows = zfec.Encoder(k, k + parity).encode(units, list(range(k, k + parity)))
        mat = _MATRICES[key] = b"".join(bytes(r) for r in rows)
    return mat


def encode_rows(rows: Sequence[bytes | bytearray | memoryview], k: int, parity: int,
                length: int) -> bytearray:
    """The parity of `length`-byte *rows*: `parity` rows of `length` bytes, one after the other,
    where byte x of parity row j is share k+j of the group made of byte x of every data row.
    `rows` are data shares 0 .. n-1 (n <= k); shares n .. k-1 are zeros (a short group).

    This is `encode` for `length` groups at once (each byte position is its own group), so a
    window whose groups are interleaved slice by slice (data share i of every group lies in one
    run of the window) is encoded in one call with no gathering: one row per share.  ISA-L
    when libisal is there (writable rows are not copied), else zfec: the same bytes."""
    from diskimg.transforms import isal
    n = len(rows)
    if not 1 <= n <= k:
        raise ValueError(f"{n} data rows for a code of {k}")
    lib = isal.load()
    if lib is not None:
        mat = parity_matrix(k, parity)
        if n < k:          # zero shares add nothing: leave their columns out
            mat = b"".join(mat[j * k:j * k + n] for j in range(parity))
        out = bytearray(parity * length)
        lib.encode(mat, rows, out, length)
        return out
    import zfec
    shares = [memoryview(r).cast("B")[:length] for r in rows]
    if n < k:
        zero = bytes(length)
        shares += [zero] * (k - n)
    par = zfec.Encoder(k, k + parity).encode(shares, list(range(k, k + parity)))
    return bytearray(b"".join(par))


def encode(data: Sequence[bytes | bytearray | memoryview], parity: int) -> list[bytes]:
    """The `parity` parity slices of a group whose data slices (all the same length) are
    `data`."""
    import zfec
    k = len(data)
    return zfec.Encoder(k, k + parity).encode(list(data), list(range(k, k + parity)))


def decode(k: int, parity: int, shares: dict[int, bytes | bytearray | memoryview]
           ) -> list[bytes]:
    """The `k` data slices of a group from any `k` of its shares: share number -> slice,
    0..k-1 data, k..k+parity-1 parity.  Raises ValueError when fewer than `k` are given."""
    import zfec
    if len(shares) < k:
        raise ValueError(f"{len(shares)} good slices of {k + parity}, {k} needed")
    nums = sorted(shares)[:k]
    if nums == list(range(k)):
        return [bytes(shares[i]) for i in nums]
    return list(zfec.Decoder(k, k + parity).decode([shares[i] for i in nums], nums))
