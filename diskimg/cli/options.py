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


# --------------------------------------------------------------------------------------------
# keys of encrypted images

PASSPHRASE_ENV = "DISKIMG_PASSPHRASE_FILE"
MIN_KEY_FILE = 16


def key_options(p: argparse.ArgumentParser) -> None:
    """How a command is given the key of encrypted images (never on the command line)."""
    g = p.add_argument_group("keys of encrypted images")
    g.add_argument("--key-file", metavar="KF",
                   help="a key file (at least 16 bytes, e.g. head -c 32 /dev/urandom > KF)")
    g.add_argument("--passphrase", action="store_true",
                   help="ask for the passphrase on the terminal")
    g.add_argument("--passphrase-file", metavar="FILE",
                   help=f"read the passphrase from FILE (its first line; also "
                        f"${PASSPHRASE_ENV})")
    g.add_argument("--paper-key", metavar="FILE",
                   help="the master key typed back from `diskimg key export --paper` (FILE, "
                        "or - for standard input)")


def read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as err:
        from diskimg.errors import PermissionDenied, is_permission_error
        if is_permission_error(err):
            raise PermissionDenied(path, f"read the {what}") from err
        raise UsageError(f"{path}: cannot read the {what}: {err.strerror or err}") from err


def _first_line(data: bytes, path: str) -> bytes:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise UsageError(f"{path}: the passphrase file's first line is empty")
    return line


def _has_terminal() -> bool:
    """Whether the process has a controlling terminal to ask on (getpass asks there)."""
    import os
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _ask_passphrase(confirm: bool, prompt: str = "Passphrase",
                    stdin_is_image: bool = False) -> bytes:
    """Ask on the terminal.  `stdin_is_image` (restore -): standard input is the image, so it
    is no terminal, but the user's terminal still is (``ssh host cat x | diskimg restore -``)."""
    import getpass
    import sys
    if not sys.stdin.isatty() and not (stdin_is_image and _has_terminal()):
        raise UsageError("--passphrase asks on a terminal, and there is none: use "
                         f"--passphrase-file FILE or ${PASSPHRASE_ENV} in scripts")
    try:
        first = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} again: ") != first:
            raise UsageError("the two passphrases differ; nothing written")
    except EOFError:
        raise UsageError("no passphrase given") from None
    if not first:
        raise UsageError("an empty passphrase protects nothing")
    return first.encode()


def credentials(args: argparse.Namespace, confirm: bool = False):
    """The crypto.keyring.Credentials the key options (or $DISKIMG_PASSPHRASE_FILE) give, or
    None.  `confirm`: a passphrase asked on the terminal is asked twice (a new chain's)."""
    import os
    from diskimg.crypto.keyring import Credentials
    if not hasattr(args, "key_file"):
        return None      # a command that reads no image (list, health): the environment is not
                         # its business
    key_file = getattr(args, "key_file", None)
    ask = getattr(args, "passphrase", False)
    pfile = getattr(args, "passphrase_file", None)
    paper = getattr(args, "paper_key", None)
    if ask and pfile:
        raise UsageError("--passphrase asks on the terminal, --passphrase-file reads a file: "
                         "give one")
    explicit = bool(key_file or ask or pfile or paper)
    env = os.environ.get(PASSPHRASE_ENV) if not (ask or pfile) else None
    if not explicit and not env:
        return None
    creds = Credentials(explicit=explicit)
    if key_file:
        data = read_secret_file(key_file, "key file")
        if len(data) < MIN_KEY_FILE:
            raise UsageError(f"{key_file}: a key file holds at least {MIN_KEY_FILE} bytes, "
                             f"this one {len(data)} (make one: head -c 32 /dev/urandom > KF)")
        creds.key_file, creds.key_file_bytes = key_file, data
    stdin_is_image = getattr(args, "image", None) == "-"
    if paper == "-" and stdin_is_image:
        raise UsageError("--paper-key -: standard input holds the image; give the paper key "
                         "in a file")
    if ask:
        creds.passphrase = _ask_passphrase(confirm, stdin_is_image=stdin_is_image)
    elif pfile or env:
        path = pfile or env
        creds.passphrase = _first_line(read_secret_file(path, "passphrase file"), path)
    if paper:
        import sys
        text = sys.stdin.read() if paper == "-" else \
            read_secret_file(paper, "paper key file").decode(errors="replace")
        from diskimg.crypto.keys import parse_paper
        try:
            creds.master = parse_paper(text)
        except ValueError as err:
            raise UsageError(f"{paper}: not a paper key: {err}") from None
    return creds


def read_new_passphrase(path: str | None) -> bytes:
    """A new passphrase: the first line of `path`, or asked twice on the terminal."""
    if path:
        return _first_line(read_secret_file(path, "passphrase file"), path)
    return _ask_passphrase(True, "New passphrase")
