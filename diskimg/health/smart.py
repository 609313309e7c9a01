"""Reading SMART: finding smartctl, running it through pySMART, and turning what it prints into
``SmartFacts`` for the rules (``check``, and ``precheck`` before imaging).

pySMART (imported only in this package, and only when a device is asked about) runs smartctl
and parses its ``--all`` output.  pySMART 1.4.3 is used for what it parses well (interface
detection, ATA attribute rows, NVMe health log, self-test logs) and the smartctl text it was
given is kept (``_RecordingSmartctl``) so the facts pySMART gets wrong are read from the text
instead: the model (pySMART lets an "Add. Product Id" line overwrite it), packed raw values (its
``raw_int`` takes the first integer), SCSI defect and error counters, and smartctl's "outdated
by newer successful extended self-test" note.  The verdict itself is ``rules.evaluate``'s.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from typing import Iterable

from diskimg.errors import SmartctlFailed, SmartUnavailable, UsageError
from diskimg.health.rules import (
    UNKNOWN,
    HealthReport,
    SelfTest,
    SmartAttr,
    SmartFacts,
    decode_hours,
    decode_temperature,
    evaluate,
)

log = logging.getLogger(__name__)

__all__ = ["check", "find_smartctl", "precheck", "read"]


# --------------------------------------------------------------------------------------------
# smartctl and pySMART

def find_smartctl(explicit: str | None = None) -> str | None:
    """--smartctl PATH, else $DISKIMG_SMARTCTL, else smartctl on PATH (or in /usr/sbin, /sbin)."""
    for candidate in (explicit, os.environ.get("DISKIMG_SMARTCTL")):
        if candidate:
            found = shutil.which(candidate)
            if found is None:
                raise SmartUnavailable(f"{candidate}: smartctl not found or not executable")
            return found
    return shutil.which("smartctl") or shutil.which(
        "smartctl", path="/usr/local/sbin:/usr/sbin:/sbin")


def _pysmart():
    # imported here, not at the top: only this module uses pySMART, and only when asked
    from pySMART import Device
    from pySMART.smartctl import Smartctl
    return Device, Smartctl


def _make_smartctl(path: str):
    _, Smartctl = _pysmart()

    class _RecordingSmartctl(Smartctl):
        """Keeps the last --all output pySMART parsed, to read what pySMART misreads."""

        def __init__(self, smartctl_path: str) -> None:
            super().__init__(smartctl_path=smartctl_path, options=[])
            self.last_all: list[str] = []

        def _decode_output(self, raw_output: bytes) -> list[str]:
            """smartctl writes ASCII, or UTF-8 in a model name: decoded as such.  pySMART
            would first guess the encoding with chardet, which costs more than running
            smartctl (60 ms for a short output); anything that is not UTF-8 still goes to it."""
            try:
                return raw_output.decode("utf-8").splitlines()
            except UnicodeDecodeError:
                return super()._decode_output(raw_output)

        def generic_call(self, params, pass_options=False):
            out, rc = super().generic_call(params, pass_options)
            log.debug("smartctl %s -> rc %s, %d lines", " ".join(params), rc, len(out))
            if "--all" in params or "--info" in params:
                self.last_all = list(out)
            if self.broken is None:
                self.broken = _smartctl_trouble(self.smartctl_path, out, rc)
            return out, rc

    sm = _RecordingSmartctl(path)
    sm.broken = None     # the first sign that smartctl itself is broken, set by generic_call
    return sm


# smartctl starts every answer with its banner ("smartctl 7.3 2022-02-28 r5338 [...]"); answers
# to commands given to a drive (-t, -X) may be recorded without it but start with a section
_SMARTCTL_TEXT = re.compile(r"^(smartctl \d+\.\d+|=== START OF )", re.M)


def _smartctl_trouble(path: str, out: list[str], rc: int) -> str | None:
    """Why an answer of smartctl shows that smartctl itself is broken (killed by a signal, or
    text that is not smartctl's), or None.  A non-zero exit alone is not: smartctl's exit
    status is a bit mask that is non-zero for a device without SMART or with logged errors."""
    first = next((line.strip() for line in out if line.strip()), "")
    if rc is not None and rc < 0:
        import signal
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"smartctl at {path} failed: killed by {name}" + (f": {first}" if first else "")
    if not first or _SMARTCTL_TEXT.search("\n".join(out)):
        # no output at all is what an unknown command line gives: a question pySMART may ask
        # of a device that cannot answer it, not a sign of a broken smartctl
        return None
    if rc:
        return (f"smartctl at {path} failed: exit {rc}: "
                + (first[:120] if first else "no output"))
    return (f"smartctl at {path} printed output diskimg cannot read"
            + (f": {first[:120]}" if first else " (nothing)"))


def open_device(path: str, smartctl: str | None, interface: str | None):
    """A pySMART Device for ``path`` (any node smartctl accepts, not only under /dev)."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such device")
    binary = find_smartctl(smartctl)
    if binary is None:
        raise SmartUnavailable("smartctl not found: install smartmontools, or give "
                               "--smartctl PATH or DISKIMG_SMARTCTL")
    Device, _ = _pysmart()
    ref = os.path.abspath(path)

    class _Device(Device):
        # pySMART strips every "/dev/" from the name and prefixes "/dev/" again, which breaks
        # nodes outside /dev (/mnt/rescue/dev/sda): answer with the path we were given.
        @property
        def dev_reference(self) -> str:
            return ref

    sm = _make_smartctl(os.path.abspath(binary))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dev = _Device(ref, interface=interface, smartctl=sm)
        except ValueError as e:          # pySMART: unknown interface
            raise UsageError(f"{path}: {e}") from e
    if sm.broken:
        # not "the device has no SMART": the tool that would tell us failed
        raise SmartctlFailed(binary, sm.broken)
    return dev, sm


