"""Command-line options shared by several commands (the global ones, the chain ones) and their
argument types.  Apart from main.py so that each command group's module can use them without
importing the parser assembly."""
from __future__ import annotations

import argparse

from diskimg.cli.lazy import pipeline
from diskimg.errors import UsageError
from diskimg.units import parse_size


def common(top: bool = False) -> argparse.ArgumentParser:
    """Options every command takes; pass as ``parents=[common()]`` to each subparser.  They are
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
    p.add_argument("--endpoint-url", metavar="URL",
                   help="the S3 server of s3:// images (default: AWS_ENDPOINT_URL, the "
                        "profile's endpoint_url, or AWS)", **default)
    return p


def size_arg(text: str) -> int:
    """An argparse type: a size with an optional unit (64K, 4M, 1G)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def chain_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads or writes a chain of images."""
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent images in DIR (repeatable)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="hashing and (de)compression threads (default: the CPUs available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def threads(args: argparse.Namespace) -> int:
    if args.threads is None:
        return pipeline.default_threads()
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    return args.threads
