"""An export's output: a regular file written under ``NAME.partial`` and renamed when complete
(never a half-written file under its name), or a pipe or standard output written as it goes.

Like restore's target, an export's output is not an image, so it is opened here rather than
through a store: it may need holes (a raw disk's zero runs are skipped with `pwrite` after
`truncate`), and tools that are not diskimg read it.
"""
from __future__ import annotations

import os
import stat

from diskimg.errors import DiskimgError, OperationFailed, PermissionDenied, UsageError
from diskimg.errors import is_permission_error

_ZEROS = bytes(1 << 20)

# Written bytes are handed to the kernel's writeback every this many, so that the disk writes
# while the export decodes instead of all at the final fsync (with a machine's default dirty
# limits nothing is written back before several GiB are dirty): the final fsync of a 1 GiB
# export took 0.4 s on its own otherwise.
WRITEBACK_BYTES = 32 << 20


class OutputFile:
    """OUT: a regular file written as OUT.partial and renamed when complete, or a pipe or
    standard output written as it goes."""

    def __init__(self, out: str, force: bool, seekable_needed: bool) -> None:
        self.out = out
        self.partial: str | None = None
        self.written = 0
        self._dirty: tuple[int, int] | None = None    # the range written since the last writeback
        self._pos = 0                                   # where `write` writes next
        if out == "-":
            self.fd = os.dup(1)
            self.stream = True
        else:
            try:
                st = os.stat(out)
            except FileNotFoundError:
                st = None
            except OSError as err:
                raise _os_error(out, err, "look at the output") from err
            if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                self.fd = os.open(out, os.O_WRONLY)
                self.stream = True
            elif st is not None and stat.S_ISBLK(st.st_mode):
                raise UsageError(f"{out}: is a block device; to write an image to a device use "
                                 f"'diskimg restore'")
            elif st is not None and stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{out}: is a directory")
            else:
                if st is not None and not force:
                    raise UsageError(f"{out}: exists; not overwritten (use --force)")
                self.partial = out + ".partial"
                try:
                    self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                except OSError as err:
                    raise _os_error(self.partial, err, "create the output") from err
                self.stream = False
        if self.stream and seekable_needed:
            os.close(self.fd)
            raise UsageError(f"{out}: this format cannot be written to a pipe (raw and qcow2 can)")

    @property
    def path(self) -> str:
        return self.partial or self.out

    def write(self, data) -> None:
        view = memoryview(data)
        start = self._pos
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
                self._pos += n
        except OSError as err:
            raise _os_error(self.path, err, "write the output") from err
        self._wrote(start, self._pos)

    def write_zeros(self, n: int) -> None:
        while n:
            take = min(n, len(_ZEROS))
            self.write(memoryview(_ZEROS)[:take])
            n -= take

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        start = offset
        try:
            while view:
                k = os.pwrite(self.fd, view, offset)
                view, offset = view[k:], offset + k
                self.written += k
        except OSError as err:
            raise _os_error(self.path, err, "write the output") from err
        self._wrote(start, offset)

    def _wrote(self, start: int, end: int) -> None:
        """Note `start`-`end` written; start the writeback of what was written since the last
        one once that is WRITEBACK_BYTES (a file only: a pipe has no page cache of its own)."""
        if self.stream or end <= start:
            return
        lo, hi = self._dirty or (start, end)
        lo, hi = min(lo, start), max(hi, end)
        if hi - lo < WRITEBACK_BYTES:
            self._dirty = (lo, hi)
            return
        self._dirty = None
        try:
            # on Linux, DONTNEED starts the writeback of the dirty pages of the range without
            # waiting for it (and drops the clean ones: nothing reads them back)
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass          # only a hint: the final fsync writes it all anyway

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as err:
            raise _os_error(self.path, err, "size the output") from err

    def commit(self) -> None:
        try:
            if not self.stream:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.partial:
                os.rename(self.partial, self.out)
                dfd = os.open(os.path.dirname(os.path.abspath(self.out)), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self.partial = None
        except OSError as err:
            raise _os_error(self.path, err, "finish the output") from err

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.partial:
            try:
                os.unlink(self.partial)
            except OSError:
                pass


def _os_error(path: str, err: OSError, what: str) -> DiskimgError:
    if is_permission_error(err):
        return PermissionDenied(path, what)
    return OperationFailed(f"{path}: cannot {what}: {err.strerror or err}")