_MODEL_KEYS = ("Device Model", "Model Number", "Product")


def _field(lines: Iterable[str], *keys: str) -> str | None:
    for line in lines:
        k, sep, v = line.partition(":")
        if sep and k.strip() in keys and v.strip():
            return v.strip()
    return None


def _int_field(text: str, pattern: str) -> int | None:
    m = re.search(pattern, text, re.M)
    return int(re.sub(r"[,.' ]", "", m.group(1))) if m else None


def read_facts(dev, lines: list[str]) -> SmartFacts:
    text = "\n".join(lines)
    f = SmartFacts()
    # some recordings (and some bridges) leave out "SMART support is:"; an attribute table or an
    # overall assessment shows SMART is there all the same
    f.smart_enabled = not re.search(r"SMART support is:\s*Disabled", text)
    f.model = _field(lines, *_MODEL_KEYS)            # not dev.model: "Add. Product Id" overwrites it
    f.vendor = _field(lines, "Vendor")
    if re.search(r"self-assessment test result:\s*PASSED", text) or \
            re.search(r"SMART Health Status:\s*OK", text):
        f.overall = "PASSED"
    elif re.search(r"self-assessment test result:\s*FAIL", text) or \
            re.search(r"SMART Health Status:\s*\S", text):
        f.overall = "FAILED"
    ifa = dev.if_attributes
    kind = type(ifa).__name__ if ifa is not None else ""
    if kind == "AtaAttributes":
        f.kind = "ata"
        for a in ifa.legacyAttributes:
            if a is None:
                continue
            f.attributes[a.num] = SmartAttr(
                a.num, a.name, _maybe_int(a.value_str), _maybe_int(a.worst),
                _maybe_int(a.thresh), a.when_failed, a.raw.strip())
        for tid in (194, 190, 231):
            if tid in f.attributes:
                f.temperature = decode_temperature(f.attributes[tid].raw)
                break
        if 9 in f.attributes:
            f.power_on_hours = decode_hours(f.attributes[9].raw)
        f.ata_error_count = _int_field(text, r"^ATA Error Count:\s*(\d+)")
        m = re.search(r"^(\d+ of \d+ failed self-tests are outdated.*)$", text, re.M)
        f.outdated_note = m.group(1) if m else None
    elif kind == "NvmeAttributes":
        f.kind = "nvme"
        f.smart_available = True
        f.nvme = {
            "critical_warning": ifa.criticalWarning,
            "available_spare": ifa.availableSpare,
            "available_spare_threshold": ifa.availableSpareThreshold,
            "percentage_used": ifa.percentageUsed,
            "media_errors": ifa.integrityErrors,
            "error_log_entries": ifa.errorEntries,
            "power_on_hours": ifa.powerOnHours,
            "data_units_read": ifa.dataUnitsRead,
        }
        f.power_on_hours = ifa.powerOnHours
        f.temperature = ifa.temperature
    elif kind == "SCSIAttributes" or "SMART Health Status" in text:
        f.kind = "scsi"
        f.scsi_grown_defects = _int_field(text, r"Elements in grown defect list:\s*([\d,]+)")
        for op in ("read", "write", "verify"):
            m = re.search(rf"^{op}:\s+(.*)$", text, re.M)
            if m:
                cols = m.group(1).split()
                if len(cols) >= 7 and cols[-1].isdigit():
                    f.scsi_uncorrected[op] = int(cols[-1])
        f.scsi_endurance_used = _int_field(text, r"Percentage used endurance indicator:\s*(\d+)")
        f.temperature = _int_field(text, r"Current Drive Temperature:\s*(\d+)")
        if f.temperature is None:
            f.temperature = _int_field(text, r"Current temperature\s*=\s*(\d+)")
        f.power_on_hours = _int_field(text, r"power on time, hours:minutes\s*(\d+)")
    f.smart_available = bool(dev.smart_capable or f.attributes or f.nvme
                             or f.overall is not None)
    if f.temperature is None:
        f.temperature = dev.temperature if isinstance(dev.temperature, int) else None
    if f.kind == "scsi" and f.temperature == 0 and not f.smart_available:
        f.temperature = None
    f.selftests.extend(selftest_entry(t) for t in dev.tests or [])
    _limits_and_running(f, text)
    return f


