"""Trends: what a drive's history says that one reading cannot, as pure functions.

``values_of(facts)`` picks the numbers worth keeping from a reading (the counters that grow when a
drive fails, the wear indicators); ``assess`` combines the one-reading verdict of
``rules.evaluate`` with the drive's stored readings:

* a counter that grew (5, 10, 184, 187, 188, 196, 197, 198, 199, NVMe media errors, SCSI grown
  defects and uncorrected errors): by how much since the last reading and over the last 7 and 30
  days, with the dates.  Growth in the last 7 days is FAIL (199, the cable's CRC count, and 188,
  command timeouts, stay WARN: they grow with cables and power, not with the media); growth
  only in the last 30 days is WARN.  A counter that has not moved keeps the verdict of its
  one-reading rule (5 reallocated: WARN; 197/198 pending and offline-uncorrectable stay FAIL:
  history does not make those sectors readable, and an imaging run will hit them);
* an acknowledged counter (``health --ack``) at or below its acknowledged value is INFO, and
  growth is counted from the acknowledged value;
* wear (NVMe percentage used, SCSI endurance used, ATA 177/202/231/233 as 100 - value): the
  date it reaches 100 % from a least-squares line through the last year of readings (once
  they span a week and two percentage points); WARN when that is less than 90 days away;
* temperature at or above the drive's own warning/critical limits, or 10 C above its usual
  range (the 10th to 90th percentile of the last 30 days);
* a failed self-test that was not in the log at the previous reading.

Power-on hours going backwards (another drive behind the same name) is found where readings
are matched to drives (``monitor``), which passes its reason in.  Every function takes the
time as ``now``: the clock is a parameter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from diskimg.errors import UsageError
from diskimg.health.rules import (
    FAIL,
    INFO,
    PASS,
    UNKNOWN,
    WARN,
    HealthReport,
    Reason,
    SmartFacts,
    decode_counter,
)

DAY = 86400.0
_RANK = {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}

__all__ = ["COUNTERS", "Assessment", "assess", "fmt_time", "label_of", "resolve_key",
           "values_of", "wear_of"]


@dataclass(frozen=True)
class Counter:
    key: str
    label: str          # the 'what' of the one-reading rule's reason, where names are fixed
    growing: str        # severity of growth in the last 7 days
    why: str


_MEDIA = "the count is growing: the drive is failing now; copy its data off and replace it"
COUNTERS: dict[str, Counter] = {c.key: c for c in [
    Counter("5", "Reallocated_Sector_Ct", FAIL, _MEDIA),
    Counter("10", "Spin_Retry_Count", WARN, "the spindle keeps needing retries to spin up"),
    Counter("184", "End-to-End_Error", FAIL, "the drive's data path keeps corrupting data"),
    Counter("187", "Reported_Uncorrect", FAIL, _MEDIA),
    Counter("188", "Command_Timeout", WARN, "commands keep timing out: check cabling and "
                                             "power, then the drive"),
    Counter("196", "Reallocated_Event_Count", FAIL, _MEDIA),
    Counter("197", "Current_Pending_Sector", FAIL, _MEDIA),
    Counter("198", "Offline_Uncorrectable", FAIL, _MEDIA),
    Counter("199", "UDMA_CRC_Error_Count", WARN, "link CRC errors keep happening: the cable, "
                                                  "backplane or connector is still bad"),
    Counter("media_errors", "media and data integrity errors", FAIL, _MEDIA),
    Counter("grown_defects", "grown defect list", FAIL, _MEDIA),
    Counter("uncorrected_read", "uncorrected read errors", FAIL, _MEDIA),
    Counter("uncorrected_write", "uncorrected write errors", FAIL, _MEDIA),
    Counter("uncorrected_verify", "uncorrected verify errors", FAIL, _MEDIA),
]}
_ATA_COUNTERS = tuple(int(k) for k in COUNTERS if k.isdigit())
_ATA_WEAR = (177, 231, 233, 202)       # normalized value = life left in percent


def fmt_time(t: float) -> str:
    """A reading's time as a sysadmin reads it: local time to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


def values_of(f: SmartFacts) -> dict[str, int]:
    """The numbers a reading keeps: counters (decoded counts), wear indicators."""
    out: dict[str, int] = {}
    for num in _ATA_COUNTERS:
        a = f.attributes.get(num)
        if a is not None:
            count, _ = decode_counter(a.raw)
            if count is not None:
                out[str(num)] = count
    for num in _ATA_WEAR:
        a = f.attributes.get(num)
        if a is not None and a.value is not None:
            out[f"{num}.value"] = a.value
    n = f.nvme
    if n:
        media = n.get("media_errors")
        if media is not None:
            # a multiple of 2^32 is a firmware quirk, not errors (rules.evaluate says so too)
            out["media_errors"] = 0 if media and media % (1 << 32) == 0 else media
        for k in ("percentage_used", "available_spare", "critical_warning", "error_log_entries"):
            if n.get(k) is not None:
                out[k] = n[k]
    if f.scsi_grown_defects is not None:
        out["grown_defects"] = f.scsi_grown_defects
    for op, count in f.scsi_uncorrected.items():
        out[f"uncorrected_{op}"] = count
    if f.scsi_endurance_used is not None:
        out["endurance_used"] = f.scsi_endurance_used
    return out


