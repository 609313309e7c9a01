"""The commands on images: ``image``, ``restore``, ``verify``, ``info``.

Each command has an ``_add_<cmd>`` that builds its parser and a ``_cmd_<cmd>`` that turns the
parsed arguments into one library call and returns an outcome for ``render.show``; nothing here
prints a result.  What is said while a command runs (the health verdict before imaging, the
overwrite question before a restore) goes through ``render`` too.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from diskimg import defaults
from diskimg.cli.lazy import (
    health,
    imagefile,
    imaging,
    render,
    rescue,
    restore,
    stream_restore,
    verify,
)
from diskimg.cli.options import chain_options, common, size_arg, threads
from diskimg.errors import UsageError
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
                        "forensics); default: skip the free space of ext2/3/4 and FAT")
    chain_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing IMAGE (never one that other images depend on, "
                        "nor the source); accept a source that differs from the parent's disk "
                        "(serial, WWN, partition table or filesystem UUID); image a source "
                        "mounted read-write")
    p.set_defaults(func=_cmd_image)


def _cmd_image(args: argparse.Namespace) -> render.ImageDone:
    opts = imaging.ImageOptions(
        block_size=args.block_size, level=args.level, threads=threads(args), force=args.force,
        incremental=args.incremental, differential=args.differential,
        search=tuple(args.search), all_blocks=args.all_blocks, digest=args.digest)
    if opts.block_size is not None:
        imaging.check_block_size(opts.block_size)
    if args.rescue and args.all_blocks:
        raise UsageError("--rescue reads every block already; --all-blocks goes without it")
    if not 1 <= opts.level <= 22:
        raise UsageError(f"--level {opts.level}: must be between 1 and 22")
    if args.rescue and (args.incremental or args.differential):
        raise UsageError("--rescue makes full images only (image the new disk incrementally "
                         "afterwards)")
    _health_precheck(args.source, rescue=args.rescue)
    if args.rescue:
        with render.RescueBar("rescuing", args.no_progress or args.json) as bar:
            rescued = rescue.rescue_image(
                args.source, args.image,
                rescue.RescueOptions(
                    block_size=opts.block_size or defaults.DEFAULT_BLOCK_SIZE, level=opts.level,
                    force=opts.force, search=opts.search, retries=args.retries,
                    mapfile=args.mapfile, direct=args.direct, command=" ".join(sys.argv),
                    digest=args.digest),
                progress=bar)
        return render.ImageDone(args.source, rescued.image, rescued)
    if args.mapfile or args.direct is not None or args.retries != 1:
        raise UsageError("--retries, --mapfile and --direct go with --rescue")
    with render.Bar("imaging", args.no_progress or args.json) as bar:
        return render.ImageDone(
            args.source, imaging.create_image(args.source, args.image, opts, progress=bar))


def _health_precheck(source: str, rescue: bool) -> None:
    """One verdict line on stderr before imaging a device that has SMART."""
    report = health.precheck(source)
    if report is None:
        return
    for line in render.precheck_lines(source, report, report.verdict == health.FAIL, rescue):
        render.note(line)


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
    chain_options(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> render.VerifyDone:
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
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> render.InfoDone | render.InfoTruncated:
    try:
        reader = imagefile.ImageReader(args.image)
    except imagefile.TruncatedImage as err:
        if err.in_header:
            raise
        # what survived of an image cut short: its header and its whole records; exit 1
        return render.InfoTruncated(args.image, imagefile.describe_truncated(args.image), err)
    with reader:
        return render.InfoDone(args.image, imagefile.describe(reader))


ADDERS = [_add_image, _add_restore, _add_verify, _add_info]