def _limits_and_running(f: SmartFacts, text: str) -> None:
    """The drive's own temperature limits and a self-test running now, from the text."""
    f.temperature_warning = _int_field(text, r"^Warning\s+Comp\. Temp\. Threshold:\s*(\d+)")
    f.temperature_critical = _int_field(text, r"^Critical Comp\. Temp\. Threshold:\s*(\d+)")
    if f.kind == "scsi":
        f.temperature_critical = _int_field(text, r"^Drive Trip Temperature:\s*(\d+)")
    airflow = f.attributes.get(190)
    if f.temperature_warning is None and airflow is not None and airflow.thresh \
            and 0 < airflow.thresh < 100:
        # 190 Airflow_Temperature_Cel: VALUE is 100 - temperature, THRESH 100 - the limit
        f.temperature_warning = 100 - airflow.thresh
    m = re.search(r"Self-test routine in progress\.\.\.\s*(\d+)% of test remaining", text)
    if m is None:   # NVMe: "Self-test status: Extended self-test in progress (42% completed)"
        m2 = re.search(r"self-test in progress \((\d+)% completed\)", text, re.I)
        f.selftest_remaining = 100 - int(m2.group(1)) if m2 else None
    else:
        f.selftest_remaining = int(m.group(1))


def selftest_entry(t) -> SelfTest:
    """A pySMART self-test log entry as diskimg's ``SelfTest``."""
    return SelfTest(num=_maybe_int(t.num), type=str(t.type or "").strip(),
                    status=str(t.status or "").strip(),
                    remaining=_str(getattr(t, "remain", None)), hours=_str(t.hours),
                    lba=_str(t.LBA))


def _maybe_int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _str(v) -> str | None:
    return None if v is None else str(v).strip()


def check(path: str, smartctl: str | None = None, interface: str | None = None) -> HealthReport:
    """Read SMART from ``path`` and judge it.

    ``interface`` is smartctl's ``-d`` type (``sat``, ``nvme``, ``megaraid,N``...); by default
    smartctl detects it.  A device without SMART gives verdict UNKNOWN.

    Raises UsageError when ``path`` does not exist, SmartUnavailable when smartctl is missing.
    """
    return read(path, smartctl, interface)[0]


