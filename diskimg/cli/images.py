"""The commands on images: ``image``, ``restore``, ``verify``, ``info``.

Each command has an ``_add_<cmd>`` that builds its parser and a ``_cmd_<cmd>`` that turns the
parsed arguments into one library call and returns an outcome for ``render.show``; nothing here
prints a result.  What is said while a command runs (the health verdict before imaging, the
overwrite question before a restore) goes through ``render`` too.
"""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Callable

from diskimg import defaults
from diskimg.cli.lazy import (
    imagefile,
    imaging,
    render,
    repair,
    rescue,
    restore,
    stream_restore,
    verify,
)
from diskimg.cli.options import chain_options, common, key_options, size_arg, threads
from diskimg.crypto import keyring
from diskimg.errors import Interrupted, UsageError
from diskimg.units import human

# --------------------------------------------------------------------------------------------
# image


def _add_image(sub) -> None:
    p = sub.add_parser("image", parents=[common()], help="image a block device or file",
                       description="Read SOURCE block by block into the image file IMAGE.")
    p.add_argument("source", metavar="SOURCE", help="block device or regular file to image")
    p.add_argument("image", metavar="IMAGE",
                   help="image file to write, s3://BUCKET/PREFIX/NAME, or - (standard output)")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help=f"power of two, 64K to 16M (default: {human(defaults.DEFAULT_BLOCK_SIZE)}; "
                        f"a changed-block image uses its parent's)")
    p.add_argument("--level", type=int, default=defaults.DEFAULT_LEVEL, metavar="N",
                   help="zstd compression level, 1-22 (default: %(default)s)")
    p.add_argument("--digest", choices=defaults.DIGESTS, default=None,
                   help=f"block digest (default: {defaults.DEFAULT_DIGEST}; a changed-block "
                        f"image uses its parent's; sha256 images stay readable by a diskimg "
                        f"older than the choice)")
    p.add_argument("--parity", type=_percent, default=None, metavar="PCT",
                   help=f"Reed-Solomon parity, percent of the image (default: "
                        f"{defaults.DEFAULT_PARITY:g}; 0: none): the image repairs its own bit "
                        f"rot and bad sectors when read (README: Parity)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--incremental", metavar="PARENT",
                      help="store only the blocks changed since the image PARENT")
    kind.add_argument("--differential", metavar="PARENT",
                      help="store the blocks changed since the full image at the root of "
                           "PARENT's chain")
    p.add_argument("--rescue", action="store_true",
                   help="keep going past unreadable sectors, ddrescue-style; resumable")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="with --rescue: times to retry each bad sector (default: %(default)s)")
    p.add_argument("--mapfile", metavar="FILE",
                   help="with --rescue: GNU ddrescue mapfile to keep (default: IMAGE.map)")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="with --rescue: read with O_DIRECT (default: on for block devices)")
    p.add_argument("--all-blocks", action="store_true",
                   help="read and store every block, free space included (an exact copy for "
                        "forensics); default: skip the free space of ext2/3/4, FAT, xfs, NTFS, "
                        "exFAT and btrfs")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt the image (AES-256-GCM) with a new chain key, opened by "
                        "--key-file, --passphrase or --passphrase-file; a changed-block image "
                        "of an encrypted chain is encrypted with its chain's key")
    key_options(p)
    p.add_argument("--no-delta", dest="delta", action="store_false",
                   help="with --incremental/--differential: store every changed block whole, "
                        "never as its changed 4 KiB pages (the image then needs no format "
                        "feature: a diskimg older than delta records reads it)")
    chain_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing IMAGE (never one that other images depend on, "
                        "nor the source); accept a source that differs from the parent's disk "
                        "(serial, WWN, partition table or filesystem UUID); image a source "
                        "mounted read-write")
    p.set_defaults(func=_cmd_image)


def _cmd_image(args: argparse.Namespace) -> render.ImageDone:
    # the used-block scan starts now, on its own thread, and reads the source while the
    # imaging modules are imported (their first use is the next line); a rescue reads every
    # block and asks the disk's health first, --all-blocks needs no scan
    early = None
    if not (args.rescue or args.all_blocks or args.source == "-"):
        from diskimg.disk import prescan
        early = prescan.claim(args.source)     # begun by the entry point, or now
    try:
        return _image(args, early)
    finally:
        if early is not None:
            early.close()


