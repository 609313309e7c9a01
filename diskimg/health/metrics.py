"""node_exporter textfile metrics of a monitor pass (``monitor --textfile DIR``).

One file, ``DIR/diskimg.prom``, written atomically (a temporary file in DIR, fsynced, renamed
over the old one) so node_exporter never reads half of it.  Every series is labelled with the
device, model and serial.  Checked with ``promtool check metrics`` in the tests.
"""
from __future__ import annotations

import os
from typing import Iterable

from diskimg import atomicfile
from diskimg.errors import OperationFailed, PermissionDenied, is_permission_error
from diskimg.health import trends
from diskimg.health.history import History, known_serial

FILENAME = "diskimg.prom"
STATUS = {"PASS": 0, "WARN": 1, "FAIL": 2, "UNKNOWN": 3}

__all__ = ["FILENAME", "render", "write_textfile"]


def _esc(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(**kw) -> str:
    return "{" + ",".join(f'{k}="{_esc(v if v is not None else "")}"' for k, v in kw.items()) \
        + "}"


def render(observations: Iterable, now: float) -> str:
    """The text exposition of a pass's observations (monitor.Observation)."""
    series: dict[str, tuple[str, list[str]]] = {
        "diskimg_health_status": ("Health verdict: 0 PASS, 1 WARN, 2 FAIL, 3 UNKNOWN", []),
        "diskimg_health_verdict": ("1 for the disk's current verdict, 0 for the others", []),
        "diskimg_smart_attribute_raw": ("Key SMART counters and wear indicators as read", []),
        "diskimg_smart_temperature_celsius": ("Drive temperature", []),
        "diskimg_smart_wear_used_ratio": ("Rated write endurance used (1 = 100%)", []),
        "diskimg_smart_power_on_seconds": ("Power-on time (the drive counts hours)", []),
        "diskimg_smart_selftest_last_passed": ("1 when the newest logged self-test passed, "
                                               "0 when it failed", []),
        "diskimg_monitor_last_run_timestamp_seconds": ("When the monitor last read the disk",
                                                       []),
    }

    def add(name: str, labels: str, value: float) -> None:
        series[name][1].append(f"{name}{labels} {value:g}" if isinstance(value, float)
                               else f"{name}{labels} {value}")

    for obs in observations:
        report, drive = obs.report, obs.drive
        model = (report.model if report else None) or (drive.model if drive else None)
        serial = (known_serial(report.serial) if report else None) or \
            (drive.serial if drive else None)
        ident = dict(device=obs.device, model=model or "", serial=serial or "")
        add("diskimg_health_status", _labels(**ident), STATUS.get(obs.verdict, 3))
        for v in STATUS:
            add("diskimg_health_verdict", _labels(**ident, verdict=v), int(v == obs.verdict))
        add("diskimg_monitor_last_run_timestamp_seconds", _labels(**ident), float(obs.taken))
        if report is None:
            continue
        if report.temperature is not None:
            add("diskimg_smart_temperature_celsius", _labels(**ident), report.temperature)
        if report.power_on_hours is not None:
            add("diskimg_smart_power_on_seconds", _labels(**ident), report.power_on_hours * 3600)
        values = getattr(obs, "values", None) or {}
        for key, value in sorted(values.items()):
            add("diskimg_smart_attribute_raw",
                _labels(**ident, attribute=key,
                        name=trends.label_of(key.split(".")[0]) if key.split(".")[0] in
                        trends.COUNTERS or key.split(".")[0].isdigit() else key), value)
        wear = getattr(obs, "wear", None)
        if wear is not None:
            add("diskimg_smart_wear_used_ratio", _labels(**ident), wear / 100.0)
        if report.selftests:
            t = report.selftests[0]
            add("diskimg_smart_selftest_last_passed", _labels(**ident, type=t.type),
                0 if t.failed else 1)
    out = []
    for name, (help_text, lines) in series.items():
        if not lines:
            continue
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *lines]
    return "\n".join(out) + "\n"


def write_textfile(directory: str, history: History | None, observations: Iterable,
                   now: float) -> str:
    """Write DIR/diskimg.prom atomically; its path."""
    text = render(observations, now)
    target = os.path.join(directory, FILENAME)
    try:
        atomicfile.write_atomically(target, text.encode())
    except OSError as e:
        if is_permission_error(e):
            raise PermissionDenied(directory, "write the metrics file in") from e
        raise OperationFailed(f"{directory}: cannot write {FILENAME}: {e.strerror or e}",
                              path=directory) from e
    return target
