"""How the backup commands' outcomes print, as text and JSON (the backup part of render.py, in
its own module so that the image commands never load it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from diskimg.cli.render import error_json, to_json
from diskimg.errors import EXIT_OK, EXIT_PROBLEM
from diskimg.units import human


def _point_json(p) -> dict:
    return {
        "name": p.name, "path": p.path, "uuid": p.uuid, "level": p.level, "time": p.time_text,
        "restore_point": p.restorable, "problem": p.problem, "parent": p.parent,
        "chain": list(p.chain), "size": p.size, "image_bytes": p.image_bytes,
        "stored_bytes": p.stored_bytes, "read_bytes": p.read_bytes, "rescue": p.rescue,
        "source": p.source, "verified": to_json(p.verified),
    }


@dataclass(frozen=True)
class RunDone:
    result: Any

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    def json(self) -> dict:
        return {"ok": self.result.exit_code == EXIT_OK, **to_json(self.result)}

    def lines(self) -> Iterator[str]:
        r = self.result
        yield (f"{r.job}: {r.level} image {r.image} of {r.source} in {r.seconds:.1f} s"
               + (f", on {r.parent}" if r.parent else ""))
        yield f"  why {r.level}: {r.reason}"
        yield (f"  read {human(r.bytes_read)}, stored {human(r.bytes_stored)}, image "
               f"{human(r.image_bytes)}; {r.restore_points} restore point(s) now")
        if r.rescue:
            yield (f"  rescue image (health FAIL): {r.unreadable_bytes} bytes unreadable, "
                   f"stored as zeros")
        yield f"  status: {r.status_file}"


@dataclass(frozen=True)
class ListDone:
    jobs: tuple          # (Job, Catalogue | None, error | None)

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEM if any(err is not None for _, _, err in self.jobs) else EXIT_OK

    def json(self) -> dict:
        out = []
        for job, cat, err in self.jobs:
            entry: dict = {"job": job.name, "destination": job.destination}
            if err is not None:
                entry["error"] = error_json(str(err), err.exit_code, err)
            else:
                entry["restore_points"] = len(cat.restore_points)
                entry["images"] = [_point_json(p) for p in cat.points]
                entry["leftovers"] = [f"{job.destination}/{n}" for n in cat.leftovers]
            out.append(entry)
        return {"ok": self.exit_code == EXIT_OK, "jobs": out}

    def lines(self) -> Iterator[str]:
        for job, cat, err in self.jobs:
            if err is not None:
                yield f"job {job.name}: {err}"
                continue
            n = len(cat.restore_points)
            yield f"job {job.name}: {n} restore point{'s' if n != 1 else ''} in {cat.location}"
            rows = [("TIME", "LEVEL", "IMAGE", "STORED", "CHAIN", "VERIFIED", "NAME")]
            for p in cat.points:
                verified = "never" if p.verified is None else (
                    f"{p.verified.time} " + ("ok" if p.verified.ok else
                                             f"FAILED ({p.verified.errors} errors)"))
                rows.append((p.time_text, p.level + (" (rescue)" if p.rescue else ""),
                             human(p.image_bytes) if p.complete else "-",
                             human(p.stored_bytes) if p.complete else "-",
                             str(len(p.chain)), verified, p.name))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for i, row in enumerate(rows):
                yield "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                if i and not cat.points[i - 1].restorable:
                    yield f"    NOT A RESTORE POINT: {cat.points[i - 1].problem}"
            for name in cat.leftovers:
                yield (f"  {name}: left by an interrupted run, not a restore point (the next "
                       f"run or prune removes it)")


@dataclass(frozen=True)
class RestoreDone:
    point: Any
    restore: Any         # render.RestoreDone

    @property
    def exit_code(self) -> int:
        return self.restore.exit_code

    def json(self) -> dict:
        return {"ok": self.exit_code == EXIT_OK, "point": _point_json(self.point),
                **self.restore.json()}

    def lines(self) -> Iterator[str]:
        p = self.point
        yield f"restore point {p.time_text} ({p.level}, {p.name})"
        yield from self.restore.lines()


@dataclass(frozen=True)
class PruneDone:
    result: Any

    @property
    def exit_code(self) -> int:
        return EXIT_OK

    def json(self) -> dict:
        plan = self.result.plan

        def d(x) -> dict:
            return {"name": x.point.name, "time": x.point.time_text, "level": x.point.level,
                    "reasons": list(x.reasons)}
        return {"ok": True, "job": self.result.job, "dry_run": self.result.dry_run,
                "keep": [d(x) for x in plan.keep], "remove": [d(x) for x in plan.remove],
                "left_alone": [d(x) for x in plan.left_alone],
                "leftovers": list(plan.leftovers), "removed": list(self.result.removed)}

    def lines(self) -> Iterator[str]:
        plan, dry = self.result.plan, self.result.dry_run
        verb = "would remove" if dry else "removed"
        for x in plan.keep:
            yield f"keep    {x.point.name}: {'; '.join(x.reasons)}"
        for x in plan.remove:
            yield f"{'remove' if dry else 'removed'} {x.point.name}: {'; '.join(x.reasons)}"
        for x in plan.left_alone:
            yield f"left    {x.point.name}: not a restore point: {'; '.join(x.reasons)}"
        for name in plan.leftovers:
            yield f"{'remove' if dry else 'removed'} {name}: left by an interrupted run"
        total = len(plan.remove) + len(plan.leftovers)
        yield (f"{self.result.job}: {len(plan.keep)} kept, {total} {verb}"
               + (" (dry run: nothing removed)" if dry else ""))


@dataclass(frozen=True)
class CheckDone:
    result: Any

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.result.ok else EXIT_PROBLEM

    def json(self) -> dict:
        return {"ok": self.result.ok, **to_json(self.result)}

    def lines(self) -> Iterator[str]:
        r = self.result
        for c in r.checked:
            yield (f"ok     {c.name}" if c.ok else
                   f"BAD    {c.name}: {c.errors} error(s), first: {c.message}")
        bad = sum(not c.ok for c in r.checked)
        yield (f"{r.job}: {len(r.checked)} image(s) verified ({len(r.chosen)} of {r.points} "
               f"restore points chosen, with their chains)"
               + (f"; {bad} FAILED" if bad else "; all ok")
               + (f"; {r.unverified} never verified yet" if r.unverified else ""))


@dataclass(frozen=True)
class TimerDone:
    result: Any

    @property
    def exit_code(self) -> int:
        return EXIT_OK

    def json(self) -> dict:
        return {"ok": True, **to_json(self.result)}

    def lines(self) -> Iterator[str]:
        r = self.result
        for f in r.files:
            yield f"{'wrote' if r.installed else 'removed'} {f}"
        if r.enabled:
            yield f"timer {'enabled and started' if r.installed else 'stopped and disabled'}"
        if r.hint:
            yield f"now run: {r.hint}"
