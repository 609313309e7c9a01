"""The keys of an encrypted chain (feature "encrypted", docs/FORMAT.md section 17).

Each chain has one random 256-bit *master key*.  It is never stored in the clear: each image
header carries *key slots*, each the master key sealed (AES-256-GCM) under a key-encryption key
derived from a passphrase (Argon2id) or a key file (HKDF-SHA256 of the file's bytes).  Every
other key is derived from the master key with HKDF-SHA256, so that nothing but the master key
needs keeping (the paper key is the master key as text)::

    key id      HKDF(master, salt "", info "diskimg key id v1"), 16 bytes, shown as hex: the
                key check in every header (a wrong key is known before any block is read) and
                the fingerprint `info` shows
    id key      HKDF(master, salt "", info "diskimg block-id key v1"): the keyed block digests
                of the chain (HMAC-SHA256, or BLAKE3 in keyed mode), shared by the chain so
                that a child compares its blocks with its parent's without decrypting them
    data key    HKDF(master, salt UUID, info "diskimg data key v1"): the records of one image
    meta key    HKDF(master, salt UUID, info "diskimg metadata key v1"): its index segments,
                footer and the sealed header fields
    header key  HKDF(master, salt UUID, info "diskimg header mac v1"): the header's HMAC

Why per-image data keys: nonces are random (transforms.aead), and a key that encrypts only one
image's records never sees another image's nonces.  Why keep slots in every image of a chain:
each image opens on its own (a child copied alone to a NAS still names its key slots, and a
lost parent does not lose the passphrase's slot).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import uuid as uuidlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from diskimg import format as fmt
from diskimg.crypto.keyring import Credentials, given
from diskimg.errors import DecodeError, KeyRefused, MetadataError
from diskimg.transforms import TransformChain, writing_chain
from diskimg.transforms import aead

CIPHER = aead.NAME
MASTER_SIZE = 32
# Argon2id for passphrase slots: 64 MiB, 3 passes, 4 lanes (measured 0.26 s on this machine's
# core; RFC 9106's second recommended option, with t=3)
ARGON2 = {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4}
# what a reader accepts of a slot's Argon2 parameters (a crafted header must not make it
# allocate gigabytes or spin for hours)
ARGON2_LIMITS = {"memory_kib": (8, 4 << 20), "iterations": (1, 64), "lanes": (1, 64)}
KEYFILE_KDF = "hkdf-sha256"
MIN_KEY_FILE = 16          # bytes of a key file (head -c 32 /dev/urandom > KF)
SLOT_CONTEXT = b"diskimg-slot-v1"
HEADER_CONTEXT = b"diskimg-header-v1"
INDEX_CONTEXT = b"diskimg-index-v1"
FOOTER_CONTEXT = b"diskimg-footer-v1"
SLOT_TYPES = ("passphrase", "keyfile")
# footer keys kept in the clear (authenticated as the sealed part's associated data): the index
# table, which `verify --no-key` walks, and parity's table, which a repair without the key needs
CLEAR_FOOTER_KEYS = ("index", "parity")


def hkdf(master: bytes, info: bytes, salt: bytes = b"", length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None,
                info=info).derive(master)


def key_id(master: bytes) -> str:
    return hkdf(master, b"diskimg key id v1", length=16).hex()


def new_master() -> bytes:
    return os.urandom(MASTER_SIZE)


def canonical(obj: object) -> bytes:
    """The JSON bytes a MAC covers: sorted keys, no spaces (docs/FORMAT.md section 17.2)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None


def _now() -> str:
    from datetime import datetime, timezone   # only when a slot is made
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- key slots -----------------------------------------------------------------------------------

def _argon2(secret: bytes, kdf: dict) -> bytes:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    for name, (lo, hi) in ARGON2_LIMITS.items():
        v = kdf.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"slot kdf {name} {v!r} out of range")
    salt = bytes.fromhex(kdf["salt"])
    return Argon2id(salt=salt, length=32, iterations=kdf["iterations"], lanes=kdf["lanes"],
                    memory_cost=kdf["memory_kib"]).derive(secret)


def _kek(slot: dict, secret: bytes) -> bytes:
    kdf = slot["kdf"]
    if slot["type"] == "passphrase":
        if kdf.get("name") != "argon2id":
            raise ValueError(f"unknown passphrase kdf {kdf.get('name')!r}")
        return _argon2(secret, kdf)
    if kdf.get("name") != KEYFILE_KDF:
        raise ValueError(f"unknown key-file kdf {kdf.get('name')!r}")
    return hkdf(secret, b"diskimg keyfile slot v1", salt=bytes.fromhex(kdf["salt"]))