def wear_of(f: SmartFacts) -> int | None:
    """Percent of the rated endurance used, or None for a drive that does not say."""
    if f.nvme and f.nvme.get("percentage_used") is not None:
        return f.nvme["percentage_used"]
    if f.scsi_endurance_used is not None:
        return f.scsi_endurance_used
    for num in _ATA_WEAR:
        a = f.attributes.get(num)
        if a is not None and a.value is not None and 0 <= a.value <= 100:
            return 100 - a.value
    return None


def label_of(key: str, f: SmartFacts | None = None) -> str:
    """The 'what' of reasons about ``key``: "5 Reallocated_Sector_Ct" (the drive's own name
    for the attribute where it is known), "media and data integrity errors"."""
    if key.isdigit():
        a = f.attributes.get(int(key)) if f is not None else None
        return f"{key} {a.name if a is not None else COUNTERS[key].label}"
    c = COUNTERS.get(key)
    return c.label if c else key


def resolve_key(text: str, f: SmartFacts) -> str:
    """The counter ``--ack`` names: an ATA id ("5"), its name ("Reallocated_Sector_Ct"), or
    a key (media_errors, grown_defects, uncorrected_read...).  UsageError for anything else."""
    values = values_of(f)
    want = text.strip().lower()
    names = {k: label_of(k, f).lower() for k in values if k in COUNTERS}
    for k, label in names.items():
        if want in (k.lower(), label, label.partition(" ")[2]):
            return k
    have = ", ".join(label_of(k, f) for k in names) or "none"
    raise UsageError(f"--ack {text}: not a counter this drive reports (counters: {have})")


@dataclass(frozen=True)
class Assessment:
    verdict: str
    reasons: tuple[Reason, ...]


def _value_at_or_after(history: Sequence, key: str, since: float):
    for r in history:
        if r.taken >= since and key in r.values:
            return r
    return None


def _counter_reasons(key: str, cur: int, f: SmartFacts | None, history: Sequence, now: float,
                     ack: tuple[int, float] | None) -> list[Reason]:
    c = COUNTERS[key]
    what = label_of(key, f)
    with_key = [r for r in history if key in r.values]
    if not with_key:
        return []
    last = with_key[-1]
    if ack is not None and cur <= ack[0]:
        return []
    if cur < last.values[key]:
        return [Reason(what, f"{cur}, down from {last.values[key]} at {fmt_time(last.taken)}",
                       INFO, "pending sectors were rewritten or remapped" if key == "197"
                       else "the count went down: reset, or a different drive")]
    floor = ack[0] if ack is not None else None
    parts, grew7, grew30 = [], False, False
    d_last = cur - max(last.values[key], floor if floor is not None else -1)
    if d_last > 0:
        parts.append(f"+{d_last} since the last reading ({last.values[key]} at "
                     f"{fmt_time(last.taken)})")
    for days in (7, 30):
        start = _value_at_or_after(with_key, key, now - days * DAY)
        if start is None:
            continue
        base = max(start.values[key], floor) if floor is not None else start.values[key]
        d = cur - base
        if d > 0:
            parts.append(f"+{d} in {days} days ({base} on {_date(start.taken)})")
            grew7 = grew7 or days == 7
            grew30 = True
    if d_last > 0:
        grew7 = grew7 or now - last.taken <= 7 * DAY
    if not parts:
        # unchanged: since when?
        since = last
        for r in reversed(with_key):
            if r.values[key] != cur:
                break
            since = r
        if cur and now - since.taken >= DAY:
            return [Reason(what, f"{cur}, unchanged since {_date(since.taken)}", INFO,
                           "an old count that does not grow: the one-reading rule decides")]
        return []
    if grew7:
        severity, why = c.growing, c.why
    elif grew30:
        severity, why = WARN, "grew in the last 30 days but not in the last 7: watch it"
    else:
        return []
    if ack is not None:
        why += f" (grew past the value {ack[0]} acknowledged on {_date(ack[1])})"
    return [Reason(what, f"{cur}: " + ", ".join(parts), severity, why)]


