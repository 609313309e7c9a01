"""The commands on health history: ``monitor`` (and ``monitor timer install``) and ``report``;
``health --history/--ack`` live with ``health`` in ``cli/devices.py`` and use the helpers here.

As elsewhere: ``_add_<cmd>`` builds the parser, ``_cmd_<cmd>`` calls the library and returns an
outcome for ``render.show``.  The clock is read here (``time.time()``) and passed down; the
hidden ``--now`` gives the library another time (tests replaying simulated days).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

from diskimg.cli.lazy import LazyModule, render
from diskimg.cli.options import common
from diskimg.errors import EXIT_FAILED, EXIT_OK, EXIT_PROBLEM, SmartUnavailable, UsageError
from diskimg.units import parse_duration

history = LazyModule("diskimg.health.history")
monitor = LazyModule("diskimg.health.monitor")
schedule = LazyModule("diskimg.health.schedule")
timer = LazyModule("diskimg.health.timer")
html = LazyModule("diskimg.report.html")

DEFAULT_DB = "/var/lib/diskimg/health.db"      # = health.history.DEFAULT_DB (no import at start)


def duration_arg(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def now_arg(text: str) -> float:
    """--now: Unix seconds or an ISO 8601 time (local time when it has no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}") from None


def since_arg(text: str) -> str:
    """--since: a duration back from now (30d, 12h) or a date/time (2026-11-01)."""
    try:
        parse_duration(text)
        return text
    except ValueError:
        pass
    try:
        datetime.fromisoformat(text)
        return text
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --since {text!r} (use e.g. 30d, 12h, "
                                         "2026-11-01)") from None


def since_time(text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help=f"the health history database (default: {DEFAULT_DB})")


def clock_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--now", type=now_arg, default=None, help=argparse.SUPPRESS)


def the_time(args: argparse.Namespace) -> float:
    return args.now if getattr(args, "now", None) is not None else time.time()


# --------------------------------------------------------------------------------------------
# monitor

def _add_monitor(sub) -> None:
    p = sub.add_parser(
        "monitor", parents=[common()], help="read SMART on a schedule, keep its history, warn "
        "on trends", description="Read every SMART-capable disk (or those named), store each "
        "reading in the health history, and judge it with the drive's history: counters that "
        "grow, wear with its predicted end, temperature, self-tests that newly failed, a "
        "different drive behind the same name. Runs every --interval until stopped, or once. "
        "Exit 0 all PASS, 1 any WARN or FAIL, 3 SMART unreadable. "
        "'diskimg monitor timer install' writes systemd units that run 'monitor --once'.")
    p.add_argument("devices", nargs="*", metavar="DEVICE",
                   help="disks to read (default: every disk with SMART, and every disk the "
                   "history knows)")
    p.add_argument("--once", action="store_true", help="one pass, then exit (for timers)")
    p.add_argument("--interval", type=duration_arg, default=1800, metavar="DURATION",
                   help="time between passes (default: 30m; 90s, 30m, 1h, 1d)")
    db_option(p)
    p.add_argument("--smartctl", metavar="PATH",
                   help="the smartctl to run (default: $DISKIMG_SMARTCTL, then PATH)")
    p.add_argument("-d", "--device-type", metavar="TYPE",
                   help="smartctl's -d type for every device (default: detect)")
    p.add_argument("--schedule", metavar="REGEX",
                   help="self-tests to start, in smartd's -s syntax T/MM/DD/d/HH "
                   "(T: S short, L long, C conveyance; d: 1 Monday..7 Sunday; local time), "
                   "e.g. '(S/../.././02|L/../../6/03)'")
    p.add_argument("--skip-standby", action="store_true",
                   help="do not read (or test) a disk that is spun down (smartctl -n standby)")
    p.add_argument("--alert-exec", metavar="COMMAND",
                   help="run COMMAND when a disk's verdict changes: JSON on stdin, "
                   "DISKIMG_DEVICE, DISKIMG_VERDICT, DISKIMG_PREVIOUS_VERDICT, DISKIMG_REASON, "
                   "DISKIMG_MESSAGE... in its environment")
    p.add_argument("--alert-mail", metavar="ADDRESS",
                   help="mail ADDRESS through the local sendmail when a verdict changes")
    p.add_argument("--textfile", metavar="DIR",
                   help="write node_exporter textfile metrics to DIR/diskimg.prom")
    p.add_argument("--unit-dir", metavar="DIR", default=None,
                   help="with 'timer install': where to write the units (default: "
                   "/etc/systemd/system)")
    p.add_argument("--json", action="store_true", help="print JSON")
    clock_option(p)
    p.set_defaults(func=_cmd_monitor)


def _options(args: argparse.Namespace):
    if args.schedule:
        schedule.parse_schedule(args.schedule)       # a typo is a usage error before any work
    for d in (args.textfile,):
        if d and not os.path.isdir(d):
            raise UsageError(f"{d}: --textfile needs an existing directory")
    return monitor.MonitorOptions(
        smartctl=args.smartctl, interface=args.device_type, schedule=args.schedule,
        skip_standby=args.skip_standby, alert_exec=args.alert_exec,
        alert_mail=args.alert_mail, textfile=args.textfile)