def _image(args: argparse.Namespace, early) -> render.ImageDone:
    opts = imaging.ImageOptions(
        block_size=args.block_size, level=args.level, threads=threads(args), force=args.force,
        incremental=args.incremental, differential=args.differential,
        search=tuple(args.search), all_blocks=args.all_blocks, digest=args.digest,
        parity=args.parity, encrypt=args.encrypt, delta=args.delta, prescan=early)
    imaging.parity_fields(args.parity)   # a percentage out of range: refused before any work
    if opts.block_size is not None:
        imaging.check_block_size(opts.block_size)
    if args.rescue and args.all_blocks:
        raise UsageError("--rescue reads every block already; --all-blocks goes without it")
    if not 1 <= opts.level <= 22:
        raise UsageError(f"--level {opts.level}: must be between 1 and 22")
    imaging.check_encryption_asked(args.encrypt, args.image)
    if args.rescue and (args.incremental or args.differential):
        raise UsageError("--rescue makes full images only (image the new disk incrementally "
                         "afterwards)")
    if not args.rescue and (args.mapfile or args.direct is not None or args.retries != 1):
        raise UsageError("--retries, --mapfile and --direct go with --rescue")
    with _HealthProbe(args.source, rescue=args.rescue) as probe:
        if args.rescue:
            with render.RescueBar("rescuing", args.no_progress or args.json) as bar:
                probe.attach(bar)
                probe.start()      # a failing disk's verdict matters more than start-up time
                rescued = rescue.rescue_image(
                    args.source, args.image,
                    rescue.RescueOptions(
                        block_size=opts.block_size or defaults.DEFAULT_BLOCK_SIZE,
                        level=opts.level, force=opts.force, search=opts.search,
                        retries=args.retries, mapfile=args.mapfile, direct=args.direct,
                        command=" ".join(sys.argv), digest=args.digest, parity=args.parity,
                        encrypt=args.encrypt),
                    progress=bar)
                probe.finish()
            return render.ImageDone(args.source, rescued.image, rescued)
        with render.Bar("imaging", args.no_progress or args.json) as bar:
            probe.attach(bar)
            done = imaging.create_image(args.source, args.image, opts, progress=bar)
            probe.finish()
        return render.ImageDone(args.source, done)


class _HealthProbe:
    """The source's health verdict, asked for once imaging has begun reading rather than before:
    the smartctl run (and, for a disk with SMART, pySMART's import) took 0.1-0.4 s that the
    first reads need not wait for, since the verdict changes nothing in what is read (issue
    20), and asked after the first block so that its imports do not compete with imaging's.
    Its lines are printed as soon as it answers (above the bar when one is shown), and at the
    latest when the image is done.  A run that fails waits a few seconds for it (a failing
    disk's verdict explains the failure); an interrupted one does not."""

    WAIT_AFTER_FAILURE = 5.0

    def __init__(self, source: str, rescue: bool) -> None:
        self.source, self.rescue = source, rescue
        self.bar: render.Bar | None = None
        self._lock = threading.Lock()
        self._lines: list[str] | None = None
        self._closed = False
        self._started = False
        self._thread = threading.Thread(target=self._ask, name="health-precheck", daemon=True)

    def __enter__(self) -> _HealthProbe:
        return self

    def attach(self, bar: render.Bar) -> None:
        """Print above `bar`, and ask when it first moves."""
        self.bar = bar
        bar.on_first_advance = self.start

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            with self._lock:
                self._closed = True
        else:
            self.finish(self.WAIT_AFTER_FAILURE)

    def _ask(self) -> None:
        from diskimg import health
        report = health.precheck(self.source)
        lines = [] if report is None else render.precheck_lines(
            self.source, report, report.verdict == health.FAIL, self.rescue)
        with self._lock:
            self._lines = lines
            self._say()

    def _say(self) -> None:
        if self._closed:
            return
        for line in self._lines or ():
            if self.bar is not None:
                self.bar.note(line)
            else:
                render.note(line)
        self._lines = []

    def finish(self, timeout: float | None = None) -> None:
        """Wait for the verdict (up to `timeout` seconds) and print it if it has not been yet;
        nothing is printed after this returns."""
        self.start()
        self._thread.join(timeout)
        with self._lock:
            self._say()
            self._closed = True


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if value != value or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage")
    return value


# --------------------------------------------------------------------------------------------
# restore

