"""Which images of a job to keep: restic's and Proxmox's keep rules, then the chains.

The rules, over the restore points newest first (restic's ``ApplyPolicy``):

- ``keep-last N``: the N newest;
- ``keep-hourly/daily/weekly/monthly/yearly N``: the newest image of each of the last N hours,
  days, ISO weeks, months, years that have one (UTC, as the images are named);

an image is kept when any rule keeps it, and the plan says which rules did.  Then the chains:
every image that a kept image depends on (its parent, its parent's parent, its full) is kept
too, "kept as the parent of X".  So removing what the plan removes never leaves an image that
cannot be restored.  Images that are no restore point because their chain is already broken are
left alone and listed (their parent may be somewhere else for now).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from diskimg.backup.catalogue import Catalogue, Point
from diskimg.backup.config import KEEP_RULES, Keep
from diskimg.errors import UsageError


def bucket(rule: str, t: datetime) -> str:
    if rule == "hourly":
        return t.strftime("%Y-%m-%d %H:00")
    if rule == "daily":
        return t.strftime("%Y-%m-%d")
    if rule == "weekly":
        y, w, _ = t.isocalendar()
        return f"{y}-W{w:02d}"
    if rule == "monthly":
        return t.strftime("%Y-%m")
    if rule == "yearly":
        return t.strftime("%Y")
    raise ValueError(rule)


@dataclass(frozen=True)
class Decision:
    point: Point
    keep: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    keep: tuple[Decision, ...]       # newest first
    remove: tuple[Decision, ...]     # newest first: children go before their parents
    left_alone: tuple[Decision, ...]
    leftovers: tuple[str, ...]       # NAME.partial of interrupted runs: removed too


def plan(cat: Catalogue, rules: Keep) -> Plan:
    """The prune plan of `cat` under `rules`.  Raises UsageError when no rule is set: a prune
    that would remove every image is refused, as restic refuses it."""
    if not rules.any:
        raise UsageError(f"job {cat.job}: no keep rule set (keep-last, keep-daily, ...): prune "
                         f"would remove every image; give one in the job or on the command line")
    points = sorted(cat.restore_points, key=lambda p: (p.time, p.name), reverse=True)
    reasons: dict[str, list[str]] = {p.uuid: [] for p in points}
    left = rules.last
    counts = {r: getattr(rules, r) for r in KEEP_RULES if r != "last"}
    last_bucket: dict[str, str | None] = {r: None for r in counts}
    for p in points:
        if left > 0:
            reasons[p.uuid].append("keep-last")
            left -= 1
        for rule, n in counts.items():
            if n <= 0:
                continue
            b = bucket(rule, p.time)
            if b != last_bucket[rule]:
                reasons[p.uuid].append(f"keep-{rule} ({b})")
                last_bucket[rule] = b
                counts[rule] = n - 1
    by_rule = {u for u, r in reasons.items() if r}
    # the chains: every image a kept image depends on is kept
    for p in points:
        if p.uuid not in by_rule:
            continue
        chain = cat.chain_of(p)
        for i in range(len(chain) - 2, -1, -1):
            parent, child = chain[i], chain[i + 1]
            # the direct dependency: the child's own line says why it is kept
            why = f"kept as the parent of {child.name}"
            if parent.uuid in reasons and why not in reasons[parent.uuid] and \
                    parent.uuid not in by_rule:
                reasons[parent.uuid].append(why)
    keep = tuple(Decision(p, True, tuple(reasons[p.uuid])) for p in points if reasons[p.uuid])
    remove = tuple(Decision(p, False, ("matches no keep rule",)) for p in points
                   if not reasons[p.uuid])
    left_alone = tuple(Decision(p, False, (p.problem or "not complete",))
                       for p in cat.points if not p.restorable)
    return Plan(keep=keep, remove=remove, left_alone=left_alone, leftovers=cat.leftovers)
