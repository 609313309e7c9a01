"""Chains of images: finding an image's parents and resolving each block through the chain.

A full image stands alone.  An incremental image's parent is any image of the same source; a
differential image's parent is the full image at the root of the chain it was taken against.  A
child records its parent's UUID, file name and index digest; parents are looked for next to the
child under that name, then next to every image of the chain found so far, then in each search
directory (by name, then by UUID among the images there), and the digest proves that the file
found is the very image the child was made against.  The looking goes through the stores
(Store.list, Store.open), so a parent may sit wherever a store can reach.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from diskimg import format as fmt
from diskimg.errors import ChainError, DiskimgError, MissingParent
from diskimg.errors import PermissionDenied
from diskimg.image.imagefile import ImageReader, peek_header
from diskimg.store import Store, open_directory

log = logging.getLogger(__name__)


def parent_ref(parent: ImageReader) -> dict:
    """What a child records of its parent."""
    return {
        "uuid": parent.uuid,
        "name": parent.name,
        "index_sha256": parent.index_sha256,
        "kind": parent.header.kind,
    }


def _search_stores(child: ImageReader, search: Iterable[str],
                   near: Iterable[ImageReader] = ()) -> list[Store]:
    """The child's own store, then the stores of the images `near` (the chain found so far),
    then each search directory, without repeats.  A grandparent sitting beside the leaf is
    found even when the parent came from a search directory.  Each is opened at its absolute
    location, so that the images found are named by absolute paths."""
    locations = [img.store.location for img in (child, *near)] + \
        [open_directory(d).location for d in search]
    return [open_directory(loc) for loc in dict.fromkeys(locations)]


def find_parent(child: ImageReader, search: Iterable[str] = (),
                near: Iterable[ImageReader] = ()) -> ImageReader:
    """Open the parent of `child`, looked for next to it, next to each image in `near` and in
    each search directory, by name and then by UUID.  Raises MissingParent or ChainError
    (replaced parent)."""
    ref = child.header.parent
    assert ref is not None
    return find_image(ref, _search_stores(child, search, near), child.path,
                      exclude_identity=child.reader.stat.identity,
                      exclude_name=(child.store.location, child.name))


def find_image(ref: dict, stores: list[Store], child_path: str, *,
               exclude_identity: tuple = (),
               exclude_name: tuple[str, str] | None = None) -> ImageReader:
    """Open the image a child's parent reference `ref` (uuid, name, index_sha256) names,
    looked for in `stores` in order, by name and then by UUID among every image there; the
    index digest proves it is the very image.  `child_path` names the child in errors (a path,
    or "-" for a stream); the child itself (`exclude_*`) is never taken for its parent.  Raises
    MissingParent, ChainError (replaced parent) or PermissionDenied."""
    uuid, name, digest = ref["uuid"], ref["name"], ref["index_sha256"]
    impostors: list[str] = []
    # by recorded name first, then any image in those stores with the right UUID
    candidates = [(store, name) for store in stores]
    for store in stores:
        try:
            candidates += [(store, n) for n in store.list() if n != name]
        except DiskimgError:
            continue
    for store, found_name in candidates:
        try:
            st = store.stat(found_name)
        except DiskimgError:
            continue
        if not st.is_file or (exclude_identity and st.identity == exclude_identity) or \
                (store.location, found_name) == exclude_name:
            continue
        path = store.path(found_name)
        try:
            header = peek_header(store, found_name, strict=found_name == name)
        except PermissionDenied as err:
            raise PermissionDenied(err.path, "read the parent image") from err
        if header is None:
            continue
        if header.uuid != uuid:
            if found_name == name:
                impostors.append(f"{path} is image {header.uuid}")
            continue
        parent = ImageReader(found_name, store=store)
        if parent.index_sha256 != digest:
            parent.close()
            raise ChainError(f"{path}: has the parent's UUID {uuid} but a different index "
                             f"(digest {parent.index_sha256[:16]}…, child {child_path} expects "
                             f"{digest[:16]}…): it is not the image the child was made against")
        return parent
    if impostors:
        raise ChainError(f"parent image {uuid} ({name}) of {child_path} not found: "
                         + "; ".join(impostors) + " (replaced by a different image?)")
    for store in stores:  # not found because a directory may not be searched: say so
        try:
            store.stat(name)
        except PermissionDenied as err:
            raise PermissionDenied(err.path, "look for the parent image") from err
        except DiskimgError:
            pass
    raise MissingParent(uuid, name, [store.location for store in stores], child_path)


@dataclass
class Chain:
    """Open images from the root full image (first) to the requested one (last)."""

    images: list[ImageReader]

    @property
    def leaf(self) -> ImageReader:
        return self.images[-1]

    @property
    def uuids(self) -> list[str]:
        return [i.uuid for i in self.images]

    def close(self) -> None:
        for i in self.images:
            i.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve(self, block: int, entry: fmt.IndexEntry) -> tuple[ImageReader, fmt.IndexEntry]:
        """The image holding `block` and its entry there, given the leaf's entry: the nearest
        image in the chain whose entry is not PARENT.  Raises BlockError for an entry of an
        unknown kind, or a PARENT entry in the root image; a damaged index segment on the way
        raises format.SegmentError.  (The caller compares the held entry's SHA-256 with the
        leaf's: section 10 of docs/FORMAT.md.)"""
        return self.resolve_from(len(self.images) - 1, block, entry)[1:]

    def resolve_from(self, level: int, block: int, entry: fmt.IndexEntry
                     ) -> tuple[int, ImageReader, fmt.IndexEntry]:
        """Like `resolve`, starting at image `level` of the chain (0 is the root) whose entry
        for `block` is `entry`; also returns the level of the holding image."""
        while True:
            img = self.images[level]
            if entry.kind not in fmt.KIND_NAMES:
                raise img.block_error(block, f"index entry damaged: unknown kind {entry.kind}")
            if entry.kind != fmt.PARENT:
                return level, img, entry
            if level == 0:
                raise img.block_error(block, "index entry refers to a parent, but this is a "
                                             "full image")
            level -= 1
            entry = self.images[level].entry(block)


def open_chain(path: str | ImageReader, search: Iterable[str] = ()) -> Chain:
    """Open the image at `path` (or the open image `path`, which the chain then owns) and every
    image it depends on, checking they fit together."""
    search = list(search)
    leaf = path if isinstance(path, ImageReader) else ImageReader(path)
    path = leaf.path
    images = [leaf]
    try:
        while images[0].header.parent is not None:
            child = images[0]
            parent = find_parent(child, search, near=images[1:])
            images.insert(0, parent)
            if parent.header.size != child.header.size or \
                    parent.header.block_size != child.header.block_size:
                raise ChainError(f"{parent.path}: size or block size differs from its child "
                                 f"{child.path}")
            if parent.header.digest != child.header.digest:
                # a PARENT entry holds the digest its parent's entry must hold: one algorithm
                raise ChainError(f"{parent.path}: block digest {parent.header.digest} differs "
                                 f"from its child {child.path}'s ({child.header.digest})")
            if len(images) > 10000:
                raise ChainError(f"{path}: chain longer than 10000 images (a loop?)")
    except BaseException:
        for i in images:
            i.close()
        raise
    log.info("chain of %s: %s", path, " -> ".join(i.name for i in images))
    return Chain(images)
