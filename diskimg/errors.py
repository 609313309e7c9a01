"""Every error diskimg raises on purpose, each with the exit code the CLI maps it to.

This module imports nothing from diskimg so that every layer can raise these.  Each error's
``__str__`` is the one line a user sees after ``diskimg: error:``: it names the file or device
and says what is wrong.  Its fields say the same to a program: every error has ``path`` (the
file or device it is about, or None: the CLI's JSON carries it), and each class adds its own
(a ChecksumMismatch its block and both digests, a DiskIOError the operation, the byte and the
errno).  A failed system call is wrapped where it happens and raised ``from`` the OSError.
"""
from __future__ import annotations

# Exit codes: one table, documented in the README and tested in tests/cli.
EXIT_OK = 0
EXIT_PROBLEM = 1      # a check found a problem: corrupt image, unreadable sectors, WARN/FAIL health
EXIT_USAGE = 2        # invalid usage or input, or an unsafe operation refused
EXIT_FAILED = 3       # the operation failed: I/O error, disk full, SMART unreadable
EXIT_PERMISSION = 4   # permission denied: a source, image, parent, target, log file or directory
EXIT_INTERRUPTED = 130


# Set once a command has begun to clean up after a failure or a Ctrl-C (restore removing its
# partial file, the CLI printing the error).  diskimg.__main__ reads it: from then on a Ctrl-C
# that Python dropped is not raised again, so that it cannot cut the cleanup short or replace
# the message.  cli.main clears it when a command starts.
cleanup_begun = False


def begin_cleanup() -> None:
    """Mark that the command is cleaning up (see `cleanup_begun`)."""
    global cleanup_begun
    cleanup_begun = True


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
    """Invalid input or arguments (exit 2).  ``path``: None (the message names what is
    wrong)."""

    exit_code = EXIT_USAGE


class SourceError(UsageError):
    """The source cannot be used: missing, a directory, unreadable type (exit 2).  ``path`` and
    ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotAnImage(UsageError):
    """A file that is not a diskimg image, or an image this version cannot read (exit 2).
    ``path`` and ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IncompleteImage(NotAnImage):
    """An image without a valid trailer: still being written, interrupted or truncated."""


class UnsafeTarget(UsageError):
    """A restore or image target that would lose data: mounted, too small, the source itself
    (exit 2).  ``path`` and ``reason``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ChainError(UsageError):
    """An image chain that cannot be resolved or built (missing or mismatched parent; exit 2).
    ``path``: the image at fault, or None."""

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MissingParent(ChainError):
    """The parent of a child image is nowhere to be found (exit 2): ``uuid`` and ``name`` of
    the parent, ``searched`` (the directories looked in) and ``path`` (the child, or None)."""

    def __init__(self, uuid: str, name: str, searched: list[str], child: str = "") -> None:
        where = ", ".join(searched) if searched else "nowhere"
        of = f"{child}: " if child else ""
        super().__init__(f"{of}parent image {uuid} ({name}) not found; looked in {where}",
                         path=child or None)
        self.uuid = uuid
        self.name = name
        self.searched = searched


class KeyRefused(UsageError):
    """An encrypted image that cannot be opened with what was given (exit 2, before any block
    is read): no key given, a wrong passphrase or key file, a key of another chain, or a key
    given for an image that is not encrypted (a downgrade).  ``path`` and ``reason``; never
    the key or passphrase."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CorruptImage(DiskimgError):
    """Damage found in an image (exit 1).  ``path``: the damaged image, or None."""

    exit_code = EXIT_PROBLEM

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BlockError(CorruptImage):
    """One damaged block of one image (exit 1): ``image`` (its path, also ``path``), ``uuid``,
    ``block``, ``offset`` (the block's byte on the device) and ``reason`` (what is wrong with
    it, the text verify reports)."""

    def __init__(self, image: str, uuid: str, block: int, offset: int, reason: str) -> None:
        super().__init__(f"{image}: block {block} (byte {offset}): {reason}", path=image)
        self.image = image
        self.uuid = uuid
        self.block = block
        self.offset = offset
        self.reason = reason


