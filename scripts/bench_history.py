#!/usr/bin/env python3
"""Health history at the scale of a year: the database size of a year of hourly readings of one
disk, and what one `monitor` reading costs once that year is stored (issue 17).

One real reading (fixtures/smart/E13, an HGST Ultrastar with 54 reallocated sectors, through the
fake smartctl and the real pySMART/diskimg parsing) is replayed 8760 times through
`health.monitor.observe`, one simulated hour apart: power-on hours count up, the temperature
follows a daily cycle of 38-45 C, and the reallocated count grows three times in the year, so the
stored reasons change as they would.  Everything observe does is done (identity, 30 days of
history loaded, trends judged, reading stored); only smartctl is not run again.

Usage: scripts/bench_history.py [--hours N] [--db PATH] [--json FILE]
(or scripts/bench --health-history)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=int, default=8760)
    ap.add_argument("--db", help="database to create (default: a temporary file)")
    ap.add_argument("--json", metavar="FILE", help="save the results as JSON")
    args = ap.parse_args()

    from diskimg.health import monitor, smart
    from diskimg.health.history import History
    from smart_history import edit_ata

    tmp = Path(tempfile.mkdtemp(prefix="bench-history-"))
    fake = tmp / "smart"
    fake.mkdir()
    src = REPO / "fixtures" / "smart" / "E13"
    for p in src.iterdir():
        if p.name.startswith("_"):
            (fake / p.name).write_text(p.read_text())
    node = tmp / "sda"
    node.touch()
    os.environ.update(FAKE_SMARTCTL_DIR=str(fake), FAKE_SMARTCTL_MAP=f"{node}=/dev/sda")
    os.environ.pop("FAKE_SMARTCTL_STATE", None)
    smartctl = str(REPO / "tests" / "fake_smartctl.py")
    readings = {}
    for count in (54, 55, 57, 60):
        answer = fake / "_-d_sat_--all__dev_sda"
        answer.write_text(edit_ata((src / answer.name).read_text(), raw={5: count}))
        t = time.perf_counter()
        readings[count] = smart.read(str(node), smartctl)
        read_s = time.perf_counter() - t

    db = Path(args.db) if args.db else tmp / "health.db"
    if db.exists():
        db.unlink()
    t0 = 1_767_225_600.0           # 2026-01-01 00:00 UTC
    growth = {2000: 55, 5000: 57, 8000: 60}
    count = 54
    times = []
    with History(str(db)) as hist:
        start = time.perf_counter()
        for h in range(args.hours):
            count = growth.get(h, count)
            report, facts = readings[count]
            temp = 38 + (h % 24) * 7 // 23
            facts = dataclasses.replace(facts, temperature=temp, power_on_hours=60013 + h)
            report = dataclasses.replace(report, temperature=temp, power_on_hours=60013 + h)
            t = time.perf_counter()
            monitor.observe(hist, str(node), t0 + h * 3600, reader=lambda *_: (report, facts))
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - start
        n = hist.count_readings()
        sets = hist.db.execute("SELECT count(*) FROM reasonsets").fetchone()[0]
        attrs = hist.db.execute("SELECT count(*) FROM attrs").fetchone()[0]
    size = db.stat().st_size
    result = {
        "hours": args.hours, "readings": n, "attr_rows": attrs, "distinct_reason_sets": sets,
        "db_bytes": size, "db_mib": round(size / 2 ** 20, 2),
        "bytes_per_reading": round(size / n, 1),
        "observe_ms_median_first_day": round(statistics.median(times[:24]) * 1000, 2),
        "observe_ms_median_last_day": round(statistics.median(times[-24:]) * 1000, 2),
        "observe_ms_max": round(max(times) * 1000, 2),
        "total_s": round(total, 1),
        "smartctl_read_s_one": round(read_s, 3),
    }
    for k, v in result.items():
        print(f"{k:32} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
