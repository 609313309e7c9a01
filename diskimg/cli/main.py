"""The command line: argument parsing, logging set-up, progress bars, text and JSON output, and the
mapping of exceptions to exit codes.  Nothing else in diskimg prints or exits; nothing imports this.

Each command has an ``_add_<cmd>`` that builds its parser and a ``_cmd_<cmd>`` that turns the parsed
arguments into one library call and reports its result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

from diskimg import __version__, defaults, errors
from diskimg.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_PROBLEM,
    EXIT_USAGE,
    DiskimgError,
    PermissionDenied,
    UsageError,
    is_permission_error,
)
from diskimg.units import human, parse_size

log = logging.getLogger("diskimg")


class _LazyModule:
    """A library module imported when a command first uses it, not when the CLI starts:
    ``--help``, ``--version`` and ``info`` do not pay for the imaging code, and only the
    commands that need them import zstandard, pyudev (``list``) or pySMART (``health``)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        # __import__, not importlib.import_module: the same import machinery as an import
        # statement, which is what -X importtime measures
        __import__(self._name)
        return getattr(sys.modules[self._name], attr)


blockdev = _LazyModule("diskimg.disk.blockdev")
devices = _LazyModule("diskimg.devices")
health = _LazyModule("diskimg.health.smart")
imagefile = _LazyModule("diskimg.image.imagefile")
imaging = _LazyModule("diskimg.ops.imaging")
pipeline = _LazyModule("diskimg.ops.pipeline")
rescue = _LazyModule("diskimg.ops.rescue")
restore = _LazyModule("diskimg.ops.restore")
verify = _LazyModule("diskimg.ops.verify")


def list_devices(all_devices: bool = False) -> list:
    return devices.list_devices(all_devices=all_devices)


def default_threads() -> int:
    return pipeline.default_threads()


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------------------------
# parser assembly

def _common(top: bool = False) -> argparse.ArgumentParser:
    """Options every command takes; pass as ``parents=[_common()]`` to each subparser.  They are
    accepted before the command too (``top``: the main parser's copy, which holds the defaults).
    The subparsers' copies default to SUPPRESS: argparse copies a subparser's namespace over
    the main one, so a default there would undo ``diskimg --debug verify X``."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log what is being done",
                   **default)
    p.add_argument("--debug", action="store_true", help="debug logging, tracebacks on errors",
                   **default)
    p.add_argument("--log-file", metavar="FILE", help="also write the log to FILE", **default)
    return p


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _chain_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads or writes a chain of images."""
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent images in DIR (repeatable)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="hashing and (de)compression threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _threads(args: argparse.Namespace) -> int:
    if args.threads is None:
        return default_threads()
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    return args.threads


