"""Chains of images: finding an image's parents and resolving each block through the chain.

A full image stands alone.  An incremental image's parent is any image of the same source; a
differential image's parent is the full image at the root of the chain it was taken against.  A
child records its parent's UUID, file name and index digest; parents are looked for next to the
child under that name, then next to every image of the chain found so far, then in each search
directory (by name, then by UUID among the images there), and the digest proves that the file
found is the very image the child was made against.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

from diskimg import format as fmt
from diskimg.errors import ChainError, CorruptImage, DiskimgError, MissingParent
from diskimg.errors import PermissionDenied, is_permission_error
from diskimg.image.imagefile import ImageReader

log = logging.getLogger(__name__)


def parent_ref(parent: ImageReader) -> dict:
    """What a child records of its parent."""
    return {
        "uuid": parent.uuid,
        "name": os.path.basename(parent.path),
        "index_sha256": parent.index_sha256,
        "kind": parent.header.kind,
    }


def _search_dirs(child: ImageReader, search: Iterable[str],
                 near: Iterable[str] = ()) -> list[str]:
    """The child's own directory, then the directories of the images `near` (the chain found
    so far), then each search directory, without repeats.  A grandparent sitting beside the
    leaf is found even when the parent came from a search directory."""
    dirs = [os.path.dirname(os.path.abspath(p)) for p in (child.path, *near)] + \
        [os.path.abspath(d) for d in search]
    seen: list[str] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _peek_uuid(path: str, damaged_is_error: bool) -> str | None:
    """The UUID in a file's header, or None when it is not an image.  A damaged image header
    raises CorruptImage when `damaged_is_error` (the file at the parent's recorded name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if damaged_is_error and is_permission_error(err):
            raise PermissionDenied(path, "read the parent image") from err
        return None
    try:
        return fmt.read_header(fd, path)[0].uuid
    except CorruptImage:
        if damaged_is_error:
            raise
        return None
    except (DiskimgError, OSError):
        return None
    finally:
        os.close(fd)


def find_parent(child: ImageReader, search: Iterable[str] = (),
                near: Iterable[str] = ()) -> ImageReader:
    """Open the parent of `child`, looked for next to it, next to each image path in `near`
    and in each search directory, by name and then by UUID.  Raises MissingParent or
    ChainError (replaced parent)."""
    ref = child.header.parent
    assert ref is not None
    uuid, name, digest = ref["uuid"], ref["name"], ref["index_sha256"]
    dirs = _search_dirs(child, search, near)
    impostors: list[str] = []
    # by recorded name first, then any image in those directories with the right UUID
    paths = [os.path.join(d, name) for d in dirs]
    for d in dirs:
        try:
            paths += sorted(os.path.join(d, f) for f in os.listdir(d) if f != name)
        except OSError:
            continue
    for path in paths:
        if not os.path.isfile(path) or os.path.samefile(path, child.path):
            continue
        found = _peek_uuid(path, damaged_is_error=os.path.basename(path) == name)
        if found is None:
            continue
        if found != uuid:
            if os.path.basename(path) == name:
                impostors.append(f"{path} is image {found}")
            continue
        parent = ImageReader(path)
        if parent.index_sha256 != digest:
            parent.close()
            raise ChainError(f"{path}: has the parent's UUID {uuid} but a different index "
                             f"(digest {parent.index_sha256[:16]}…, child {child.path} expects "
                             f"{digest[:16]}…): it is not the image the child was made against")
        return parent
    if impostors:
        raise ChainError(f"parent image {uuid} ({name}) of {child.path} not found: "
                         + "; ".join(impostors) + " (replaced by a different image?)")
    for d in dirs:  # not found because a directory may not be searched: say so
        try:
            os.stat(os.path.join(d, name))
        except OSError as err:
            if is_permission_error(err):
                raise PermissionDenied(os.path.join(d, name), "look for the parent image") from err
    raise MissingParent(uuid, name, dirs, child.path)


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


def open_chain(path: str, search: Iterable[str] = ()) -> Chain:
    """Open the image at `path` and every image it depends on, checking they fit together."""
    search = list(search)
    leaf = ImageReader(path)
    images = [leaf]
    try:
        while images[0].header.parent is not None:
            child = images[0]
            parent = find_parent(child, search, near=[i.path for i in images[1:]])
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
    log.info("chain of %s: %s", path, " -> ".join(os.path.basename(i.path) for i in images))
    return Chain(images)