def _slot_aad(slot: dict) -> bytes:
    return SLOT_CONTEXT + canonical({"id": slot["id"], "type": slot["type"], "kdf": slot["kdf"]})


def make_slot(master: bytes, kind: str, secret: bytes, slot_id: int) -> dict:
    """A key slot holding `master`, opened by `secret` (a passphrase or a key file's bytes)."""
    if kind == "passphrase":
        kdf = {**ARGON2, "salt": os.urandom(16).hex()}
    else:
        kdf = {"name": KEYFILE_KDF, "salt": os.urandom(16).hex()}
    slot = {"id": slot_id, "type": kind, "kdf": kdf, "created": _now()}
    slot["wrapped"] = b64(aead.seal(_kek(slot, secret), master, _slot_aad(slot)))
    return slot


def open_slot(slot: dict, secret: bytes) -> bytes | None:
    """The master key in `slot`, or None when `secret` does not open it."""
    try:
        return aead.unseal(_kek(slot, secret), unb64(slot.get("wrapped"), "wrapped"),
                           _slot_aad(slot))
    except (DecodeError, ValueError, KeyError, TypeError):
        return None


def secrets_of(creds: Credentials) -> list[tuple[str, bytes]]:
    """(slot type, secret) of what was given, key file first (no KDF cost)."""
    out = []
    if creds.key_file_bytes is not None:
        out.append(("keyfile", creds.key_file_bytes))
    if creds.passphrase is not None:
        out.append(("passphrase", creds.passphrase))
    return out


def new_slots(master: bytes, creds: Credentials) -> list[dict]:
    """The key slots of a new chain: one per secret given."""
    return [make_slot(master, kind, secret, i) for i, (kind, secret) in
            enumerate(secrets_of(creds))]


def unlock(enc: dict, path: str, creds: Credentials | None = None) -> bytes:
    """The master key of an image whose header's `encryption` is `enc`, opened with `creds`
    (default: the command's).  Raises KeyRefused: no key given, or none that opens a slot."""
    creds = creds if creds is not None else given()
    kid = enc["key_id"]
    if creds is None:
        raise KeyRefused(path, "is encrypted; give its key: --key-file KF, --passphrase, "
                               "--passphrase-file FILE (or DISKIMG_PASSPHRASE_FILE), or "
                               "--paper-key FILE")
    master = creds.unlocked.get(kid)
    if master is not None:
        return master
    if creds.master is not None and key_id(creds.master) == kid:
        creds.unlocked[kid] = creds.master
        return creds.master
    slots = enc.get("slots", [])
    for kind, secret in secrets_of(creds):
        for slot in slots:
            if slot.get("type") != kind:
                continue
            master = open_slot(slot, secret)
            if master is not None and key_id(master) == kid:
                creds.unlocked[kid] = master
                return master
    if creds.master is not None and not secrets_of(creds):
        raise KeyRefused(path, f"the paper key is not this image's key (its key id is "
                               f"{kid[:16]}, the paper key's {key_id(creds.master)[:16]})")
    kinds = sorted({s.get("type") for s in slots})
    raise KeyRefused(path, f"{creds.describe()} opens none of its {len(slots)} key slots "
                           f"({', '.join(map(str, kinds)) or 'none'}): a wrong passphrase or "
                           f"key file, or the key of another chain")


# -- the paper key -------------------------------------------------------------------------------

PAPER_LINE_BYTES = 8


def _line_check(number: int, data: bytes) -> str:
    return hashlib.sha256(bytes([number]) + data).hexdigest()[:4]


def paper_lines(master: bytes) -> list[str]:
    """The master key as text a person can type back: 4 lines of 8 bytes in hex groups, each
    with its line number and a 4-hex-digit checksum of the line (a typo is found, and named,
    line by line)."""
    lines = []
    for i in range(0, len(master), PAPER_LINE_BYTES):
        n = i // PAPER_LINE_BYTES + 1
        part = master[i:i + PAPER_LINE_BYTES]
        groups = "-".join(part[j:j + 2].hex() for j in range(0, len(part), 2))
        lines.append(f"{n}: {groups}  {_line_check(n, part)}")
    return lines


