"""Every error diskimg raises on purpose, each with the exit code the CLI maps it to.

This module imports nothing from diskimg so that every layer can raise these.  Each error's
``__str__`` is the one line a user sees after ``diskimg: error:``: it names the file or device
and says what is wrong.
"""
from __future__ import annotations

# Exit codes: one table, documented in the README and tested in tests/cli.
EXIT_OK = 0
EXIT_PROBLEM = 1      # a check found a problem: corrupt image, unreadable sectors, WARN/FAIL health
EXIT_USAGE = 2        # invalid usage or input, or an unsafe operation refused
EXIT_FAILED = 3       # the operation failed: I/O error, disk full, SMART unreadable
EXIT_PERMISSION = 4   # permission denied: a source, image, parent, target, log file or directory
EXIT_INTERRUPTED = 130

# errno values that mean "not allowed" (EACCES: mode bits; EPERM: immutable files, capabilities)
PERMISSION_ERRNOS = (13, 1)


class DiskimgError(Exception):
    """Base of every diskimg error.  ``exit_code`` is what the CLI exits with; ``path`` is the
    file or device the error is about, or None (the CLI puts it in its JSON)."""

    exit_code = EXIT_FAILED
    path: str | None = None

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DiskimgError):
    """Invalid input or arguments (exit 2)."""

    exit_code = EXIT_USAGE


class SourceError(UsageError):
    """The source cannot be used: missing, a directory, unreadable type."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotAnImage(UsageError):
    """A file that is not a diskimg image, or an image this version cannot read."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IncompleteImage(NotAnImage):
    """An image without a valid trailer: still being written, interrupted or truncated."""


class UnsafeTarget(UsageError):
    """A restore or image target that would lose data: mounted, too small, the source itself."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ChainError(UsageError):
    """An image chain that cannot be resolved or built (missing or mismatched parent)."""

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MissingParent(ChainError):
    def __init__(self, uuid: str, name: str, searched: list[str], child: str = "") -> None:
        where = ", ".join(searched) if searched else "nowhere"
        of = f"{child}: " if child else ""
        super().__init__(f"{of}parent image {uuid} ({name}) not found; looked in {where}",
                         path=child or None)
        self.uuid = uuid
        self.name = name
        self.searched = searched


class CorruptImage(DiskimgError):
    """Damage found in an image (exit 1)."""

    exit_code = EXIT_PROBLEM

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class OperationFailed(DiskimgError):
    """An operation that failed for reasons outside the input: I/O error, disk full (exit 3)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ReadError(OperationFailed):
    """An unreadable area of the source."""

    def __init__(self, path: str, offset: int, length: int, err: OSError, hint: str = "") -> None:
        msg = f"{path}: read error at byte {offset} ({length} bytes): {err.strerror or err}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)
        self.path = path
        self.offset = offset
        self.length = length
        self.errno = err.errno


class SmartUnavailable(OperationFailed):
    """SMART could not be read: no smartctl, or no SMART on the device (exit 3)."""


class PermissionDenied(DiskimgError):
    """The system refused access to a file, device or directory (EACCES or EPERM; exit 4).
    ``operation`` says what was tried: "read", "write", "create the image in", ..."""

    exit_code = EXIT_PERMISSION

    def __init__(self, path: str, operation: str, detail: str = "") -> None:
        super().__init__(f"{path}: permission denied (cannot {operation}"
                         + (f": {detail}" if detail else "") + ")")
        self.path = path
        self.operation = operation


def is_permission_error(err: BaseException) -> bool:
    """An OSError that means "not allowed" rather than "not there" or "broken"."""
    return isinstance(err, OSError) and err.errno in PERMISSION_ERRNOS


class SmartctlFailed(SmartUnavailable):
    """smartctl itself failed: killed, or printed what is not smartctl's output (exit 3).
    ``path`` is the smartctl binary."""

    def __init__(self, smartctl: str, message: str) -> None:
        super().__init__(message, path=smartctl)


class Interrupted(DiskimgError):
    exit_code = EXIT_INTERRUPTED
