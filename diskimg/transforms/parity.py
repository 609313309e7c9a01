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
