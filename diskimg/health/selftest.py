"""SMART self-tests: start one, follow it, abort it.

``start_selftest`` returns a ``SelfTestRun``, diskimg's own handle on a started test: ``poll()``
asks the drive once, ``wait()`` polls until the test ends, ``abort()`` stops it.  Callers (the
CLI, later health history) see only that handle and the frozen ``SelfTestStatus`` and
``SelfTestResult`` it gives, never the pySMART ``Device`` behind it, so pySMART stays an
implementation detail of this package.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from diskimg.errors import SmartUnavailable, UsageError
from diskimg.health.rules import SelfTest
from diskimg.health.smart import open_device, require_smart, selftest_entry

log = logging.getLogger(__name__)

SELFTEST_TYPES = ("short", "long", "conveyance")

__all__ = [
    "SELFTEST_TYPES", "SelfTestResult", "SelfTestRun", "SelfTestStatus", "abort_selftest",
    "start_selftest", "wait_selftest",
]


@dataclass(frozen=True)
class SelfTestResult:
    device: str
    started: bool
    message: str
    running: bool = False
    progress: int | None = None            # percent done, when running
    result: SelfTest | None = None         # the log entry of the finished test


@dataclass(frozen=True)
class SelfTestStatus:
    """What one poll of a self-test shows."""

    progress_percent: int | None           # percent done (100 once done); None: not reported
    done: bool
    result: SelfTest | None = None         # the log entry of the finished test, when there is one


class SelfTestRun:
    """A self-test started on ``device``: poll it, wait for it, abort it."""

    def __init__(self, device: str, test_type: str, dev) -> None:
        self.device = device
        self.type = test_type
        self._dev = dev                    # the pySMART Device; nothing outside health sees it

    def __repr__(self) -> str:
        return f"SelfTestRun({self.device!r}, {self.type!r})"

    def poll(self) -> SelfTestStatus:
        """Ask the drive once how the test is going (runs smartctl)."""
        rc, entry, pct = self._dev.get_selftest_result()
        if rc == 1:
            return SelfTestStatus(None if pct is None else int(pct), False)
        if rc in (0, 3):
            return SelfTestStatus(100, True, selftest_entry(entry))
        # rc 2: no new log entry (two identical tests in one hour); the newest one is the result
        tests = self._dev.tests
        return SelfTestStatus(100, True, selftest_entry(tests[0]) if tests else None)

    def wait(self, progress: Callable[[int], None] | None = None, poll_interval: float = 10.0,
             timeout: float | None = None) -> SelfTestStatus:
        """Poll until the test ends (or ``timeout`` seconds pass: then the last status, not
        done); ``progress(percent_done)`` after each poll that reports it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll()
            if progress is not None and status.progress_percent is not None:
                progress(status.progress_percent)
            if status.done or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll_interval)

    def abort(self) -> None:
        """Stop the test (smartctl -X)."""
        rc = self._dev.abort_selftest()
        if rc not in (0, None):
            raise SmartUnavailable(f"{self.device}: smartctl -X failed with status {rc}")


def start_selftest(path: str, test_type: str = "short", smartctl: str | None = None,
                   interface: str | None = None) -> tuple[SelfTestResult, SelfTestRun]:
    """Start a self-test.  Returns what happened and the handle on the test.

    Raises UsageError for an unknown type or a missing device, SmartUnavailable when the
    device has no SMART or refuses the test, SmartctlFailed when smartctl itself is broken.
    """
    if test_type not in SELFTEST_TYPES:
        raise UsageError(f"unknown self-test type {test_type!r}: use one of "
                         + ", ".join(SELFTEST_TYPES))
    dev, sm = open_device(path, smartctl, interface)
    require_smart(dev, sm, path)
    rc, message, eta = dev.run_selftest(test_type)
    log.debug("run_selftest(%s) -> %s %s %s", test_type, rc, message, eta)
    run = SelfTestRun(path, test_type, dev)
    if rc == 1:
        # pySMART has no public accessor for the progress it parsed from the same answer
        return SelfTestResult(path, False, "a self-test is already running", True,
                              dev._test_progress), run
    if rc != 0:
        raise SmartUnavailable(f"{path}: {message.strip()}")
    text = f"{test_type} self-test started" + (f", expected to complete {eta}" if eta else "")
    return SelfTestResult(path, True, text, True, 0), run


def wait_selftest(handle: SelfTestRun, progress: Callable[[int], None] | None = None,
                  poll: float = 10.0, timeout: float | None = None) -> SelfTestResult:
    """Poll a started self-test until it finishes; ``progress(percent_done)`` on each poll."""
    status = handle.wait(progress, poll_interval=poll, timeout=timeout)
    if not status.done:
        return SelfTestResult(handle.device, True, "still running", True,
                              status.progress_percent)
    t = status.result
    return SelfTestResult(handle.device, True, t.status if t else "finished", False, 100, t)


def abort_selftest(path: str, smartctl: str | None = None,
                   interface: str | None = None) -> SelfTestResult:
    """Stop a running self-test (smartctl -X)."""
    dev, sm = open_device(path, smartctl, interface)
    require_smart(dev, sm, path)
    SelfTestRun(path, "", dev).abort()
    return SelfTestResult(path, False, "self-test aborted")