def parse_paper(text: str) -> bytes:
    """The master key typed back from `paper_lines`; raises ValueError naming the line that is
    wrong.  Blank lines and lines starting with '#' are ignored; dashes and spaces anywhere."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    want = MASTER_SIZE // PAPER_LINE_BYTES
    if len(lines) != want:
        raise ValueError(f"a paper key has {want} lines, {len(lines)} given")
    out = b""
    for i, line in enumerate(lines, 1):
        num, sep, rest = line.partition(":")
        if not sep or num.strip() != str(i):
            raise ValueError(f"line {i} does not start with '{i}:'")
        digits = "".join(rest.replace("-", " ").split()).lower()
        if len(digits) != 2 * PAPER_LINE_BYTES + 4:
            raise ValueError(f"line {i} has {len(digits)} hex digits, "
                             f"{2 * PAPER_LINE_BYTES + 4} expected")
        try:
            part = bytes.fromhex(digits[:2 * PAPER_LINE_BYTES])
        except ValueError:
            raise ValueError(f"line {i} holds a character that is not a hex digit") from None
        if _line_check(i, part) != digits[2 * PAPER_LINE_BYTES:]:
            raise ValueError(f"line {i}'s checksum does not match: a typo in that line")
        out += part
    return out


# -- the keys of one image ------------------------------------------------------------------------

def _keyed_digest(name: str, id_key: bytes):
    if name == "sha256":
        def _hmac_sha256(data) -> bytes:
            return hmac.digest(id_key, data, "sha256")
        return _hmac_sha256
    if name == "blake3":
        from blake3 import blake3

        def _blake3_keyed(data) -> bytes:
            return blake3(data, key=id_key).digest()
        return _blake3_keyed
    raise ValueError(f"no keyed form of the digest {name!r}")


class ImageKeys:
    """The keys of one image, derived from its chain's master key: the record cipher, the keyed
    block digest, the metadata seals.  Attached to an unlocked Header (`Header.keys`), so that
    every reader of the header's blocks uses them without knowing of them."""

    def __init__(self, master: bytes, uuid: str, size: int, block_size: int,
                 digest: str) -> None:
        self._master = master
        self.uuid16 = uuidlib.UUID(uuid).bytes
        self.key_id = key_id(master)
        self.digest_name = digest
        self.cipher = aead.AesGcm(hkdf(master, b"diskimg data key v1", self.uuid16),
                                  self.uuid16, size, block_size)
        self._meta = hkdf(master, b"diskimg metadata key v1", self.uuid16)
        self._mac = hkdf(master, b"diskimg header mac v1", self.uuid16)
        self.hash = _keyed_digest(digest, hkdf(master, b"diskimg block-id key v1"))
        self._chains: dict[tuple, TransformChain] = {}

    @property
    def master(self) -> bytes:
        """The chain's master key (a child image is written with it; `key export` shows it)."""
        return self._master

    @functools.lru_cache(maxsize=4)
    def zero_digest(self, length: int) -> bytes:
        return self.hash(bytes(length))

    def reading_chain(self, table: dict[int, tuple[str, ...]]) -> TransformChain:
        key = tuple(sorted(table.items()))
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = TransformChain.for_reading(table,
                                                                   {CIPHER: self.cipher})
        return chain

    def writing_chain(self, level: int) -> TransformChain:
        return writing_chain(level, self.cipher)

    # index segments ---------------------------------------------------------------------------

    def _index_aad(self, first: int, count: int) -> bytes:
        return INDEX_CONTEXT + self.uuid16 + first.to_bytes(8, "little") + \
            count.to_bytes(4, "little")

    def seal_segment(self, first: int, count: int, payload: bytes) -> bytes:
        return aead.seal(self._meta, payload, self._index_aad(first, count))

    def open_segment(self, first: int, count: int, payload: bytes | memoryview) -> bytes:
        """Raises DecodeError when the segment fails authentication."""
        return aead.unseal(self._meta, payload, self._index_aad(first, count))

    # footer -----------------------------------------------------------------------------------

    def seal_footer(self, footer: dict) -> dict:
        """The footer JSON of an encrypted image: the index table in the clear (so that
        `verify --no-key` can check the structure), everything else sealed, and the whole
        authenticated (the clear part is the associated data)."""
        clear = {k: v for k, v in footer.items() if k in CLEAR_FOOTER_KEYS}
        secret = {k: v for k, v in footer.items() if k not in CLEAR_FOOTER_KEYS}
        clear["sealed"] = b64(aead.seal(self._meta, canonical(secret),
                                        FOOTER_CONTEXT + self.uuid16 + canonical(clear)))
        return clear

    def open_footer(self, footer: dict, path: str) -> dict:
        """The whole footer JSON of a sealed one; raises MetadataError when it fails
        authentication."""
        clear = {k: v for k, v in footer.items() if k != "sealed"}
        try:
            blob = unb64(footer.get("sealed"), "sealed")
            secret = json.loads(aead.unseal(self._meta, blob,
                                            FOOTER_CONTEXT + self.uuid16 + canonical(clear)))
            if not isinstance(secret, dict) or "index" in secret:
                raise ValueError("the sealed footer is not an object of footer fields")
        except (DecodeError, ValueError) as err:
            raise MetadataError(path, "footer", f"fails authentication ({err}): tampered, or "
                                                f"another image's footer") from None
        return {**secret, **clear}

    # header -----------------------------------------------------------------------------------

    def _header_mac(self, header_json: dict) -> str:
        covered = dict(header_json)
        enc = {k: v for k, v in covered["encryption"].items() if k not in ("slots", "mac")}
        covered["encryption"] = enc
        return hmac.new(self._mac, HEADER_CONTEXT + canonical(covered), "sha256").hexdigest()

    def seal_header(self, header: fmt.Header, slots: list[dict]) -> fmt.Header:
        """`header` as an encrypted image writes it: the source's identity sealed, the whole
        (but the key slots, which `diskimg key` rewrites) under an HMAC."""
        secret = {"source": header.source,
                  "source_mounted_rw": header.extra.get("source_mounted_rw", [])}
        extra = {k: v for k, v in header.extra.items() if k != "source_mounted_rw"}
        enc = {"cipher": CIPHER, "key_id": self.key_id, "slots": slots,
               "sealed": b64(aead.seal(self._meta, canonical(secret),
                                       HEADER_CONTEXT + self.uuid16))}
        sealed = dataclasses.replace(header, source={}, extra=extra, encryption=enc, keys=self)
        enc["mac"] = self._header_mac(sealed.to_json())
        return sealed

    def open_header(self, header: fmt.Header, path: str) -> fmt.Header:
        """The unlocked header: authenticated, its sealed fields back, these keys attached.
        Raises MetadataError when the header fails authentication."""
        raw = header.raw if header.raw is not None else header.to_json()
        enc = header.encryption or {}
        if not hmac.compare_digest(str(enc.get("mac", "")), self._header_mac(raw)):
            raise MetadataError(path, "header", "fails authentication (HMAC mismatch): a field "
                                                "was changed, or it is another image's header")
        try:
            secret = json.loads(aead.unseal(self._meta, unb64(enc.get("sealed"), "sealed"),
                                            HEADER_CONTEXT + self.uuid16))
            source = secret["source"]
            mounted = secret["source_mounted_rw"]
            if not isinstance(source, dict) or not isinstance(mounted, list):
                raise ValueError("sealed fields of the wrong type")
        except (DecodeError, ValueError, KeyError, TypeError) as err:
            raise MetadataError(path, "header", f"sealed fields fail authentication "
                                                f"({err})") from None
        extra = dict(header.extra)
        if mounted:
            extra["source_mounted_rw"] = mounted
        return dataclasses.replace(header, source=source, extra=extra, keys=self)


def unlock_header(header: fmt.Header, path: str, creds: Credentials | None = None
                  ) -> fmt.Header:
    """The unlocked header of an encrypted image (KeyRefused, MetadataError)."""
    master = unlock(header.encryption or {}, path, creds)
    keys = ImageKeys(master, header.uuid, header.size, header.block_size, header.digest)
    return keys.open_header(header, path)


def describe(enc: dict) -> dict:
    """What `info` shows of an image's encryption: never a key."""
    slots = []
    for s in enc.get("slots", []):
        kdf = {k: v for k, v in (s.get("kdf") or {}).items() if k != "salt"}
        slots.append({"id": s.get("id"), "type": s.get("type"), "kdf": kdf,
                      "created": s.get("created")})
    passphrase_kdfs = [s["kdf"] for s in slots if s["type"] == "passphrase"]
    return {"cipher": enc.get("cipher"), "key_fingerprint": enc.get("key_id"),
            # the passphrase KDF (of the first passphrase slot; each slot shows its own)
            "kdf": passphrase_kdfs[0] if passphrase_kdfs else None,
            "slots": slots}
