"""One run at a time per job: an flock(2) on STATE_DIR/JOB.lock.

The kernel releases an flock when its holder dies (kill -9 included), so there is no stale lock
to clear by hand.  The holder writes who it is into the file (pid, host, since when, what), and
a second start reads that to say which run holds the job.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone

from diskimg.errors import JobBusy, PermissionDenied, UsageError, is_permission_error


class JobLock:
    def __init__(self, state_dir: str, job: str, what: str) -> None:
        self.path = os.path.join(state_dir, f"{job}.lock")
        self.job, self.what = job, what
        self.fd: int | None = None

    def __enter__(self) -> JobLock:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if is_permission_error(err):
                raise PermissionDenied(self.path, "create the job's lock file") from err
            raise UsageError(f"{self.path}: cannot create the job's lock file: "
                             f"{err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise JobBusy(self.path, self.job, holder) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "what": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)     # releases the lock
            self.fd = None


def _read_holder(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
