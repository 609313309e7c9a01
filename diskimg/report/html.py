"""The HTML report: one page, no network.

Everything is inline (CSS in a ``<style>``, charts and block maps as ``<svg>``), and a
Content-Security-Policy forbids the page any load at all, so it opens the same from a rescue USB
stick as from a web server.  Per disk of the health history: the verdict with its reasons, a
strip of the verdicts over time, charts of temperature, wear and every tracked counter that is
not zero, the self-tests and the alerts.  Per image (or every image in a directory): a block map
like ddrescueview's, one cell per run of blocks coloured by what the index says they are.

Block kinds come from the image's index (``ImageReader.iter_runs``): ``stored`` (data in this
full image), ``changed`` (data stored in an incremental or differential image), ``unchanged``
(resolved through the parent), ``zero``, ``unused`` (free space of a recognised filesystem, not
read) and ``unreadable`` (rescue: sectors that could not be read, stored as zeros).  A cell
holding any unreadable block is drawn unreadable, otherwise as its most common kind.  The format
has no "repaired" state yet, so the map has none.
"""
from __future__ import annotations

import html
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from diskimg import atomicfile
from diskimg import format as fmt
from diskimg.errors import DiskimgError, OperationFailed, PermissionDenied, is_permission_error

log = logging.getLogger(__name__)

__all__ = ["BlockMap", "ReportResult", "block_map", "write_report"]

COLOURS = {"PASS": "#2e7d32", "WARN": "#ef8f00", "FAIL": "#c62828", "UNKNOWN": "#757575",
           "INFO": "#546e7a"}
KINDS = ("stored", "changed", "unchanged", "zero", "unused", "unreadable")
KIND_COLOURS = {"stored": "#1565c0", "changed": "#00897b", "unchanged": "#90caf9",
                "zero": "#e0e0e0", "unused": "#fafafa", "unreadable": "#d32f2f"}
CELLS = 1024            # block map cells (64 x 16)


@dataclass(frozen=True)
class BlockMap:
    path: str
    kind: str               # full, incremental, differential
    blocks: int
    block_size: int
    size: int
    created: str
    source: str
    counts: dict            # kind -> blocks
    cells: tuple            # kind of each cell
    blocks_per_cell: float


@dataclass(frozen=True)
class ReportResult:
    path: str
    size: int
    disks: tuple            # (device, model, serial, verdict)
    images: tuple           # image paths
    errors: tuple = ()      # (path, why) of images that could not be drawn


# --------------------------------------------------------------------------------------------
# block maps

def block_map(path: str, store=None, cells: int = CELLS) -> BlockMap:
    """The block map of one image.  Raises what ImageReader raises."""
    from diskimg.image.imagefile import ImageReader
    with ImageReader(path, store) as r:
        h = r.header
        blocks = r.blocks
        has_parent = h.parent is not None
        data_kind = "changed" if has_parent else "stored"
        n = max(1, min(cells, blocks))
        per = blocks / n if blocks else 1.0
        tally: list[dict[str, int]] = [dict() for _ in range(n)]
        counts = {k: 0 for k in KINDS}
        for first, count, entry in r.iter_runs():
            if entry.kind == fmt.DATA:
                kind = "unreadable" if entry.flags & fmt.FLAG_UNREADABLE else data_kind
            elif entry.kind == fmt.PARENT:
                kind = "unchanged"
            elif entry.kind == fmt.UNUSED:
                kind = "unused"
            else:
                kind = "unreadable" if entry.flags & fmt.FLAG_UNREADABLE else "zero"
            counts[kind] += count
            # spread the run over the cells it covers
            b, end = first, first + count
            while b < end:
                c = min(n - 1, int(b / per))
                cell_end = min(end, int((c + 1) * per) if c < n - 1 else end)
                cell_end = max(cell_end, b + 1)
                tally[c][kind] = tally[c].get(kind, 0) + (cell_end - b)
                b = cell_end
        kinds = tuple("unreadable" if t.get("unreadable") else
                      max(t.items(), key=lambda kv: kv[1])[0] if t else "zero" for t in tally)
        src = h.source or {}
        source = " ".join(str(x) for x in (src.get("path"), src.get("model"),
                                           src.get("serial") and f"serial {src['serial']}")
                          if x)
        return BlockMap(r.path, h.kind, blocks, h.block_size, h.size, h.created, source,
                        counts, kinds, per)


