"""The commands that open an image without restoring it: ``mount``, ``umount``, ``export``,
``serve``.

``mount`` without ``--foreground`` starts itself again as a detached process (a new session,
cwd /, stdin/stdout/stderr on /dev/null, its log in syslog-less machines only with
``--log-file``) and waits on a pipe until that process says the mount is ready or why it is
not; so the command returns when DIR can be used, with the real error and exit code otherwise.
A fresh process rather than a fork: the FUSE session runs threads, and forking a process that
has imported zstandard and started threads is not safe.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading

from diskimg.cli.lazy import LazyModule, render
from diskimg.cli.options import chain_options, common, threads
from diskimg.errors import DiskimgError, OperationFailed, UsageError

mount = LazyModule("diskimg.ops.mount")
export = LazyModule("diskimg.ops.export")
nbd = LazyModule("diskimg.ops.nbd")

# --------------------------------------------------------------------------------------------
# mount


def _add_mount(sub) -> None:
    p = sub.add_parser("mount", parents=[common()], help="mount an image read-only (FUSE)",
                       description="Mount IMAGE (any point of a chain) read-only on DIR: "
                                   "DIR/disk is the whole device, DIR/p1... its partitions; "
                                   "with --fs the filesystems inside are mounted under DIR/fs/. "
                                   "Every read is verified; a damaged block reads as EIO.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="DIR", help="an empty directory")
    p.add_argument("--fs", action="store_true",
                   help="also mount each recognised filesystem read-only under DIR/fs/pN "
                        "(journals are not replayed)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground until Ctrl-C or SIGTERM (default: return "
                        "once mounted; undo with 'diskimg umount DIR')")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent images in DIR (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_mount)


def _cmd_mount(args: argparse.Namespace):
    if not args.foreground:
        return render.MountDone(_spawn_mount(args), foreground=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    ready_fd = args.ready_fd

    def ready(mounted) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, (json.dumps({"ok": True, "mounted": render.to_json(mounted)})
                                + "\n").encode())
            os.close(ready_fd)
            ready_fd = None
        else:
            for line in render.MountDone(mounted, foreground=True).lines():
                render.say(line)
            sys.stdout.flush()

    try:
        mounted = mount.mount_image(args.image, args.mountpoint, search=args.search,
                                    fs=args.fs, stop=stop, ready=ready)
    except DiskimgError as err:
        if ready_fd is not None:
            os.write(ready_fd, (json.dumps({"ok": False, "message": str(err),
                                            "exit_code": err.exit_code,
                                            "path": getattr(err, "path", None)})
                                + "\n").encode())
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return render.Unmounted(mounted.mountpoint, [m.mountpoint for m in mounted.filesystems])


class _ChildFailed(DiskimgError):
    def __init__(self, message: str, exit_code: int, path: str | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.path = path


def _spawn_mount(args: argparse.Namespace):
    """Run `mount --foreground` detached and wait until it is mounted or has failed."""
    from diskimg.ops.mount import Mounted, MountedFs
    for name in ("image", "mountpoint"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    cmd = [sys.executable, "-m", "diskimg", "mount", args.image, args.mountpoint,
           "--foreground"]
    cmd += [a for d in args.search for a in ("--search", os.path.abspath(d))]
    if args.fs:
        cmd.append("--fs")
    if getattr(args, "debug", False):
        cmd.append("--debug")
    elif getattr(args, "verbose", False):
        cmd.append("-v")
    if getattr(args, "log_file", None):
        cmd += ["--log-file", os.path.abspath(args.log_file)]
    rfd, wfd = os.pipe()
    cmd += ["--ready-fd", str(wfd)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=(wfd,), cwd="/",
                                start_new_session=True)
    finally:
        os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline()
    if not line:
        code = proc.wait()
        raise OperationFailed(f"{args.mountpoint}: the mount process exited with status {code} "
                              f"before mounting (run with --foreground to see why)")
    reply = json.loads(line)
    if not reply["ok"]:
        proc.wait()
        raise _ChildFailed(reply["message"], reply["exit_code"], reply.get("path"))
    m = reply["mounted"]
    m["filesystems"] = tuple(MountedFs(**f) for f in m["filesystems"])
    return Mounted(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})


def _add_umount(sub) -> None:
    p = sub.add_parser("umount", parents=[common()], help="unmount what 'diskimg mount' mounted",
                       description="Unmount DIR and the filesystems mounted inside it, detach "
                                   "their loop devices and stop the process serving it.")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_umount)


def _cmd_umount(args: argparse.Namespace):
    fs = mount.umount_image(args.mountpoint)
    return render.Unmounted(os.path.abspath(args.mountpoint), fs)


ADDERS = [_add_mount, _add_umount]