def _wear_reason(wear: int, series: Sequence[tuple[float, int]], now: float) -> Reason | None:
    pts = [(t, w) for t, w in series if w is not None and now - 365 * DAY <= t < now]
    pts.append((now, wear))
    # integer percentages: a line needs a week and two points of wear to mean something
    if len(pts) < 3 or pts[-1][0] - pts[0][0] < 7 * DAY or wear >= 100 \
            or max(w for _, w in pts) - min(w for _, w in pts) < 2:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mw = sum(w for _, w in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var == 0:
        return None
    slope = sum((t - mt) * (w - mw) for t, w in pts) / var      # percent per second
    if slope <= 0:
        return None
    fit_now = mw + slope * (now - mt)
    when = now + (100 - fit_now) / slope
    per30 = slope * 30 * DAY
    soon = when - now < 90 * DAY
    return Reason("wear", f"{wear}% used, +{per30:.1f}% per 30 days: 100% around {_date(when)}",
                  WARN if soon else INFO,
                  "at this rate the rated write endurance runs out "
                  + ("within 90 days: plan the replacement" if soon else "on that date"))


def _temperature_reasons(f: SmartFacts, temp: int, history: Sequence,
                         now: float) -> list[Reason]:
    if f.temperature_critical and temp >= f.temperature_critical:
        return [Reason("temperature", f"{temp} C >= the drive's critical limit "
                       f"{f.temperature_critical} C", FAIL,
                       "the drive is at the temperature it protects itself from: cool it now")]
    if f.temperature_warning and temp >= f.temperature_warning:
        return [Reason("temperature", f"{temp} C >= the drive's warning limit "
                       f"{f.temperature_warning} C", WARN, "check airflow and fans")]
    temps = sorted(r.temperature for r in history
                   if r.temperature is not None and r.taken >= now - 30 * DAY)
    if len(temps) >= 7:
        lo, hi = temps[int(0.1 * (len(temps) - 1))], temps[int(0.9 * (len(temps) - 1))]
        if temp >= hi + 10 and temp >= 40:
            return [Reason("temperature", f"{temp} C, usually {lo}-{hi} C (last 30 days)", WARN,
                           "much hotter than usual: a fan, airflow or a neighbour changed")]
    return []


def assess(report: HealthReport, f: SmartFacts, values: dict[str, int], history: Sequence,
           now: float, acks: dict[str, tuple[int, float]] | None = None,
           known_selftests: Iterable[tuple[str, str, str]] = (),
           extra: Iterable[Reason] = (),
           wear_history: Sequence[tuple[float, int]] | None = None) -> Assessment:
    """The verdict of one reading with the drive's history (its earlier readings, oldest
    first; 30 days are enough) taken into account.  ``known_selftests``: (hours, type, status)
    of the self-test log entries seen before; ``extra``: reasons found elsewhere (a different
    drive); ``wear_history``: (time, wear) of the last year (default: from ``history``)."""
    if report.verdict == UNKNOWN:
        return Assessment(UNKNOWN, tuple(report.reasons) + tuple(extra))
    acks = acks or {}
    reasons = list(report.reasons)
    for key, (value, when) in acks.items():
        cur = values.get(key)
        if cur is None or cur > value:
            continue
        what = label_of(key, f)
        reasons = [Reason(r.what, f"{r.value} (acknowledged at {value} on {_date(when)})", INFO,
                          r.why) if r.what == what and r.severity != INFO
                   and not r.value.startswith(("value ", "worst ")) else r for r in reasons]
    reasons += list(extra)
    if history:
        for key in COUNTERS:
            if key in values:
                reasons += _counter_reasons(key, values[key], f, history, now, acks.get(key))
        known = set(known_selftests)
        new_failed = [t for t in report.selftests
                      if t.failed and (t.hours or "", t.type, t.status) not in known]
        if new_failed:
            t = new_failed[0]
            reasons.append(Reason(
                f"self-test #{t.num}", f"{t.type}: {t.status}"
                + (f" at LBA {t.lba}" if t.lba and t.lba != "-" else "")
                + f", new since {fmt_time(history[-1].taken)}", FAIL,
                "a self-test failed since the last reading: the drive found what it cannot "
                "read"))
    wear = wear_of(f)
    if wear is not None:
        if wear_history is None:
            wear_history = [(r.taken, r.wear) for r in history if r.wear is not None]
        r = _wear_reason(wear, wear_history, now)
        if r is not None:
            reasons.append(r)
    if report.temperature is not None:
        reasons += _temperature_reasons(f, report.temperature, history, now)
    worst = max((_RANK.get(r.severity, 0) for r in reasons), default=0)
    return Assessment({0: PASS, 1: WARN, 2: FAIL}[worst], tuple(reasons))
