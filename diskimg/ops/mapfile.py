"""The rescue map: which byte ranges of a failing source are rescued, bad or still to try, kept
in GNU ddrescue's mapfile format so that `ddrescuelog` and ddrescue itself can read it.

Status characters are ddrescue's: '?' non-tried, '*' non-trimmed, '/' non-scraped, '-' bad
sector, '+' finished.  The map is a list of contiguous intervals covering the whole device, with
neighbours of equal status merged, so its size follows the number of distinct areas, not the size
of the device.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterator

from diskimg.disk.blockdev import replace_durably
from diskimg.errors import MapfileError

NON_TRIED = "?"
NON_TRIMMED = "*"
NON_SCRAPED = "/"
BAD = "-"
FINISHED = "+"
STATUSES = NON_TRIED + NON_TRIMMED + NON_SCRAPED + BAD + FINISHED

# current_status of the mapfile's status line, per rescue pass
PASS_STATUS = {1: "?", 2: "?", 3: "*", 4: "/", 5: "-", 6: "+"}


@dataclass
class RescueMap:
    size: int
    starts: list[int]
    statuses: list[str]
    current_pos: int = 0
    current_pass: int = 1

    @classmethod
    def new(cls, size: int) -> RescueMap:
        return cls(size, [0], [NON_TRIED])

    def intervals(self) -> Iterator[tuple[int, int, str]]:
        """(pos, size, status) of every interval, in order."""
        n = len(self.starts)
        for i in range(n):
            end = self.starts[i + 1] if i + 1 < n else self.size
            yield self.starts[i], end - self.starts[i], self.statuses[i]

    def status_at(self, pos: int) -> str:
        return self.statuses[bisect_right(self.starts, pos) - 1]

    def slice(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """(pos, size, status) of the intervals overlapping [start, end), clipped to it."""
        out = []
        i = max(0, bisect_right(self.starts, start) - 1)
        n = len(self.starts)
        while i < n and self.starts[i] < end:
            stop = self.starts[i + 1] if i + 1 < n else self.size
            a, b = max(self.starts[i], start), min(stop, end)
            if b > a:
                out.append((a, b - a, self.statuses[i]))
            i += 1
        return out

    def areas(self, status: str, start: int = 0, end: int | None = None
              ) -> list[tuple[int, int]]:
        """(pos, size) of the intervals with `status`, clipped to [start, end)."""
        end = self.size if end is None else end
        return [(p, n) for p, n, st in self.slice(start, end) if st == status]

    def all_finished(self, start: int, end: int) -> bool:
        return all(st == FINISHED for _, _, st in self.slice(start, end))

    def _split(self, pos: int) -> int:
        """Make an interval start at `pos`; return its index."""
        i = bisect_right(self.starts, pos) - 1
        if self.starts[i] == pos:
            return i
        self.starts.insert(i + 1, pos)
        self.statuses.insert(i + 1, self.statuses[i])
        return i + 1

    def set(self, pos: int, size: int, status: str) -> None:
        """Give [pos, pos+size) the status `status`."""
        if size <= 0:
            return
        end = min(pos + size, self.size)
        i = self._split(pos)
        j = self._split(end) if end < self.size else len(self.starts)
        self.starts[i:j] = [pos]
        self.statuses[i:j] = [status]
        # merge with equal neighbours
        if i + 1 < len(self.starts) and self.statuses[i + 1] == status:
            del self.starts[i + 1], self.statuses[i + 1]
        if i > 0 and self.statuses[i - 1] == status:
            del self.starts[i], self.statuses[i]

    def totals(self) -> dict[str, int]:
        t = {s: 0 for s in STATUSES}
        for _, size, st in self.intervals():
            t[st] += size
        return t

    # -- ddrescue's text format ----------------------------------------------------------------

    def dumps(self, command: str = "", started: str = "", notes: tuple[str, ...] = ()) -> str:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [
            "# Mapfile. Created by diskimg (GNU ddrescue mapfile format)",
            f"# Command line: {command}",
            f"# Start time:   {started or now}",
            f"# Current time: {now}",
            *(f"# {note}" for note in notes),
            "# current_pos  current_status  current_pass",
            f"0x{self.current_pos:08X}     {PASS_STATUS.get(self.current_pass, '?')}"
            f"               {min(self.current_pass, 5)}",
            "#      pos        size  status",
        ]
        lines += [f"0x{p:08X}  0x{s:08X}  {st}" for p, s, st in self.intervals()]
        return "\n".join(lines) + "\n"

    def save(self, path: str, command: str = "", started: str = "",
             notes: tuple[str, ...] = ()) -> None:
        """Write atomically: a temporary file, fsync, rename, fsync of the directory.  `notes`
        become comment lines (ddrescue ignores them)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.dumps(command, started, notes))
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)

    @classmethod
    def loads(cls, text: str, size: int) -> RescueMap:
        """Parse a ddrescue mapfile for a device of `size` bytes.  Blocks must be in order and
        must not overlap, as ddrescuelog demands; what they do not cover reads as non-tried.
        Raises MapfileError naming the first bad line."""
        m = cls.new(size)
        status_line_seen = False
        expect = 0
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                if not status_line_seen:
                    m.current_pos = _number(parts[0])
                    m.current_pass = int(parts[2]) if len(parts) > 2 else 1
                    status_line_seen = True
                    continue
                pos, length, st = _number(parts[0]), _number(parts[1]), parts[2]
            except (IndexError, ValueError) as err:
                raise MapfileError(f"line {n}: cannot parse {raw!r}") from err
            if len(st) != 1 or st not in STATUSES or length <= 0 or pos + length > size:
                raise MapfileError(f"line {n}: invalid block {raw!r} for a {size}-byte device")
            if pos < expect:
                raise MapfileError(f"line {n}: blocks are not contiguous (block at {pos:#x} "
                                   f"overlaps or precedes the one ending at {expect:#x})")
            expect = pos + length
            m.set(pos, length, st)
        return m

    @classmethod
    def load(cls, path: str, size: int) -> RescueMap:
        """The mapfile at `path`; raises MapfileError (not text, or a bad line) or OSError."""
        try:
            with open(path, encoding="ascii") as f:
                return cls.loads(f.read(), size)
        except UnicodeDecodeError as err:
            raise MapfileError(f"not a text mapfile ({err.reason} at byte {err.start})") from err


def _number(text: str) -> int:
    """A number as ddrescue writes and reads them: C style hex (0x), octal (leading 0) or
    decimal."""
    if text.lower().startswith("0x"):
        return int(text, 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text, 8)
    return int(text, 10)