def read(path: str, smartctl: str | None = None,
         interface: str | None = None) -> tuple[HealthReport, SmartFacts]:
    """``check``'s report and the facts behind it (what health history stores)."""
    dev, sm = open_device(path, smartctl, interface)
    facts = read_facts(dev, sm.last_all)
    verdict, reasons = evaluate(facts)
    model = facts.model or dev.model
    if facts.vendor and model and not model.startswith(facts.vendor):
        model = f"{facts.vendor} {model}"
    return HealthReport(
        device=path, model=model, serial=dev.serial or None, interface=dev.interface,
        verdict=verdict, reasons=tuple(reasons), smart_overall=facts.overall,
        temperature=facts.temperature, power_on_hours=facts.power_on_hours,
        selftests=tuple(facts.selftests), firmware=dev.firmware,
    ), facts


_DETECTED = re.compile(r"Device of type '[^']+' .*(detected|opened)")


def detect_type(path: str, smartctl: str | None = None) -> bool:
    """Whether smartctl finds a device type for ``path`` (``smartctl -d test``, the question
    pySMART asks first).  A loop device, a virtual disk or a bridge smartctl does not know has
    none, so it has no SMART to read, and pySMART (a tenth of a second to import) need not be
    loaded to learn that.  Raises SmartUnavailable (no smartctl) or SmartctlFailed (smartctl
    itself broken, judged as ``check`` judges it)."""
    import subprocess
    binary = find_smartctl(smartctl)
    if binary is None:
        raise SmartUnavailable("smartctl not found")
    binary = os.path.abspath(binary)
    try:
        run = subprocess.run([binary, "-d", "test", os.path.abspath(path)],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SmartctlFailed(binary, f"smartctl at {binary} failed: {e}") from e
    out = run.stdout.decode("utf-8", "replace").splitlines()
    trouble = _smartctl_trouble(binary, out, run.returncode)
    if trouble:
        raise SmartctlFailed(binary, trouble)
    return any(_DETECTED.search(line) for line in out)


def precheck(path: str, smartctl: str | None = None) -> HealthReport | None:
    """The health of an imaging source, or None when it cannot be had (no SMART, no smartctl,
    a regular file).  Never raises for those; meant for a one-line verdict before imaging."""
    try:
        if not os.path.exists(path) or not _is_block_or_char(path):
            return None
        if not detect_type(path, smartctl):
            log.debug("no health check for %s: smartctl finds no device type", path)
            return None
        report = check(path, smartctl)
    except SmartctlFailed as e:  # worth a line, but no reason to refuse imaging
        log.warning("warning: no health check of %s before imaging: %s", path, e)
        return None
    except (SmartUnavailable, UsageError) as e:
        log.debug("no health check for %s: %s", path, e)
        return None
    except Exception as e:  # pySMART parsing surprises must never stop an imaging run
        log.warning("health check of %s failed: %s", path, e)
        return None
    return None if report.verdict == UNKNOWN else report


def _is_block_or_char(path: str) -> bool:
    import stat
    mode = os.stat(path).st_mode
    return stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


def require_smart(dev, sm, path: str) -> None:
    """Refuse a device without SMART (what a self-test needs)."""
    if not read_facts(dev, sm.last_all).smart_available:
        raise SmartUnavailable(f"{path}: no SMART on this device (cannot run self-tests)")


def in_standby(path: str, smartctl: str | None = None, interface: str | None = None) -> bool:
    """Whether the disk is spun down (``smartctl -n standby -i``: exit 2 and "STANDBY"), asked
    without waking it, as smartd's ``-n standby`` does.  False when it cannot tell."""
    import subprocess
    binary = find_smartctl(smartctl)
    if binary is None:
        return False
    argv = [binary] + (["-d", interface] if interface else []) + ["-n", "standby", "-i",
                                                                  os.path.abspath(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("%s: standby check failed: %s", path, e)
        return False
    return proc.returncode == 2 and "STANDBY" in proc.stdout.upper()