class ChecksumMismatch(BlockError):
    """A block whose content does not hash to the digest its index entry holds (SHA-256 or
    BLAKE3, as the image says; exit 1): ``image``, ``block``, ``expected`` (the entry's digest)
    and ``actual`` (the content's), both 32 bytes, plus BlockError's ``uuid`` and ``offset``."""

    def __init__(self, image: str, block: int, expected: bytes, actual: bytes, uuid: str,
                 offset: int, detail: str = "", pages: tuple[int, ...] = ()) -> None:
        super().__init__(image, uuid, block, offset, _checksum_reason(expected, actual) + detail)
        self.expected = expected
        self.actual = actual
        # the pages (4 KiB, numbered within the block) that differ from the page hashes
        # recorded with the block (format feature "delta"); empty when not known
        self.pages = pages


def _checksum_reason(expected: bytes, actual: bytes) -> str:
    return f"checksum mismatch: calculated {actual.hex()}, should be {expected.hex()}"


class TruncatedImage(CorruptImage):
    """An image (not a .partial file) whose trailer is missing: it was cut short (exit 1).
    ``path``, ``size`` (the file's bytes) and ``in_header``: cut inside the header, so nothing
    of it can be read."""

    def __init__(self, path: str, size: int, reason: str = "") -> None:
        self.in_header = "inside its header" in reason
        if self.in_header:
            msg = f"{path}: {reason}: nothing of the image survived"
        else:
            msg = (f"{path}: image is truncated or incomplete: no trailer at its end "
                   f"({size} bytes); its index is lost")
        super().__init__(msg)
        self.path = path
        self.size = size


class StreamEnded(CorruptImage):
    """A restore from a stream (standard input) that stopped: the stream ended before the
    image's end, or carried a damaged record (exit 1).  ``path``: "-"; the message says what
    was written to the target."""


class MetadataError(CorruptImage):
    """Header, footer or trailer metadata that fails its checks: the whole image is unusable
    (exit 1).  ``path``, ``part`` ("header", "trailer" or "footer") and ``reason``."""

    def __init__(self, path: str, part: str, reason: str) -> None:
        super().__init__(f"{path}: {part} damaged: {reason}")
        self.path = path
        self.part = part
        self.reason = reason


class SegmentError(CorruptImage):
    """An index segment that failed its checks (exit 1); names the blocks it describes:
    ``path``, ``first``, ``count`` and ``reason`` ("index segment ...")."""

    def __init__(self, path: str, first: int, count: int, reason: str) -> None:
        super().__init__(f"{path}: index segment for blocks {first}-{first + count - 1} {reason}",
                         path=path)
        self.first = first
        self.count = count
        self.reason = f"index segment {reason}"


class BeyondRepair(CorruptImage):
    """`diskimg repair` refused: damage exceeds what the image's parity repairs (exit 1).
    ``path``: the image; ``blocks``: the blocks whose records are lost, as (first, last)
    ranges; ``parts``: other lost parts ("index segment 0", "footer and trailer", ...)."""

    def __init__(self, path: str, blocks: tuple[tuple[int, int], ...],
                 parts: tuple[str, ...] = ()) -> None:
        self.blocks = blocks
        self.parts = parts
        named = [f"block {a}" if a == b else f"blocks {a}-{b}" for a, b in blocks[:20]]
        if len(blocks) > 20:
            named.append(f"and {len(blocks) - 20} more ranges")
        what = ", ".join(list(parts) + named) or "damage the block checks do not place"
        super().__init__(f"{path}: damage beyond what parity repairs: {what}; nothing written "
                         f"(`diskimg restore --salvage` restores the rest)", path=path)


