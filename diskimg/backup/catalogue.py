"""The images are the catalogue: a job's restore points are read from the headers and footers of
the images in its destination, never from a database that could fall out of step with them.

Each image a job makes records, in its header's ``extra.backup``, the job's name, the level
and the time of the run (the job's clock, which names the image too).  A name is a restore
point when its image is complete (its trailer and footer read) and every image of its chain is
there and complete too.  What a killed run leaves (``NAME.partial``, an unfinished upload) is
never one.

``Destination`` is all the access a job needs to where its images live: list the names, read a
header, open an image, delete one, find what interrupted runs left, and keep a small sidecar
object per image (the last verification's result, ``NAME.verified.json``).  It goes through
the Store seam: a directory and an ``s3://bucket/prefix`` are the same calls (in object
storage a killed run leaves an uncompleted multipart upload instead of a ``.partial`` file:
no object, so never a restore point, and found by `Store.unfinished`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from diskimg.errors import DiskimgError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".dimg"
VERIFIED_SUFFIX = ".verified.json"
PARTIAL_SUFFIX = ".partial"
LEVELS = ("full", "differential", "incremental")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time as the headers write it ('2026-11-30T03:00:00Z') -> aware UTC."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_name(job: str, when: datetime, level: str) -> str:
    """job-20261130T030000Z-incremental.dimg: sorts by time within a job."""
    return f"{job}-{when.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{level}{IMAGE_SUFFIX}"


class Destination:
    """Where a job's images live: a directory or an ``s3://bucket/prefix``, both through the
    Store seam (listing, ranged reads of headers, deletes, small sidecar objects)."""

    def __init__(self, location: str) -> None:
        from diskimg.store import open_directory
        self.location = location
        self.store = open_directory(location)

    @property
    def remote(self) -> bool:
        return self.store.local_path("") is None

    def check_exists(self) -> None:
        """Refuse a destination that is not there: a backup disk that is not mounted must not
        turn into images filling the root filesystem under its mountpoint; a bucket that does
        not exist (or may not be listed) is said in one line before anything is done."""
        import os
        if self.remote:
            self.store.list(".")        # NoSuchBucket -> UsageError, 403 -> PermissionDenied
        elif not os.path.isdir(self.location):
            raise UsageError(f"{self.location}: the destination directory does not exist (is "
                             f"the backup disk mounted?); create it first")

    def path(self, name: str) -> str:
        return self.store.path(name)

    def names(self, prefix: str = "") -> list[str]:
        return self.store.list(prefix)

    def unfinished(self, prefix: str = "") -> list[str]:
        """Images whose writing was interrupted (see Store.unfinished)."""
        return self.store.unfinished(prefix)

    def header(self, name: str):
        from diskimg.image.imagefile import peek_header
        return peek_header(self.store, name)

    def open_image(self, name: str):
        from diskimg.image.imagefile import ImageReader
        return ImageReader(name, store=self.store)

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def read_sidecar(self, name: str) -> dict | None:
        try:
            with self.store.open(name) as r:
                data = json.loads(r.pread(r.size, 0).decode("utf-8"))
        except (DiskimgError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_sidecar(self, name: str, data: dict) -> None:
        """Replace `name` whole: a rename in a directory, one PUT in object storage (a
        reader sees the old record or the new one, never half of one)."""
        sink = self.store.create(name)
        try:
            sink.write([json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"])
            sink.commit()
        except BaseException:
            sink.abort()
            raise


@dataclass(frozen=True)
class Verification:
    """The last `backup check` of an image: when (the job's clock), the result, what failed."""

    time: str
    ok: bool
    errors: int = 0
    message: str | None = None


@dataclass(frozen=True)
class Point:
    """One image of a job, complete or not.  `restorable` says whether it is a restore point;
    `problem` why not."""

    name: str
    path: str
    uuid: str
    job: str
    level: str
    time: datetime
    parent: str | None          # the parent's uuid
    chain: tuple[str, ...]      # uuids from the full image to this one
    size: int                   # the source's bytes
    image_bytes: int
    stored_bytes: int
    read_bytes: int
    rescue: bool
    complete: bool
    problem: str | None = None
    verified: Verification | None = None
    source: str | None = None   # the device it was read from
    identity: dict | None = None   # what the header records of the source (serial, fs UUID...)

    @property
    def restorable(self) -> bool:
        return self.complete and self.problem is None

    @property
    def time_text(self) -> str:
        return format_time(self.time)


@dataclass(frozen=True)
class Catalogue:
    job: str
    location: str
    points: tuple[Point, ...]        # every image of the job, oldest first
    leftovers: tuple[str, ...]       # what interrupted runs left, as a listing names it
    unfinished: tuple[str, ...] = ()  # ... by the names of the images they were writing

    @property
    def restore_points(self) -> list[Point]:
        return [p for p in self.points if p.restorable]

    def by_uuid(self, uuid: str) -> Point | None:
        for p in self.points:
            if p.uuid == uuid:
                return p
        return None

    def chain_of(self, point: Point) -> list[Point]:
        """The images `point` depends on and itself, full first (those present)."""
        return [p for u in point.chain if (p := self.by_uuid(u)) is not None]

    def latest(self) -> Point | None:
        points = self.restore_points
        return points[-1] if points else None


def _verification(dest: Destination, name: str) -> Verification | None:
    data = dest.read_sidecar(name + VERIFIED_SUFFIX)
    if data is None or not isinstance(data.get("time"), str) or \
            not isinstance(data.get("ok"), bool):
        return None
    errors = data.get("errors")
    return Verification(time=data["time"], ok=data["ok"],
                        errors=errors if isinstance(errors, int) else 0,
                        message=data.get("message") if isinstance(data.get("message"), str)
                        else None)


def _backup_meta(header) -> dict | None:
    meta = header.extra.get("backup") if isinstance(header.extra, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("job"), str):
        return None
    if meta.get("level") not in LEVELS or not isinstance(meta.get("time"), str):
        return None
    return meta


def scan(dest: Destination, job: str) -> Catalogue:
    """Every image of `job` in `dest`, read from the images themselves, oldest first.  Only
    the names the job gives its images (``JOB-...``) are looked at, each opened once: its
    header, footer and trailer read by ranged reads, never the records."""
    points: list[Point] = []
    names = dest.names(job + "-")
    listed = set(names)
    unfinished = tuple(n for n in dest.unfinished(job + "-") if n.endswith(IMAGE_SUFFIX))
    for name in names:
        if not name.endswith(IMAGE_SUFFIX):
            continue
        try:
            reader = dest.open_image(name)
        except DiskimgError as err:
            reader, failed = None, err
            header = dest.header(name)
        else:
            header, failed = reader.header, None
        meta = _backup_meta(header) if header is not None else None
        if meta is None or meta["job"] != job:
            if reader is not None:
                reader.close()
            continue
        try:
            when = parse_time(meta["time"])
        except ValueError:
            if reader is not None:
                reader.close()
            continue
        common = dict(
            name=name, path=dest.path(name), uuid=header.uuid, job=job, level=meta["level"],
            time=when, parent=(header.parent or {}).get("uuid"),
            chain=tuple(header.chain or (header.uuid,)), size=header.size,
            rescue=bool(header.extra.get("rescue")), source=header.source.get("path")
            if isinstance(header.source, dict) else None,
            identity=header.source if isinstance(header.source, dict) else None,
            verified=_verification(dest, name) if name + VERIFIED_SUFFIX in listed else None)
        if reader is None:
            points.append(Point(**common, image_bytes=0, stored_bytes=0, read_bytes=0,
                                complete=False, problem=f"not complete: {failed}"))
            continue
        with reader:
            stats = reader.footer.stats
            points.append(Point(**common, image_bytes=reader.file_size,
                                stored_bytes=int(stats.get("stored_bytes", 0)),
                                read_bytes=int(stats.get("read_bytes", 0)), complete=True))
    points.sort(key=lambda p: (p.time, p.name))
    # a restore point needs its whole chain, complete
    complete = {p.uuid for p in points if p.complete}
    checked = []
    for p in points:
        if p.complete:
            missing = [u for u in p.chain if u not in complete]
            if missing:
                p = _replace(p, problem=f"chain broken: image {missing[0]} is missing or "
                                        f"incomplete")
        checked.append(p)
    return Catalogue(job=job, location=dest.location, points=tuple(checked),
                     leftovers=tuple(dest.store.unfinished_label(n) for n in unfinished),
                     unfinished=unfinished)


def _replace(p: Point, **changes) -> Point:
    import dataclasses
    return dataclasses.replace(p, **changes)
