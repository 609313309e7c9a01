"""Health history: every SMART reading of every drive, kept in one SQLite file.

``History(path)`` opens (and creates) the database; ``monitor.observe`` writes a reading and
``trends`` judges the readings.  The stdlib ``sqlite3`` is enough: one writer (a monitor run or a
timer), a few readers (``health --history``, ``report``), a few thousand rows a month per disk.
No server (Scrutiny needs InfluxDB for the same job).

Identity: a *drive* is what sat behind a device name between two changes of serial number or
power-on hours going backwards (a disk swapped into the same bay keeps the name /dev/sda); its
readings are what trends compare.  Recorded outputs with anonymised serials ("--") rely on the
power-on hours alone.

Size: a reading is one ``readings`` row, the tracked numbers of ``KEY_VALUES`` (only those the
drive reports) as ``attrs`` rows, and its reasons as a reference to a deduplicated
``reasonsets`` row (a healthy drive says the same thing every hour).  A year of hourly readings
of one disk is measured in tests/unit/test_history_size.py (README, "Health history").

Times are Unix seconds (float), given by the caller: the clock is a parameter of every function
here, never read from the system, so tests replay simulated days.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from diskimg.errors import HistoryError, PermissionDenied, is_permission_error
from diskimg.health.rules import Reason, SelfTest

log = logging.getLogger(__name__)

DEFAULT_DB = "/var/lib/diskimg/health.db"
SCHEMA_VERSION = 1

__all__ = ["DEFAULT_DB", "Drive", "History", "Reading", "SCHEMA_VERSION", "StoredSelfTest",
           "known_serial"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS drives (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,           -- the name it was read through: /dev/sda, /dev/bus/0 ...
    model TEXT, serial TEXT, interface TEXT,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    follows INTEGER REFERENCES drives(id),   -- the drive it replaced behind the same name
    why TEXT                        -- why it is a new drive (serial changed, hours went back)
);
CREATE INDEX IF NOT EXISTS drives_device ON drives(device, id);
CREATE TABLE IF NOT EXISTS reasonsets (id INTEGER PRIMARY KEY, digest BLOB UNIQUE NOT NULL,
                                       reasons TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    drive INTEGER NOT NULL REFERENCES drives(id),
    taken REAL NOT NULL,
    verdict TEXT NOT NULL,          -- PASS WARN FAIL UNKNOWN, trends included
    temperature INTEGER, power_on_hours INTEGER, wear INTEGER,
    reasons INTEGER REFERENCES reasonsets(id)
);
CREATE INDEX IF NOT EXISTS readings_drive_taken ON readings(drive, taken);
CREATE TABLE IF NOT EXISTS attrs (
    reading INTEGER NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (reading, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selftests (
    drive INTEGER NOT NULL, hours TEXT NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL,
    lba TEXT, failed INTEGER NOT NULL, first_seen REAL NOT NULL,
    PRIMARY KEY (drive, hours, type, status)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acks (
    drive INTEGER NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL, taken REAL NOT NULL,
    PRIMARY KEY (drive, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, drive INTEGER NOT NULL, taken REAL NOT NULL,
    previous TEXT, verdict TEXT NOT NULL, how TEXT NOT NULL, outcome TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scheduled (
    drive INTEGER NOT NULL, slot TEXT NOT NULL, type TEXT NOT NULL, taken REAL NOT NULL,
    outcome TEXT NOT NULL, PRIMARY KEY (drive, slot)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Drive:
    id: int
    device: str
    model: str | None
    serial: str | None
    interface: str | None
    first_seen: float
    last_seen: float
    follows: int | None = None
    why: str | None = None


@dataclass(frozen=True)
class Reading:
    """One stored reading: the verdict with trends, and the tracked numbers (``values``: key ->
    integer, keys as in ``trends.KEY_VALUES``)."""

    id: int
    drive: int
    taken: float
    verdict: str
    temperature: int | None
    power_on_hours: int | None
    wear: int | None
    values: dict[str, int] = field(default_factory=dict)
    reasons: tuple[Reason, ...] = ()


@dataclass(frozen=True)
class StoredSelfTest:
    drive: int
    hours: str
    type: str
    status: str
    lba: str | None
    failed: bool
    first_seen: float


def known_serial(serial: str | None) -> str | None:
    """None for what is not a serial: empty, or the "--" of anonymised recordings."""
    s = (serial or "").strip()
    return s if s and s.strip("-") else None


class History:
    """The history database at ``path`` (created with its directory when missing).

    Raises HistoryError when the file is not a diskimg history, PermissionDenied when it cannot
    be opened."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                if not os.path.exists(path):
                    raise HistoryError(path, "no health history here (run diskimg monitor "
                                             "first, or give --db PATH)")
                if not os.access(path, os.R_OK):
                    raise PermissionDenied(path, "read the health history")
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                parent = os.path.dirname(os.path.abspath(path))
                os.makedirs(parent, exist_ok=True)
                if not os.access(path if os.path.exists(path) else parent, os.R_OK | os.W_OK):
                    raise PermissionDenied(path, "write the health history")
                self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._check_schema(readonly)
        except sqlite3.OperationalError as e:
            raise HistoryError(path, f"cannot use the health history: {e}") from e
        except sqlite3.DatabaseError as e:
            raise HistoryError(path, f"not a diskimg health history ({e})") from e
        except OSError as e:
            if is_permission_error(e):
                raise PermissionDenied(path, "open the health history") from e
            raise HistoryError(path, f"cannot open the health history: {e.strerror or e}") \
                from e

    def _check_schema(self, readonly: bool) -> None:
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = int(row[0]) if row else None
            if version != SCHEMA_VERSION:
                raise HistoryError(self.path, f"health history schema {version}, this diskimg "
                                              f"reads {SCHEMA_VERSION}")
            return
        if tables:
            raise HistoryError(self.path, "an SQLite database that is not a diskimg health "
                                          "history")
        if readonly:
            raise HistoryError(self.path, "an empty file, not a health history")
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self):
        """A transaction; SQLite errors (disk full, locked) become HistoryError."""
        return _Transaction(self)

    # -- drives --------------------------------------------------------------------------------

    def drives(self, device: str | None = None) -> list[Drive]:
        q = "SELECT * FROM drives" + (" WHERE device = ?" if device else "") + " ORDER BY id"
        return [Drive(*r) for r in self.db.execute(q, (device,) if device else ())]

    def drive(self, drive_id: int) -> Drive:
        return Drive(*self.db.execute("SELECT * FROM drives WHERE id = ?",
                                      (drive_id,)).fetchone())

    def current_drive(self, device: str) -> Drive | None:
        row = self.db.execute("SELECT * FROM drives WHERE device = ? ORDER BY id DESC LIMIT 1",
                              (device,)).fetchone()
        return Drive(*row) if row else None

    def add_drive(self, device: str, model: str | None, serial: str | None,
                  interface: str | None, now: float, follows: int | None = None,
                  why: str | None = None) -> Drive:
        with self._write():
            cur = self.db.execute(
                "INSERT INTO drives (device, model, serial, interface, first_seen, last_seen, "
                "follows, why) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (device, model, known_serial(serial), interface, now, now, follows, why))
        return self.drive(cur.lastrowid)

    # -- readings ------------------------------------------------------------------------------

    def add_reading(self, drive: Drive, now: float, verdict: str, temperature: int | None,
                    power_on_hours: int | None, wear: int | None, values: dict[str, int],
                    reasons: Iterable[Reason], selftests: Iterable[SelfTest] = ()) -> int:
        """Store one reading (and the self-test log entries not seen before); its id."""
        text = json.dumps([[r.what, r.value, r.severity, r.why] for r in reasons],
                          separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).digest()[:16]
        with self._write():
            row = self.db.execute("SELECT id FROM reasonsets WHERE digest = ?",
                                  (digest,)).fetchone()
            rid = row[0] if row else self.db.execute(
                "INSERT INTO reasonsets (digest, reasons) VALUES (?, ?)",
                (digest, text)).lastrowid
            reading = self.db.execute(
                "INSERT INTO readings (drive, taken, verdict, temperature, power_on_hours, "
                "wear, reasons) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (drive.id, now, verdict, temperature, power_on_hours, wear, rid)).lastrowid
            self.db.executemany("INSERT INTO attrs VALUES (?, ?, ?)",
                                [(reading, k, int(v)) for k, v in values.items()])
            self.db.executemany(
                "INSERT OR IGNORE INTO selftests VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(drive.id, t.hours or "", t.type, t.status, t.lba, int(t.failed), now)
                 for t in selftests])
            self.db.execute("UPDATE drives SET last_seen = ? WHERE id = ?", (now, drive.id))
        return reading

    def readings(self, drive: int, since: float | None = None, until: float | None = None,
                 with_reasons: bool = False) -> list[Reading]:
        """The drive's readings, oldest first, ``since <= taken <= until``."""
        q = ("SELECT r.id, r.drive, r.taken, r.verdict, r.temperature, r.power_on_hours, r.wear"
             + (", s.reasons" if with_reasons else "")
             + " FROM readings r" + (" LEFT JOIN reasonsets s ON s.id = r.reasons"
                                     if with_reasons else "")
             + " WHERE r.drive = ? AND r.taken >= ? AND r.taken <= ? ORDER BY r.taken, r.id")
        rows = self.db.execute(q, (drive, since if since is not None else float("-inf"),
                                   until if until is not None else float("inf"))).fetchall()
        values: dict[int, dict[str, int]] = {r[0]: {} for r in rows}
        if rows:
            for rid, key, value in self.db.execute(
                    "SELECT a.reading, a.key, a.value FROM attrs a JOIN readings r "
                    "ON r.id = a.reading WHERE r.drive = ? AND r.taken >= ? AND r.taken <= ?",
                    (drive, rows[0][2], rows[-1][2])):
                if rid in values:
                    values[rid][key] = value
        out = []
        for r in rows:
            reasons = tuple(Reason(*x) for x in json.loads(r[7] or "[]")) if with_reasons \
                else ()
            out.append(Reading(*r[:7], values=values[r[0]], reasons=reasons))
        return out

    def wear_series(self, drive: int, since: float, until: float) -> list[tuple[float, int]]:
        """(time, wear) of the drive's readings that report wear, oldest first."""
        return list(self.db.execute(
            "SELECT taken, wear FROM readings WHERE drive = ? AND taken >= ? AND taken <= ? "
            "AND wear IS NOT NULL ORDER BY taken", (drive, since, until)))

    def last_reading(self, drive: int, with_reasons: bool = False) -> Reading | None:
        row = self.db.execute("SELECT taken FROM readings WHERE drive = ? ORDER BY taken DESC, "
                              "id DESC LIMIT 1", (drive,)).fetchone()
        if row is None:
            return None
        return self.readings(drive, since=row[0], with_reasons=with_reasons)[-1]

    def last_hours(self, drive: int) -> tuple[int, float] | None:
        """(power-on hours, time) of the drive's newest reading that had them."""
        row = self.db.execute(
            "SELECT power_on_hours, taken FROM readings WHERE drive = ? AND power_on_hours IS "
            "NOT NULL ORDER BY taken DESC, id DESC LIMIT 1", (drive,)).fetchone()
        return (row[0], row[1]) if row else None

    def last_verdict(self, device: str) -> tuple[str, float] | None:
        """The verdict of the newest reading through ``device`` (any drive behind it)."""
        row = self.db.execute(
            "SELECT r.verdict, r.taken FROM readings r JOIN drives d ON d.id = r.drive "
            "WHERE d.device = ? ORDER BY r.taken DESC, r.id DESC LIMIT 1", (device,)).fetchone()
        return (row[0], row[1]) if row else None

    def count_readings(self) -> int:
        return self.db.execute("SELECT count(*) FROM readings").fetchone()[0]

    # -- self-tests, acknowledgements, alerts, schedules ----------------------------------------

    def selftests(self, drive: int) -> list[StoredSelfTest]:
        rows = self.db.execute("SELECT * FROM selftests WHERE drive = ? ORDER BY first_seen, "
                               "CAST(hours AS INTEGER)", (drive,))
        return [StoredSelfTest(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    def acks(self, drive: int) -> dict[str, tuple[int, float]]:
        """key -> (acknowledged value, when)."""
        return {k: (v, t) for k, v, t in self.db.execute(
            "SELECT key, value, taken FROM acks WHERE drive = ?", (drive,))}

    def set_ack(self, drive: int, key: str, value: int, now: float) -> None:
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO acks VALUES (?, ?, ?, ?)",
                            (drive, key, value, now))

    def add_alert(self, drive: int, now: float, previous: str | None, verdict: str, how: str,
                  outcome: str) -> None:
        with self._write():
            self.db.execute("INSERT INTO alerts (drive, taken, previous, verdict, how, outcome) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (drive, now, previous, verdict, how, outcome))

    def alerts(self, drive: int | None = None) -> list[tuple]:
        """(drive, taken, previous, verdict, how, outcome), oldest first."""
        q = "SELECT drive, taken, previous, verdict, how, outcome FROM alerts"
        q += " WHERE drive = ?" if drive is not None else ""
        return list(self.db.execute(q + " ORDER BY id", (drive,) if drive is not None else ()))

    def scheduled(self, drive: int) -> dict[str, tuple[str, float, str]]:
        """slot -> (type, when, outcome) of the scheduled self-tests handled for a drive."""
        return {s: (t, w, o) for s, t, w, o in self.db.execute(
            "SELECT slot, type, taken, outcome FROM scheduled WHERE drive = ?", (drive,))}

    def add_scheduled(self, drive: int, slot: str, test_type: str, now: float,
                      outcome: str) -> None:
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO scheduled VALUES (?, ?, ?, ?, ?)",
                            (drive, slot, test_type, now, outcome))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class _Transaction:
    def __init__(self, history: History) -> None:
        self.h = history

    def __enter__(self) -> None:
        self.h.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, err, tb) -> bool:
        if kind is None:
            try:
                self.h.db.commit()
                return False
            except sqlite3.Error as e:
                self.h.db.rollback()
                raise HistoryError(self.h.path, f"cannot write the health history: {e}") from e
        self.h.db.rollback()
        if isinstance(err, sqlite3.Error):
            raise HistoryError(self.h.path, f"cannot write the health history: {err}") from err
        return False


def iter_devices(history: History) -> Iterator[str]:
    """Every device name the history knows, in the order first seen."""
    seen: list[str] = []
    for d in history.drives():
        if d.device not in seen:
            seen.append(d.device)
    yield from seen