def _images_in(location: str) -> list[tuple[str, object]]:
    """(name, store) of an image, or of every image in a directory."""
    from diskimg.image.imagefile import peek_header
    from diskimg.store import open_directory
    if os.path.isdir(location):
        store = open_directory(location)
        return [(name, store) for name in store.list()
                if not name.startswith(".") and peek_header(store, name) is not None]
    return [(location, None)]


# --------------------------------------------------------------------------------------------
# SVG

def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def line_chart(title: str, unit: str, points: Sequence[tuple[float, float]],
               width: int = 640, height: int = 150) -> str:
    """An SVG line chart of (time, value) points with its axes' ends labelled."""
    left, right, top, bottom = 56, 12, 22, 26
    w, h = width - left - right, height - top - bottom
    t0, t1 = points[0][0], points[-1][0]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    span = (t1 - t0) or 1.0

    def xy(t: float, v: float) -> tuple[float, float]:
        return left + (t - t0) / span * w, top + h - (v - lo) / (hi - lo) * h
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in points))
    lx, ly = xy(*points[-1])
    last = points[-1][1]
    return (
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f'<title>{_e(title)}</title>'
        f'<text x="{left}" y="14" class="ct">{_e(title)}: {last:g}{_e(unit)} now</text>'
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="plot"/>'
        f'<text x="{left - 6}" y="{top + 10}" class="ax" text-anchor="end">{hi:g}</text>'
        f'<text x="{left - 6}" y="{top + h}" class="ax" text-anchor="end">{lo:g}</text>'
        f'<text x="{left}" y="{height - 8}" class="ax">{_e(_date(t0))}</text>'
        f'<text x="{left + w}" y="{height - 8}" class="ax" text-anchor="end">'
        f'{_e(_date(t1))}</text>'
        f'<polyline points="{path}" class="line"/>'
        f'<circle cx="{lx:.1f}" cy="{ly:.1f}" r="3" class="dot"/></svg>')


def verdict_strip(readings: Sequence, width: int = 640, height: int = 18) -> str:
    """The verdict of each reading as a coloured strip over time."""
    left = 56
    w = width - left - 12
    t0, t1 = readings[0].taken, readings[-1].taken
    span = (t1 - t0) or 1.0
    rects = []
    for i, r in enumerate(readings):
        x0 = left + (r.taken - t0) / span * w
        x1 = left + ((readings[i + 1].taken - t0) / span * w if i + 1 < len(readings) else w)
        rects.append(f'<rect x="{x0:.1f}" y="2" width="{max(x1 - x0, 1.5):.1f}" '
                     f'height="{height - 4}" fill="{COLOURS.get(r.verdict, "#757575")}">'
                     f'<title>{_e(_when(r.taken))} {_e(r.verdict)}</title></rect>')
    return (f'<svg class="strip" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="0" y="{height - 5}" class="ax">verdict</text>{"".join(rects)}</svg>')


