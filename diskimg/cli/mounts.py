"""The commands that open an image without restoring it: ``mount``, ``umount``, ``export``,
``serve``.

``mount`` without ``--foreground`` starts itself again as a detached process (a new session,
cwd /, stdin/stdout/stderr on /dev/null: its log, damaged blocks included, goes to
``--log-file`` when given) and waits on a pipe until that process says the mount is ready or
why it is not; so the command returns when DIR can be used, with the real error and exit code
otherwise.
A fresh process rather than a fork: the FUSE session runs threads, and forking a process that
has imported zstandard and started threads is not safe.
"""
from __future__ import annotations

import argparse
import os
import sys

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
    import json
    import signal
    import threading
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
        elif args.json:
            render.print_json(render.MountDone(mounted, foreground=True).json())
            sys.stdout.flush()
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
    import json
    import subprocess
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
    try:
        with os.fdopen(rfd, "rb") as r:
            line = r.readline()
    except BaseException:      # Ctrl-C while it mounts: it unmounts what it mounted and exits
        proc.terminate()
        proc.wait()
        raise
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


# --------------------------------------------------------------------------------------------
# export

def _add_export(sub) -> None:
    p = sub.add_parser("export", parents=[common()], help="write an image as a VM disk",
                       description="Write IMAGE (any point of a chain) to OUT as a raw (sparse), "
                                   "qcow2, vmdk or vhdx disk; '-' writes raw or qcow2 to "
                                   "standard output.  Every block is verified.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", "-O", dest="format", required=True,
                   choices=("raw", "qcow2", "vmdk", "vhdx"),
                   help="raw and qcow2 are written by diskimg; vmdk and vhdx through qemu-img")
    p.add_argument("--force", action="store_true", help="replace an existing OUT file")
    chain_options(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace):
    quiet = args.no_progress or args.json or args.out == "-"
    with render.Bar("exporting", quiet) as bar:
        result = export.export_image(args.image, args.out, args.format, search=args.search,
                                     threads=threads(args), force=args.force, progress=bar)
    return render.ExportDone(result)


# --------------------------------------------------------------------------------------------
# serve

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", parents=[common()], help="serve an image read-only over NBD",
                       description="Export IMAGE (any point of a chain) read-only over NBD "
                                   "until Ctrl-C or SIGTERM: qemu can boot it "
                                   "(-drive file=nbd+unix:///?socket=S,snapshot=on), "
                                   "nbdcopy and qemu-img read it.  Zero and unused blocks are "
                                   "reported as holes; every block is verified.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--nbd", required=True, metavar="SOCKET|HOST:PORT",
                   help="a unix socket path to create, or HOST:PORT to listen on (TCP: "
                        "anyone who can reach it can read the disk)")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent images in DIR (repeatable)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="requests answered at once per client (default: 4)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace):
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    import signal
    import threading
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def ready(uri: str) -> None:
        render.say(f"serving {args.image} read-only on {uri}; Ctrl-C or SIGTERM stops")
        sys.stdout.flush()

    try:
        uri = nbd.serve_image(args.image, args.nbd, search=args.search, stop=stop, ready=ready,
                              threads=args.threads or 4)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return render.Served(args.image, uri)


ADDERS = [_add_mount, _add_umount, _add_export, _add_serve]
