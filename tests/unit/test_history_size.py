"""The health history's size (issue 17: "a year of hourly readings of one disk measured at
about 5 MB"): 8760 readings stored as `monitor` stores them, with the values and reasons of a
real drive's reading (E13's attribute table, decoded by the rules), temperatures moving and
the reallocated count growing three times in the year.  scripts/bench_history.py measures the
same through the whole `monitor.observe` path (README, "Health history")."""
from __future__ import annotations

from diskimg.health.history import History
from diskimg.health.rules import FAIL, INFO, WARN, Reason

HOUR = 3600.0
MiB = 1 << 20


def test_a_year_of_hourly_readings_fits_in_a_few_mib(tmp_path):
    db = tmp_path / "health.db"
    with History(str(db)) as hist:
        hist.db.execute("PRAGMA synchronous = OFF")      # the size is the point, not fsyncs
        hist.db.execute("PRAGMA journal_mode = MEMORY")
        drive = hist.add_drive("/dev/sda", "HGST HUS724020ALA640", "PN1234P8JG4ABC", "sat", 0.0)
        count = 54
        for h in range(8760):
            count = {2000: 55, 5000: 57, 8000: 60}.get(h, count)
            values = {"5": count, "10": 0, "196": 65, "197": 0, "198": 0, "199": 0}
            reasons = [
                Reason("5 Reallocated_Sector_Ct", str(count), WARN,
                       "sectors already remapped to spares; Backblaze finds any non-zero count "
                       "strongly correlated with drive failure"),
                Reason("196 Reallocated_Event_Count", "65", WARN,
                       "reallocation events: the drive has been remapping sectors"),
                Reason("5 Reallocated_Sector_Ct", f"{count}, unchanged since 2026-01-01", INFO,
                       "an old count that does not grow: the one-reading rule decides")]
            if h % 24 == 0 and h in range(2000, 2200):
                reasons.append(Reason("5 Reallocated_Sector_Ct", f"{count}: +1 in 7 days", FAIL,
                                      "the count is growing"))
            hist.add_reading(drive, h * HOUR, WARN, 38 + (h % 24) * 7 // 23, 60013 + h, None,
                             values, reasons)
        assert hist.count_readings() == 8760
        assert len(hist.readings(drive.id, since=8000 * HOUR)) == 760
    size = db.stat().st_size
    print(f"a year of hourly readings: {size} bytes ({size / MiB:.2f} MiB, "
          f"{size / 8760:.0f} bytes a reading)")
    assert size < 5 * MiB