class _NoBar:
    """What a command updates when no bar is shown."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass


@contextmanager
def _progress_bar(total: int, desc: str, disabled: bool, unit: str = "B") -> Iterator:
    """A tqdm bar on stderr (bytes, rate, ETA), with log lines printed above it.  None when
    disabled or when stderr is not a terminal; tqdm is then not even imported (it takes a
    tenth of the start-up time)."""
    if disabled or not sys.stderr.isatty():
        yield _NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    if unit != "B":
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar, \
                logging_redirect_tqdm(loggers=[log]):
            yield bar
        return

    class BinaryBar(tqdm):
        """Byte counts and rates in the units of the summaries (KiB, MiB/s): tqdm's own
        scaling prints "MB" for MiB and scales rates by 1000."""

        @property
        def format_dict(self):
            d = super().format_dict
            rate = d["rate"]
            if rate is None and d["elapsed"]:
                rate = (d["n"] - d["initial"]) / d["elapsed"]
            d["n_bin"] = human(d["n"])
            d["total_bin"] = human(d["total"]) if d["total"] else "?"
            d["rate_bin"] = f"{human(rate)}/s" if rate else "? B/s"
            return d

    fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n_bin}/{total_bin} "
           "[{elapsed}<{remaining}, {rate_bin}{postfix}]" if total else
           "{desc}: {n_bin} [{elapsed}, {rate_bin}{postfix}]")
    with BinaryBar(total=total or None, desc=desc, unit="B", bar_format=fmt, file=sys.stderr,
                   dynamic_ncols=True) as bar, logging_redirect_tqdm(loggers=[log]):
        yield bar


# --------------------------------------------------------------------------------------------
# image

def _add_image(sub) -> None:
    p = sub.add_parser("image", parents=[_common()], help="image a block device or file",
                       description="Read SOURCE block by block into the image file IMAGE.")
    p.add_argument("source", metavar="SOURCE", help="block device or regular file to image")
    p.add_argument("image", metavar="IMAGE", help="image file to write")
    p.add_argument("--block-size", type=_parse_size, default=None, metavar="SIZE",
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
    _chain_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing IMAGE (never one that other images depend on, "
                        "nor the source); accept a source that differs from the parent's disk "
                        "(serial, WWN, partition table or filesystem UUID); image a source "
                        "mounted read-write")
    p.set_defaults(func=_cmd_image)


def _cmd_image(args: argparse.Namespace) -> int:
    opts = imaging.ImageOptions(
        block_size=args.block_size, level=args.level, threads=_threads(args), force=args.force,
        incremental=args.incremental, differential=args.differential,
        search=tuple(args.search), all_blocks=args.all_blocks, digest=args.digest)
    if opts.block_size is not None:
        imaging.check_block_size(opts.block_size)
    if args.rescue and args.all_blocks:
        raise UsageError("--rescue reads every block already; --all-blocks goes without it")
    if not 1 <= opts.level <= 22:
        raise UsageError(f"--level {opts.level}: must be between 1 and 22")
    _health_precheck(args.source, rescue=args.rescue)
    size = _source_size_for_progress(args.source)
    unreadable: tuple[tuple[int, int], ...] = ()
    with _progress_bar(size, "rescuing" if args.rescue else "imaging",
                       args.no_progress or args.json) as bar:
        if args.rescue:
            rescued = rescue.rescue_image(
                args.source, args.image, opts,
                rescue.RescueOptions(retries=args.retries, mapfile=args.mapfile,
                                     direct=args.direct, command=" ".join(sys.argv)),
                progress=_rescue_progress(bar))
            result, unreadable = rescued.image, rescued.unreadable
        else:
            if args.mapfile or args.direct is not None or args.retries != 1:
                raise UsageError("--retries, --mapfile and --direct go with --rescue")
            result = imaging.create_image(args.source, args.image, opts, progress=bar.update)
    code = EXIT_PROBLEM if unreadable else EXIT_OK
    if args.json:
        out = dataclasses.asdict(result)
        if args.rescue:
            out["unreadable"] = [{"offset": o, "length": n} for o, n in unreadable]
            out["mapfile"] = rescued.mapfile
            out["resumed"] = rescued.resumed
        _print_json(out)
        return code
    rate = result.size / result.seconds if result.seconds else 0
    ratio = result.image_bytes / result.size * 100 if result.size else 0
    print(f"{result.kind} image {result.path} of {args.source}: {human(result.size)} "
          f"in {result.seconds:.1f} s ({human(rate)}/s)")
    for line in _block_lines(dataclasses.asdict(result), bool(result.parent)):
        print(f"  {line}")
    print(f"  image: {human(result.image_bytes)} ({ratio:.1f}% of the source); "
          f"uuid {result.uuid}")
    if args.rescue:
        lost = sum(n for _, n in unreadable)
        print(f"  rescue{' (resumed)' if rescued.resumed else ''}: {human(result.size - lost)} "
              f"rescued, {lost} bytes unreadable in {len(unreadable)} area(s); "
              f"map: {rescued.mapfile}")
        for off, n in unreadable:
            print(f"  unreadable: bytes {off}-{off + n - 1} ({n} bytes), stored as zeros")
    return code


def _block_lines(c: dict, has_parent: bool) -> list[str]:
    """How the blocks of an image are recorded (the four kinds add up to the blocks) and, for
    a changed-block image, how many changed since the parent and how they are recorded."""
    line = (f"blocks: {c['blocks']} x {human(c['block_size'])} = stored {c['stored_blocks']} "
            f"+ zero {c['zero_blocks']} + unused {c['unused_blocks']}")
    if has_parent:
        line += f" + unchanged {c['unchanged_blocks']} (kept in the parent)"
    if c.get("unreadable_blocks"):
        line += (f"; {c['unreadable_blocks']} of them hold unreadable sectors "
                 f"(restored as zeros)")
    lines = [line]
    if has_parent:
        zero_changed = c["zero_blocks"] + c["unused_blocks"] - c["unchanged_zero_blocks"]
        changed = (f"changed: {c['changed_blocks']} of {c['blocks']} blocks differ from the "
                   f"parent (stored {c['stored_blocks']}, zero or unused {zero_changed})")
        if c["unchanged_zero_blocks"]:
            changed += (f"; the other {c['unchanged_zero_blocks']} zero or unused blocks were "
                        f"zeros in the parent too")
        lines.append(changed)
    return lines


def _rescue_progress(bar) -> Callable:
    """Show rescued, bad and remaining bytes and the pass on the bar."""
    def show(st: rescue.RescueStatus) -> None:
        bar.n = st.rescued + st.bad
        bar.set_postfix_str(f"pass {st.pass_no} {st.pass_name}, bad {human(st.bad)}, "
                            f"failed areas {human(st.pending)}, untried {human(st.remaining)}",
                            refresh=True)
    return show


def _health_precheck(source: str, rescue: bool) -> None:
    """One verdict line on stderr before imaging a device that has SMART."""
    report = health.precheck(source)
    if report is None:
        return
    reasons = "; ".join(f"{r.what}: {r.value}" for r in report.reasons[:3])
    print(f"diskimg: health of {source}: {report.verdict}" + (f" ({reasons})" if reasons else ""),
          file=sys.stderr)
    if report.verdict == health.FAIL:
        advice = "" if rescue else "; consider --rescue to keep going past unreadable sectors"
        print(f"diskimg: warning: {source} is failing: reading it may hit bad sectors{advice}",
              file=sys.stderr)


def _source_size_for_progress(path: str) -> int:
    try:
        src = blockdev.open_source(path)
    except DiskimgError:
        return 0  # create_image reports the problem
    try:
        return src.size
    finally:
        src.close()


# --------------------------------------------------------------------------------------------
# restore

def _add_restore(sub) -> None:
    p = sub.add_parser("restore", parents=[_common()], help="restore an image to a device or file",
                       description="Write IMAGE (resolving its chain) to TARGET block by block, "
                                   "verifying every block before it is written.")
    p.add_argument("image", metavar="IMAGE")
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
    _chain_options(p)
    p.set_defaults(func=_cmd_restore)


def _question_lines(q: restore.Overwrite) -> list[str]:
    """The overwrite question: what is on the target now, like Clonezilla's last question
    before it writes."""
    t = q.target
    what = "block device" if t.is_block else "file"
    ident = ", ".join(x for x in (t.model, t.serial and f"serial {t.serial}") if x)
    lines = [f"diskimg: {t.path} ({what}, {human(t.size)}{', ' + ident if ident else ''}) "
             f"will be overwritten with {os.path.basename(q.image)} ({human(q.image_size)})"]
    if t.pttype:
        lines.append(f"  partition table: {t.pttype}")
    for c in t.contents:
        desc = [c.fstype or "-"]
        if c.label:
            desc.append(f'label "{c.label}"')
        if c.size is not None:
            desc.append(human(c.size))
        if c.mountpoints:
            desc.append("mounted on " + ", ".join(c.mountpoints))
        lines.append(f"  {c.name}: {', '.join(desc)}")
    if not t.pttype and not t.contents:
        lines.append("  no partition table or filesystem found on it")
    return lines


def _confirm(args: argparse.Namespace) -> Callable[[restore.Overwrite], bool]:
    def ask(question: restore.Overwrite) -> bool:
        if args.yes:
            return True
        lines = _question_lines(question)
        if not sys.stdin.isatty():
            print(f"{lines[0]}; refusing without --yes (no terminal to ask on)",
                  file=sys.stderr)
            for line in lines[1:]:
                print(line, file=sys.stderr)
            return False
        for line in lines:
            print(line, file=sys.stderr)
        try:
            answer = input("Type 'yes' to overwrite: ")
        except EOFError:
            return False
        return answer.strip().lower() == "yes"
    return ask


class _LazyBar:
    """A progress bar opened at the first progress report, so that nothing the restore asks or
    says before it starts writing (the overwrite question) is mixed up with the bar."""

    def __init__(self, total: int, desc: str, disabled: bool) -> None:
        self._args = (total, desc, disabled)
        self._stack = ExitStack()
        self._bar = None

    def update(self, n: int = 1) -> None:
        if self._bar is None:
            self._bar = self._stack.enter_context(_progress_bar(*self._args))
        self._bar.update(n)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _cmd_restore(args: argparse.Namespace) -> int:
    with _ChainSize(args.image) as total, \
            _LazyBar(total, "restoring", args.no_progress or args.json) as bar:
        result = restore.restore_image(
            args.image, args.target, search=args.search, only_changed=args.only_changed,
            confirm=_confirm(args), threads=_threads(args), progress=bar.update,
            salvage=args.salvage, verify=args.verify, keep_partial=args.keep_partial)
    problem = bool(result.unreadable or result.salvaged or result.verify_errors)
    if args.json:
        out = dataclasses.asdict(result)
        out["salvaged"] = [{"block": s.block, "last_block": s.block + s.blocks - 1,
                            "offset": s.offset, "length": s.length, "reason": s.reason}
                           for s in result.salvaged]
        _print_json(out)
        return EXIT_PROBLEM if problem else EXIT_OK
    rate = result.size / result.seconds if result.seconds else 0
    names = " -> ".join(os.path.basename(p) for p in result.chain_paths)
    print(f"restored {args.image} to {args.target}: {human(result.size)} in "
          f"{result.seconds:.1f} s ({human(rate)}/s)")
    print(f"  chain: {names}" + (" (truncated: its index is lost)" if result.truncated else ""))
    line = (f"  blocks: {result.blocks}; written {result.written_blocks}, zeroed "
            f"{result.zeroed_blocks}, left as holes {result.hole_blocks}")
    if args.only_changed:
        line += (f"; read from target {result.read_target_blocks}, already identical "
                 f"{result.skipped_blocks}")
    print(line)
    if result.target_size > result.size:
        print(f"  note: {args.target} is larger than the image ({human(result.target_size)} vs "
              f"{human(result.size)}); the bytes past {result.size} were left as they were")
    for off, length in result.unreadable:
        print(f"  unreadable on the source, restored as zeros: bytes {off}-{off + length - 1}")
    for s in result.salvaged:
        blocks = (f"block {s.block}" if s.blocks == 1
                  else f"blocks {s.block}-{s.block + s.blocks - 1}")
        print(f"  salvaged as zeros: {blocks}, bytes {s.offset}-{s.offset + s.length - 1} "
              f"({s.length} bytes): {s.reason}")
    if result.salvaged:
        lost = sum(s.length for s in result.salvaged)
        print(f"  SALVAGED: {lost} bytes ({human(lost)}) in {len(result.salvaged)} range(s) "
              f"could not be restored and read as zeros")
    if result.verified:
        how = "O_DIRECT" if result.verify_direct else "page cache dropped"
        for m in result.verify_errors[:20]:
            print(f"  VERIFY FAILED: block {m.block} (byte {m.offset}, {m.length} bytes) reads "
                  f"back as {m.actual}, the image has {m.expected}")
        if len(result.verify_errors) > 20:
            print(f"  ... and {len(result.verify_errors) - 20} more blocks (--json lists all)")
        if result.verify_errors:
            print(f"  VERIFY FAILED: {len(result.verify_errors)} of {result.verified_blocks} "
                  f"blocks read back from {args.target} differ from the image")
        else:
            print(f"  verified: {result.verified_blocks} blocks read back ({how}) in "
                  f"{result.verify_seconds:.1f} s, all identical to the image")
    return EXIT_PROBLEM if problem else EXIT_OK


class _ChainSize:
    """The device size of an image for the progress bar (0 when it cannot be read; the
    restore itself then reports why)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> int:
        try:
            with imagefile.ImageReader(self.path) as r:
                return r.header.size
        except DiskimgError:
            return 0

    def __exit__(self, *exc) -> None:
        return None


