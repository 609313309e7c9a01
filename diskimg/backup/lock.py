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

from diskimg.errors import JobBusy, JobClaimed, PermissionDenied, UsageError
from diskimg.errors import is_permission_error


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


# -- object storage --------------------------------------------------------------------------

def host_identity() -> dict:
    """This host as a claim names it: the hostname and /etc/machine-id (two cloned VMs may
    share a hostname; a machine id tells them apart unless it was cloned too)."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip() or None
    except OSError:
        machine = None
    return {"host": socket.gethostname(), "machine_id": machine}


class RemoteClaim:
    """A run's claim on a job whose images live in object storage: the object
    ``JOB.running.json`` under the destination's prefix (one PUT, deleted when the run ends),
    taken after the host's flock (JobLock) is held.

    Object storage has no lock a killed process releases, so the claim says who: a claim of
    this host is stale (its flock is free, which is why we got here: the run that wrote it is
    dead) and is replaced; a claim of another host stops the run (JobClaimed), since that run
    may be alive and its unfinished upload must not be aborted as a leftover.  Two hosts that
    start within the same moment can both miss each other's claim (S3 has no compare-and-swap
    here): the claim is read back after it is written, which narrows that window to the
    time between the two reads; it is a guard against two hosts configured with one job, not
    a distributed lock."""

    def __init__(self, store, job: str, what: str) -> None:
        self.store, self.job, self.what = store, job, what
        self.name = f"{job}.running.json"
        self.path = store.path(self.name)
        self.token = os.urandom(8).hex()
        self.stale: dict | None = None     # this host's claim left by a killed run
        self.held = False

    def _read(self) -> dict | None:
        from diskimg.errors import DiskimgError, NotAnImage
        try:
            with self.store.open(self.name) as r:
                data = json.loads(r.pread(min(r.size, 65536), 0).decode("utf-8"))
        except NotAnImage:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"what": "unreadable claim"}
        except DiskimgError:
            raise
        return data if isinstance(data, dict) else {"what": "unreadable claim"}

    def _mine(self, holder: dict, me: dict) -> bool:
        return holder.get("host") == me["host"] and holder.get("machine_id") == me["machine_id"]

    def __enter__(self) -> RemoteClaim:
        me = host_identity()
        holder = self._read()
        if holder is not None:
            if not self._mine(holder, me):
                raise JobClaimed(self.path, self.job, _shown(holder))
            self.stale = holder
        claim = {**me, "pid": os.getpid(), "what": self.what, "token": self.token,
                 "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        sink = self.store.create(self.name)
        try:
            sink.write([json.dumps(claim, indent=1).encode() + b"\n"])
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        back = self._read()
        if back is None or back.get("token") != self.token:
            raise JobClaimed(self.path, self.job, _shown(back))
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.held = False
        from diskimg.errors import DiskimgError
        try:
            back = self._read()
            if back is not None and back.get("token") == self.token:
                self.store.delete(self.name)
        except DiskimgError as err:
            import logging
            logging.getLogger(__name__).warning(
                "warning: cannot remove the claim %s (%s); this host's next run replaces it",
                self.path, err)


def _shown(holder: dict | None) -> dict | None:
    """A claim as errors show it (without its token)."""
    return None if holder is None else {k: v for k, v in holder.items() if k != "token"}
