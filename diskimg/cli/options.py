"""Command-line options shared by several commands (the global ones, the chain ones) and their
argument types.  Apart from main.py so that each command group's module can use them without
importing the parser assembly."""
from __future__ import annotations

import argparse
import os
import sys

from diskimg.cli.lazy import pipeline
from diskimg.errors import UsageError
from diskimg.units import parse_size


class Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized to the terminal without importing shutil: argparse
    makes one for every add_argument, and shutil brings zlib, bz2 and lzma along (a few
    milliseconds of every command's start-up, issue 20).  Same width rule as shutil's."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            width = (width or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help is made by ``Formatter`` (its subparsers too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


def common(top: bool = False) -> argparse.ArgumentParser:
    """Options every command takes; pass as ``parents=[common()]`` to each subparser.  They are
    accepted before the command too (``top``: the main parser's copy, which holds the defaults).
    The subparsers' copies default to SUPPRESS: argparse copies a subparser's namespace over
    the main one, so a default there would undo ``diskimg --debug verify X``."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p = Parser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log what is being done",
                   **default)
    p.add_argument("--debug", action="store_true", help="debug logging, tracebacks on errors",
                   **default)
    p.add_argument("--log-file", metavar="FILE", help="also write the log to FILE", **default)
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
