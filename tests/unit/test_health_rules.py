"""The health rules and raw-value decoding, as pure functions."""
from __future__ import annotations

import pytest

from diskimg.health.rules import (FAIL, INFO, PASS, UNKNOWN, WARN, SelfTest, SmartAttr, SmartFacts,
                            decode_counter, decode_temperature, evaluate)


@pytest.mark.parametrize("raw,expected", [
    ("36 (Min/Max 0/48)", 36), ("34 (0 15 0 0 0)", 34), ("41", 41), ("3145764", 36), ("", None),
])
def test_decode_temperature(raw, expected):
    assert decode_temperature(raw) == expected


@pytest.mark.parametrize("raw,count,noted", [
    ("0", 0, False), ("1303", 1303, False),
    ("0 1 1", 1, True),             # Seagate 188 raw16: >7.5 s, >5 s, all
    ("0 0 0", 0, False),
    ("65536", 0, True),             # HGST 10: packed, low word 0
    ("8647409707", None, True),     # above 2^32: not a count
    ("15380 (242 180 0)", 15380, False),
])
def test_decode_counter(raw, count, noted):
    c, note = decode_counter(raw)
    assert c == count
    assert bool(note) == noted


def _ata(*attrs, tests=(), overall="PASSED"):
    f = SmartFacts(kind="ata", smart_available=True, overall=overall)
    for a in attrs:
        f.attributes[a.id] = a
    f.selftests = list(tests)
    return f


def _attr(i, name, raw="0", when="-", value=100, worst=100, thresh=0):
    return SmartAttr(i, name, value, worst, thresh, when, raw)


def _verdict(f):
    verdict, reasons = evaluate(f)
    return verdict, {r.what: r for r in reasons}


def test_clean_drive_passes():
    assert _verdict(_ata(_attr(5, "Reallocated_Sector_Ct"), _attr(197, "Current_Pending_Sector")))[0] == PASS


def test_no_smart_is_unknown():
    assert evaluate(SmartFacts())[0] == UNKNOWN
    assert evaluate(SmartFacts(smart_available=True, smart_enabled=False))[0] == UNKNOWN


@pytest.mark.parametrize("attr,verdict", [
    (5, WARN), (187, WARN), (188, WARN), (197, FAIL), (198, FAIL), (199, WARN), (10, WARN),
])
def test_backblaze_counters(attr, verdict):
    v, reasons = _verdict(_ata(_attr(attr, f"attr{attr}", raw="3")))
    assert v == verdict
    assert reasons[f"{attr} attr{attr}"].value == "3"


def test_crc_errors_blame_the_cable():
    _, reasons = _verdict(_ata(_attr(199, "UDMA_CRC_Error_Count", raw="12")))
    assert "cable" in reasons["199 UDMA_CRC_Error_Count"].why


def test_failing_now_and_in_the_past():
    assert _verdict(_ata(_attr(22, "Helium_Level", "1", "FAILING_NOW", 1, 1, 25)))[0] == FAIL
    assert _verdict(_ata(_attr(1, "Raw_Read_Error_Rate", "0", "In_the_past", 100, 1, 50)))[0] == WARN


def test_drive_failed_overall():
    v, reasons = _verdict(_ata(overall="FAILED"))
    assert v == FAIL and reasons["overall assessment"].value == "FAILED"


def _st(num, kind, status):
    return SelfTest(num, kind, status, "00%", "100", "-")


def test_failed_selftest_fails():
    v, _ = _verdict(_ata(tests=[_st(1, "Short offline", "Completed without error"),
                                _st(2, "Short offline", "Completed: read failure")]))
    assert v == FAIL     # a newer *short* test does not outdate it


def test_failed_selftest_outdated_by_newer_extended():
    v, reasons = _verdict(_ata(tests=[_st(1, "Extended offline", "Completed without error"),
                                      _st(2, "Short offline", "Completed: read failure")]))
    assert v == PASS
    assert reasons["self-test log"].severity == INFO


def test_interrupted_selftests_are_not_failures():
    v, _ = _verdict(_ata(tests=[_st(1, "Extended offline", "Interrupted (host reset)"),
                                _st(2, "Extended offline", "Aborted by host")]))
    assert v == PASS


def _nvme(**kw):
    n = dict(critical_warning=0, available_spare=100, available_spare_threshold=10,
             percentage_used=1, media_errors=0, error_log_entries=0, power_on_hours=10,
             data_units_read=10)
    n.update(kw)
    return SmartFacts(kind="nvme", smart_available=True, overall="PASSED", nvme=n)


@pytest.mark.parametrize("kw,verdict", [
    ({}, PASS),
    ({"critical_warning": 0x02}, WARN),
    ({"critical_warning": 0x04}, FAIL),
    ({"critical_warning": 0x08}, FAIL),
    ({"available_spare": 5}, FAIL),
    ({"media_errors": 3}, WARN),
    ({"media_errors": 1 << 32}, PASS),          # firmware quirk (E33)
    ({"percentage_used": 120}, WARN),
    ({"error_log_entries": 10**7}, PASS),       # noisy, never a verdict by itself (E34)
    ({"available_spare": 0, "power_on_hours": 0, "data_units_read": 0}, PASS),  # unpopulated (E30)
])
def test_nvme_rules(kw, verdict):
    assert evaluate(_nvme(**kw))[0] == verdict


def test_scsi_rules():
    f = SmartFacts(kind="scsi", smart_available=True, overall="PASSED", scsi_grown_defects=56)
    assert evaluate(f)[0] == WARN
    f = SmartFacts(kind="scsi", smart_available=True, overall="PASSED",
                   scsi_uncorrected={"read": 2, "write": 0})
    v, reasons = _verdict(f)
    assert v == WARN and "uncorrected read errors" in reasons
    f = SmartFacts(kind="scsi", smart_available=True, overall="FAILED")
    assert evaluate(f)[0] == FAIL
