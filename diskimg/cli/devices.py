"""The commands on devices: ``list`` (diskimg.devices), ``health`` and ``selftest``
(diskimg.health).

As in ``cli/images.py``: ``_add_<cmd>`` builds the parser, ``_cmd_<cmd>`` makes one library call
and returns an outcome for ``render.show``.  A self-test is followed through the
``health.SelfTestRun`` handle only.
"""
from __future__ import annotations

import argparse

from diskimg.cli import monitor
from diskimg.cli.lazy import devices, health, render
from diskimg.cli.options import common
from diskimg.errors import EXIT_FAILED, EXIT_OK, EXIT_PROBLEM, UsageError

# --------------------------------------------------------------------------------------------
# list


def _add_list(sub) -> None:
    p = sub.add_parser("list", parents=[common()], help="list disks, partitions and loop devices",
                       description="One row per disk with its partitions, identity, transport, "
                       "sector sizes, read-only flag, filesystem type, label and UUID, "
                       "mountpoints ([SWAP] for swap) and whether SMART can be read.")
    p.add_argument("--json", action="store_true", help="print JSON (sizes in bytes)")
    p.add_argument("--all", action="store_true",
                   help="also unattached loop devices, ram, zram, device-mapper and md")
    p.set_defaults(func=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> render.DeviceList:
    return render.DeviceList(tuple(devices.list_devices(all_devices=args.all)))


# --------------------------------------------------------------------------------------------
# health

def _smart_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE",
                   help="any path smartctl accepts (/dev/sda, /dev/nvme0, /dev/bus/0, ...)")
    p.add_argument("--smartctl", metavar="PATH",
                   help="the smartctl to run (default: $DISKIMG_SMARTCTL, then PATH)")
    p.add_argument("-d", "--device-type", metavar="TYPE",
                   help="smartctl's -d type (sat, nvme, scsi, megaraid,N, ...); default: detect")


def _add_health(sub) -> None:
    p = sub.add_parser("health", parents=[common()], help="SMART health verdict with reasons",
                       description="Read SMART and judge it: PASS, WARN, FAIL or UNKNOWN, with "
                       "the reasons. Exit 0 PASS, 1 WARN or FAIL, 3 SMART unreadable.")
    _smart_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--db", metavar="PATH", default=None,
                   help="the health history (default with --history and --ack: "
                   f"{monitor.DEFAULT_DB}); given without them, the reading is stored there and "
                   "judged with the drive's history")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--history", action="store_true",
                   help="print the drive's stored readings as a table (no SMART is read)")
    g.add_argument("--ack", action="append", metavar="ATTR",
                   help="accept a counter's current value as its baseline (5, "
                   "Reallocated_Sector_Ct, media_errors, grown_defects...): it stays quiet "
                   "until it grows past it; repeatable")
    p.add_argument("--since", type=monitor.since_arg, default=None, metavar="WHEN",
                   help="with --history: only readings since WHEN (30d, 12h, 2026-11-01)")
    monitor.clock_option(p)
    p.set_defaults(func=_cmd_health)


def _cmd_health(args: argparse.Namespace):
    if args.since is not None and not args.history:
        raise UsageError("--since goes with --history")
    if args.history:
        return monitor.health_history(args)
    if args.ack:
        return monitor.health_ack(args)
    if args.db:
        return monitor.health_observe(args)
    report = health.check(args.device, smartctl=args.smartctl, interface=args.device_type)
    code = (EXIT_FAILED if report.verdict == health.UNKNOWN
            else EXIT_OK if report.verdict == health.PASS else EXIT_PROBLEM)
    return render.HealthDone(report, code)


# --------------------------------------------------------------------------------------------
# selftest

def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", parents=[common()], help="start, follow or abort a SMART "
                       "self-test", description="Start a SMART self-test; --wait follows it to "
                       "the end and prints the result; --abort stops a running one.")
    _smart_options(p)
    p.add_argument("--type", choices=["short", "long", "conveyance"], default="short",
                   help="which test (default: short)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wait", action="store_true", help="show progress until the test completes")
    g.add_argument("--abort", action="store_true", help="stop a running self-test")
    p.add_argument("--poll", type=float, default=10.0, metavar="SECONDS", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_selftest)


def _cmd_selftest(args: argparse.Namespace) -> render.SelfTestDone:
    if args.abort:
        aborted = health.abort_selftest(args.device, args.smartctl, args.device_type)
        return render.SelfTestDone(args.device, aborted.message)
    started, run = health.start_selftest(args.device, args.type, args.smartctl,
                                         args.device_type)
    if not started.started or not args.wait:
        return render.SelfTestDone(args.device, started.message,
                                   exit_code=EXIT_OK if started.started else EXIT_PROBLEM)
    render.say(f"{args.device}: {started.message}")
    with render.progress_bar(100, f"{args.type} self-test", False, unit="%") as bar:
        status = run.wait(render.selftest_progress(bar), poll_interval=args.poll)
    entry = status.result
    return render.SelfTestDone(args.device, "finished", entry,
                               EXIT_PROBLEM if entry is not None and entry.failed else EXIT_OK)


ADDERS = [_add_list, _add_health, _add_selftest]