def block_map_svg(m: BlockMap, columns: int = 64, cell: int = 10) -> str:
    rows = -(-len(m.cells) // columns)
    rects = []
    for i, kind in enumerate(m.cells):
        x, y = (i % columns) * cell, (i // columns) * cell
        first = int(i * m.blocks_per_cell)
        rects.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                     f'fill="{KIND_COLOURS[kind]}" class="k-{kind}"><title>blocks {first}-'
                     f'{max(first, int((i + 1) * m.blocks_per_cell) - 1)}: {kind}</title></rect>')
    return (f'<svg class="blockmap" width="{columns * cell}" height="{rows * cell}" '
            f'viewBox="0 0 {columns * cell} {rows * cell}" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(rects)}</svg>')


# --------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#212121;
background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid
#ccc;padding-bottom:4px} h3{font-size:15px;margin:14px 0 4px}
.meta{color:#616161;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;
padding:3px 7px;text-align:left;vertical-align:top} th{background:#f5f5f5}
.v{display:inline-block;color:#fff;font-weight:bold;padding:2px 9px;border-radius:3px}
.v-PASS{background:#2e7d32}.v-WARN{background:#ef8f00}.v-FAIL{background:#c62828}
.v-UNKNOWN{background:#757575}.v-INFO{background:#546e7a}
svg{display:block;margin:6px 0} .plot{fill:#fafafa;stroke:#bbb}
.line{fill:none;stroke:#1565c0;stroke-width:2} .dot{fill:#1565c0}
.ax{font-size:10px;fill:#616161} .ct{font-size:12px;fill:#212121;font-weight:bold}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;border:1px solid #999;
vertical-align:-1px}
.why{color:#616161}
"""


def _series(readings: Sequence, key: str) -> list[tuple[float, float]]:
    return [(r.taken, r.values[key]) for r in readings if key in r.values]


def _disk_section(hist, drive, now: float, since: float | None) -> tuple[str, tuple]:
    from diskimg.health import trends
    readings = hist.readings(drive.id, since=since, until=now)
    last = hist.last_reading(drive.id, with_reasons=True)
    verdict = last.verdict if last else "UNKNOWN"
    ident = ", ".join(x for x in (drive.model, drive.serial and f"serial {drive.serial}",
                                  drive.interface) if x)
    out = [f'<section class="disk" id="drive-{drive.id}">',
           f'<h2>{_e(drive.device)} <span class="v v-{_e(verdict)}">{_e(verdict)}</span></h2>',
           f'<div class="meta">{_e(ident)}' + (f' &middot; serial {_e(drive.serial)}'
                                                if drive.serial and not ident else "")
           + f' &middot; readings {_e(_when(drive.first_seen))} to '
             f'{_e(_when(drive.last_seen))}'
           + (f' &middot; a different drive than before: {_e(drive.why)}' if drive.why else "")
           + '</div>']
    if last is not None:
        facts = [f"{last.temperature} C" if last.temperature is not None else None,
                 f"{last.power_on_hours} power-on hours" if last.power_on_hours is not None
                 else None, f"{last.wear}% of its endurance used" if last.wear is not None
                 else None]
        out.append(f'<p>Last reading {_e(_when(last.taken))}: '
                   + _e(", ".join(f for f in facts if f) or "no numbers") + '</p>')
        if last.reasons:
            out.append('<table class="reasons"><tr><th></th><th>what</th><th>value</th>'
                       '<th>why</th></tr>')
            for r in last.reasons:
                out.append(f'<tr><td><span class="v v-{_e(r.severity)}">{_e(r.severity)}'
                           f'</span></td><td>{_e(r.what)}</td><td>{_e(r.value)}</td>'
                           f'<td class="why">{_e(r.why)}</td></tr>')
            out.append('</table>')
        else:
            out.append('<p>No reasons: every rule passed.</p>')
    if len(readings) >= 2:
        out.append(verdict_strip(readings))
        temps = [(r.taken, r.temperature) for r in readings if r.temperature is not None]
        if len(temps) >= 2:
            out.append(line_chart("temperature", " C", temps))
        wear = [(r.taken, r.wear) for r in readings if r.wear is not None]
        if len(wear) >= 2:
            out.append(line_chart("wear (endurance used)", "%", wear))
        for key in trends.COUNTERS:
            s = _series(readings, key)
            if len(s) >= 2 and any(v for _, v in s):
                out.append(line_chart(trends.label_of(key), "", s))
    elif readings:
        out.append('<p class="meta">One reading in this period: charts need two.</p>')
    tests = hist.selftests(drive.id)
    if tests:
        out.append('<h3>Self-tests</h3><table><tr><th>first seen</th><th>type</th>'
                   '<th>status</th><th>at hours</th><th>first error LBA</th></tr>')
        for t in reversed(tests[-40:]):
            out.append(f'<tr><td>{_e(_when(t.first_seen))}</td><td>{_e(t.type)}</td>'
                       f'<td>{"<b>" if t.failed else ""}{_e(t.status)}'
                       f'{"</b>" if t.failed else ""}</td><td>{_e(t.hours)}</td>'
                       f'<td>{_e(t.lba or "-")}</td></tr>')
        out.append('</table>')
    alerts = hist.alerts(drive.id)
    if alerts:
        out.append('<h3>Alerts</h3><table><tr><th>when</th><th>change</th><th>how</th>'
                   '<th>outcome</th></tr>')
        for _, taken, prev, verdict_, how, outcome in alerts[-40:]:
            out.append(f'<tr><td>{_e(_when(taken))}</td><td>{_e(prev or "-")} &rarr; '
                       f'{_e(verdict_)}</td><td>{_e(how)}</td><td>{_e(outcome)}</td></tr>')
        out.append('</table>')
    out.append('</section>')
    return "\n".join(out), (drive.device, drive.model, drive.serial, verdict)


def _image_section(m: BlockMap) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in m.counts.items() if v)
    legend = "".join(f'<span><i style="background:{KIND_COLOURS[k]}"></i>{k} '
                     f'{m.counts[k]}</span>' for k in KINDS
                     if m.counts[k] or k == "unreadable")
    return (f'<section class="image"><h3>{_e(m.path)}</h3>'
            f'<div class="meta">{_e(m.kind)} image of {_e(m.source or "an unnamed source")}, '
            f'created {_e(m.created)}; {m.blocks} blocks of {m.block_size // 1024} KiB '
            f'({m.size} bytes); one cell = {m.blocks_per_cell:.3g} blocks</div>'
            f'<div class="legend">{legend}</div>{block_map_svg(m)}'
            f'<div class="meta">{_e(counts)}</div></section>')


def render_page(db: str | None, images: Iterable[str], now: float,
                since: float | None) -> tuple[str, tuple, tuple, tuple]:
    """(HTML, disks, image paths, image errors) of the report."""
    body: list[str] = []
    disks: list[tuple] = []
    if db is not None:
        from diskimg.health.history import History
        with History(db, readonly=True) as hist:
            drives = hist.drives()
            current = {}
            for d in drives:
                current[d.device] = d         # the newest drive behind each name
            summary = ['<table class="summary"><tr><th>device</th><th>model</th>'
                       '<th>serial</th><th>verdict</th><th>last reading</th></tr>']
            sections = []
            for d in drives:
                section, row = _disk_section(hist, d, now, since)
                if current[d.device] is not d:
                    section = section.replace('<section class="disk"',
                                              '<section class="disk replaced"', 1)
                sections.append(section)
                disks.append(row)
                summary.append(f'<tr><td><a href="#drive-{d.id}">{_e(d.device)}</a></td>'
                               f'<td>{_e(d.model or "")}</td><td>{_e(d.serial or "")}</td>'
                               f'<td><span class="v v-{_e(row[3])}">{_e(row[3])}</span></td>'
                               f'<td>{_e(_when(d.last_seen))}</td></tr>')
            summary.append('</table>')
            body.append(f'<h2>Disks</h2><div class="meta">from {_e(os.path.abspath(db))}'
                        '</div>')
            body += summary if drives else ['<p>The history holds no disk yet.</p>']
            body += sections
    maps, errors = [], []
    for location in images:
        try:
            found = _images_in(location)
        except DiskimgError as e:
            errors.append((location, str(e)))
            continue
        for name, store in found:
            try:
                maps.append(block_map(name, store))
            except DiskimgError as e:
                errors.append((store.path(name) if store else name, str(e)))
    if maps or errors:
        body.append('<h2>Images</h2>')
        body += [_image_section(m) for m in maps]
        body += [f'<p><b>{_e(p)}</b>: {_e(why)}</p>' for p, why in errors]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'style-src \'unsafe-inline\'; img-src data:">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>diskimg report {_e(_when(now))}</title><style>{_CSS}</style></head><body>'
        f'<h1>diskimg report</h1><div class="meta">written {_e(_when(now))}'
        + (f', history since {_e(_when(since))}' if since is not None else "")
        + '</div>\n' + "\n".join(body) + '\n</body></html>\n')
    return page, tuple(disks), tuple(m.path for m in maps), tuple(errors)


def write_report(out: str, db: str | None, images: Iterable[str], now: float,
                 since: float | None = None) -> ReportResult:
    """Write the page to ``out`` (atomically: a temporary file renamed over it)."""
    page, disks, paths, errors = render_page(db, list(images), now, since)
    data = page.encode()
    try:
        atomicfile.write_atomically(out, data)
    except OSError as e:
        if is_permission_error(e):
            raise PermissionDenied(out, "write the report") from e
        raise OperationFailed(f"{out}: cannot write the report: {e.strerror or e}",
                              path=out) from e
    return ReportResult(os.path.abspath(out), len(data), disks, paths, errors)
