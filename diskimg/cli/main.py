"""The command line's entry: the parser assembled from each command group's, the global options,
logging set-up, and the mapping of exceptions to exit codes.  ``main(argv) -> int`` runs one
command in-process.  Nothing else in diskimg prints or exits; nothing imports this package.

The commands live by group (``images.py``: image, restore, verify, info; ``devices.py``: list,
health, selftest) and return outcomes that ``render.py`` prints as text or JSON.  Library
modules are imported when a command first uses them (``lazy.py``), so ``--help`` and
``--version`` import none.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from diskimg import __version__, errors
from diskimg.cli import early
from diskimg.cli.lazy import render
from diskimg.cli.options import Parser, common, credentials
from diskimg.crypto import keyring
from diskimg.store import S3_OPTIONS, is_remote
from diskimg.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
    DiskimgError,
    PermissionDenied,
    UsageError,
    is_permission_error,
)

log = logging.getLogger("diskimg")


# each command group's module (diskimg/cli/NAME.py, whose ADDERS build its parsers) and the
# commands it adds, in the order of --help
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("images", ("image", "restore", "verify", "repair", "info")),
    ("keys", ("key",)),
    ("mounts", ("mount", "umount", "export", "serve")),
    ("devices", ("list", "health", "selftest")),
    ("monitor", ("monitor", "report")),
    ("backup", ("backup",)),
)


def _group_of(argv: list[str]) -> str | None:
    """The one command group a command line needs, when it can be told without parsing: the
    group of the first word that names a command, unless help or the version is asked for
    (they list every command).  A guess that is wrong (that word was an option's value) only
    makes the parse fail, and main then parses again with every group."""
    if any(a in ("-h", "--help", "--version") for a in argv):
        return None
    for a in argv:
        for group, commands in GROUPS:
            if a in commands:
                return group
    return None


class _UsageExit(Exception):
    """argparse found a usage error (raised instead of printing and exiting, so that main can
    answer in JSON when --json was asked for)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(Parser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageExit(self, message)


def _build_parser(argv: list[str] | None = None, group: str | None = None
                  ) -> argparse.ArgumentParser:
    """The parser of every command, or of `group`'s only: a command's start-up then imports
    and builds its own group's parsers alone (the others cost ~25 ms, issue 20)."""
    parser = _Parser(
        prog="diskimg",
        description="Image block devices, track changed blocks, restore block by block, "
        "watch disk health.",
        parents=[common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"diskimg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, _ in GROUPS:
        if group is not None and name != group:
            continue
        module = importlib.import_module(f"diskimg.cli.{name}")
        if name == "backup":
            # the backup actions' parsers only when the command line may ask for them
            module.wanted = argv is None or "backup" in argv
        for add in module.ADDERS:
            add(sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the command's group alone when it can be told, else (or when that parse
    fails) with every group, so that errors and help read as they always did."""
    group = _group_of(argv)
    if group is not None:
        try:
            return _build_parser(argv, group).parse_args(argv)
        except _UsageExit:
            pass
    return _build_parser(argv).parse_args(argv)


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
_PATH_ARGS = ("source", "image", "target", "incremental", "differential", "mapfile",
              "mountpoint", "out")


def _absolute(path: str) -> str:
    """A local path made absolute; an s3:// URL or "-" (a stream) as it is."""
    return path if path == "-" or is_remote(path) else os.path.abspath(path)


def _absolute_paths(args: argparse.Namespace) -> None:
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, _absolute(value))
    if isinstance(getattr(args, "search", None), list):
        args.search = [_absolute(d) for d in args.search]


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code.  Every failure, Ctrl-C included, is one line on
    stderr (and with --json one JSON object on stdout), never a traceback unless --debug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    want_json = "--json" in argv
    args: argparse.Namespace | None = None
    errors.cleanup_begun = False
    try:
        try:
            args = _parse(argv)
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
        S3_OPTIONS["endpoint_url"] = getattr(args, "endpoint_url", None)
        creds = credentials(args, confirm=getattr(args, "encrypt", False)
                            and not getattr(args, "incremental", None)
                            and not getattr(args, "differential", None))
        early.resume_gc()     # paused by the entry point while the program started
        with keyring.using(creds):
            outcome = args.func(args)
            if args.command == "image" and getattr(args, "image", None) == "-":
                # standard output holds the image: what is said of it goes to stderr
                with contextlib.redirect_stdout(sys.stderr):
                    return render.show(outcome, as_json=want_json, debug=args.debug)
            return render.show(outcome, as_json=want_json, debug=args.debug)
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
        if isinstance(e.__cause__, KeyboardInterrupt):
            # a Ctrl-C that Python wrapped while it made a class (RuntimeError "Error calling
            # __set_name__", raised by a dataclass field during an import): still Ctrl-C
            return _report_error(args, "interrupted", EXIT_INTERRUPTED, json_out=want_json)
        return _report_error(args, f"internal error: {type(e).__name__}: {e} (run with --debug "
                                   f"for the traceback, and please report it)", EXIT_FAILED,
                             json_out=want_json)


def _report_error(args: argparse.Namespace | None, message: str, code: int, *,
                  json_out: bool = False, err: BaseException | None = None) -> int:
    """The one error line (and JSON error object) of a failed command; returns ``code``."""
    return render.report_error(message, code, json_out=json_out, err=err,
                               debug=args is not None and getattr(args, "debug", False))
