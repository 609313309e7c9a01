"""What the backup commands do: run a job, restore a point, check images, prune.

Each takes the job (config.Job), the clock (``now``: a function returning an aware datetime; a
test passes one that steps through a month) and, where it says things while it works, a
``notify`` callback for one line at a time (the CLI prints them on stderr).  Images are made,
verified and restored through the library (create_image, rescue_image, verify_image,
restore_image), never by running diskimg.

A run: take the job's lock; remove what an interrupted run left; find the source by its stable
name; the health gate (a FAIL verdict stops the run, or switches it to a rescue, as the job
says); the level (policy.choose); the image, named job-UTCTIME-level.dimg, its header recording
job, level and time; then the JSON status (STATE_DIR/JOB.status.json) and, if asked,
the textfile metrics.  Status and metrics are written whatever the outcome, failures included.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from diskimg.backup import catalogue as cat_mod
from diskimg.backup import metrics, policy, retention
from diskimg.backup.catalogue import Catalogue, Destination, Point, Verification, format_time
from diskimg.backup.config import Job, Keep
from diskimg.backup.lock import JobLock, RemoteClaim
from diskimg.backup.source import resolve_source
from diskimg.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    DiskimgError,
    HealthGateFailed,
    SmartUnavailable,
    UsageError,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Notify = Callable[[str], None]


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


def _quiet(line: str) -> None:
    log.info("%s", line)


# --------------------------------------------------------------------------------------------
# run

@dataclass(frozen=True)
class RunResult:
    job: str
    level: str
    reason: str
    image: str
    uuid: str
    parent: str | None
    source: str
    started: str
    ended: str
    seconds: float
    bytes_read: int
    bytes_stored: int
    image_bytes: int
    health: str | None
    rescue: bool
    unreadable_bytes: int
    removed_leftovers: tuple[str, ...]
    restore_points: int
    status_file: str
    textfile: str | None
    exit_code: int


@contextlib.contextmanager
def _endpoint(job: Job):
    """The job's ``endpoint-url`` for its s3:// destination while a command works on it,
    unless one was given already (``--endpoint-url`` on the command line wins)."""
    from diskimg.store import S3_OPTIONS
    if not job.remote or not job.endpoint_url or S3_OPTIONS.get("endpoint_url"):
        yield
        return
    S3_OPTIONS["endpoint_url"] = job.endpoint_url
    try:
        yield
    finally:
        S3_OPTIONS["endpoint_url"] = None


def _destination(job: Job) -> Destination:
    dest = Destination(job.destination)
    dest.check_exists()
    return dest


@contextlib.contextmanager
def _job_lock(job: Job, dest: Destination, what: str, notify: Notify):
    """One run at a time: the host's flock, and in object storage the job's claim object
    (other hosts: see lock.RemoteClaim)."""
    with JobLock(job.state_dir, job.name, what):
        if not dest.remote:
            yield
            return
        with RemoteClaim(dest.store, job.name, what) as claim:
            if claim.stale:
                notify(f"replaced the claim of an interrupted run of this host (pid "
                       f"{claim.stale.get('pid')} since {claim.stale.get('since')})")
            yield


def status_path(job: Job) -> str:
    return os.path.join(job.state_dir, f"{job.name}.status.json")


def _health_gate(job: Job, device: str, notify: Notify) -> tuple[str | None, bool]:
    """(verdict or None, rescue?): raises HealthGateFailed on FAIL when the job says stop."""
    import stat
    try:
        if not stat.S_ISBLK(os.stat(device).st_mode):
            return None, False
    except OSError:
        return None, False
    from diskimg.health import FAIL, UNKNOWN, WARN, check
    try:
        report = check(device, job.smartctl)
    except SmartUnavailable as err:
        notify(f"no health check of {device}: {err}")
        return None, False
    reasons = [f"{r.what}: {r.value}" for r in report.reasons if r.severity in (FAIL, WARN)]
    if report.verdict == FAIL:
        if job.health == "stop":
            raise HealthGateFailed(device, job.name, reasons)
        if job.health == "rescue":
            notify(f"health of {device}: FAIL: making a full rescue image (health = rescue)")
            return report.verdict, True
        notify(f"health of {device}: FAIL, imaging anyway (health = ignore)")
    elif report.verdict == WARN:
        notify(f"health of {device}: WARN ({'; '.join(reasons[:2])})")
    elif report.verdict != UNKNOWN:
        notify(f"health of {device}: {report.verdict}")
    return report.verdict, False


def run_job(job: Job, *, now: Clock = system_clock, level: str | None = None,
            textfile: str | None = None, notify: Notify = _quiet, progress=None,
            rescue_progress=None, threads: int | None = None) -> RunResult:
    """Make the job's next image.  Raises the imaging errors, JobBusy (exit 2) and
    HealthGateFailed (exit 1); the status file (and textfile) are written in every case."""
    started_at = now()
    started = time.monotonic()
    previous = metrics.read_status(status_path(job)) or {}
    status: dict = {
        "job": job.name, "start": format_time(started_at), "end": None, "level": None,
        "reason": None, "image": None, "source": None, "bytes_read": 0, "bytes_stored": 0,
        "image_bytes": 0, "result": "failed", "exit_code": EXIT_FAILED, "error": None,
        "health": None, "restore_points": None,
        "last_success": previous.get("last_success"),
        "last_success_epoch": previous.get("last_success_epoch"),
    }
    result: RunResult | None = None
    try:
        with _endpoint(job):
            result = _run(job, now, started_at, started, level, notify, progress,
                          rescue_progress, threads, status)
        return result
    except KeyboardInterrupt:
        status.update(exit_code=EXIT_INTERRUPTED, error="interrupted", result="interrupted")
        raise
    except DiskimgError as err:
        status.update(exit_code=err.exit_code, error=str(err))
        raise
    except Exception as err:     # an OSError the library did not wrap, a bug: still recorded
        status.update(error=f"{type(err).__name__}: {err}")
        raise
    finally:
        ended_at = now()
        status["end"] = format_time(ended_at)
        status["end_epoch"] = ended_at.timestamp()
        status["duration_seconds"] = round(time.monotonic() - started, 3)
        if status["result"] in ("success", "problem"):
            status["last_success"] = status["end"]
            status["last_success_epoch"] = ended_at.timestamp()
        written = _write_status(job, status, textfile)
        if result is not None:    # (frozen: filled in here, once the run has ended)
            object.__setattr__(result, "ended", status["end"])
            object.__setattr__(result, "textfile", written)


def _write_status(job: Job, status: dict, textfile: str | None) -> str | None:
    import json
    try:
        os.makedirs(job.state_dir, exist_ok=True)
        metrics.write_atomic(status_path(job),
                             json.dumps(status, indent=1).encode() + b"\n", "job status")
    except (OSError, DiskimgError) as err:
        log.warning("warning: cannot write the status of job %s: %s", job.name, err)
    if textfile:
        return metrics.write_textfile(textfile, status)
    return None


def _run(job: Job, now: Clock, started_at: datetime, started: float, level: str | None,
         notify: Notify, progress, rescue_progress, threads: int | None,
         status: dict) -> RunResult:
    dest = _destination(job)
    with _job_lock(job, dest, f"backup run {job.name}", notify):
        cat = cat_mod.scan(dest, job.name)
        removed = _remove_leftovers(dest, cat, notify)
        device = resolve_source(job.source)
        status["source"] = device
        verdict, rescue = _health_gate(job, device, notify)
        status["health"] = verdict
        if rescue:
            decision = policy.Decision("full", None, "health FAIL: a rescue image")
        else:
            size, mismatch = _probe(device)
            decision = policy.choose(job.levels, cat, started_at, size, level, mismatch)
        status.update(level=decision.level, reason=decision.reason)
        name = cat_mod.image_name(job.name, started_at, decision.level)
        if dest.store.exists(name) or name in dest.unfinished(name):
            raise UsageError(f"{dest.path(name)}: already exists (two runs of job {job.name} in "
                             f"the same second?)")
        status["image"] = dest.path(name)
        notify(f"{job.name}: {decision.level} image {dest.path(name)} of {device} "
               f"({decision.reason})")
        extra = {"backup": {"job": job.name, "level": decision.level,
                            "time": format_time(started_at), "reason": decision.reason}}
        unreadable = 0
        if rescue:
            from diskimg.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL
            from diskimg.ops.rescue import RescueOptions, rescue_image
            rescued = rescue_image(device, dest.path(name), RescueOptions(
                block_size=job.block_size or DEFAULT_BLOCK_SIZE,
                level=job.compression_level or DEFAULT_LEVEL, digest=job.digest,
                mapfile=dest.path(name) + ".map", clock=now, extra=extra,
                command=f"diskimg backup run {job.name}", **rescue_options(job.image_options)),
                progress=rescue_progress)
            made = rescued.image
            unreadable = sum(n for _, n in rescued.unreadable)
        else:
            from diskimg.defaults import DEFAULT_LEVEL
            from diskimg.ops.imaging import ImageOptions, create_image
            kwargs = dict(level=job.compression_level or DEFAULT_LEVEL,
                          all_blocks=job.all_blocks, clock=now, extra=extra,
                          search=(dest.location,), **job.image_options)
            if decision.level == "full":   # a changed-block image takes its parent's
                kwargs.update(block_size=job.block_size, digest=job.digest)
            if threads:
                kwargs["threads"] = threads
            if decision.level == "incremental":
                kwargs["incremental"] = decision.parent.path
            elif decision.level == "differential":
                kwargs["differential"] = decision.parent.path
            made = create_image(device, dest.path(name), ImageOptions(**kwargs), progress)
        points = len(cat_mod.scan(dest, job.name).restore_points)
        code = EXIT_PROBLEM if unreadable else EXIT_OK
        status.update(bytes_read=made.read_bytes, bytes_stored=made.stored_bytes,
                      image_bytes=made.image_bytes, restore_points=points, exit_code=code,
                      result="success" if code == EXIT_OK else "problem", error=None if not
                      unreadable else f"{unreadable} bytes unreadable, restored as zeros")
        return RunResult(
            job=job.name, level=decision.level, reason=decision.reason, image=made.path,
            uuid=made.uuid, parent=decision.parent.name if decision.parent else None,
            source=device, started=format_time(started_at), ended="",
            seconds=time.monotonic() - started, bytes_read=made.read_bytes,
            bytes_stored=made.stored_bytes, image_bytes=made.image_bytes, health=verdict,
            rescue=rescue, unreadable_bytes=unreadable, removed_leftovers=removed,
            restore_points=points, status_file=status_path(job), textfile=None, exit_code=code)


def _probe(device: str) -> tuple[int, Callable[[Point], str | None]]:
    """The source's size, and why it is not the disk a full image was made from, as imaging
    would refuse a changed-block image of it (serial, WWN, partition-table id, filesystem
    UUID); None when it is."""
    from diskimg.disk.blockdev import open_source
    from diskimg.disk.identity import source_mismatch
    from diskimg.ops.imaging import source_identity
    source = open_source(device)
    try:
        size, ident = source.size, source_identity(source)
    finally:
        source.close()
    return size, lambda full: source_mismatch(ident, full.identity, device, full.path)


def _remove_leftovers(dest: Destination, cat: Catalogue, notify: Notify) -> tuple[str, ...]:
    """What interrupted runs left (a NAME.partial file, an unfinished multipart upload): no
    run of the job holds them (we hold the lock, and in object storage the job's claim), and
    none is a restore point."""
    removed = []
    names = set(dest.names(cat.job + "-"))
    for name, label in zip(cat.unfinished, cat.leftovers):
        try:
            dest.store.discard_unfinished(name)
        except DiskimgError as err:
            notify(f"warning: cannot remove {dest.path(label)}, left by an interrupted run: "
                   f"{err}")
            continue
        notify(f"removed {dest.path(label)}, left by an interrupted run")
        removed.append(label)
        _delete_beside(dest, name, (MAP_SUFFIX,), names)
    return tuple(removed)


MAP_SUFFIX = ".map"     # a rescue's GNU ddrescue mapfile, beside its image


def _delete_beside(dest: Destination, image: str, suffixes: tuple[str, ...],
                   names: set[str]) -> None:
    """The small files that belong to `image` (its verification, its rescue map), of those
    listed in `names`."""
    for suffix in suffixes:
        if image + suffix in names:
            dest.delete(image + suffix)


# --------------------------------------------------------------------------------------------
# list, restore

def catalogue(job: Job) -> Catalogue:
    with _endpoint(job):
        return cat_mod.scan(_destination(job), job.name)


def parse_at(text: str) -> datetime | None:
    """--at: 'latest' (None), an ISO date (the end of that day, UTC) or time (UTC unless it
    says otherwise).  Raises UsageError."""
    if text == "latest":
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text}: 'latest' or an ISO 8601 time expected (2026-11-03, "
                         f"2026-11-03T12:00, 2026-11-03T12:00:00Z)") from None
    if len(text) == 10:   # a date: the last point of that day
        t = t.replace(hour=23, minute=59, second=59)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc)


def find_point(cat: Catalogue, at: datetime | None) -> Point:
    points = cat.restore_points
    if at is not None:
        points = [p for p in points if p.time <= at]
    if not points:
        when = "" if at is None else f" at or before {format_time(at)}"
        raise UsageError(f"{cat.location}: job {cat.job} has no restore point{when}")
    return points[-1]


def restore_job(job: Job, target: str, at: datetime | None, **restore_kwargs):
    """Restore the job's last restore point at or before `at` (None: the latest) onto
    `target`; returns (point, RestoreResult).  The restore's own checks and question apply."""
    from diskimg.ops.restore import restore_image
    with _endpoint(job):
        dest = _destination(job)
        point = find_point(cat_mod.scan(dest, job.name), at)
        result = restore_image(point.path, target, search=(dest.location,), **restore_kwargs)
    return point, result


# --------------------------------------------------------------------------------------------
# check

@dataclass(frozen=True)
class Checked:
    name: str
    path: str
    ok: bool
    errors: int
    message: str | None


@dataclass(frozen=True)
class CheckResult:
    job: str
    checked: tuple[Checked, ...]
    chosen: tuple[str, ...]            # the images asked for (a sample), whose chains were checked
    points: int
    unverified: int = 0                # restore points never verified, after this check
    textfile: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checked)


