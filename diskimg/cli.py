"""The command line: argument parsing, logging set-up, progress bars, text and JSON output, and the
mapping of exceptions to exit codes.  Nothing else in diskimg prints or exits; nothing imports this.

Each command has an ``_add_<cmd>`` that builds its parser and a ``_cmd_<cmd>`` that turns the parsed
arguments into one library call and reports its result.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from diskimg import __version__
from diskimg.errors import EXIT_FAILED, EXIT_INTERRUPTED, DiskimgError

log = logging.getLogger("diskimg")


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------------------------
# parser assembly

def _common() -> argparse.ArgumentParser:
    """Options every command takes; pass as ``parents=[_common()]`` to each subparser."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    p.add_argument("--debug", action="store_true", help="debug logging, tracebacks on errors")
    p.add_argument("--log-file", metavar="FILE", help="also write the log to FILE")
    return p


ADDERS: list[Callable[[argparse._SubParsersAction], None]] = []


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diskimg",
        description="Image block devices, track changed blocks, restore block by block, "
        "watch disk health.",
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
        fh = logging.FileHandler(args.log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(e.code or 0)
    _setup_logging(args)
    try:
        return args.func(args)
    except DiskimgError as e:
        _report_error(args, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _report_error(args, "interrupted")
        return EXIT_INTERRUPTED
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _report_error(args, f"{where}{e.strerror or e}")
        return EXIT_FAILED


def _report_error(args: argparse.Namespace, message: str) -> None:
    if args.debug:
        log.exception("traceback")
    print(f"diskimg: error: {message}", file=sys.stderr)
