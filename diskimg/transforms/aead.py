"""aes-256-gcm: the authenticated-encryption transform of encrypted images (feature "encrypted",
docs/FORMAT.md section 17).

It is the last transform of an encrypted image's chain: a block is compressed (where that pays
off), then sealed.  Stored bytes of a record::

    nonce (12 bytes, random) | ciphertext (as long as the input) | GCM tag (16 bytes)

The associated data binds the record to its place, so that a record moved to another block,
copied from another image, cut or relabelled with another chain fails to open::

    "diskimg-record-v1" | image UUID (16 bytes) | block u64 | raw length u32 |
    stored length u32 | chain id u8                                  (little-endian)

Why random nonces and not a counter: a rescue that is interrupted and resumed goes on writing
records of the same image (the same key); a counter would have to be recovered exactly from
a torn partial file, a random 96-bit nonce cannot repeat in practice (2^-33 after 2^32 records
of one image; a 16 TiB disk in 64 KiB blocks is 2^28 records).  Each image has its own data key
(derived from the chain's master key and the image's UUID), so nonces of different images of a
chain never meet under one key.

The key arrives as bytes (diskimg.crypto derives it); this module knows no key management.
`encrypt_into`/`decrypt_into` write into preallocated buffers (no copy of the block besides the
cipher's output), and the cryptography package releases the GIL while it works, so the
pipeline's worker threads seal blocks in parallel.
"""
from __future__ import annotations

import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from diskimg.errors import DecodeError

NAME = "aes-256-gcm"
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32
_RECORD_AAD = struct.Struct("<17s16sQIIB")
RECORD_CONTEXT = b"diskimg-record-v1"
_local = threading.local()     # per-thread decode scratch buffer


def record_aad(uuid16: bytes, block: int, raw_len: int, stored_len: int, chain_id: int) -> bytes:
    return _RECORD_AAD.pack(RECORD_CONTEXT, uuid16, block, raw_len, stored_len, chain_id)


def seal(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """nonce | ciphertext | tag of `plaintext` (metadata: header fields, index, footer)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), aad)


def unseal(key: bytes, blob: bytes | memoryview, aad: bytes) -> bytes:
    """The plaintext `seal` sealed; raises DecodeError when the key is wrong or a byte of the
    blob or the associated data changed."""
    blob = bytes(blob)
    if len(blob) < OVERHEAD:
        raise DecodeError(f"sealed data is {len(blob)} bytes, shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecodeError("fails authentication (tampered, damaged, moved, or another "
                          "image's)") from None


class AesGcm:
    """The record cipher of one image: `key` is the image's data key, `uuid16` its UUID's
    bytes; `size` and `block_size` give each block's raw length for the associated data."""

    name = NAME
    optional = False
    binds_chain = True     # TransformChain passes the record's chain id (associated data)

    def __init__(self, key: bytes, uuid16: bytes, size: int, block_size: int) -> None:
        if len(key) != KEY_SIZE or len(uuid16) != 16:
            raise ValueError("aes-256-gcm needs a 32-byte key and a 16-byte image UUID")
        self._aead = AESGCM(key)
        self._uuid = uuid16
        self._size = size
        self._bs = block_size

    def _aad(self, block_no: int, stored_len: int, chain_id: int) -> bytes:
        raw_len = min(self._bs, self._size - block_no * self._bs)
        return _RECORD_AAD.pack(RECORD_CONTEXT, self._uuid, block_no, raw_len, stored_len,
                                chain_id)

    def encode(self, block_no: int, data: bytes | memoryview, chain_id: int = 0) -> bytes:
        n = len(data)
        out = bytearray(n + OVERHEAD)
        nonce = os.urandom(NONCE_SIZE)
        out[:NONCE_SIZE] = nonce
        self._aead.encrypt_into(nonce, data, self._aad(block_no, n + OVERHEAD, chain_id),
                                memoryview(out)[NONCE_SIZE:])
        return out

    def _open(self, block_no: int, stored: bytes | memoryview, chain_id: int,
              out: memoryview | None) -> bytes | int:
        n = len(stored)
        if n < OVERHEAD:
            raise DecodeError(f"encrypted record is {n} bytes, shorter than nonce and tag")
        stored = memoryview(stored)
        aad = self._aad(block_no, n, chain_id)
        try:
            if out is None:
                return self._aead.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], aad)
            if len(out) != n - OVERHEAD:
                raise DecodeError(f"data is {n - OVERHEAD} bytes, {len(out)} expected")
            return self._aead.decrypt_into(stored[:NONCE_SIZE], stored[NONCE_SIZE:], aad, out)
        except InvalidTag:
            raise DecodeError("record fails authentication (a ciphertext byte changed, or the "
                              "record was moved, cut, or copied from another image)") from None

    def decode_into(self, block_no: int, stored: bytes | memoryview, out: memoryview,
                    chain_id: int = 0) -> int:
        self._open(block_no, stored, chain_id, out)
        return len(out)

    def decode(self, block_no: int, stored: bytes | memoryview, limit: int,
               chain_id: int = 0) -> memoryview:
        """The plaintext (the next transform's input), decrypted into this thread's scratch
        buffer: valid until this thread's next decode (the chain consumes it at once), so that
        no buffer is allocated per block."""
        n = len(stored) - OVERHEAD
        if n > limit:
            raise DecodeError(f"encrypted record holds more than {limit} bytes")
        scratch = getattr(_local, "buf", None)
        if scratch is None or len(scratch) < n:
            scratch = _local.buf = bytearray(max(n, limit))
        view = memoryview(scratch)[:max(n, 0)]
        self._open(block_no, stored, chain_id, view)
        return view
