"""Self-test schedules in smartd's ``-s`` syntax, started by ``diskimg monitor``.

A schedule is an extended regular expression matched (whole) against ``T/MM/DD/d/HH`` for every
hour: T the test type (L long, S short, C conveyance), MM the month (01-12), DD the day of the
month (01-31), d the day of the week (1 Monday ... 7 Sunday), HH the hour (00-23), local time.
``(S/../.././02|L/../../6/03)`` is a short test every day between 2 and 3 a.m. and a long test
on Saturdays between 3 and 4 a.m. (smartd.conf(5), ``-s``).

As smartd does, each monitor pass looks at the hours since the previous pass (at most the last
24), runs at most one test (a long one first, then short, then conveyance) and never runs the
same scheduled hour twice (kept in the history's ``scheduled`` table, with what was done).  A
test is not started while another runs: it is skipped with the reason logged and kept.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from diskimg.errors import DiskimgError, UsageError
from diskimg.health.history import Drive, History

log = logging.getLogger(__name__)

TYPES = {"L": "long", "S": "short", "C": "conveyance"}   # in priority order
_HOUR = timedelta(hours=1)

__all__ = ["TYPES", "due", "parse_schedule", "run_schedule"]


def parse_schedule(text: str) -> re.Pattern:
    """The compiled schedule; UsageError when it is not a regular expression or matches no
    hour of the coming year (a typo such as ``S/../.././2`` instead of ``02``)."""
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise UsageError(f"--schedule {text!r}: not a regular expression ({e})") from None
    start = datetime(2024, 1, 1)
    for h in range(366 * 24):
        t = start + h * _HOUR
        if any(pattern.fullmatch(_slot(k, t)) for k in TYPES):
            return pattern
    raise UsageError(f"--schedule {text!r}: matches no hour of a year; the format is "
                     "T/MM/DD/d/HH, e.g. (S/../.././02|L/../../6/03)")


def _slot(kind: str, t: datetime) -> str:
    return f"{kind}/{t.month:02d}/{t.day:02d}/{t.isoweekday()}/{t.hour:02d}"


def due(pattern: re.Pattern, last_check: float | None, now: float) -> list[str]:
    """The scheduled slots (``T/MM/DD/d/HH`` strings, with the year for uniqueness) whose hour
    came since ``last_check`` (at most 24 hours back; the current hour on a first run)."""
    end = datetime.fromtimestamp(now).replace(minute=0, second=0, microsecond=0)
    if last_check is None:
        start = end
    else:
        start = datetime.fromtimestamp(last_check).replace(minute=0, second=0,
                                                           microsecond=0) + _HOUR
        start = max(start, end - 23 * _HOUR)
    out = []
    t = start
    while t <= end:
        for kind in TYPES:
            s = _slot(kind, t)
            if pattern.fullmatch(s):
                out.append(f"{t.year}/{s}")
        t += _HOUR
    return out


def run_schedule(history: History, drive: Drive, device: str, schedule: str, now: float,
                 running: int | None, smartctl: str | None = None,
                 interface: str | None = None, starter=None) -> str | None:
    """Start the scheduled self-test due now on ``device``, if any; what was done (None when
    nothing was due).  ``running``: percent left of a test running now (then nothing starts).
    ``starter(device, type)`` replaces ``selftest.start_selftest`` (its result's ``started``
    and ``message`` are used)."""
    pattern = parse_schedule(schedule)
    key = f"schedule-checked:{drive.id}"
    last = history.meta(key)
    history.set_meta(key, repr(now))
    done = history.scheduled(drive.id)
    slots = [s for s in due(pattern, float(last) if last else None, now) if s not in done]
    if not slots:
        return None
    order = list(TYPES)
    slots.sort(key=lambda s: (order.index(s.split("/")[1]), s))
    pick = slots[0]
    test = TYPES[pick.split("/")[1]]
    if running is not None:
        outcome = f"skipped the scheduled {test} self-test: a self-test is running ({running}% " \
                  "left)"
    else:
        try:
            if starter is None:
                from diskimg.health.selftest import start_selftest

                def starter(dev, kind):
                    return start_selftest(dev, kind, smartctl, interface)[0]
            result = starter(device, test)
            if result.started:
                outcome = f"started the scheduled {test} self-test"
            else:
                outcome = f"skipped the scheduled {test} self-test: {result.message}"
        except DiskimgError as e:
            outcome = f"could not start the scheduled {test} self-test: {e}"
    log.info("%s: %s (%s)", device, outcome, pick)
    for s in slots:
        history.add_scheduled(drive.id, s, TYPES[s.split("/")[1]], now,
                              outcome if s == pick else f"not run: {test} test ran at {pick}")
    return outcome