def choose_sample(points: list[Point], pct: float | None) -> list[Point]:
    """All points, or PCT% of them (at least one): those never verified first, then those
    verified longest ago, so successive runs cover every image (Proxmox's verify jobs
    re-verify the oldest)."""
    if pct is None:
        return list(points)
    n = max(1, math.ceil(len(points) * pct / 100)) if points else 0
    order = sorted(points, key=lambda p: (p.verified is not None,
                                          p.verified.time if p.verified else "", p.time))
    return order[:n]


def check_job(job: Job, *, sample: float | None = None, now: Clock = system_clock,
              notify: Notify = _quiet, progress=None, threads: int | None = None,
              textfile: str | None = None) -> CheckResult:
    """Verify the job's images (all, or a sample) with their chains, and record each image's
    result beside it (NAME.verified.json, a small object in object storage written by one
    PUT) for `list` and for the level policy."""
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample:g}: a percentage above 0 and up to 100 expected")
    with _endpoint(job):
        return _check(job, sample, now, notify, progress, threads, textfile)


def _check(job: Job, sample: float | None, now: Clock, notify: Notify, progress,
           threads: int | None, textfile: str | None) -> CheckResult:
    from diskimg.ops.verify import verify_image
    dest = _destination(job)
    cat = cat_mod.scan(dest, job.name)
    chosen = choose_sample(cat.restore_points, sample)
    done: dict[str, Checked] = {}
    for point in sorted(chosen, key=lambda p: p.time, reverse=True):
        if point.uuid in done:
            continue      # verified already as part of a later image's chain
        notify(f"checking {point.path}")
        result = verify_image(point.path, search=(dest.location,), threads=threads,
                              progress=progress)
        when = format_time(now())
        for uuid, path in result.chain:
            member = cat.by_uuid(uuid)
            if member is None or uuid in done:
                continue
            errs = [e for e in result.errors if e.image == uuid]
            checked = Checked(name=member.name, path=member.path, ok=not errs, errors=len(errs),
                              message=errs[0].reason if errs else None)
            done[uuid] = checked
            dest.write_sidecar(member.name + cat_mod.VERIFIED_SUFFIX, {
                "time": when, "ok": checked.ok, "errors": checked.errors,
                "message": checked.message, "uuid": uuid})
    unverified = sum(1 for p in cat.restore_points if p.verified is None and p.uuid not in done)
    written = None
    if textfile:
        written = metrics.write_check_textfile(
            textfile, job.name, now().timestamp(), len(done),
            sum(1 for c in done.values() if not c.ok), unverified)
    return CheckResult(job=job.name, checked=tuple(done.values()),
                       chosen=tuple(p.name for p in chosen), points=len(cat.restore_points),
                       unverified=unverified, textfile=written)


