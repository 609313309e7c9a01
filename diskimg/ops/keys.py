"""Key slots of encrypted images: list, add, remove, change a passphrase, and the master key as
a paper key (`diskimg key`, docs/FORMAT.md section 17.5).

Only the header's `encryption.slots` change, rewritten in place in the room the header JSON
keeps for them (format.HEADER_SLOT_ROOM): no record moves, no block is decrypted or written
again (an image with parity is copied as it is stored with the new header and its parity made
again, since the parity covers the header),
and the header's HMAC stays valid (it does not cover the slots).  Every change needs the key:
an image is first unlocked with what the command was given (diskimg.crypto.keyring) and its
header authenticated, so that a slot is only ever added for the key the image really has.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from diskimg import format as fmt
from diskimg.crypto import keyring
from diskimg.crypto import keys as ck
from diskimg.errors import KeyRefused, UsageError
from diskimg.image.imagefile import unlock_header
from diskimg.store import open_store

_FIXED = struct.Struct("<8sHHI")


@dataclass(frozen=True)
class KeyResult:
    """What a `diskimg key` command did: the slots of each image after it."""

    action: str                                  # list, add, remove, change-passphrase, export
    images: tuple[tuple[str, str, tuple[dict, ...]], ...]   # (path, key fingerprint, slots)
    changed: tuple[int, ...] = ()                # slot ids added, removed or replaced
    paper: tuple[str, ...] = ()                  # export --paper: the key's lines


class _Image:
    """One image's header bytes as read, for an in-place rewrite of its slots."""

    def __init__(self, path: str) -> None:
        self.store, self.name = open_store(path)
        self.path = self.store.path(self.name)
        with self.store.open(self.name) as reader:
            self.header, self.data_start = fmt.read_header(reader, self.path)
            self.head = reader.pread(self.data_start, 0)
        if not self.header.encrypted:
            raise UsageError(f"{self.path}: is not encrypted; it has no key slots")
        self.jlen = _FIXED.unpack_from(self.head)[3]

    @property
    def slots(self) -> list[dict]:
        return list(self.header.encryption["slots"])

    def unlock(self) -> bytes:
        """The master key, the header authenticated (KeyRefused, MetadataError)."""
        unlock_header(self.header, self.path)
        return ck.unlock(self.header.encryption, self.path)

    def write_slots(self, slots: list[dict]) -> None:
        raw = json.loads(self.head[_FIXED.size:_FIXED.size + self.jlen])
        raw["encryption"]["slots"] = slots
        body = json.dumps(raw, sort_keys=True).encode()
        if len(body) > self.jlen:
            raise UsageError(f"{self.path}: no room left in its header for another key slot "
                             f"(remove one first)")
        body += b" " * (self.jlen - len(body))
        fixed = self.head[:_FIXED.size]
        new = fixed + body + struct.pack("<I", fmt.crc32c(fixed + body))
        if self.header.parity is not None:
            self._rewrite_with_parity(new)
        else:
            self.store.rewrite_head(self.name, new, self.head)
        with self.store.open(self.name) as reader:       # read back: what is there now
            self.header = fmt.read_header(reader, self.path)[0]


    def _rewrite_with_parity(self, new: bytes) -> None:
        """An image with parity: its header is covered by the parity and copied in its tails,
        so an in-place rewrite would be undone as damage by the next read.  The image is
        written again with the new header (as `diskimg repair` writes one: the stored bytes
        as they are, no key needed for them), checked slice by slice, and renamed over."""
        from diskimg.errors import DiskimgError, OperationFailed
        from diskimg.image.imagefile import ImageReader
        from diskimg.image.parity import rewrite
        tmp = self.name + ".rekey"
        with ImageReader(self.name, store=self.store, unlock=False) as img:
            if img.healing is None or len(new) != img.data_start:
                raise OperationFailed(f"{self.path}: cannot rewrite its key slots (its "
                                      f"parity layout was not found)")
            rewrite(self.store, tmp, img.healing.geom, new, img.reader, img.file_size,
                    self.path)
            index_sha256 = img.index_sha256
        try:
            with ImageReader(tmp, store=self.store, unlock=False) as check:
                repairs = check.scrub()
                if repairs is None or repairs.repaired or repairs.lost or \
                        check.index_sha256 != index_sha256:
                    raise OperationFailed(f"{self.store.path(tmp)}: the rewritten image does "
                                          f"not check; {self.path} left as it was")
            self.store.rename(tmp, self.name)
        except BaseException:
            try:
                self.store.delete(tmp)
            except DiskimgError:
                pass
            raise


