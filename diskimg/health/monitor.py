"""Monitoring: read a disk, match the reading to a drive of the history, judge it with its trends,
store it; for each pass over the disks, start scheduled self-tests and send alerts on a change of
verdict.

``observe`` is one disk once; ``run_pass`` is what ``diskimg monitor`` does each interval.  The
reading itself goes through ``smart.read`` (smartctl via pySMART) unless a ``reader`` is given.
Every function takes ``now`` (Unix seconds): the clock is a parameter.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from diskimg.errors import DiskimgError
from diskimg.health import trends
from diskimg.health.history import Drive, History, known_serial
from diskimg.health.rules import INFO, UNKNOWN, WARN, HealthReport, Reason, SmartFacts

log = logging.getLogger(__name__)

__all__ = ["MonitorOptions", "Observation", "acknowledge", "observe", "run_pass"]

Reader = Callable[[str, "str | None", "str | None"], "tuple[HealthReport, SmartFacts]"]


@dataclass(frozen=True)
class Observation:
    """One disk read once: the verdict with trends, the previous verdict through the same
    device name, what the self-test schedule did and what alert went out."""

    device: str
    taken: float
    verdict: str
    reasons: tuple[Reason, ...]
    report: HealthReport | None
    drive: Drive | None
    previous: str | None = None          # verdict of the previous reading through this device
    previous_taken: float | None = None
    error: str | None = None             # why SMART could not be read
    selftest: str | None = None          # what the schedule did: started, skipped (and why)
    alert: str | None = None             # what the alert did
    selftest_remaining: int | None = None  # percent left of a self-test running at the reading
    values: dict | None = None           # the tracked numbers (trends.values_of)
    wear: int | None = None              # percent of the rated endurance used

    @property
    def changed(self) -> bool:
        """A change of verdict worth an alert: any change, except a first reading that
        passes."""
        if self.previous is None:
            return self.verdict not in ("PASS",)
        return self.previous != self.verdict


@dataclass(frozen=True)
class MonitorOptions:
    smartctl: str | None = None
    interface: str | None = None
    schedule: str | None = None          # smartd -s regular expression (schedule.py)
    skip_standby: bool = False
    alert_exec: str | None = None
    alert_mail: str | None = None
    textfile: str | None = None


def _default_reader(path: str, smartctl: str | None, interface: str | None):
    from diskimg.health.smart import read
    return read(path, smartctl, interface)


def _identify(history: History, device: str, report: HealthReport,
              now: float) -> tuple[Drive, list[Reason]]:
    """The drive this reading belongs to: the device's current drive, or a new one when the
    serial changed or the power-on hours went backwards."""
    drive = history.current_drive(device)
    serial = known_serial(report.serial)
    if drive is None:
        return history.add_drive(device, report.model, serial, report.interface, now), []
    why, reason = None, None
    last = history.last_hours(drive.id)
    if drive.serial and serial and drive.serial != serial:
        why = f"serial {serial}, was {drive.serial}"
        reason = Reason("drive", f"a different drive behind {device}: {why}", INFO,
                        "the disk was replaced; its history starts here")
    elif (drive.model and report.model and drive.model != report.model):
        why = f"model {report.model}, was {drive.model}"
        reason = Reason("drive", f"a different drive behind {device}: {why}", INFO,
                        "the disk was replaced; its history starts here")
    elif last is not None and report.power_on_hours is not None \
            and report.power_on_hours < last[0] - 1:
        hours, when = last
        why = f"power-on hours {report.power_on_hours}, were {hours} at {trends.fmt_time(when)}"
        reason = Reason("power-on hours", f"{report.power_on_hours} h, were {hours} h at "
                        f"{trends.fmt_time(when)}", WARN,
                        f"power-on hours went backwards: a different drive behind {device} "
                        "(or its counters were reset); its history starts here")
    if why is None:
        return drive, []
    log.info("%s: %s", device, why)
    new = history.add_drive(device, report.model, serial, report.interface, now,
                            follows=drive.id, why=why)
    return new, [reason]


def observe(history: History, device: str, now: float, smartctl: str | None = None,
            interface: str | None = None, reader: Reader | None = None) -> Observation:
    """Read ``device``, judge the reading with its drive's history and store it.

    SMART that cannot be read (no smartctl, device gone, smartctl broken) is an UNKNOWN
    observation with ``error`` set; it is stored when the history knows the device, so that
    a disk that vanished changes its verdict (and alerts)."""
    prev = history.last_verdict(device)
    previous, previous_taken = prev if prev else (None, None)
    try:
        report, facts = (reader or _default_reader)(device, smartctl, interface)
    except DiskimgError as e:
        drive = history.current_drive(device)
        reasons = (Reason("SMART", "unreadable", INFO, str(e)),)
        if drive is not None:
            history.add_reading(drive, now, UNKNOWN, None, None, None, {}, reasons)
        return Observation(device, now, UNKNOWN, reasons, None, drive, previous,
                           previous_taken, error=str(e))
    drive, extra = _identify(history, device, report, now)
    # counters and temperature look back 30 days; the wear line a year (a lighter query: an
    # hourly year is 8760 readings)
    past = history.readings(drive.id, since=now - 31 * trends.DAY, until=now)
    wear_past = history.wear_series(drive.id, now - 365 * trends.DAY, now)
    values = trends.values_of(facts)
    known = {(t.hours, t.type, t.status) for t in history.selftests(drive.id)}
    result = trends.assess(report, facts, values, past, now, history.acks(drive.id), known,
                           extra, wear_history=wear_past)
    wear = trends.wear_of(facts)
    history.add_reading(drive, now, result.verdict, report.temperature, report.power_on_hours,
                        wear, values, result.reasons, report.selftests)
    return Observation(device, now, result.verdict, result.reasons, report, drive, previous,
                       previous_taken, selftest_remaining=facts.selftest_remaining,
                       values=values, wear=wear)


def acknowledge(history: History, device: str, attrs: Sequence[str], now: float,
                smartctl: str | None = None, interface: str | None = None,
                reader: Reader | None = None) -> tuple[list[tuple[str, int]], Observation]:
    """Accept the current values of ``attrs`` as the baseline of ``device``'s drive: read it,
    store the acknowledgements, then store and return the reading judged with them.
    ([(key, value)], observation).  UsageError for an attribute the drive does not count."""
    report, facts = (reader or _default_reader)(device, smartctl, interface)
    keys = [trends.resolve_key(a, facts) for a in attrs]
    values = trends.values_of(facts)
    drive, _ = _identify(history, device, report, now)
    acked = []
    for key in dict.fromkeys(keys):
        history.set_ack(drive.id, key, values[key], now)
        acked.append((key, values[key]))
        log.info("%s: %s acknowledged at %s", device, trends.label_of(key, facts), values[key])
    obs = observe(history, device, now, smartctl, interface,
                  reader=lambda *_: (report, facts))
    return acked, obs


def run_pass(history: History, devices: Sequence[str], now: float, options: MonitorOptions,
             reader: Reader | None = None) -> list[Observation]:
    """One pass of ``diskimg monitor``: for each device, skip it in standby when asked,
    observe it, run the self-test schedule, alert on a change of verdict; then write the
    textfile metrics.  Returns the observations in the order of ``devices``."""
    from dataclasses import replace

    from diskimg.health import alerts, schedule
    out: list[Observation] = []
    for device in devices:
        if options.skip_standby:
            from diskimg.health.smart import in_standby
            standby = in_standby(device, options.smartctl, options.interface)
            if standby:
                log.info("%s: in standby, not read (--skip-standby)", device)
                prev = history.last_verdict(device)
                obs = Observation(device, now, prev[0] if prev else UNKNOWN, (
                    Reason("standby", "not read", INFO,
                           "the disk is in standby and --skip-standby was given"),),
                    None, history.current_drive(device), prev[0] if prev else None,
                    prev[1] if prev else None,
                    selftest="skipped: the disk is in standby" if options.schedule else None)
                out.append(obs)
                continue
        obs = observe(history, device, now, options.smartctl, options.interface, reader)
        if options.schedule and obs.drive is not None and obs.report is not None:
            obs = replace(obs, selftest=schedule.run_schedule(
                history, obs.drive, device, options.schedule, now, obs.selftest_remaining,
                smartctl=options.smartctl, interface=options.interface))
        if obs.changed and obs.drive is not None and (options.alert_exec or options.alert_mail):
            obs = replace(obs, alert=alerts.send(history, obs, options.alert_exec,
                                                 options.alert_mail))
        out.append(obs)
    if options.textfile:
        from diskimg.health import metrics
        metrics.write_textfile(options.textfile, history, out, now)
    return out