def _add_restore(sub) -> None:
    p = sub.add_parser("restore", parents=[common()], help="restore an image to a device or file",
                       description="Write IMAGE (resolving its chain) to TARGET block by block, "
                                   "verifying every block before it is written.")
    p.add_argument("image", metavar="IMAGE",
                   help="image file, s3://BUCKET/PREFIX/NAME, or - (standard input)")
    p.add_argument("target", metavar="TARGET", help="block device or file (created if missing)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="overwrite an existing TARGET without asking")
    p.add_argument("--only-changed", action="store_true",
                   help="read TARGET and write only the blocks that differ from the image")
    p.add_argument("--salvage", action="store_true",
                   help="restore past damaged or lost blocks (and what survives of a truncated "
                        "image): write them as zeros and list them (exit 1)")
    p.add_argument("--verify", action="store_true",
                   help="read everything back from TARGET (bypassing the page cache) and "
                        "compare it with the image; name every block that differs (exit 1)")
    p.add_argument("--keep-partial", action="store_true",
                   help="keep a TARGET file this restore created when the restore fails "
                        "(default: remove it)")
    key_options(p)
    chain_options(p)
    p.set_defaults(func=_cmd_restore)


def _confirm(args: argparse.Namespace) -> Callable:
    """Ask before overwriting an existing target (a restore.Overwrite question)."""
    def ask(question) -> bool:
        if args.yes:
            return True
        lines = render.overwrite_question(question)
        if not sys.stdin.isatty():
            render.note(f"{lines[0]}; refusing without --yes (no terminal to ask on)")
            for line in lines[1:]:
                render.note(line)
            return False
        for line in lines:
            render.note(line)
        try:
            answer = input("Type 'yes' to overwrite: ")
        except EOFError:
            return False
        return answer.strip().lower() == "yes"
    return ask


def _cmd_restore(args: argparse.Namespace) -> render.RestoreDone:
    if args.image == "-":
        if args.only_changed or args.verify:
            raise UsageError("restore -: --only-changed and --verify need an image file (a "
                             "stream is read once, front to back)")
        with render.Bar("restoring", args.no_progress or args.json) as bar:
            result = stream_restore.restore_stream(
                args.target, search=args.search, confirm=_confirm(args), salvage=args.salvage,
                keep_partial=args.keep_partial, progress=bar)
        return render.RestoreDone(args.image, args.target, False, result)
    with render.Bar("restoring", args.no_progress or args.json) as bar:
        result = restore.restore_image(
            args.image, args.target, search=args.search, only_changed=args.only_changed,
            confirm=_confirm(args), threads=threads(args), progress=bar,
            salvage=args.salvage, verify=args.verify, keep_partial=args.keep_partial)
    return render.RestoreDone(args.image, args.target, args.only_changed, result)


# --------------------------------------------------------------------------------------------
# verify

def _add_verify(sub) -> None:
    p = sub.add_parser("verify", parents=[common()], help="check an image and its chain",
                       description="Check every block of IMAGE and of each image it depends on; "
                                   "name every damaged block.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-key", action="store_true",
                   help="check an encrypted image without its key: the CRC-32C of its header, "
                        "record headers, index segments, footer and trailer (bit rot of an "
                        "offsite copy); not the blocks' content nor their authenticity")
    key_options(p)
    chain_options(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> render.VerifyDone:
    if args.no_key:
        if args.key_file or args.passphrase or args.passphrase_file or args.paper_key:
            raise UsageError("--no-key checks without the key: give no key with it")
        with render.Bar("verifying", args.no_progress or args.json) as bar:
            result = verify.verify_structure(args.image, progress=bar)
        return render.VerifyDone(args.image, result)
    with render.Bar("verifying", args.no_progress or args.json) as bar:
        result = verify.verify_image(args.image, search=args.search, threads=threads(args),
                                     progress=bar)
    return render.VerifyDone(args.image, result)


# --------------------------------------------------------------------------------------------
# info

def _add_info(sub) -> None:
    p = sub.add_parser("info", parents=[common()], help="describe an image",
                       description="Print what IMAGE holds: kind, chain, sizes, source.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    key_options(p)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> render.InfoDone | render.InfoTruncated:
    try:
        # an encrypted image without its key: what its header shows in the clear
        reader = imagefile.ImageReader(args.image, unlock=keyring.given() is not None)
    except imagefile.TruncatedImage as err:
        if err.in_header:
            raise
        # what survived of an image cut short: its header and its whole records; exit 1
        return render.InfoTruncated(args.image, imagefile.describe_truncated(args.image), err)
    with reader:
        return render.InfoDone(args.image, imagefile.describe(reader))


# --------------------------------------------------------------------------------------------
# repair

def _add_repair(sub) -> None:
    p = sub.add_parser("repair", parents=[common()],
                       help="rewrite an image with parity, healed",
                       description="Check IMAGE whole and rewrite it with the damage its parity "
                                   "repairs healed: written to IMAGE.repair, verified, then "
                                   "renamed over IMAGE. Refuses (exit 1, nothing written) when "
                                   "damage exceeds what parity repairs, naming the lost blocks.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="hashing and decompression threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_repair)


def _cmd_repair(args: argparse.Namespace) -> render.RepairDone:
    with render.Bar("repairing", args.no_progress or args.json) as bar:
        result = repair.repair_image(args.image, threads=threads(args), progress=bar)
    return render.RepairDone(args.image, result)


ADDERS = [_add_image, _add_restore, _add_verify, _add_repair, _add_info]
