"""The health rules: what SMART facts mean, as pure functions over plain data.

``evaluate(facts)`` turns ``SmartFacts`` into a verdict (PASS, WARN, FAIL, UNKNOWN) and the
reasons behind it; the decoders read packed ATA raw values.  Nothing here runs smartctl or
imports pySMART: the rules are tested on hand-made facts (tests/unit/test_health_rules.py) and
on replayed recordings, and they will serve health history the same way.  docs/HEALTH.md gives
each rule with its evidence.  The drive's own opinion ("PASSED") is one input among several:
drives often pass while failing self-tests and growing pending sectors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

PASS, WARN, FAIL, UNKNOWN = "PASS", "WARN", "FAIL", "UNKNOWN"
INFO = "INFO"                      # a reason that explains a value but does not change the verdict
_RANK = {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}

__all__ = [
    "FAIL", "HealthReport", "INFO", "PASS", "Reason", "SelfTest", "SmartAttr", "SmartFacts",
    "UNKNOWN", "WARN", "decode_counter", "decode_hours", "decode_temperature", "evaluate",
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
    """One entry of the drive's self-test log (newest first: #1 is the newest)."""

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
    # the drive's own temperature limits (NVMe warning/critical composite thresholds, SCSI trip
    # temperature, ATA 190's threshold read as 100 - limit), for health history
    temperature_warning: int | None = None
    temperature_critical: int | None = None
    selftest_remaining: int | None = None      # percent left of a self-test running now


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


def decode_hours(raw: str) -> int | None:
    """Power-on hours from an ATA raw value (``12345`` or ``12345 (173 53 0)``)."""
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
