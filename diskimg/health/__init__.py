"""Disk health from SMART: a verdict (PASS, WARN, FAIL, UNKNOWN) with the reasons behind it, and
self-tests.

``rules`` judges (pure, no smartctl), ``smart`` reads a device through smartctl and pySMART,
``selftest`` starts, follows and aborts self-tests through a handle of diskimg's own.  This
package is the only place that imports pySMART, and only when a device is asked about:
importing ``diskimg.health`` runs no smartctl and imports no pySMART.
"""
from __future__ import annotations

from diskimg.health.rules import (
    FAIL,
    INFO,
    PASS,
    UNKNOWN,
    WARN,
    HealthReport,
    Reason,
    SelfTest,
    SmartAttr,
    SmartFacts,
    decode_counter,
    decode_temperature,
    evaluate,
)
from diskimg.health.selftest import (
    SELFTEST_TYPES,
    SelfTestResult,
    SelfTestRun,
    SelfTestStatus,
    abort_selftest,
    start_selftest,
    wait_selftest,
)
from diskimg.health.smart import check, find_smartctl, precheck

__all__ = [
    "FAIL", "HealthReport", "INFO", "PASS", "Reason", "SELFTEST_TYPES", "SelfTest",
    "SelfTestResult", "SelfTestRun", "SelfTestStatus", "SmartAttr", "SmartFacts", "UNKNOWN",
    "WARN", "abort_selftest", "check", "decode_counter", "decode_temperature", "evaluate",
    "find_smartctl", "precheck", "start_selftest", "wait_selftest",
]