# --------------------------------------------------------------------------------------------
# prune

@dataclass(frozen=True)
class PruneResult:
    job: str
    plan: retention.Plan
    dry_run: bool
    removed: tuple[str, ...]


def prune_job(job: Job, rules: Keep | None = None, *, dry_run: bool = False,
              notify: Notify = _quiet) -> PruneResult:
    """Remove what the keep rules (the job's, or `rules`) and the chains do not keep, newest
    first so that no image is ever left without its parent, under the job's lock."""
    rules = rules if rules is not None else job.keep
    with _endpoint(job):
        dest = _destination(job)
        if dry_run:
            cat = cat_mod.scan(dest, job.name)
            return PruneResult(job.name, retention.plan(cat, rules), True, ())
        with _job_lock(job, dest, f"backup prune {job.name}", notify):
            cat = cat_mod.scan(dest, job.name)
            plan = retention.plan(cat, rules)
            names = set(dest.names(job.name + "-"))
            removed = []
            for d in plan.remove:
                dest.delete(d.point.name)
                removed.append(d.point.name)
                _delete_beside(dest, d.point.name, (cat_mod.VERIFIED_SUFFIX, MAP_SUFFIX),
                               names)
            removed += _remove_leftovers(dest, cat, _quiet)   # the plan says it
            # verification records whose image is gone (a check that ran while a prune
            # removed)
            names = set(dest.names(job.name + "-"))
            for name in names:
                image = name.removesuffix(cat_mod.VERIFIED_SUFFIX)
                if name != image and image not in names:
                    dest.delete(name)
    return PruneResult(job.name, plan, False, tuple(removed))


__all__ = ["CheckResult", "Checked", "PruneResult", "RunResult",
           "Verification", "catalogue", "check_job", "find_point", "parse_at", "prune_job",
           "restore_job", "run_job", "system_clock"]


def rescue_options(wanted: dict) -> dict:
    """The job's image settings (parity, encryption) for a rescue run: the same as for an
    image, so that a job switched to --rescue by its health gate still writes what it was asked
    to (an encrypted job never writes in plaintext); a setting a rescue cannot honour stops the
    run."""
    import dataclasses

    from diskimg.ops.rescue import RescueOptions
    have = {f.name for f in dataclasses.fields(RescueOptions)}
    missing = sorted(set(wanted) - have)
    if missing:
        raise UsageError(f"a rescue cannot apply the job's {', '.join(missing)} setting")
    return dict(wanted)