class OperationFailed(DiskimgError):
    """An operation that failed for reasons outside the input: I/O error, disk full (exit 3).
    ``path``: the file or device, or None.  A failed system call is a DiskIOError."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class DiskIOError(OperationFailed):
    """An I/O call on a file or device that the system refused or failed (exit 3), raised
    ``from`` the OSError.  Carries ``path`` (the file or device), ``operation`` (what was
    tried: "read", "write", "fsync", "open", "open for writing", "open to read back", "read
    the existing file", "write the mapfile", "complete the image"), ``offset`` (the byte where
    it failed, or None), ``errno`` and ``strerror`` (the system's answer) and ``context``
    (what the operation was part of, said after it: "while verifying", "(record of block 3)",
    or "").

    The message: "PATH: read error at byte N: STRERROR" with an offset, "PATH: read failed:
    STRERROR" for a read, write or fsync without one, "PATH: cannot open for writing:
    STRERROR" for the others."""

    def __init__(self, path: str, operation: str, err: OSError, offset: int | None = None,
                 context: str = "") -> None:
        self.path = path
        self.operation = operation
        self.offset = offset
        self.errno = err.errno
        self.strerror = err.strerror or str(err)
        self.context = context
        super().__init__(self._describe(), path=path)

    def _describe(self) -> str:
        context = f" {self.context}" if self.context else ""
        if self.offset is not None:
            what = f"{self.operation} error at byte {self.offset}{context}"
        elif self.operation in ("read", "write", "fsync"):
            what = f"{self.operation} failed{context}"
        else:
            what = f"cannot {self.operation}{context}"
        return f"{self.path}: {what}: {self.strerror}"


class ReadError(DiskIOError):
    """An unreadable area of the source: a DiskIOError ("read", at ``offset``) that also carries
    ``length`` (the bytes asked for) and ``hint`` (what to do about it, e.g. use --rescue)."""

    def __init__(self, path: str, offset: int, length: int, err: OSError, hint: str = "") -> None:
        self.length = length
        self.hint = hint
        super().__init__(path, "read", err, offset)

    def _describe(self) -> str:
        msg = (f"{self.path}: read error at byte {self.offset} ({self.length} bytes): "
               f"{self.strerror}")
        return f"{msg}; {self.hint}" if self.hint else msg


class SmartUnavailable(OperationFailed):
    """SMART could not be read: no smartctl, or no SMART on the device (exit 3)."""


class HistoryError(OperationFailed):
    """The health history database cannot be opened, read or written: not an SQLite file, a
    newer schema, a disk full (exit 3).  ``path``: the database."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}", path=path)


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
    """Ctrl-C (exit 130); the message says what was kept (a rescue keeps its partial image and
    map).  ``path``: None."""

    exit_code = EXIT_INTERRUPTED


class JobBusy(UsageError):
    """A backup job's lock is held by another run (exit 2: refused, nothing done).  ``path``
    is the lock file, ``job`` the job, ``holder`` what the holder wrote of itself (pid, host,
    since, what) or None."""

    def __init__(self, path: str, job: str, holder: dict | None) -> None:
        who = "another run"
        if holder:
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                   f"{holder.get('since')} ({holder.get('what')})")
        super().__init__(f"{path}: job {job} is busy: held by {who}")
        self.path, self.job, self.holder = path, job, holder

    def to_dict(self) -> dict:
        return {"job": self.job, "holder": self.holder}


class JobClaimed(JobBusy):
    """The job's prefix in object storage holds the claim of a run started on another host
    (exit 2, nothing done).  The flock is local to each host, so a second host is stopped by
    this object instead; if that run is gone for good (the host died), the object is stale and
    deleting it by hand lets the job run again."""

    def __init__(self, path: str, job: str, holder: dict | None) -> None:
        super().__init__(path, job, holder)
        self.message += (f" (a run on another host, or what is left of one: the lock is "
                         f"per host; if that run is gone, delete {path})")


class HealthGateFailed(DiskimgError):
    """A backup job's source has the health verdict FAIL and the job says stop (exit 1: a
    check found a problem).  ``path`` is the device, ``reasons`` the FAIL and WARN reasons."""

    exit_code = EXIT_PROBLEM

    def __init__(self, path: str, job: str, reasons: list[str]) -> None:
        why = "; ".join(reasons[:3]) or "SMART verdict FAIL"
        super().__init__(f"{path}: health FAIL, job {job} not run ({why}); set health = "
                         f"\"rescue\" in the job or image it with `diskimg image --rescue`")
        self.path, self.job, self.reasons = path, job, reasons


class RestoreFailed(DiskimgError):
    """A restore that stopped part way (a bad block, an I/O error, Ctrl-C): the error that
    stopped it (`cause`) and what was left on the target, so that the user knows whether the
    target still holds its old contents.  The exit code is the cause's.

    `restored_through` is the last block of the contiguous prefix that holds the image's
    contents (-1: none); blocks are written in order, so every later block is as it was."""

    def __init__(self, cause: DiskimgError | None, target: str, restored_through: int,
                 written_blocks: int, block_size: int, *, created: bool = False,
                 removed: bool = False, only_changed: bool = False,
                 torn_block: int | None = None) -> None:
        self.cause = cause
        self.target = target
        self.restored_through = restored_through
        self.written_blocks = written_blocks
        self.block_size = block_size
        self.created = created
        self.removed = removed
        self.only_changed = only_changed
        self.torn_block = torn_block     # the block whose write failed: may be partly written
        self.path = getattr(cause, "path", None) or target
        super().__init__(f"{cause if cause is not None else 'interrupted'}; {self.left()}")
        self.exit_code = cause.exit_code if cause is not None else EXIT_INTERRUPTED

    def left(self) -> str:
        """What the target holds now, in words."""
        if self.removed:
            return f"{self.target} removed (this restore created it; --keep-partial keeps it)"
        torn = "" if self.torn_block is None else \
            f"block {self.torn_block} may be partly written, "
        rest = "the rest reads as zeros (a new file)" if self.created else "the rest unchanged"
        if self.restored_through < 0:
            if torn:
                return f"{self.target} partially written: {torn}{rest}"
            return f"{self.target} unchanged" + (" (created empty)" if self.created else "")
        done = f"blocks 0-{self.restored_through} restored"
        if self.only_changed:
            done += f" ({self.written_blocks} written, the others already identical)"
        return f"{self.target} partially written: {done}, {torn}{rest}"

    def to_dict(self) -> dict:
        """What the target holds, for a JSON error report (the CLI merges these keys into its
        `error` object): `target`; `restored_blocks`, the ranges [first, last] that hold the
        image's contents; `written_blocks`, how many of them this restore wrote; `block_size`;
        `torn_block`, the block whose write failed (may be partly written) or None;
        `target_unchanged`, true only when the target was not changed at all (nothing written,
        no torn block, and no new file left behind); `created`, the restore created the file;
        `removed`, it removed that file again."""
        return {
            "target": self.target,
            "restored_blocks": [[0, self.restored_through]] if self.restored_through >= 0 else [],
            "written_blocks": self.written_blocks,
            "block_size": self.block_size,
            "torn_block": self.torn_block,
            "target_unchanged": (self.written_blocks == 0 and self.torn_block is None
                                 and (not self.created or self.removed)),
            "created": self.created,
            "removed": self.removed,
        }


class RestoreInterrupted(RestoreFailed, Interrupted):
    """Ctrl-C during a restore (exit 130), with what was left on the target."""

    def __init__(self, target: str, restored_through: int, written_blocks: int,
                 block_size: int, **kw) -> None:
        super().__init__(None, target, restored_through, written_blocks, block_size, **kw)


class DecodeError(ValueError):
    """Stored bytes that do not decode to the block they claim to hold.  A ValueError, not a
    DiskimgError: the transforms know no file, so the image reader turns it into a BlockError
    naming the image and the block.  ``reason`` is the words put after the block."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DigestMismatch(DecodeError):
    """Decoded bytes whose digest is not the one recorded: ``expected`` and ``actual`` (32
    bytes each).  The image reader turns it into a ChecksumMismatch."""

    def __init__(self, expected: bytes, actual: bytes) -> None:
        super().__init__(_checksum_reason(expected, actual))
        self.expected = expected
        self.actual = actual


class UnknownTransform(ValueError):
    """A transform name this diskimg does not know: the image was made by a newer one.
    ``name``; the header check turns it into a NotAnImage naming the file."""

    def __init__(self, name: str) -> None:
        super().__init__(f"made by a newer diskimg: transform {name!r} unknown")
        self.name = name


class UnknownDigest(ValueError):
    """A digest name this diskimg does not know: the image was made by a newer one.  ``name``;
    the header check turns it into a NotAnImage naming the file."""

    def __init__(self, name: str) -> None:
        super().__init__(f"made by a newer diskimg: digest {name!r} unknown")
        self.name = name


class UnknownFeature(ValueError):
    """A required format feature this diskimg does not know: the image was made by a newer one.
    ``name``; the header check turns it into a NotAnImage naming the file."""

    def __init__(self, name: str) -> None:
        super().__init__(f"made by a newer diskimg: format feature {name!r} unknown")
        self.name = name


class MapfileError(ValueError):
    """A rescue mapfile that cannot be parsed (a ValueError, not a DiskimgError: the rescue that
    reads it turns it into a UsageError naming the mapfile).  The message names the line."""