def _result(action: str, images: list[_Image], changed=(), paper=()) -> KeyResult:
    return KeyResult(action, tuple((i.path, i.header.encryption["key_id"],
                                    tuple(_public(s) for s in i.slots)) for i in images),
                     tuple(changed), tuple(paper))


def _public(slot: dict) -> dict:
    """A slot as `key list` shows it: no salt, no wrapped key."""
    return {"id": slot["id"], "type": slot["type"],
            "kdf": {k: v for k, v in slot["kdf"].items() if k != "salt"},
            "created": slot.get("created")}


def list_slots(paths: list[str]) -> KeyResult:
    """The key slots of each image (no key needed)."""
    return _result("list", [_Image(p) for p in paths])


def add_slot(paths: list[str], kind: str, secret: bytes) -> KeyResult:
    """Add a slot opened by `secret` (a passphrase, or a key file's bytes: `kind`) to each
    image, unlocked with the command's key."""
    images = [_Image(p) for p in paths]
    masters = [img.unlock() for img in images]      # every image unlocks before any changes
    added = []
    for img, master in zip(images, masters):
        slots = img.slots
        new_id = max((s["id"] for s in slots), default=-1) + 1
        img.write_slots(slots + [ck.make_slot(master, kind, secret, new_id)])
        added.append(new_id)
    return _result("add", images, added)


def remove_slot(paths: list[str], slot_id: int) -> KeyResult:
    """Remove slot `slot_id` of each image (unlocked with the command's key).  The last slot is
    never removed: the image could not be opened any more but with the paper key."""
    images = [_Image(p) for p in paths]
    for img in images:
        if slot_id not in [s["id"] for s in img.slots]:
            raise UsageError(f"{img.path}: has no key slot {slot_id} (its slots: "
                             f"{', '.join(str(s['id']) for s in img.slots)})")
        if len(img.slots) == 1:
            raise UsageError(f"{img.path}: slot {slot_id} is its only key slot; add another "
                             f"before removing it")
        img.unlock()
    for img in images:
        img.write_slots([s for s in img.slots if s["id"] != slot_id])
    return _result("remove", images, [slot_id])


def change_passphrase(paths: list[str], new: bytes) -> KeyResult:
    """Replace each passphrase slot the command's passphrase opens by one opened by `new`
    (same slot id); the data is not touched."""
    creds = keyring.given()
    if creds is None or creds.passphrase is None:
        raise UsageError("change-passphrase needs the current passphrase (--passphrase or "
                         "--passphrase-file)")
    images = [_Image(p) for p in paths]
    plans = []
    for img in images:
        master = img.unlock()
        opened = [s["id"] for s in img.slots if s["type"] == "passphrase"
                  and ck.open_slot(s, creds.passphrase) == master]
        if not opened:
            raise KeyRefused(img.path, "the passphrase given opens none of its passphrase "
                                       "slots: nothing to change")
        plans.append((img, master, opened))
    changed: list[int] = []
    for img, master, opened in plans:
        img.write_slots([ck.make_slot(master, "passphrase", new, s["id"])
                         if s["id"] in opened else s for s in img.slots])
        changed += opened
    return _result("change-passphrase", images, sorted(set(changed)))


def export_paper(path: str) -> KeyResult:
    """The master key of `path`'s chain as a paper key (unlocked with the command's key)."""
    img = _Image(path)
    master = img.unlock()
    return _result("export", [img], paper=ck.paper_lines(master))
