"""Which level the next run of a job takes, and against which parent, from the images already
there and the time now (a parameter: the schedule is tested day by day).

In order, the first that applies:

1. ``--level`` given: that level (a changed-block level needs a full image to build on);
2. no restorable full image yet: full;
3. the source's size differs from the last full's (a replaced, larger disk), or it is not the
   last full's disk (its serial, WWN, partition-table id or filesystem UUID differ: a disk
   replaced, a filesystem made again): full, saying so;
4. ``full-every`` is due since the last full: full.  A calendar period ("monthly") is due when
   the month (day, ISO week, year) has changed, an interval ("4w") when that many whole days
   have passed, by UTC date, so that a timer's random delay does not push a full to the next
   run (an interval under a day is due after 95% of it);
5. an image of the latest chain failed its last ``backup check``: full (nothing more is built
   on a damaged chain);
6. ``full-after-percent``: the changed images of the latest chain (its differential and
   incrementals) add up to more than that percentage of the full's stored bytes: full;
7. ``full-after-incrementals``: the latest chain holds that many incrementals: full;
8. ``differential-every`` is due since the last differential or full: differential;
9. ``incremental = true``: incremental on the latest restore point; else a differential when
   ``differential-every`` is set, else a full.

A differential is taken against the last full image; an incremental against the latest
restore point, whatever its level.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from diskimg.backup.catalogue import Catalogue, Point
from diskimg.backup.config import LevelPolicy, Period
from diskimg.errors import UsageError
from diskimg.units import human


@dataclass(frozen=True)
class Decision:
    level: str
    parent: Point | None     # the incremental's parent, the differential's full
    reason: str


def due(period: Period, last: datetime | None, now: datetime) -> bool:
    """Whether `period` has come round since `last` (always when there is no last)."""
    if last is None:
        return True
    if period.never:
        return False
    if period.calendar == "daily":
        return now.date() > last.date()
    if period.calendar == "weekly":
        return now.isocalendar()[:2] > last.isocalendar()[:2]
    if period.calendar == "monthly":
        return (now.year, now.month) > (last.year, last.month)
    if period.calendar == "yearly":
        return now.year > last.year
    assert period.seconds is not None
    if period.seconds % 86400 == 0:
        return (now.date() - last.date()).days >= period.seconds // 86400
    return (now - last).total_seconds() >= period.seconds * 0.95


def _age(last: datetime, now: datetime) -> str:
    days = (now.date() - last.date()).days
    return f"{days} day{'s' if days != 1 else ''} old" if days else "from today"


def choose(policy: LevelPolicy, cat: Catalogue, now: datetime, source_size: int | None = None,
           override: str | None = None, mismatch=None) -> Decision:
    """The next run's level.  `mismatch(full) -> str | None` says why the source is not the
    disk a full image was made from (None: it is)."""
    points = cat.restore_points
    latest = points[-1] if points else None
    fulls = [p for p in points if p.level == "full"]
    full = fulls[-1] if fulls else None

    if override is not None:
        if override == "full":
            return Decision("full", None, "--level full")
        if full is None or latest is None:
            raise UsageError(f"job {cat.job}: --level {override} needs a full image to build on; "
                             f"{cat.location} has no restorable one yet")
        if source_size is not None and source_size != full.size:
            raise UsageError(f"job {cat.job}: --level {override}: the source's size "
                             f"({source_size} bytes) differs from the full image's "
                             f"({full.size}); make a full image")
        why = mismatch(full) if mismatch else None
        if why:
            raise UsageError(f"job {cat.job}: --level {override}: {why}; make a full image")
        if override == "differential":
            return Decision("differential", full, "--level differential")
        return Decision("incremental", latest, "--level incremental")

    if full is None or latest is None:
        return Decision("full", None, "no restorable full image yet")
    if source_size is not None and source_size != full.size:
        return Decision("full", None, f"the source's size ({source_size} bytes) differs from "
                                      f"the last full image's ({full.size})")
    why = mismatch(full) if mismatch else None
    if why:
        return Decision("full", None, f"{why}: not the disk of the last full image")
    if due(policy.full_every, full.time, now):
        return Decision("full", None, f"full-every {policy.full_every}: the last full "
                                      f"{full.name} is {_age(full.time, now)}")
    chain = cat.chain_of(latest)
    failed = [p for p in chain if p.verified is not None and not p.verified.ok]
    if failed:
        return Decision("full", None, f"{failed[0].name} failed its last check: nothing more "
                                      f"is built on that chain")
    changed = [p for p in chain if p.level != "full"]
    if policy.full_after_percent is not None and changed:
        total = sum(p.stored_bytes for p in changed)
        limit = full.stored_bytes * policy.full_after_percent / 100
        if total > limit:
            return Decision("full", None, f"full-after-percent {policy.full_after_percent:g}: "
                                          f"the chain's changed images hold {human(total)}, "
                                          f"more than {policy.full_after_percent:g}% of the "
                                          f"full's {human(full.stored_bytes)}")
    incs = sum(1 for p in chain if p.level == "incremental")
    if policy.full_after_incrementals is not None and incs >= policy.full_after_incrementals:
        return Decision("full", None, f"full-after-incrementals "
                                      f"{policy.full_after_incrementals}: the chain holds "
                                      f"{incs} incrementals")
    if not policy.differential_every.never:
        base = [p for p in points if p.level in ("full", "differential")][-1]
        if due(policy.differential_every, base.time, now):
            return Decision("differential", full,
                            f"differential-every {policy.differential_every}: the last "
                            f"{base.level} {base.name} is {_age(base.time, now)}")
    if policy.incremental:
        return Decision("incremental", latest, f"incremental on the latest restore point "
                                               f"{latest.name}")
    if not policy.differential_every.never:
        return Decision("differential", full, "incremental = false: a differential on the "
                                              f"last full {full.name}")
    return Decision("full", None, "no changed-block level is configured")