def _devices(args: argparse.Namespace, hist) -> list[str]:
    if args.devices:
        return list(args.devices)
    from diskimg import devices
    found = [d.path for d in devices.list_devices(smartctl=args.smartctl) if d.smart_available]
    for known in history.iter_devices(hist):
        if known not in found:
            found.append(known)
    if not found:
        raise UsageError("no disk with SMART found (and none in the history): name the "
                         "devices to monitor")
    return found


def monitor_exit_code(observations) -> int:
    """0 all PASS, 1 any WARN or FAIL, 3 SMART unreadable (and nothing WARN or FAIL)."""
    verdicts = {o.verdict for o in observations}
    if verdicts & {"WARN", "FAIL"}:
        return EXIT_PROBLEM
    if "UNKNOWN" in verdicts:
        return EXIT_FAILED
    return EXIT_OK


def _cmd_monitor(args: argparse.Namespace):
    if args.devices[:1] == ["timer"]:
        return _cmd_timer(args)
    options = _options(args)
    db = args.db or DEFAULT_DB
    with history.History(db) as hist:
        devs = _devices(args, hist)
        while True:
            started = time.monotonic()
            obs = monitor.run_pass(hist, devs, the_time(args), options)
            outcome = render.MonitorDone(tuple(obs), monitor_exit_code(obs))
            if args.once:
                return outcome
            render.show(outcome, as_json=args.json)
            sys.stdout.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
            if args.now is not None:
                args.now += args.interval


def _cmd_timer(args: argparse.Namespace):
    rest = args.devices[1:]
    if rest[:1] != ["install"]:
        raise UsageError("monitor timer: the only action is 'install' "
                         "(diskimg monitor timer install [DEVICE...] [options])")
    devices = rest[1:]
    _options(args)
    exe = _self_command()
    argv = exe + ["monitor", "--once", "--db", os.path.abspath(args.db or DEFAULT_DB)]
    if args.smartctl:
        argv += ["--smartctl", args.smartctl]
    if args.device_type:
        argv += ["-d", args.device_type]
    if args.schedule:
        argv += ["--schedule", args.schedule]
    if args.skip_standby:
        argv += ["--skip-standby"]
    if args.alert_exec:
        argv += ["--alert-exec", args.alert_exec]
    if args.alert_mail:
        argv += ["--alert-mail", args.alert_mail]
    if args.textfile:
        argv += ["--textfile", os.path.abspath(args.textfile)]
    argv += devices
    unit_dir = args.unit_dir or timer.UNIT_DIR
    paths = timer.install(unit_dir, argv, args.interval)
    return render.TimerDone(tuple(paths), timer.exec_line(argv), args.interval,
                            unit_dir == timer.UNIT_DIR)


def _self_command() -> list[str]:
    """How systemd should start this diskimg: its script when run as one, else python -m."""
    exe = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(exe) == "diskimg" and os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "diskimg"]


# --------------------------------------------------------------------------------------------
# health --history / --ack (parsed in cli/devices.py)

def health_history(args: argparse.Namespace):
    now = the_time(args)
    with history.History(args.db or DEFAULT_DB, readonly=True) as hist:
        drives = hist.drives(args.device)
        if not drives:
            raise UsageError(f"{args.device}: not in the health history {hist.path} (run "
                             "diskimg monitor first)")
        since = since_time(args.since, now)
        rows = [(d, hist.readings(d.id, since=since, until=now, with_reasons=False))
                for d in drives]
    return render.HistoryDone(args.device, tuple(rows), args.since)


def health_ack(args: argparse.Namespace):
    now = the_time(args)
    with history.History(args.db or DEFAULT_DB) as hist:
        acked, obs = monitor.acknowledge(hist, args.device, args.ack, now, args.smartctl,
                                         args.device_type)
    return render.AckDone(obs, tuple(acked), monitor_exit_code([obs]))


def health_observe(args: argparse.Namespace):
    """``health DEV --db PATH``: one reading, stored and judged with the history."""
    with history.History(args.db) as hist:
        obs = monitor.observe(hist, args.device, the_time(args), args.smartctl,
                              args.device_type)
    if obs.error:
        raise SmartUnavailable(obs.error, path=args.device)
    return render.MonitorDone((obs,), monitor_exit_code([obs]))


# --------------------------------------------------------------------------------------------
# report

def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", parents=[common()], help="an HTML page: disk health over time, block maps "
        "of images", description="Write one self-contained HTML page (inline SVG, nothing "
        "loaded from the network): per disk of the health history its verdict and reasons, "
        "charts of its key attributes and temperature over time, its self-tests; per image "
        "(or directory of images) given, a block map: stored, changed, unchanged, zero, "
        "unused, unreadable.")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR",
                   help="images, or directories of images, to draw block maps of")
    p.add_argument("--out", metavar="FILE", default="report.html",
                   help="where to write the page (default: report.html)")
    db_option(p)
    p.add_argument("--since", type=since_arg, default="90d", metavar="WHEN",
                   help="history shown in the charts (default: 90d)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    clock_option(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace):
    now = the_time(args)
    db = args.db or DEFAULT_DB
    explicit = args.db is not None
    if not os.path.exists(db) and explicit:
        raise UsageError(f"{db}: no health history here")
    result = html.write_report(args.out, db if os.path.exists(db) else None, args.images, now,
                               since_time(args.since, now))
    return render.ReportDone(result)


ADDERS = [_add_monitor, _add_report]
