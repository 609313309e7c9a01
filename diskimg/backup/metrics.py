"""node_exporter textfile metrics of a job's last run, and the JSON status they come from.

One file per job, ``DIR/diskimg_backup_JOB.prom`` (and ``DIR/diskimg_backup_check_JOB.prom`` for
its last ``backup check``), so that jobs never overwrite each other's,
written to a temporary name in DIR and renamed: node_exporter's textfile collector never reads
half a file.  The job's name is the label ``backup_job`` rather than ``job``, which Prometheus
sets itself (to the scrape job) and would rename to ``exported_job``.
"""
from __future__ import annotations

import json
import os

from diskimg import atomicfile
from diskimg.errors import PermissionDenied, UsageError, is_permission_error

LEVEL_VALUES = ("full", "differential", "incremental")

# name -> (type, help)
_METRICS = {
    "diskimg_backup_last_run_timestamp_seconds": ("gauge", "When the job's last run ended."),
    "diskimg_backup_last_success_timestamp_seconds": (
        "gauge", "When the job's last successful run ended."),
    "diskimg_backup_last_run_success": ("gauge", "1 if the job's last run succeeded, else 0."),
    "diskimg_backup_last_run_exit_code": ("gauge", "Exit code of the job's last run."),
    "diskimg_backup_last_run_duration_seconds": ("gauge", "How long the job's last run took."),
    "diskimg_backup_last_run_read_bytes": ("gauge", "Bytes the last run read from the source."),
    "diskimg_backup_last_run_stored_bytes": (
        "gauge", "Bytes of block data the last run stored in its image."),
    "diskimg_backup_last_run_image_bytes": ("gauge", "Size of the last run's image file."),
    "diskimg_backup_last_run_level": (
        "gauge", "1 for the level the job's last run made, 0 for the others."),
    "diskimg_backup_restore_points": ("gauge", "Restore points of the job after its last run."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(status: dict) -> str:
    """The textfile of one job's status (a run's JSON status)."""
    job = _escape(status["job"])
    label = f'backup_job="{job}"'
    values: dict[str, list[tuple[str, float]]] = {name: [] for name in _METRICS}

    def put(name: str, value, extra: str = "") -> None:
        if value is not None:
            values[name].append((label + extra, float(value)))

    put("diskimg_backup_last_run_timestamp_seconds", status.get("end_epoch"))
    put("diskimg_backup_last_success_timestamp_seconds", status.get("last_success_epoch"))
    put("diskimg_backup_last_run_success", 1 if status.get("result") == "success" else 0)
    put("diskimg_backup_last_run_exit_code", status.get("exit_code"))
    put("diskimg_backup_last_run_duration_seconds", status.get("duration_seconds"))
    put("diskimg_backup_last_run_read_bytes", status.get("bytes_read"))
    put("diskimg_backup_last_run_stored_bytes", status.get("bytes_stored"))
    put("diskimg_backup_last_run_image_bytes", status.get("image_bytes"))
    if status.get("level") in LEVEL_VALUES:
        for level in LEVEL_VALUES:
            put("diskimg_backup_last_run_level", 1 if level == status["level"] else 0,
                f',level="{level}"')
    put("diskimg_backup_restore_points", status.get("restore_points"))
    lines = []
    for name, (kind, help_text) in _METRICS.items():
        if not values[name]:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{labels}}} {_number(v)}" for labels, v in values[name]]
    return "\n".join(lines) + "\n"


_CHECK_METRICS = {
    "diskimg_backup_last_check_timestamp_seconds": ("gauge", "When the job's last check ended."),
    "diskimg_backup_last_check_images": ("gauge", "Images the job's last check verified."),
    "diskimg_backup_last_check_failed_images": (
        "gauge", "Images the job's last check found damaged."),
    "diskimg_backup_unverified_restore_points": (
        "gauge", "Restore points of the job never verified."),
}


def render_check(job: str, ended: float, checked: int, failed: int, unverified: int) -> str:
    """The textfile of one job's last `backup check`."""
    label = f'backup_job="{_escape(job)}"'
    lines = []
    for (name, (kind, help_text)), value in zip(_CHECK_METRICS.items(),
                                                (ended, checked, failed, unverified)):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name}{{{label}}} {_number(float(value))}"]
    return "\n".join(lines) + "\n"


def write_check_textfile(directory: str, job: str, ended: float, checked: int, failed: int,
                         unverified: int) -> str:
    path = os.path.join(directory, f"diskimg_backup_check_{job}.prom")
    write_atomic(path, render_check(job, ended, checked, failed, unverified).encode(),
                 "metrics textfile")
    return path


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 2 ** 53 else repr(v)


def write_atomic(path: str, data: bytes, what: str) -> None:
    """Write `data` to `path` through a temporary file in its directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = atomicfile.temp_beside(path)
    except FileNotFoundError:
        raise UsageError(f"{directory}: no such directory (for the {what})") from None
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(directory, f"write the {what} in") from err
        raise UsageError(f"{directory}: cannot write the {what}: {err.strerror or err}") from err
    atomicfile.publish(fd, tmp, path, data)


def write_textfile(directory: str, status: dict) -> str:
    path = os.path.join(directory, f"diskimg_backup_{status['job']}.prom")
    write_atomic(path, render(status).encode(), "metrics textfile")
    return path


def read_status(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
