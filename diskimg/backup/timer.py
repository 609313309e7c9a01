"""A job's systemd units: diskimg-backup-JOB.service (one run) and diskimg-backup-JOB.timer.

The timer fires at the job's ``schedule`` (OnCalendar), catches up on a run missed while the
machine was off (Persistent=true) and spreads its start over ``random-delay``
(RandomizedDelaySec), so that many machines do not hit one backup server at once.  The service
runs at the lowest CPU and I/O priority (Nice=19, IOSchedulingClass=idle): a backup must not
slow the machine's own work.  Units are written atomically; ``systemctl daemon-reload`` and
``enable --now`` are run only when systemd runs and the units went to its own directory.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from diskimg.backup.config import Job
from diskimg.backup.metrics import write_atomic
from diskimg.errors import PermissionDenied, UsageError

DEFAULT_UNIT_DIR = "/etc/systemd/system"
ENV_DIR = "/etc/diskimg"       # JOB.env: the environment of an s3:// job's service (optional)


def unit_names(job: str) -> tuple[str, str]:
    return f"diskimg-backup-{job}.service", f"diskimg-backup-{job}.timer"


def _quote(arg: str) -> str:
    # systemd's ExecStart quoting: double quotes, backslash escapes, % doubled (specifiers)
    if arg and all(c.isalnum() or c in "/._-=:,+@" for c in arg):
        return arg.replace("%", "%%")
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def service_text(job: Job, command: list[str], textfile: str | None = None) -> str:
    args = [*command, "backup", "run", job.name, "--config", job.config_path, "--no-progress"]
    if textfile:
        args += ["--textfile", textfile]
    if job.remote:
        # object storage: the network first; the credentials from root's ~/.aws, or from
        # an optional environment file (AWS_ACCESS_KEY_ID=..., AWS_PROFILE=...) kept out of
        # the unit, which is world-readable
        after = ["Wants=network-online.target", "After=network-online.target local-fs.target"]
        env = [f"EnvironmentFile=-{ENV_DIR}/{job.name}.env"]
    else:
        after, env = ["After=local-fs.target"], []
    return "\n".join([
        "[Unit]",
        f"Description=diskimg backup job {job.name}",
        *after,
        "",
        "[Service]",
        "Type=oneshot",
        *env,
        "ExecStart=" + " ".join(_quote(a) for a in args),
        "Nice=19",
        "IOSchedulingClass=idle",
        "CPUSchedulingPolicy=batch",
        # an interrupted run leaves only a .partial file, removed by the next run
        "KillSignal=SIGINT",
        "TimeoutStopSec=5min",
        "",
    ])


def timer_text(job: Job) -> str:
    return "\n".join([
        "[Unit]",
        f"Description=diskimg backup job {job.name}, {job.schedule}",
        "",
        "[Timer]",
        f"OnCalendar={job.schedule}",
        "Persistent=true",
        f"RandomizedDelaySec={job.random_delay}",
        f"Unit={unit_names(job.name)[0]}",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def check_calendar(job: Job) -> None:
    """Refuse a schedule systemd would not take (when systemd-analyze is there to ask)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    proc = subprocess.run([analyze, "calendar", job.schedule], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["not a calendar event"])[-1]
        raise UsageError(f"{job.config_path}: jobs.{job.name}.schedule: {job.schedule!r} is not "
                         f"a systemd calendar event ({why}); e.g. daily, *-*-* 03:00, Sun 02:00")


@dataclass(frozen=True)
class TimerResult:
    job: str
    installed: bool              # False: removed
    unit_dir: str
    files: tuple[str, ...]
    enabled: bool                # systemctl enable --now ran (or disable --now, on removal)
    hint: str | None             # what to run by hand, when it did not


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"systemctl {' '.join(args)}: {proc.stderr.strip() or 'failed'}")


def install(job: Job, unit_dir: str | None = None, command: list[str] | None = None,
            textfile: str | None = None) -> TimerResult:
    """Write the job's service and timer into `unit_dir` (default /etc/systemd/system)."""
    check_calendar(job)
    directory = unit_dir or DEFAULT_UNIT_DIR
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: no such directory (for the systemd units)")
    command = command or [shutil.which("diskimg") or "/usr/bin/diskimg"]
    service, timer = unit_names(job.name)
    files = []
    for name, text in ((service, service_text(job, command, textfile)), (timer, timer_text(job))):
        path = os.path.join(directory, name)
        write_atomic(path, text.encode(), "systemd unit")
        files.append(path)
    enabled, hint = False, f"systemctl daemon-reload && systemctl enable --now {timer}"
    if unit_dir is None and _systemd_running():
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", timer)
        enabled, hint = True, None
    return TimerResult(job.name, True, directory, tuple(files), enabled, hint)


def remove(job_name: str, unit_dir: str | None = None) -> TimerResult:
    directory = unit_dir or DEFAULT_UNIT_DIR
    service, timer = unit_names(job_name)
    enabled = False
    if unit_dir is None and _systemd_running():
        subprocess.run(["systemctl", "disable", "--now", timer], capture_output=True)
        enabled = True
    files = []
    for name in (timer, service):
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            files.append(path)
        except FileNotFoundError:
            pass
        except PermissionError as err:
            raise PermissionDenied(path, "remove the unit") from err
    if not files:
        raise UsageError(f"{directory}: job {job_name} has no units here ({service}, {timer})")
    if enabled:
        _systemctl("daemon-reload")
    return TimerResult(job_name, False, directory, tuple(files), enabled,
                       None if enabled else "systemctl daemon-reload")
