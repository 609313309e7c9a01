"""Alerts on a change of verdict: run a command (like smartd's ``-M exec``) or mail through the
local sendmail.

Only a change alerts (PASS -> WARN, WARN -> FAIL, FAIL -> PASS after a repair or an
acknowledgement, anything -> UNKNOWN when a disk vanishes), never a verdict that stays: a drive
that is FAIL for a month sends one message, not 720.  Every alert is kept in the history's
``alerts`` table with what became of it.

The command is split like a shell would (no shell runs it); it gets JSON on stdin (the
device, drive, verdicts and reasons) and the same in its environment: ``DISKIMG_DEVICE``,
``DISKIMG_MODEL``, ``DISKIMG_SERIAL``, ``DISKIMG_VERDICT``, ``DISKIMG_PREVIOUS_VERDICT``,
``DISKIMG_TIME`` (ISO 8601), ``DISKIMG_REASON`` (the worst reason, one line) and
``DISKIMG_MESSAGE`` (the subject line).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from datetime import datetime, timezone

from diskimg.health.history import History, known_serial
from diskimg.health.rules import FAIL, WARN

log = logging.getLogger(__name__)

TIMEOUT = 120          # seconds an alert command may take

__all__ = ["find_sendmail", "payload", "send"]


def payload(obs) -> dict:
    """What an alert says about an observation (monitor.Observation)."""
    report = obs.report
    drive = obs.drive
    worst = next((r for sev in (FAIL, WARN) for r in obs.reasons if r.severity == sev), None)
    model = (report.model if report else None) or (drive.model if drive else None)
    serial = (known_serial(report.serial) if report else None) or \
        (drive.serial if drive else None)
    ident = ", ".join(x for x in (model, serial and f"serial {serial}") if x)
    subject = (f"{obs.device}" + (f" ({ident})" if ident else "") + f" is now {obs.verdict}"
               + (f", was {obs.previous}" if obs.previous else "")
               + (f": {worst.what}: {worst.value}" if worst else ""))
    return {
        "device": obs.device,
        "model": model,
        "serial": serial,
        "verdict": obs.verdict,
        "previous_verdict": obs.previous,
        "time": datetime.fromtimestamp(obs.taken, timezone.utc).isoformat(),
        "previous_time": (datetime.fromtimestamp(obs.previous_taken, timezone.utc).isoformat()
                          if obs.previous_taken is not None else None),
        "message": subject,
        "reason": f"{worst.what}: {worst.value}" if worst else None,
        "reasons": [{"what": r.what, "value": r.value, "severity": r.severity, "why": r.why}
                    for r in obs.reasons],
        "error": obs.error,
    }


def find_sendmail() -> str | None:
    return shutil.which("sendmail") or shutil.which(
        "sendmail", path="/usr/sbin:/usr/lib:/sbin:/usr/local/sbin")


def _run_command(command: str, data: dict) -> str:
    env = dict(os.environ)
    env.update({
        "DISKIMG_DEVICE": data["device"], "DISKIMG_MODEL": data["model"] or "",
        "DISKIMG_SERIAL": data["serial"] or "", "DISKIMG_VERDICT": data["verdict"],
        "DISKIMG_PREVIOUS_VERDICT": data["previous_verdict"] or "",
        "DISKIMG_TIME": data["time"], "DISKIMG_REASON": data["reason"] or "",
        "DISKIMG_MESSAGE": data["message"],
    })
    try:
        argv = shlex.split(command)
        proc = subprocess.run(argv, input=json.dumps(data, indent=2), text=True, env=env,
                              capture_output=True, timeout=TIMEOUT)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return f"command failed: {e}"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return f"command exited {proc.returncode}" + (f": {last}" if last else "")
    return "command ran"


def _mail(to: str, data: dict) -> str:
    sendmail = find_sendmail()
    if sendmail is None:
        return "no sendmail here: not mailed"
    body = [f"To: {to}", f"Subject: diskimg: {data['message']}", "Content-Type: text/plain; "
            "charset=utf-8", "", data["message"], ""]
    for r in data["reasons"]:
        body += [f"  {r['severity']:<4}  {r['what']}: {r['value']}", f"        {r['why']}"]
    body += ["", "JSON:", json.dumps(data, indent=2)]
    try:
        proc = subprocess.run([sendmail, "-oi", "-t"], input="\n".join(body) + "\n", text=True,
                              capture_output=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sendmail failed: {e}"
    return "mailed" if proc.returncode == 0 else f"sendmail exited {proc.returncode}"


def send(history: History, obs, command: str | None, mail_to: str | None) -> str:
    """Send the alert for an observation whose verdict changed; what became of it (also kept
    in the history and logged)."""
    data = payload(obs)
    outcomes = []
    if command:
        outcomes.append(("exec", _run_command(command, data)))
    if mail_to:
        outcomes.append(("mail", _mail(mail_to, data)))
    for how, outcome in outcomes:
        ok = outcome in ("command ran", "mailed")
        (log.info if ok else log.warning)("%s: alert (%s): %s", obs.device, how, outcome)
        history.add_alert(obs.drive.id, obs.taken, obs.previous, obs.verdict, how, outcome)
    return "; ".join(o for _, o in outcomes)