# --------------------------------------------------------------------------------------------
# verify

def _add_verify(sub) -> None:
    p = sub.add_parser("verify", parents=[_common()], help="check an image and its chain",
                       description="Check every block of IMAGE and of each image it depends on; "
                                   "name every damaged block.")
    p.add_argument("image", metavar="IMAGE")
    _chain_options(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    total = 0 if args.no_progress or args.json else _chain_bytes(args.image, args.search)
    with _progress_bar(total, "verifying", args.no_progress or args.json) as bar:
        result = verify.verify_image(args.image, search=args.search, threads=_threads(args),
                                     progress=bar.update)
    if args.json:
        _print_json({"ok": result.ok, "image": result.image,
                     "chain": [{"uuid": u, "path": p} for u, p in result.chain],
                     "blocks_checked": result.blocks_checked,
                     "errors": [e.to_json() for e in result.errors],
                     "errors_affecting_restore": result.restore_errors})
        return EXIT_OK if result.ok else EXIT_PROBLEM
    for uuid, path in result.chain:
        print(f"checked {path} ({uuid})")
    for e in result.errors:
        where = "" if e.block is None else (
            f"blocks {e.block}-{e.last_block}: " if e.last_block is not None
            else f"block {e.block} (byte {e.offset}): ")
        note = "" if e.affects_restore else (
            f" (overridden by {e.overridden_by}: does not affect restoring {args.image})")
        print(f"BAD {e.path}: {where}{e.reason}{note}")
    if result.ok:
        print(f"OK: {result.blocks_checked} blocks, {human(result.bytes_checked)} of data "
              f"verified in {result.seconds:.1f} s")
        return EXIT_OK
    matter = result.restore_errors
    print(f"FAILED: {len(result.errors)} error(s) in {args.image}"
          + ("" if matter == len(result.errors) else
             f"; {matter or 'none'} of them affect{'s' if matter == 1 else ''} restoring it"))
    return EXIT_PROBLEM


def _chain_bytes(image: str, search: list[str]) -> int:
    """What verify's progress counts: the device size once per image of the chain (0 when the
    chain cannot be opened; verify itself then reports why)."""
    if not sys.stderr.isatty():
        return 0
    from diskimg.image.chain import open_chain
    try:
        with open_chain(image, search) as chain:
            return sum(i.header.size for i in chain.images)
    except (DiskimgError, OSError):
        return 0


# --------------------------------------------------------------------------------------------
# info

def _add_info(sub) -> None:
    p = sub.add_parser("info", parents=[_common()], help="describe an image",
                       description="Print what IMAGE holds: kind, chain, sizes, source.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    try:
        reader = imagefile.ImageReader(args.image)
    except imagefile.TruncatedImage as err:
        if err.in_header:
            raise
        return _info_truncated(args, err)
    with reader:
        info = imagefile.describe(reader)
    if args.json:
        _print_json(info)
        return EXIT_OK
    src = info["source"] or {}
    print(f"image:       {args.image}")
    print(f"uuid:        {info['uuid']}")
    print(f"kind:        {info['kind']}" + (f" (parent {info['parent']}, {info['parent_name']})"
                                           if info["parent"] else ""))
    if len(info["chain"]) > 1:
        print(f"chain:       {' -> '.join(info['chain'])}")
    print(f"source:      {src.get('path')}" + "".join(
        f", {k} {src[k]}" for k in ("model", "serial") if src.get(k))
        + (f", loop device backed by {src['backing_file']}" if src.get("backing_file") else ""))
    print(f"size:        {info['size']} bytes ({human(info['size'])})")
    blocks, *changed = _block_lines(info, bool(info["parent"]))
    print(f"blocks:      {blocks.removeprefix('blocks: ')}")
    for line in changed:
        print(f"             {line}")
    if info["rescue"]:
        contents = "rescue image (every block read past read errors)"
    elif info["all_blocks"] is None:
        contents = "unknown (made before diskimg recorded it)"
    else:
        contents = ("all blocks (free space included: an exact copy)" if info["all_blocks"]
                    else "used blocks (the free space of ext2/3/4 and FAT left out)")
    print(f"contents:    {contents}")
    level = info["compression_level"]
    print(f"compression: {(info['compression'] or {}).get('codec', 'zstd')}"
          + (f" level {level}" if level is not None else ""))
    print(f"digest:      {info['digest']}")
    print(f"image size:  {info['image_bytes']} bytes ({human(info['image_bytes'])})")
    print(f"created:     {info['created']} by diskimg {info['tool_version']}")
    print(f"completed:   {info['completed'] or 'unknown'}")
    if info["source_mounted_rw"]:
        print(f"warning:     the source was mounted read-write on "
              f"{', '.join(info['source_mounted_rw'])} while imaged (--force): the image may "
              f"not be consistent")
    for r in info["unreadable"]:
        print(f"unreadable:  bytes {r['offset']}-{r['offset'] + r['length'] - 1} "
              f"({r['length']} bytes) read as zeros")
    return EXIT_OK


def _info_truncated(args: argparse.Namespace, err: DiskimgError) -> int:
    """What survived of an image cut short: its header and its whole records; exit 1."""
    info = imagefile.describe_truncated(args.image)
    left = info["survived"]
    if args.json:
        _print_json({"ok": False, "truncated": True,
                     "error": {"message": str(err), "path": os.path.abspath(args.image),
                               "exit_code": err.exit_code}, **info})
        return err.exit_code
    print(f"image:       {args.image} (TRUNCATED: no trailer, its index is lost)")
    print(f"uuid:        {info['uuid']}")
    print(f"kind:        {info['kind']}" + (f" (parent {info['parent']}, {info['parent_name']})"
                                           if info["parent"] else ""))
    print(f"size:        {info['size']} bytes ({human(info['size'])})")
    print(f"blocks:      {info['blocks']} x {human(info['block_size'])}")
    print(f"created:     {info['created']} by diskimg {info['tool_version']}")
    print(f"image size:  {info['image_bytes']} bytes ({human(info['image_bytes'])})")
    if left["records"]:
        print(f"survived:    {left['records']} whole records of {left['blocks']} blocks "
              f"({human(left['bytes'])}), up to byte {left['up_to_byte']} of the file; "
              f"the last is block {left['last_block']} (verify checks their content)")
    else:
        print("survived:    no stored block")
    _report_error(args, str(err), err.exit_code, err=err)
    return err.exit_code


ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_image, _add_restore, _add_verify, _add_info,
]


class _UsageExit(Exception):
    """argparse found a usage error (raised instead of printing and exiting, so that main can
    answer in JSON when --json was asked for)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageExit(self, message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diskimg",
        description="Image block devices, track changed blocks, restore block by block, "
        "watch disk health.",
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"diskimg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in ADDERS:
        add(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    root = logging.getLogger("diskimg")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if args.log_file else level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("diskimg: %(message)s"))
    root.addHandler(handler)
    if args.log_file:
        try:
            fh = logging.FileHandler(args.log_file)
        except OSError as err:
            root.removeHandler(handler)
            if is_permission_error(err):
                raise PermissionDenied(args.log_file, "write the log file") from err
            raise UsageError(f"{args.log_file}: cannot write the log file: "
                             f"{err.strerror or err}") from err
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    root.propagate = False


# argument names that hold paths; with --json they are made absolute before the command runs,
# so that every path the JSON echoes (image, target, chain_paths, ...) is absolute
_PATH_ARGS = ("source", "image", "target", "incremental", "differential", "mapfile")


def _absolute_paths(args: argparse.Namespace) -> None:
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, os.path.abspath(value))
    if isinstance(getattr(args, "search", None), list):
        args.search = [os.path.abspath(d) for d in args.search]


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code.  Every failure, Ctrl-C included, is one line on
    stderr (and with --json one JSON object on stdout), never a traceback unless --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    want_json = "--json" in argv
    args: argparse.Namespace | None = None
    errors.cleanup_begun = False
    try:
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return int(e.code or 0)
        except _UsageExit as e:
            if want_json:
                _report_error(None, e.message, EXIT_USAGE, json_out=True)
            else:
                e.parser.print_usage(sys.stderr)
                print(f"{e.parser.prog}: error: {e.message}", file=sys.stderr)
            return EXIT_USAGE
        want_json = bool(getattr(args, "json", False))
        if want_json:
            _absolute_paths(args)
        _setup_logging(args)
        return args.func(args)
    except KeyboardInterrupt:
        errors.begin_cleanup()    # a Ctrl-C that Python dropped is not raised again from here
        return _report_error(args, "interrupted", EXIT_INTERRUPTED, json_out=want_json)
    except DiskimgError as e:
        errors.begin_cleanup()
        return _report_error(args, str(e), e.exit_code, json_out=want_json, err=e)
    except BrokenPipeError:  # output piped into head and friends: not an error worth a message
        errors.begin_cleanup()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        errors.begin_cleanup()
        where = f"{e.filename}: " if e.filename else ""
        if is_permission_error(e):
            return _report_error(args, f"{where}permission denied ({e.strerror or e})",
                                 EXIT_PERMISSION, json_out=want_json, err=e)
        return _report_error(args, f"{where}{e.strerror or e}", EXIT_FAILED,
                             json_out=want_json, err=e)
    except Exception as e:  # a bug: still one line, the traceback with --debug
        errors.begin_cleanup()
        return _report_error(args, f"internal error: {type(e).__name__}: {e} (run with --debug "
                                   f"for the traceback, and please report it)", EXIT_FAILED,
                             json_out=want_json)


def _error_path(err: BaseException | None) -> str | None:
    path = getattr(err, "path", None) if isinstance(err, DiskimgError) else (
        getattr(err, "filename", None) if isinstance(err, OSError) else None)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return os.path.abspath(path) if isinstance(path, str) and path else None


def _report_error(args: argparse.Namespace | None, message: str, code: int, *,
                  json_out: bool = False, err: BaseException | None = None) -> int:
    """Print the one error line (and the JSON object with --json); returns ``code``.  A second
    Ctrl-C while this runs is dropped: it must not leave a traceback in place of the message."""
    try:
        if args is not None and getattr(args, "debug", False):
            log.exception("traceback")
        print(f"diskimg: error: {message}", file=sys.stderr)
        # the --log-file keeps why the command ended too (stderr has it already)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,),
                                None)
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        if json_out:
            error = {"message": message, "path": _error_path(err), "exit_code": code}
            extra = getattr(err, "to_dict", None)
            if callable(extra):
                error.update({k: v for k, v in extra().items() if k not in error})
            _print_json({"ok": False, "error": error})
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (BrokenPipeError, ValueError):
        pass
    return code


# --------------------------------------------------------------------------------------------
# list, health, selftest (devices.py and health.py)

def _add_list(sub) -> None:
    p = sub.add_parser("list", parents=[_common()], help="list disks, partitions and loop devices",
                       description="One row per disk with its partitions, identity, transport, "
                       "sector sizes, read-only flag, filesystem type, label and UUID, "
                       "mountpoints ([SWAP] for swap) and whether SMART can be read.")
    p.add_argument("--json", action="store_true", help="print JSON (sizes in bytes)")
    p.add_argument("--all", action="store_true",
                   help="also unattached loop devices, ram, zram, device-mapper and md")
    p.set_defaults(func=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    devices = list_devices(all_devices=args.all)
    if args.json:
        _print_json([d.to_dict() for d in devices])
        return 0
    print(_list_table(devices), end="")
    return 0


_LIST_COLUMNS = ("NAME", "SIZE", "RO", "TRAN", "ROT", "SECTOR", "SMART", "FSTYPE", "LABEL",
                 "UUID", "MODEL / SERIAL / BACKING FILE", "MOUNTPOINTS")
_RIGHT = {"SIZE"}


def _list_table(devices) -> str:
    """The rows of `list`, each column as wide as its widest cell (as lsblk does), so that a
    long backing-file path or label does not push the columns after it out of line."""
    def yes(v: bool | None) -> str:
        return "-" if v is None else "1" if v else "0"

    rows: list[tuple[str, ...]] = []
    for d in devices:
        ident = d.backing_file if d.backing_file else " ".join(
            x for x in (d.model, d.serial, d.wwn) if x) or "-"
        sectors = (f"{d.logical_sector_size}/{d.physical_sector_size}"
                   if d.logical_sector_size else "-")
        rows.append((d.name, human(d.size), yes(d.read_only), d.transport or "-",
                     "yes" if d.rotational else "no", sectors,
                     "yes" if d.smart_available else "no", d.fstype or "-", d.label or "-",
                     d.uuid or "-", ident, " ".join(d.mountpoints) or "-"))
        for p in d.partitions:
            rows.append(("  " + p.name, human(p.size), yes(p.read_only), "", "", "", "",
                         p.fstype or "-", p.label or "-", p.uuid or "-", f"start {p.start}",
                         " ".join(p.mountpoints) or "-"))
    widths = [max(len(r[i]) for r in [_LIST_COLUMNS, *rows]) for i in range(len(_LIST_COLUMNS))]
    lines = []
    for r in [_LIST_COLUMNS, *rows]:
        cells = [c.rjust(w) if h in _RIGHT else c.ljust(w)
                 for c, w, h in zip(r, widths, _LIST_COLUMNS)]
        cells[-1] = r[-1]   # the last column is not padded
        lines.append(" ".join(cells).rstrip() + "\n")
    return "".join(lines)


def _smart_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE",
                   help="any path smartctl accepts (/dev/sda, /dev/nvme0, /dev/bus/0, ...)")
    p.add_argument("--smartctl", metavar="PATH",
                   help="the smartctl to run (default: $DISKIMG_SMARTCTL, then PATH)")
    p.add_argument("-d", "--device-type", metavar="TYPE",
                   help="smartctl's -d type (sat, nvme, scsi, megaraid,N, ...); default: detect")


def _add_health(sub) -> None:
    p = sub.add_parser("health", parents=[_common()], help="SMART health verdict with reasons",
                       description="Read SMART and judge it: PASS, WARN, FAIL or UNKNOWN, with "
                       "the reasons. Exit 0 PASS, 1 WARN or FAIL, 3 SMART unreadable.")
    _smart_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_health)


def _cmd_health(args: argparse.Namespace) -> int:
    report = health.check(args.device, smartctl=args.smartctl, interface=args.device_type)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(_health_text(report))
    if report.verdict == health.UNKNOWN:
        return EXIT_FAILED
    return 0 if report.verdict == health.PASS else 1


def _health_text(report) -> str:
    ident = ", ".join(x for x in (report.model, report.serial and f"serial {report.serial}",
                                  report.interface) if x)
    lines = [f"{report.device}: {report.verdict}" + (f"  ({ident})" if ident else "")]
    facts = [f"drive says {report.smart_overall}"] if report.smart_overall else []
    if report.temperature is not None:
        facts.append(f"{report.temperature} C")
    if report.power_on_hours is not None:
        facts.append(f"{report.power_on_hours} power-on hours")
    if report.selftests:
        failed = sum(t.failed for t in report.selftests)
        facts.append(f"{len(report.selftests)} self-tests logged, {failed} failed")
    if facts:
        lines.append("  " + ", ".join(facts))
    for r in report.reasons:
        lines.append(f"  {r.severity:<4}  {r.what}: {r.value}")
        lines.append(f"        {r.why}")
    return "\n".join(lines)


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", parents=[_common()], help="start, follow or abort a SMART "
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


def _cmd_selftest(args: argparse.Namespace) -> int:
    if args.abort:
        result = health.abort_selftest(args.device, args.smartctl, args.device_type)
        print(f"{args.device}: {result.message}")
        return 0
    started, handle = health.start_selftest(args.device, args.type, args.smartctl,
                                            args.device_type)
    print(f"{args.device}: {started.message}")
    if not started.started:
        return 1
    if not args.wait:
        return 0
    with _progress_bar(100, f"{args.type} self-test", False, unit="%") as bar:
        def progress(pct: int) -> None:
            bar.update(max(0, pct - bar.n))
        result = health.wait_selftest(handle, progress, poll=args.poll)
    entry = result.result
    if entry is None:
        print(f"{args.device}: {result.message}")
        return 0
    print(f"{args.device}: {entry.type}: {entry.status}"
          + (f" (first error at LBA {entry.lba})" if entry.lba and entry.lba != "-" else ""))
    return 1 if entry.failed else 0


ADDERS += [_add_list, _add_health, _add_selftest]
