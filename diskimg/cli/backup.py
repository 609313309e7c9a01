"""``diskimg backup run|list|restore|prune|check|timer install|timer remove``: backup jobs.

As the other command groups: ``_add_*`` builds a parser, ``_cmd_*`` makes one library call
(diskimg.backup, imported when a backup command runs) and returns an outcome for
``render.show`` (the outcomes are in ``backup_render.py``).  What a run says while it works
(the health verdict, the level it chose and why) goes to stderr through ``render.note``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from diskimg.cli.lazy import LazyModule, render
from diskimg.cli.options import common, threads
from diskimg.errors import UsageError

bconfig = LazyModule("diskimg.backup.config")
runner = LazyModule("diskimg.backup.runner")
timer = LazyModule("diskimg.backup.timer")
brender = LazyModule("diskimg.cli.backup_render")

LEVELS = ("full", "differential", "incremental")
# whether this command line may be a backup command (main sets it): if not, only the `backup`
# entry of the command list is made, not its eleven parsers
wanted = True


def _config_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="the jobs file (default: $DISKIMG_JOBS, then /etc/diskimg/jobs.toml)")
    return p


def _load(args: argparse.Namespace):
    return bconfig.load_config(args.config or os.environ.get("DISKIMG_JOBS"))


def _add_backup(sub) -> None:
    p = sub.add_parser("backup", parents=[common()], help="backup jobs: run, list, restore, "
                       "prune, check, timers",
                       description="Backup jobs defined in a TOML file: images made on a "
                       "schedule at the level a policy chooses, pruned by keep rules that never "
                       "break a chain, verified, restored by time.")
    if not wanted:
        return
    bsub = p.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    cfg = _config_option()

    r = bsub.add_parser("run", parents=[common(), cfg], help="make the job's next image",
                        description="Make JOB's next image, at the level its policy chooses "
                        "from the images already there (or --level).")
    r.add_argument("job", metavar="JOB")
    r.add_argument("--level", choices=LEVELS, default=None, help="override the policy")
    r.add_argument("--textfile", metavar="DIR",
                   help="write node_exporter textfile metrics of the run into DIR")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="hashing and compression threads (default: the CPUs available)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print the run's status as JSON")
    r.set_defaults(func=_cmd_run)

    ls = bsub.add_parser("list", parents=[common(), cfg], help="list restore points",
                         description="Every restore point of JOB (or of every job), read from "
                         "the images' headers: level, time, size, chain, last verification.")
    ls.add_argument("job", metavar="JOB", nargs="?")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cmd_list)

    rs = bsub.add_parser("restore", parents=[common(), cfg], help="restore a point in time",
                         description="Restore JOB's last restore point at or before --at onto "
                         "TARGET.")
    rs.add_argument("job", metavar="JOB")
    rs.add_argument("target", metavar="TARGET", help="block device or file (created if missing)")
    rs.add_argument("--at", required=True, metavar="TIME",
                    help="'latest', or an ISO 8601 time (UTC unless it says otherwise); a date "
                         "alone means the end of that day")
    rs.add_argument("--yes", "-y", action="store_true",
                    help="overwrite an existing TARGET without asking")
    rs.add_argument("--only-changed", action="store_true",
                    help="read TARGET and write only the blocks that differ")
    rs.add_argument("--verify", action="store_true",
                    help="read everything back from TARGET and compare")
    rs.add_argument("--threads", type=int, default=None, metavar="N")
    rs.add_argument("--no-progress", action="store_true", help="no progress bar")
    rs.add_argument("--json", action="store_true", help="print the result as JSON")
    rs.set_defaults(func=_cmd_restore)

    pr = bsub.add_parser("prune", parents=[common(), cfg], help="remove images the keep rules "
                         "and the chains do not need",
                         description="Remove JOB's images that no keep rule keeps and no kept "
                         "image depends on; say why each kept image is kept.")
    pr.add_argument("job", metavar="JOB")
    pr.add_argument("--dry-run", "-n", action="store_true", help="show the plan, remove nothing")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        pr.add_argument(f"--keep-{rule}", type=int, default=None, metavar="N",
                        help=f"keep-{rule} (overrides the job's)")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=_cmd_prune)

    ck = bsub.add_parser("check", parents=[common(), cfg], help="verify images and record it",
                         description="Verify JOB's images (all, or --sample PCT of them, those "
                         "never or longest ago verified first) with their chains, and record "
                         "each result beside the image for `backup list`.")
    ck.add_argument("job", metavar="JOB")
    ck.add_argument("--sample", type=float, default=None, metavar="PCT",
                    help="verify PCT%% of the restore points this time")
    ck.add_argument("--textfile", metavar="DIR",
                    help="write node_exporter textfile metrics of the check into DIR")
    ck.add_argument("--threads", type=int, default=None, metavar="N")
    ck.add_argument("--no-progress", action="store_true", help="no progress bar")
    ck.add_argument("--json", action="store_true", help="print JSON")
    ck.set_defaults(func=_cmd_check)

    tm = bsub.add_parser("timer", parents=[common()], help="install or remove a job's systemd "
                         "timer")
    tsub = tm.add_subparsers(dest="timer_command", metavar="ACTION", required=True)
    ti = tsub.add_parser("install", parents=[common(), cfg],
                         help="write the job's service and timer units",
                         description="Write diskimg-backup-JOB.service and .timer (OnCalendar "
                         "from the job's schedule, Persistent=true, a random delay, idle "
                         "priority); enable the timer when systemd runs and --unit-dir is not "
                         "given.")
    ti.add_argument("job", metavar="JOB")
    ti.add_argument("--unit-dir", metavar="DIR", default=None,
                    help="where to write the units (default: /etc/systemd/system)")
    ti.add_argument("--textfile", metavar="DIR",
                    help="have each run write node_exporter textfile metrics into DIR")
    ti.add_argument("--json", action="store_true", help="print JSON")
    ti.set_defaults(func=_cmd_timer_install)
    tr = tsub.add_parser("remove", parents=[common()], help="remove the job's units")
    tr.add_argument("job", metavar="JOB")
    tr.add_argument("--unit-dir", metavar="DIR", default=None,
                    help="where the units are (default: /etc/systemd/system)")
    tr.add_argument("--json", action="store_true", help="print JSON")
    tr.set_defaults(func=_cmd_timer_remove)


def _threads(args: argparse.Namespace) -> int | None:
    return threads(args) if args.threads is not None else None


def _cmd_run(args: argparse.Namespace):
    job = _load(args).job(args.job)
    quiet = args.no_progress or args.json
    with render.Bar("imaging", quiet) as bar, render.RescueBar("rescuing", quiet) as rbar:
        textfile = os.path.abspath(args.textfile) if args.textfile else None
        result = runner.run_job(job, level=args.level, textfile=textfile,
                                notify=render.note, progress=bar, rescue_progress=rbar,
                                threads=_threads(args))
    return brender.RunDone(result)


def _cmd_list(args: argparse.Namespace):
    config = _load(args)
    jobs = [config.job(args.job)] if args.job else [config.jobs[n] for n in sorted(config.jobs)]
    if not jobs:
        raise UsageError(f"{config.path}: no jobs defined ([jobs.NAME] tables)")
    out = []
    for job in jobs:
        try:
            out.append((job, runner.catalogue(job), None))
        except Exception as err:   # one job's missing destination does not hide the others
            if args.job or not hasattr(err, "exit_code"):
                raise
            out.append((job, None, err))
    return brender.ListDone(tuple(out))


def _cmd_restore(args: argparse.Namespace):
    from diskimg.cli.images import _confirm
    job = _load(args).job(args.job)
    at = runner.parse_at(args.at)
    with render.Bar("restoring", args.no_progress or args.json) as bar:
        point, result = runner.restore_job(
            job, args.target, at, only_changed=args.only_changed, confirm=_confirm(args),
            threads=_threads(args), progress=bar, verify=args.verify)
    return brender.RestoreDone(point, render.RestoreDone(point.path, args.target,
                                                         args.only_changed, result))


def _cmd_prune(args: argparse.Namespace):
    job = _load(args).job(args.job)
    rules = job.keep.merged(**{r: getattr(args, f"keep_{r}") for r in
                               ("last", "hourly", "daily", "weekly", "monthly", "yearly")})
    for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        v = getattr(args, f"keep_{r}")
        if v is not None and v < 0:
            raise UsageError(f"--keep-{r} {v}: a whole number >= 0 expected")
    return brender.PruneDone(runner.prune_job(job, rules, dry_run=args.dry_run,
                                              notify=render.note))


def _cmd_check(args: argparse.Namespace):
    job = _load(args).job(args.job)
    with render.Bar("verifying", args.no_progress or args.json) as bar:
        result = runner.check_job(job, sample=args.sample, notify=render.note,
                                  progress=_Restarting(bar), threads=_threads(args),
                                  textfile=os.path.abspath(args.textfile) if args.textfile
                                  else None)
    return brender.CheckDone(result)


class _Restarting:
    """One bar across several verifies: each start adds its total."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.total = 0

    def start(self, total: int, unit: str = "B") -> None:
        self.bar.start(total, unit)
        shown = self.bar.bar
        if self.total and getattr(shown, "total", None) is not None:   # a tqdm bar
            shown.total += total
            shown.refresh()
        self.total += total

    def advance(self, n: int) -> None:
        self.bar.advance(n)


def _command() -> list[str]:
    """How the service runs diskimg: this diskimg's entry point when it is one on PATH, else
    this Python with -m diskimg."""
    found = shutil.which("diskimg")
    if found:
        return [os.path.abspath(found)]
    return [sys.executable, "-m", "diskimg"]


def _cmd_timer_install(args: argparse.Namespace):
    job = _load(args).job(args.job)
    textfile = os.path.abspath(args.textfile) if args.textfile else None
    return brender.TimerDone(timer.install(job, args.unit_dir, _command(), textfile))


def _cmd_timer_remove(args: argparse.Namespace):
    if not bconfig.JOB_NAME.match(args.job):
        raise UsageError(f"{args.job}: not a job name")
    return brender.TimerDone(timer.remove(args.job, args.unit_dir))


ADDERS = [_add_backup]
