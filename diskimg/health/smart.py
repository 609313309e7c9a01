"""Disk health from SMART: a verdict (PASS, WARN, FAIL, UNKNOWN) with the reasons behind it, and
self-tests.

Reading goes through pySMART (imported only here), which runs smartctl and parses its
``--all`` output.  pySMART 1.4.3 is used for what it parses well (interface detection, ATA
attribute rows, NVMe health log, self-test logs) and the smartctl text it was given is kept
(``_RecordingSmartctl``) so the facts pySMART gets wrong are read from the text instead: the
model (pySMART lets an "Add. Product Id" line overwrite it), packed raw values (its ``raw_int``
takes the first integer), SCSI defect and error counters, and smartctl's "outdated by newer
successful extended self-test" note.

The rules live in ``evaluate(facts)``, a pure function over ``SmartFacts``, so they are tested
without smartctl; docs/HEALTH.md gives each rule with its evidence.  The drive's own opinion
("PASSED") is one input among several: drives often pass while failing self-tests and growing
pending sectors.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from diskimg.errors import SmartctlFailed, SmartUnavailable, UsageError

log = logging.getLogger(__name__)

PASS, WARN, FAIL, UNKNOWN = "PASS", "WARN", "FAIL", "UNKNOWN"
INFO = "INFO"                      # a reason that explains a value but does not change the verdict
_RANK = {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}
SELFTEST_TYPES = ("short", "long", "conveyance")

__all__ = [
    "FAIL", "HealthReport", "INFO", "PASS", "Reason", "SelfTest", "SelfTestResult", "SmartFacts",
    "UNKNOWN", "WARN", "abort_selftest", "check", "decode_counter", "decode_temperature",
    "evaluate", "find_smartctl", "precheck", "start_selftest", "wait_selftest",
]


# --------------------------------------------------------------------------------------------
# results

@dataclass(frozen=True)
class Reason:
    what: str          # the attribute or log entry: "5 Reallocated_Sector_Ct", "self-test #2"
    value: str         # what it shows, as printed by smartctl (decoded where packed)
    severity: str      # FAIL, WARN or INFO
    why: str           # why it matters


@dataclass(frozen=True)
class SelfTest:
    num: int | None
    type: str
    status: str
    remaining: str | None
    hours: str | None
    lba: str | None

    @property
    def failed(self) -> bool:
        s = self.status.lower()
        return ("fail" in s or "fatal" in s) and "without error" not in s

    @property
    def extended(self) -> bool:
        t = self.type.lower()
        return "extended" in t or "long" in t


@dataclass(frozen=True)
class HealthReport:
    device: str
    model: str | None
    serial: str | None
    interface: str | None
    verdict: str
    reasons: tuple[Reason, ...]
    smart_overall: str | None          # what the drive says: "PASSED", "FAILED" or None
    temperature: int | None
    power_on_hours: int | None
    selftests: tuple[SelfTest, ...]
    firmware: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = [asdict(r) for r in self.reasons]
        d["selftests"] = [dict(asdict(t), failed=t.failed) for t in self.selftests]
        return d


@dataclass
class SmartAttr:
    id: int
    name: str
    value: int | None
    worst: int | None
    thresh: int | None
    when_failed: str            # "-", "FAILING_NOW", "In_the_past"
    raw: str


@dataclass
class SmartFacts:
    """What the rules look at, independent of how it was read."""

    kind: str | None = None                     # "ata", "nvme", "scsi"
    smart_available: bool = False
    smart_enabled: bool = True
    overall: str | None = None                  # PASSED / FAILED / None
    model: str | None = None
    vendor: str | None = None
    attributes: dict[int, SmartAttr] = field(default_factory=dict)
    selftests: list[SelfTest] = field(default_factory=list)
    outdated_note: str | None = None
    ata_error_count: int | None = None
    nvme: dict[str, int | None] = field(default_factory=dict)
    scsi_grown_defects: int | None = None
    scsi_uncorrected: dict[str, int] = field(default_factory=dict)
    scsi_endurance_used: int | None = None
    temperature: int | None = None
    power_on_hours: int | None = None


# --------------------------------------------------------------------------------------------
# raw value decoding

_INT = re.compile(r"\d+")


def decode_temperature(raw: str) -> int | None:
    """Degrees Celsius from an ATA temperature raw value.

    smartctl prints ``36 (Min/Max 0/48)`` or ``34 (0 15 0 0 0)``: the current temperature is the
    first number.  An undecoded raw48 (``3145764``) packs min/max in the upper bytes: the current
    temperature is the lowest byte.
    """
    m = _INT.search(raw or "")
    if not m:
        return None
    t = int(m.group())
    return t & 0xFF if t > 255 else t


def decode_counter(raw: str) -> tuple[int | None, str | None]:
    """(count, note) for an ATA counting attribute's raw value.

    * ``0 1 1``: smartctl's raw16 layout (three 16-bit words, most significant first; Seagate 188
      command timeouts: >7.5 s, >5 s, all): the count is the lowest word.
    * ``15380 (242 180 0)``: the first number is the count.
    * ``65536``: a 48-bit value whose lowest word is zero is packed, the count is 0 (HGST 10).
    * above 2^32: no drive counts that many events; it is a vendor-packed value that smartctl's
      database did not decode, and it is not used as a count (HGST 187/188 ``8647409707``).
    """
    raw = (raw or "").strip()
    if re.fullmatch(r"\d+ \d+ \d+", raw):
        words = [int(x) for x in raw.split()]
        note = f"packed 16-bit counters {words}: the count is the last, {words[-1]}"
        return words[-1], note if any(words) else None
    m = _INT.match(raw)
    if not m:
        return None, None
    n = int(m.group())
    if n > 0xFFFFFFFF:
        words = [(n >> 32) & 0xFFFF, (n >> 16) & 0xFFFF, n & 0xFFFF]
        return None, f"packed vendor-specific raw value (16-bit words {words}), not a count"
    if n > 0xFFFF and n & 0xFFFF == 0:
        return 0, f"packed raw value {n} = {n >> 16} << 16: the count (lowest word) is 0"
    return n, None


def _hours(raw: str) -> int | None:
    m = _INT.match((raw or "").strip())
    return int(m.group()) if m else None


# --------------------------------------------------------------------------------------------
# rules

# attribute id -> (severity when the decoded count is above zero, why)
_COUNTERS: dict[int, tuple[str, str]] = {
    5: (WARN, "sectors already remapped to spares; Backblaze finds any non-zero count "
              "strongly correlated with drive failure"),
    10: (WARN, "the spindle needed retries to spin up: a mechanical problem"),
    184: (WARN, "data corrupted on the drive's internal data path (cache/buffer parity)"),
    187: (WARN, "reads the drive could not correct and reported to the host; Backblaze "
                "correlates any non-zero count with failure"),
    188: (WARN, "commands that timed out; Backblaze correlates any non-zero count with failure"),
    196: (WARN, "reallocation events: the drive has been remapping sectors"),
    197: (FAIL, "sectors that cannot be read now and wait to be remapped: reading this disk "
                "will hit them; Backblaze correlates any non-zero count with failure"),
    198: (FAIL, "sectors found unreadable by the offline scan; Backblaze correlates any "
                "non-zero count with failure"),
    199: (WARN, "CRC errors on the SATA link: a cable, backplane or connector problem, not the "
                "disk's media; reseat or replace the cable"),
}

_NVME_CRIT = [
    (0x01, FAIL, "available spare below threshold"),
    (0x02, WARN, "temperature above or below its threshold"),
    (0x04, FAIL, "NVM subsystem reliability degraded (media or internal errors)"),
    (0x08, FAIL, "media placed in read-only mode"),
    (0x10, FAIL, "volatile memory backup device failed"),
    (0x20, FAIL, "persistent memory region read-only or unreliable"),
]


def evaluate(f: SmartFacts) -> tuple[str, list[Reason]]:
    """The verdict and its reasons for what SMART shows.  Pure; see docs/HEALTH.md."""
    reasons: list[Reason] = []
    add = reasons.append
    if not f.smart_available:
        return UNKNOWN, [Reason("SMART", "unavailable", INFO,
                                "the device has no SMART (virtual, loop or RAID volume, or a "
                                "bridge that does not pass it through)")]
    if not f.smart_enabled:
        return UNKNOWN, [Reason("SMART", "disabled", INFO,
                                "SMART is supported but disabled; enable it with smartctl -s on")]
    if f.overall == "FAILED":
        add(Reason("overall assessment", "FAILED", FAIL,
                   "the drive itself says it has failed or will fail soon"))

    for a in sorted(f.attributes.values(), key=lambda a: a.id):
        what = f"{a.id} {a.name}"
        if a.when_failed == "FAILING_NOW":
            add(Reason(what, f"value {a.value} <= threshold {a.thresh} (raw {a.raw})", FAIL,
                       "attribute at or below its failure threshold now: the drive's own "
                       "criterion for imminent failure"))
        elif a.when_failed == "In_the_past":
            add(Reason(what, f"worst {a.worst} <= threshold {a.thresh}", WARN,
                       "attribute was below its failure threshold in the past"))
        if a.id in _COUNTERS:
            count, note = decode_counter(a.raw)
            severity, why = _COUNTERS[a.id]
            if count:
                add(Reason(what, a.raw if not note else f"{a.raw} ({note})", severity, why))
            elif note:
                add(Reason(what, a.raw, INFO, note + "; not used for the verdict"))

    failed = [t for t in f.selftests if t.failed]
    if failed:
        newest_ok_extended = min((t.num for t in f.selftests
                                  if t.extended and not t.failed and t.num is not None
                                  and t.status.lower().startswith("completed")), default=None)
        current = [t for t in failed if newest_ok_extended is None or t.num is None
                   or t.num < newest_ok_extended]
        if current:
            t = current[0]
            more = f" (and {len(current) - 1} more failed)" if len(current) > 1 else ""
            add(Reason(f"self-test #{t.num}", f"{t.type}: {t.status}"
                       + (f" at LBA {t.lba}" if t.lba and t.lba != "-" else "")
                       + (f", at {t.hours} h" if t.hours else "") + more, FAIL,
                       "a failed self-test not outdated by a newer successful extended test: "
                       "the drive found sectors or parts it cannot read"))
        outdated = len(failed) - len(current)
        if outdated:
            add(Reason("self-test log", f"{outdated} failed self-test(s) outdated", INFO,
                       f"a newer extended self-test (#{newest_ok_extended}) completed without "
                       "error"))

    if f.ata_error_count:
        add(Reason("ATA error log", f"{f.ata_error_count} errors", INFO,
                   "the drive logged command errors; see the attributes for their cause"))

    n = f.nvme
    if n:
        crit = n.get("critical_warning") or 0
        for bit, severity, why in _NVME_CRIT:
            if crit & bit:
                add(Reason("NVMe critical warning", f"0x{crit:02x} (bit 0x{bit:02x})", severity,
                           why))
        spare, thresh = n.get("available_spare"), n.get("available_spare_threshold")
        unpopulated = not n.get("power_on_hours") and not n.get("data_units_read")
        if spare is not None and thresh is not None:
            if spare < thresh and not crit & 0x01 and unpopulated:
                add(Reason("available spare", f"{spare}% (threshold {thresh}%)", INFO,
                           "the health log looks unpopulated (0 power-on hours, 0 data units) "
                           "and the drive raises no spare warning: value not trusted"))
            elif spare < thresh:
                add(Reason("available spare", f"{spare}% < threshold {thresh}%", FAIL,
                           "the drive has run out of spare blocks to replace worn ones"))
            elif spare < 100:
                add(Reason("available spare", f"{spare}% (threshold {thresh}%)", INFO,
                           "spare blocks have been used"))
        media = n.get("media_errors")
        if media:
            if media >= 1 << 32 and media % (1 << 32) == 0:
                add(Reason("media and data integrity errors", str(media), INFO,
                           "exactly a multiple of 2^32: a known firmware counter quirk, not "
                           "errors (the low 32 bits are 0)"))
            else:
                add(Reason("media and data integrity errors", str(media), WARN,
                           "unrecovered data integrity errors: data the drive could not "
                           "read back"))
        used = n.get("percentage_used")
        if used is not None and used >= 100:
            add(Reason("percentage used", f"{used}%", WARN,
                       "past the rated write endurance; not a failure by itself, but wear-out "
                       "failures become likely"))
        entries = n.get("error_log_entries")
        if entries:
            add(Reason("error information log entries", str(entries), INFO,
                       "counts every command error the host saw, most harmless; not a health "
                       "signal by itself"))

    if f.scsi_grown_defects:
        add(Reason("grown defect list", str(f.scsi_grown_defects), WARN,
                   "blocks reassigned since manufacture: the SCSI counterpart of ATA "
                   "attribute 5"))
    for op, count in f.scsi_uncorrected.items():
        if count:
            add(Reason(f"uncorrected {op} errors", str(count), WARN,
                       "errors the drive could not correct: data was lost or unreadable"))
    if f.scsi_endurance_used is not None and f.scsi_endurance_used >= 100:
        add(Reason("percentage used endurance", f"{f.scsi_endurance_used}%", WARN,
                   "past the rated write endurance"))

    if f.temperature is not None and f.temperature >= 60:
        add(Reason("temperature", f"{f.temperature} C", WARN,
                   "above 60 C drives age fast and error rates rise; check cooling"))

    worst = max((_RANK[r.severity] for r in reasons), default=0)
    verdict = {0: PASS, 1: WARN, 2: FAIL}[worst]
    return verdict, reasons


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


def _open(path: str, smartctl: str | None, interface: str | None):
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


def _facts(dev, lines: list[str]) -> SmartFacts:
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
            f.power_on_hours = _hours(f.attributes[9].raw)
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
    for t in dev.tests or []:
        f.selftests.append(SelfTest(
            num=_maybe_int(t.num), type=str(t.type or "").strip(), status=str(t.status or "").strip(),
            remaining=_str(getattr(t, "remain", None)), hours=_str(t.hours), lba=_str(t.LBA)))
    return f


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
    dev, sm = _open(path, smartctl, interface)
    facts = _facts(dev, sm.last_all)
    verdict, reasons = evaluate(facts)
    model = facts.model or dev.model
    if facts.vendor and model and not model.startswith(facts.vendor):
        model = f"{facts.vendor} {model}"
    return HealthReport(
        device=path, model=model, serial=dev.serial or None, interface=dev.interface,
        verdict=verdict, reasons=tuple(reasons), smart_overall=facts.overall,
        temperature=facts.temperature, power_on_hours=facts.power_on_hours,
        selftests=tuple(facts.selftests), firmware=dev.firmware,
    )


def precheck(path: str, smartctl: str | None = None) -> HealthReport | None:
    """The health of an imaging source, or None when it cannot be had (no SMART, no smartctl,
    a regular file).  Never raises for those; meant for a one-line verdict before imaging."""
    try:
        if not os.path.exists(path) or not _is_block_or_char(path):
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


# --------------------------------------------------------------------------------------------
# self-tests

@dataclass(frozen=True)
class SelfTestResult:
    device: str
    started: bool
    message: str
    running: bool = False
    progress: int | None = None            # percent done, when running
    result: SelfTest | None = None         # the log entry of the finished test


def _require_smart(dev, sm, path: str) -> None:
    if not _facts(dev, sm.last_all).smart_available:
        raise SmartUnavailable(f"{path}: no SMART on this device (cannot run self-tests)")


def start_selftest(path: str, test_type: str = "short", smartctl: str | None = None,
                   interface: str | None = None):
    """Start a self-test.  Returns (SelfTestResult, handle); pass the handle to wait_selftest."""
    if test_type not in SELFTEST_TYPES:
        raise UsageError(f"unknown self-test type {test_type!r}: use one of "
                         + ", ".join(SELFTEST_TYPES))
    dev, sm = _open(path, smartctl, interface)
    _require_smart(dev, sm, path)
    rc, message, eta = dev.run_selftest(test_type)
    log.debug("run_selftest(%s) -> %s %s %s", test_type, rc, message, eta)
    if rc == 1:
        return SelfTestResult(path, False, "a self-test is already running", True,
                              dev._test_progress), dev
    if rc != 0:
        raise SmartUnavailable(f"{path}: {message.strip()}")
    text = f"{test_type} self-test started" + (f", expected to complete {eta}" if eta else "")
    return SelfTestResult(path, True, text, True, 0), dev


def wait_selftest(handle, progress: Callable[[int], None] | None = None,
                  poll: float = 10.0, timeout: float | None = None) -> SelfTestResult:
    """Poll a started self-test until it finishes; ``progress(percent_done)`` on each poll."""
    dev = handle
    path = dev.dev_reference
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rc, entry, pct = dev.get_selftest_result()
        if rc == 1:
            if progress is not None and pct is not None:
                progress(int(pct))
            if deadline is not None and time.monotonic() > deadline:
                return SelfTestResult(path, True, "still running", True, pct)
            time.sleep(poll)
            continue
        if progress is not None:
            progress(100)
        if rc in (0, 3):
            t = SelfTest(_maybe_int(entry.num), str(entry.type).strip(), str(entry.status).strip(),
                         _str(getattr(entry, "remain", None)), _str(entry.hours), _str(entry.LBA))
            return SelfTestResult(path, True, t.status, False, 100, t)
        # rc 2: no new log entry (two identical tests in one hour); the newest one is the result
        newest = dev.tests[0] if dev.tests else None
        t = None if newest is None else SelfTest(
            _maybe_int(newest.num), str(newest.type).strip(), str(newest.status).strip(),
            _str(getattr(newest, "remain", None)), _str(newest.hours), _str(newest.LBA))
        return SelfTestResult(path, True, t.status if t else "finished", False, 100, t)


def abort_selftest(path: str, smartctl: str | None = None,
                   interface: str | None = None) -> SelfTestResult:
    """Stop a running self-test (smartctl -X)."""
    dev, sm = _open(path, smartctl, interface)
    _require_smart(dev, sm, path)
    rc = dev.abort_selftest()
    if rc not in (0, None):
        raise SmartUnavailable(f"{path}: smartctl -X failed with status {rc}")
    return SelfTestResult(path, False, "self-test aborted")
