"""Everything the CLI shows: results as text or JSON, progress bars, the error line and the JSON
error object.  The one place where a result becomes output.

A command (``cli/images.py``, ``cli/devices.py``) calls the library and returns an *outcome*: a
frozen dataclass holding the library's frozen result and what the text needs from the command
line (the source as typed, ``--only-changed``...).  ``show`` prints it as text (``lines()``) or
as JSON (``json()``) and returns its exit code.  Every JSON document goes through ``to_json``,
which turns dataclasses into objects, tuples into arrays and path objects into absolute paths;
the few shapes that differ from a result's fields (verify's errors, ``ro`` in ``list``) are
built here too, so a result class carries no rendering of its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from diskimg.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEM, DiskimgError
from diskimg.store import is_remote
from diskimg.units import human

log = logging.getLogger("diskimg")


# --------------------------------------------------------------------------------------------
# JSON

def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON values: a dataclass becomes an object of its fields (in their
    order), a tuple or list an array, a path object its absolute path; dicts are converted
    value by value.  (Path strings are made absolute earlier, when the arguments are parsed:
    a string does not say whether it is a path.)"""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.path.abspath(os.fspath(obj))
    return obj


def print_json(obj: Any) -> None:
    json.dump(to_json(obj), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def show(outcome, as_json: bool, debug: bool = False) -> int:
    """Print a command's outcome as text or JSON; returns its exit code.  An outcome that ends
    in an error (``error`` set: what survived of a truncated image) prints the error line after
    its text; with JSON the error is inside the object."""
    if as_json:
        print_json(outcome.json())
        return outcome.exit_code
    for line in outcome.lines():
        print(line)
    error = getattr(outcome, "error", None)
    if error is not None:
        report_error(str(error), outcome.exit_code, err=error, debug=debug)
    return outcome.exit_code


def say(line: str) -> None:
    """A line of text on stdout while a command runs (a self-test started)."""
    print(line)


def note(line: str) -> None:
    """A line for the person at the terminal, on stderr (questions, warnings, verdicts)."""
    print(line, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# errors

def error_path(err: BaseException | None) -> str | None:
    path = getattr(err, "path", None) if isinstance(err, DiskimgError) else (
        getattr(err, "filename", None) if isinstance(err, OSError) else None)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not (isinstance(path, str) and path):
        return None
    return path if is_remote(path) else os.path.abspath(path)   # a URL as it is


def error_json(message: str, code: int, err: BaseException | None = None) -> dict:
    """The ``error`` object of a failure's JSON; an error that carries more (``to_dict``: what a
    failed restore left on its target) adds its fields."""
    error = {"message": message, "path": error_path(err), "exit_code": code}
    extra = getattr(err, "to_dict", None)
    if callable(extra):
        error.update({k: v for k, v in to_json(extra()).items() if k not in error})
    return error


def report_error(message: str, code: int, *, json_out: bool = False,
                 err: BaseException | None = None, debug: bool = False) -> int:
    """Print the one error line (and the JSON object with --json); returns ``code``.  A second
    Ctrl-C while this runs is dropped: it must not leave a traceback in place of the message."""
    try:
        if debug:
            log.error("traceback", exc_info=err if err is not None else True)
        print(f"diskimg: error: {message}", file=sys.stderr)
        # the --log-file keeps why the command ended too (stderr has it already)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,),
                                None)
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        if json_out:
            print_json({"ok": False, "error": error_json(message, code, err)})
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (BrokenPipeError, ValueError):
        pass
    return code


# --------------------------------------------------------------------------------------------
# progress

class NoBar:
    """What a command updates when no bar is shown."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass


@contextmanager
def progress_bar(total: int, desc: str, disabled: bool, unit: str = "B") -> Iterator:
    """A tqdm bar on stderr (bytes, rate, ETA), with log lines printed above it.  A ``NoBar``
    when disabled or when stderr is not a terminal; tqdm is then not even imported (it takes a
    tenth of the start-up time)."""
    if disabled or not sys.stderr.isatty():
        yield NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    if unit != "B":
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar, \
                logging_redirect_tqdm(loggers=[log]):
            yield bar
        return

    class BinaryBar(tqdm):
        """Byte counts and rates in the units of the summaries (KiB, MiB/s): tqdm's own
        scaling prints "MB" for MiB and scales rates by 1000."""

        @property
        def format_dict(self):
            d = super().format_dict
            rate = d["rate"]
            if rate is None and d["elapsed"]:
                rate = (d["n"] - d["initial"]) / d["elapsed"]
            d["n_bin"] = human(d["n"])
            d["total_bin"] = human(d["total"]) if d["total"] else "?"
            d["rate_bin"] = f"{human(rate)}/s" if rate else "? B/s"
            return d

    fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n_bin}/{total_bin} "
           "[{elapsed}<{remaining}, {rate_bin}{postfix}]" if total else
           "{desc}: {n_bin} [{elapsed}, {rate_bin}{postfix}]")
    with BinaryBar(total=total or None, desc=desc, unit="B", bar_format=fmt, file=sys.stderr,
                   dynamic_ncols=True) as bar, logging_redirect_tqdm(loggers=[log]):
        yield bar


class Bar:
    """The progress an operation reports (diskimg.ops.progress.Progress) as a bar on stderr,
    opened when the operation starts and says how much there is to do: nothing it asks or says
    before (restore's overwrite question) is mixed up with the bar, and no one opens the source
    or the image a second time just to size it."""

    def __init__(self, desc: str, disabled: bool) -> None:
        self.desc, self.disabled = desc, disabled
        self._stack = ExitStack()
        self.bar = None
        # called once, when the operation first reports progress (its first block is done)
        self.on_first_advance: Callable[[], None] | None = None

    def start(self, total: int, unit: str = "B") -> None:
        if self.bar is None:
            self.bar = self._stack.enter_context(
                progress_bar(total, self.desc, self.disabled, unit))

    def advance(self, n: int) -> None:
        self.bar.update(n)
        if self.on_first_advance is not None:
            first, self.on_first_advance = self.on_first_advance, None
            first()

    def note(self, line: str) -> None:
        """A line for the person at the terminal (``note``), printed above the bar when one
        is shown; callable from any thread."""
        if self.bar is not None and hasattr(self.bar, "write"):
            self.bar.write(line, file=sys.stderr)
        else:
            note(line)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class RescueBar(Bar):
    """Shows rescued, bad and remaining bytes and the pass on the bar."""

    def status(self, st) -> None:     # a rescue.RescueStatus
        if self.bar is None:
            return
        self.bar.n = st.rescued + st.bad
        self.bar.set_postfix_str(f"pass {st.pass_no} {st.pass_name}, bad {human(st.bad)}, "
                                 f"failed areas {human(st.pending)}, "
                                 f"untried {human(st.remaining)}", refresh=True)


def selftest_progress(bar) -> Callable[[int], None]:
    """Move a percent bar to each percentage a self-test reports."""
    def show_percent(pct: int) -> None:
        bar.update(max(0, pct - bar.n))
    return show_percent


# --------------------------------------------------------------------------------------------
# image

def block_lines(c: dict, has_parent: bool) -> list[str]:
    """How the blocks of an image are recorded (the four kinds add up to the blocks) and, for
    a changed-block image, how many changed since the parent and how they are recorded."""
    line = (f"blocks: {c['blocks']} x {human(c['block_size'])} = stored {c['stored_blocks']} "
            f"+ zero {c['zero_blocks']} + unused {c['unused_blocks']}")
    if has_parent:
        line += f" + unchanged {c['unchanged_blocks']} (kept in the parent)"
    if c.get("unreadable_blocks"):
        line += (f"; {c['unreadable_blocks']} of them hold unreadable sectors "
                 f"(restored as zeros)")
    lines = [line]
    if has_parent:
        zero_changed = c["zero_blocks"] + c["unused_blocks"] - c["unchanged_zero_blocks"]
        changed = (f"changed: {c['changed_blocks']} of {c['blocks']} blocks differ from the "
                   f"parent (stored {c['stored_blocks']}, zero or unused {zero_changed})")
        if c["unchanged_zero_blocks"]:
            changed += (f"; the other {c['unchanged_zero_blocks']} zero or unused blocks were "
                        f"zeros in the parent too")
        lines.append(changed)
    if c.get("delta_blocks"):
        whole = c["stored_blocks"] - c["delta_blocks"]
        lines.append(f"stored: {whole} whole + {c['delta_blocks']} as deltas (their changed "
                     f"4 KiB pages only), {human(c.get('delta_saved_bytes', 0))} not stored "
                     f"again")
    if c.get("page_hash_bytes"):
        lines.append(f"page hashes: {human(c['page_hash_bytes'])} (what the next incremental "
                     f"compares with)")
    return lines


@dataclass(frozen=True)
class ImageDone:
    """``image``: an imaging.ImageResult, and a rescue.RescueResult when --rescue."""

    source: str
    result: Any
    rescued: Any | None = None

    @property
    def unreadable(self) -> tuple[tuple[int, int], ...]:
        return self.rescued.unreadable if self.rescued is not None else ()

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEM if self.unreadable else EXIT_OK

    def json(self) -> dict:
        out = to_json(self.result)
        if self.rescued is not None:
            out["unreadable"] = [{"offset": o, "length": n} for o, n in self.unreadable]
            out["mapfile"] = self.rescued.mapfile
            out["resumed"] = self.rescued.resumed
        return out

    def lines(self) -> Iterator[str]:
        result = self.result
        rate = result.size / result.seconds if result.seconds else 0
        ratio = result.image_bytes / result.size * 100 if result.size else 0
        yield (f"{result.kind} image {result.path} of {self.source}: {human(result.size)} "
               f"in {result.seconds:.1f} s ({human(rate)}/s)")
        for line in block_lines(to_json(result), bool(result.parent)):
            yield f"  {line}"
        yield (f"  image: {human(result.image_bytes)} ({ratio:.1f}% of the source); "
               f"uuid {result.uuid}")
        if self.rescued is not None:
            unreadable = self.unreadable
            lost = sum(n for _, n in unreadable)
            yield (f"  rescue{' (resumed)' if self.rescued.resumed else ''}: "
                   f"{human(result.size - lost)} rescued, {lost} bytes unreadable in "
                   f"{len(unreadable)} area(s); map: {self.rescued.mapfile}")
            for off, n in unreadable:
                yield f"  unreadable: bytes {off}-{off + n - 1} ({n} bytes), stored as zeros"


def precheck_lines(source: str, report, failing: bool, rescue: bool) -> list[str]:
    """The verdict line (and a warning for a failing disk) before imaging a device with SMART."""
    reasons = "; ".join(f"{r.what}: {r.value}" for r in report.reasons[:3])
    lines = [f"diskimg: health of {source}: {report.verdict}"
             + (f" ({reasons})" if reasons else "")]
    if failing:
        advice = "" if rescue else "; consider --rescue to keep going past unreadable sectors"
        lines.append(f"diskimg: warning: {source} is failing: reading it may hit bad "
                     f"sectors{advice}")
    return lines


# --------------------------------------------------------------------------------------------
# restore

def overwrite_question(q) -> list[str]:
    """The overwrite question (a restore.Overwrite): what is on the target now, like
    Clonezilla's last question before it writes."""
    t = q.target
    what = "block device" if t.is_block else "file"
    ident = ", ".join(x for x in (t.model, t.serial and f"serial {t.serial}") if x)
    lines = [f"diskimg: {t.path} ({what}, {human(t.size)}{', ' + ident if ident else ''}) "
             f"will be overwritten with {os.path.basename(q.image)} ({human(q.image_size)})"]
    if t.pttype:
        lines.append(f"  partition table: {t.pttype}")
    for c in t.contents:
        desc = [c.fstype or "-"]
        if c.label:
            desc.append(f'label "{c.label}"')
        if c.size is not None:
            desc.append(human(c.size))
        if c.mountpoints:
            desc.append("mounted on " + ", ".join(c.mountpoints))
        lines.append(f"  {c.name}: {', '.join(desc)}")
    if not t.pttype and not t.contents:
        lines.append("  no partition table or filesystem found on it")
    return lines


@dataclass(frozen=True)
class RestoreDone:
    """``restore``: a restore.RestoreResult."""

    image: str
    target: str
    only_changed: bool
    result: Any

    @property
    def exit_code(self) -> int:
        r = self.result
        return EXIT_PROBLEM if (r.unreadable or r.salvaged or r.verify_errors) else EXIT_OK

    def json(self) -> dict:
        out = to_json(self.result)
        out["salvaged"] = [{"block": s.block, "last_block": s.block + s.blocks - 1,
                            "offset": s.offset, "length": s.length, "reason": s.reason}
                           for s in self.result.salvaged]
        return out

    def lines(self) -> Iterator[str]:
        result = self.result
        rate = result.size / result.seconds if result.seconds else 0
        names = " -> ".join(os.path.basename(p) for p in result.chain_paths)
        yield (f"restored {self.image} to {self.target}: {human(result.size)} in "
               f"{result.seconds:.1f} s ({human(rate)}/s)")
        yield f"  chain: {names}" + (" (truncated: its index is lost)" if result.truncated else "")
        line = (f"  blocks: {result.blocks}; written {result.written_blocks}, zeroed "
                f"{result.zeroed_blocks}, left as holes {result.hole_blocks}")
        if self.only_changed:
            line += (f"; read from target {result.read_target_blocks}, already identical "
                     f"{result.skipped_blocks}")
        yield line
        if result.target_size > result.size:
            yield (f"  note: {self.target} is larger than the image ({human(result.target_size)} "
                   f"vs {human(result.size)}); the bytes past {result.size} were left as they "
                   f"were")
        for off, length in result.unreadable:
            yield f"  unreadable on the source, restored as zeros: bytes {off}-{off + length - 1}"
        for s in result.salvaged:
            blocks = (f"block {s.block}" if s.blocks == 1
                      else f"blocks {s.block}-{s.block + s.blocks - 1}")
            yield (f"  salvaged as zeros: {blocks}, bytes {s.offset}-{s.offset + s.length - 1} "
                   f"({s.length} bytes): {s.reason}")
        if result.salvaged:
            lost = sum(s.length for s in result.salvaged)
            yield (f"  SALVAGED: {lost} bytes ({human(lost)}) in {len(result.salvaged)} "
                   f"range(s) could not be restored and read as zeros")
        for h in getattr(result, "repaired", ()):
            yield (f"  REPAIRED on the fly by parity: {h.slices} damaged slice(s), "
                   f"{human(h.bytes)}, in {h.path}; the file itself is still damaged: "
                   f"run `diskimg repair {h.path}`")
        if result.verified:
            how = "O_DIRECT" if result.verify_direct else "page cache dropped"
            for m in result.verify_errors[:20]:
                yield (f"  VERIFY FAILED: block {m.block} (byte {m.offset}, {m.length} bytes) "
                       f"reads back as {m.actual}, the image has {m.expected}")
            if len(result.verify_errors) > 20:
                yield f"  ... and {len(result.verify_errors) - 20} more blocks (--json lists all)"
            if result.verify_errors:
                yield (f"  VERIFY FAILED: {len(result.verify_errors)} of "
                       f"{result.verified_blocks} blocks read back from {self.target} differ "
                       f"from the image")
            else:
                yield (f"  verified: {result.verified_blocks} blocks read back ({how}) in "
                       f"{result.verify_seconds:.1f} s, all identical to the image")


# --------------------------------------------------------------------------------------------
# verify

def verify_error_json(e) -> dict:
    """A verify.VerifyError: the range and override keys only when they apply."""
    d = {"block": e.block, "offset": e.offset, "image": e.image, "path": e.path,
         "reason": e.reason, "affects_restore": e.affects_restore}
    if e.last_block is not None:
        d["last_block"] = e.last_block
    if e.overridden_by is not None:
        d["overridden_by"] = e.overridden_by
    if e.repairable is not None:
        d["repairable"] = e.repairable
    return d


@dataclass(frozen=True)
class VerifyDone:
    """``verify``: a verify.VerifyResult."""

    image: str
    result: Any

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.result.ok else EXIT_PROBLEM

    def json(self) -> dict:
        r = self.result
        return {"ok": r.ok, "image": r.image,
                "chain": [{"uuid": u, "path": p} for u, p in r.chain],
                "blocks_checked": r.blocks_checked,
                "errors": [verify_error_json(e) for e in r.errors],
                "errors_affecting_restore": r.restore_errors, "scope": r.scope}

    def lines(self) -> Iterator[str]:
        result = self.result
        for uuid, path in result.chain:
            yield f"checked {path} ({uuid})"
        for e in result.errors:
            where = "" if e.block is None else (
                f"blocks {e.block}-{e.last_block}: " if e.last_block is not None
                else f"block {e.block} (byte {e.offset}): ")
            note_ = "" if e.affects_restore or e.overridden_by is None else (
                f" (overridden by {e.overridden_by}: does not affect restoring {self.image})")
            tag = {None: "BAD", True: "REPAIRABLE", False: "LOST"}[e.repairable]
            yield f"{tag} {e.path}: {where}{e.reason}{note_}"
        if result.scope == "structure":
            yield (f"checked without the key: the CRC-32C of the header, {result.blocks_checked} "
                   f"record headers, the index segments, footer and trailer; the blocks' "
                   f"content and authenticity were NOT checked (give the key to check them)")
            if result.ok:
                yield f"OK (structure only) in {result.seconds:.1f} s"
                return
        if result.ok:
            yield (f"OK: {result.blocks_checked} blocks, {human(result.bytes_checked)} of data "
                   f"verified in {result.seconds:.1f} s")
            return
        matter = result.restore_errors
        yield (f"FAILED: {len(result.errors)} error(s) in {self.image}"
               + ("" if matter == len(result.errors) else
                  f"; {matter or 'none'} of them affect{'s' if matter == 1 else ''} restoring it"))
        fixable = sorted({e.path for e in result.errors if e.repairable})
        if fixable and not any(e.repairable is False for e in result.errors):
            for path in fixable:
                yield (f"all damage in {path} is within what its parity repairs: restore heals "
                       f"it on the fly; `diskimg repair {path}` rewrites the file healed")


# --------------------------------------------------------------------------------------------
# repair

@dataclass(frozen=True)
class RepairDone:
    """``repair``: a repair.RepairResult."""

    image: str
    result: Any
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        out = to_json(self.result)
        out["repaired_bytes"] = self.result.bytes
        return out

    def lines(self) -> Iterator[str]:
        r = self.result
        if not r.written:
            yield f"OK: {self.image} has no damage; left as it was ({r.seconds:.1f} s)"
            return
        for what in r.parts:
            yield f"  repaired: {what}"
        if r.blocks:
            shown = ", ".join(map(str, r.blocks[:20])) + (
                f" and {len(r.blocks) - 20} more" if len(r.blocks) > 20 else "")
            yield f"  repaired: records of block(s) {shown}"
        yield (f"REPAIRED {self.image}: {r.slices} damaged slice(s) ({human(r.bytes)}) "
               f"rebuilt from parity; the rewritten image verified clean and replaced it "
               f"({human(r.image_bytes)}, {r.seconds:.1f} s)")


# --------------------------------------------------------------------------------------------
# info

@dataclass(frozen=True)
class InfoDone:
    """``info``: the dict imagefile.describe makes of an image."""

    image: str
    info: dict
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return to_json(self.info)

    def lines(self) -> Iterator[str]:
        info = self.info
        src = info["source"] or {}
        yield f"image:       {self.image}"
        yield f"uuid:        {info['uuid']}"
        yield f"kind:        {info['kind']}" + (
            f" (parent {info['parent']}, {info['parent_name']})" if info["parent"] else "")
        if len(info["chain"]) > 1:
            yield f"chain:       {' -> '.join(info['chain'])}"
        yield (f"source:      {src.get('path') if not info.get('locked') else '(sealed)'}" + "".join(
            f", {k} {src[k]}" for k in ("model", "serial") if src.get(k))
            + (f", loop device backed by {src['backing_file']}" if src.get("backing_file")
               else ""))
        yield f"size:        {info['size']} bytes ({human(info['size'])})"
        if info.get("locked"):
            yield (f"blocks:      {info['blocks']} x {human(info['block_size'])} (counts, "
                   f"source and completion time sealed: give the key to see them)")
        else:
            blocks, *changed = block_lines(info, bool(info["parent"]))
            yield f"blocks:      {blocks.removeprefix('blocks: ')}"
            for line in changed:
                yield f"             {line}"
        if info["rescue"]:
            contents = "rescue image (every block read past read errors)"
        elif info["all_blocks"] is None:
            contents = "unknown (made before diskimg recorded it)"
        else:
            contents = ("all blocks (free space included: an exact copy)" if info["all_blocks"]
                        else "used blocks (the free space of recognised filesystems left out)")
        yield f"contents:    {contents}"
        level = info["compression_level"]
        yield (f"compression: {(info['compression'] or {}).get('codec', 'zstd')}"
               + (f" level {level}" if level is not None else ""))
        enc = info.get("encryption")
        yield f"digest:      {info['digest']}" + (
            f" (keyed: {'HMAC-SHA256' if info['digest'] == 'sha256' else 'BLAKE3 keyed'} "
            f"under the chain's id key)" if enc else "")
        if enc:
            yield (f"encryption:  {enc['cipher']}, key fingerprint {enc['key_fingerprint']}"
                   + ("" if enc["unlocked"] else " (locked: no key given; source, statistics "
                                                  "and index are sealed)"))
            for slot in enc["slots"]:
                kdf = slot["kdf"]
                params = ", ".join(f"{k} {v}" for k, v in kdf.items() if k != "name")
                yield (f"key slot {slot['id']}:  {slot['type']}, {kdf.get('name')}"
                       + (f" ({params})" if params else "")
                       + (f", added {slot['created']}" if slot.get("created") else ""))
        par = info.get("parity")
        if par:
            yield (f"parity:      {par['percent']:g}% Reed-Solomon, {par['data']}+{par['parity']} "
                   f"slices of {human(par['slice'])} per group, {par['depth']} groups per full "
                   f"window, {par['windows']} window(s)")
        elif "parity" in info:
            yield "parity:      none"
        yield f"image size:  {info['image_bytes']} bytes ({human(info['image_bytes'])})"
        yield f"created:     {info['created']} by diskimg {info['tool_version']}"
        yield f"completed:   {info['completed'] or 'unknown'}"
        if info["source_mounted_rw"]:
            yield (f"warning:     the source was mounted read-write on "
                   f"{', '.join(info['source_mounted_rw'])} while imaged (--force): the image "
                   f"may not be consistent")
        for r in info.get("allocation_repaired", []):
            owner = {"vfat": "reachable from directories", "exfat": "owned by files",
                     "ntfs": "owned by MFT records"}.get(r["kind"], "owned by inodes")
            yield (f"repaired:    allocation map repaired: {r['blocks']} blocks {owner} but "
                   f"marked free ({r['kind']} at byte {r['offset']}, {r['block_size']}-byte "
                   f"blocks; read all the same)")
        for r in info["unreadable"]:
            yield (f"unreadable:  bytes {r['offset']}-{r['offset'] + r['length'] - 1} "
                   f"({r['length']} bytes) read as zeros")


@dataclass(frozen=True)
class InfoTruncated:
    """``info`` of an image cut short: what survived (imagefile.describe_truncated) and the
    error that says so; exit with the error's code."""

    image: str
    info: dict
    error: DiskimgError

    @property
    def exit_code(self) -> int:
        return self.error.exit_code

    def json(self) -> dict:
        return {"ok": False, "truncated": True,
                "error": {"message": str(self.error), "path": os.path.abspath(self.image),
                          "exit_code": self.exit_code}, **to_json(self.info)}

    def lines(self) -> Iterator[str]:
        info = self.info
        left = info["survived"]
        yield f"image:       {self.image} (TRUNCATED: no trailer, its index is lost)"
        yield f"uuid:        {info['uuid']}"
        yield f"kind:        {info['kind']}" + (
            f" (parent {info['parent']}, {info['parent_name']})" if info["parent"] else "")
        yield f"size:        {info['size']} bytes ({human(info['size'])})"
        yield f"blocks:      {info['blocks']} x {human(info['block_size'])}"
        yield f"created:     {info['created']} by diskimg {info['tool_version']}"
        yield f"image size:  {info['image_bytes']} bytes ({human(info['image_bytes'])})"
        if left["records"]:
            yield (f"survived:    {left['records']} whole records of {left['blocks']} blocks "
                   f"({human(left['bytes'])}), up to byte {left['up_to_byte']} of the file; "
                   f"the last is block {left['last_block']} (verify checks their content)")
        else:
            yield "survived:    no stored block"


# --------------------------------------------------------------------------------------------
# list

_LIST_COLUMNS = ("NAME", "SIZE", "RO", "TRAN", "ROT", "SECTOR", "SMART", "FSTYPE", "LABEL",
                 "UUID", "MODEL / SERIAL / BACKING FILE", "MOUNTPOINTS")
_RIGHT = {"SIZE"}


def list_table(devices: Iterable) -> str:
    """The rows of `list`, each column as wide as its widest cell (as lsblk does), so that a
    long backing-file path or label does not push the columns after it out of line."""
    def yes(v: bool | None) -> str:
        return "-" if v is None else "1" if v else "0"

    rows: list[tuple[str, ...]] = []
    for d in devices:
        ident = d.backing_file if d.backing_file else " ".join(
            x for x in (d.model, d.serial, d.wwn) if x) or "-"
        sectors = (f"{d.logical_sector_size}/{d.physical_sector_size}"
                   if d.logical_sector_size else "-")
        rows.append((d.name, human(d.size), yes(d.read_only), d.transport or "-",
                     "yes" if d.rotational else "no", sectors,
                     "yes" if d.smart_available else "no", d.fstype or "-", d.label or "-",
                     d.uuid or "-", ident, " ".join(d.mountpoints) or "-"))
        for p in d.partitions:
            rows.append(("  " + p.name, human(p.size), yes(p.read_only), "", "", "", "",
                         p.fstype or "-", p.label or "-", p.uuid or "-", f"start {p.start}",
                         " ".join(p.mountpoints) or "-"))
    widths = [max(len(r[i]) for r in [_LIST_COLUMNS, *rows]) for i in range(len(_LIST_COLUMNS))]
    lines = []
    for r in [_LIST_COLUMNS, *rows]:
        cells = [c.rjust(w) if h in _RIGHT else c.ljust(w)
                 for c, w, h in zip(r, widths, _LIST_COLUMNS)]
        cells[-1] = r[-1]   # the last column is not padded
        lines.append(" ".join(cells).rstrip() + "\n")
    return "".join(lines)


def device_json(d) -> dict:
    """A devices.DeviceInfo or PartitionInfo: its fields, plus ``ro`` (lsblk's name for
    read_only)."""
    out = to_json(d)
    if "partitions" in out:
        out["partitions"] = [device_json(p) for p in d.partitions]
    out["ro"] = d.read_only
    return out


@dataclass(frozen=True)
class DeviceList:
    """``list``: devices.DeviceInfo rows."""

    devices: tuple
    exit_code: int = EXIT_OK

    def json(self) -> list:
        return [device_json(d) for d in self.devices]

    def lines(self) -> list[str]:
        return list_table(self.devices).splitlines()


# --------------------------------------------------------------------------------------------
# health and self-tests

def health_text(report) -> str:
    ident = ", ".join(x for x in (report.model, report.serial and f"serial {report.serial}",
                                  report.interface) if x)
    lines = [f"{report.device}: {report.verdict}" + (f"  ({ident})" if ident else "")]
    facts = [f"drive says {report.smart_overall}"] if report.smart_overall else []
    if report.temperature is not None:
        facts.append(f"{report.temperature} C")
    if report.power_on_hours is not None:
        facts.append(f"{report.power_on_hours} power-on hours")
    if report.selftests:
        failed = sum(t.failed for t in report.selftests)
        facts.append(f"{len(report.selftests)} self-tests logged, {failed} failed")
    if facts:
        lines.append("  " + ", ".join(facts))
    for r in report.reasons:
        lines.append(f"  {r.severity:<4}  {r.what}: {r.value}")
        lines.append(f"        {r.why}")
    return "\n".join(lines)


@dataclass(frozen=True)
class HealthDone:
    """``health``: a health.HealthReport; exit 0 PASS, 1 WARN or FAIL, 3 UNKNOWN."""

    report: Any
    exit_code: int

    def json(self) -> dict:
        out = to_json(self.report)
        out["selftests"] = [dict(to_json(t), failed=t.failed) for t in self.report.selftests]
        return out

    def lines(self) -> list[str]:
        return [health_text(self.report)]


@dataclass(frozen=True)
class SelfTestDone:
    """``selftest``: what happened (started, aborted, already running) or, after --wait, the
    self-test log entry of the finished test (a health.SelfTest)."""

    device: str
    message: str
    entry: Any = None
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return to_json(self)

    def lines(self) -> list[str]:
        entry = self.entry
        if entry is None:
            return [f"{self.device}: {self.message}"]
        return [f"{self.device}: {entry.type}: {entry.status}"
                + (f" (first error at LBA {entry.lba})" if entry.lba and entry.lba != "-"
                   else "")]


# --------------------------------------------------------------------------------------------
# health history: monitor, health --history / --ack, timer, report

def _when(t: float | None) -> str | None:
    import time as _time
    return None if t is None else _time.strftime("%Y-%m-%d %H:%M", _time.localtime(t))


def _iso(t: float | None) -> str | None:
    from datetime import datetime, timezone
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def observation_json(o) -> dict:
    r = o.report
    return {
        "device": o.device, "time": _iso(o.taken), "verdict": o.verdict,
        "previous_verdict": o.previous, "previous_time": _iso(o.previous_taken),
        "changed": o.changed,
        "model": (r.model if r else None) or (o.drive.model if o.drive else None),
        "serial": o.drive.serial if o.drive else None,
        "interface": r.interface if r else None,
        "temperature": r.temperature if r else None,
        "power_on_hours": r.power_on_hours if r else None,
        "wear": o.wear, "values": o.values or {},
        "reasons": to_json(o.reasons), "error": o.error,
        "selftest": o.selftest, "alert": o.alert,
    }


def observation_lines(o) -> list[str]:
    r = o.report
    serial = o.drive.serial if o.drive else None
    ident = ", ".join(x for x in ((r.model, serial and f"serial {serial}", r.interface)
                                  if r else ()) if x)
    head = f"{o.device}: {o.verdict}"
    if o.previous and o.previous != o.verdict:
        head += f", was {o.previous} at {_when(o.previous_taken)}"
    lines = [head + (f"  ({ident})" if ident else "")]
    if o.error:
        lines.append(f"  SMART unreadable: {o.error}")
    for x in o.reasons:
        if o.error and x.what == "SMART":
            continue
        lines.append(f"  {x.severity:<4}  {x.what}: {x.value}")
        lines.append(f"        {x.why}")
    if o.selftest:
        lines.append(f"  self-test: {o.selftest}")
    if o.alert:
        lines.append(f"  alert: {o.alert}")
    return lines


@dataclass(frozen=True)
class MonitorDone:
    """``monitor`` (one pass) and ``health --db``: the observations; exit 0 all PASS, 1 any
    WARN or FAIL, 3 SMART unreadable."""

    observations: tuple
    exit_code: int

    def json(self) -> dict:
        return {"disks": [observation_json(o) for o in self.observations]}

    def lines(self) -> list[str]:
        return [line for o in self.observations for line in observation_lines(o)]


_VALUE_ORDER = ("5", "10", "184", "187", "188", "196", "197", "198", "199", "media_errors",
                "grown_defects", "uncorrected_read", "uncorrected_write", "uncorrected_verify",
                "percentage_used", "available_spare", "critical_warning", "error_log_entries",
                "endurance_used", "177.value", "202.value", "231.value", "233.value")


@dataclass(frozen=True)
class HistoryDone:
    """``health DEV --history``: (drive, readings) for each drive seen behind DEV."""

    device: str
    drives: tuple
    since: str | None
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"device": self.device, "since": self.since, "drives": [
            dict(to_json(d), first_seen=_iso(d.first_seen), last_seen=_iso(d.last_seen),
                 readings=[{"time": _iso(r.taken), "verdict": r.verdict,
                            "temperature": r.temperature, "power_on_hours": r.power_on_hours,
                            "wear": r.wear, "values": r.values} for r in readings])
            for d, readings in self.drives]}

    def lines(self) -> list[str]:
        out = []
        for d, readings in self.drives:
            ident = ", ".join(x for x in (d.model, d.serial and f"serial {d.serial}") if x)
            if d.follows is not None:
                out.append(f"-- a different drive from {_when(d.first_seen)}: {d.why}")
            if not readings:
                out.append(f"{self.device}: no readings" + (f" since {self.since}"
                                                           if self.since else "")
                           + (f"  ({ident})" if ident else ""))
                continue
            out.append(f"{self.device}: {len(readings)} readings from "
                       f"{_when(readings[0].taken)} to {_when(readings[-1].taken)}"
                       + (f"  ({ident})" if ident else ""))
            keys = [k for k in _VALUE_ORDER if any(k in r.values for r in readings)]
            keys += sorted({k for r in readings for k in r.values} - set(keys))
            cols = ["time", "verdict", "temp", "hours", "wear"] + keys
            rows = [[_when(r.taken), r.verdict,
                     "" if r.temperature is None else str(r.temperature),
                     "" if r.power_on_hours is None else str(r.power_on_hours),
                     "" if r.wear is None else f"{r.wear}%"]
                    + [str(r.values[k]) if k in r.values else "" for k in keys]
                    for r in readings]
            keep = [i for i, c in enumerate(cols) if i < 2 or any(row[i] for row in rows)]
            cols = [cols[i] for i in keep]
            rows = [[row[i] for i in keep] for row in rows]
            widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
            out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
            out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                    for row in rows]
        return out


@dataclass(frozen=True)
class AckDone:
    """``health DEV --ack ATTR``: what was acknowledged, and the verdict with it."""

    observation: Any
    acked: tuple
    exit_code: int

    def json(self) -> dict:
        return dict(observation_json(self.observation),
                    acknowledged=[{"attribute": k, "value": v} for k, v in self.acked])

    def lines(self) -> list[str]:
        return [f"{self.observation.device}: {k} acknowledged at {v}" for k, v in self.acked] \
            + observation_lines(self.observation)


@dataclass(frozen=True)
class TimerDone:
    """``monitor timer install``: the unit files written."""

    paths: tuple
    exec_start: str
    interval: int
    system_dir: bool
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"units": list(self.paths), "exec_start": self.exec_start,
                "interval_seconds": self.interval}

    def lines(self) -> list[str]:
        out = [f"wrote {p}" for p in self.paths]
        out.append(f"  ExecStart={self.exec_start}")
        if self.system_dir:
            out.append("enable it with: systemctl daemon-reload && systemctl enable --now "
                       "diskimg-monitor.timer")
        return out


@dataclass(frozen=True)
class ReportDone:
    """``report``: the page written and what it shows; exit 1 when an image could not be
    drawn (the page says why)."""

    result: Any

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEM if self.result.errors else EXIT_OK

    def json(self) -> dict:
        return to_json(self.result)

    def lines(self) -> list[str]:
        r = self.result
        return [f"wrote {r.path}: {len(r.disks)} disk(s), {len(r.images)} image(s), "
                f"{human(r.size)}"] + [f"  {path}: {why}" for path, why in r.errors]
# mount, umount, export, serve

@dataclass(frozen=True)
class MountDone:
    """``mount``: an ops.mount.Mounted, ready (daemonised, or in the foreground)."""

    mounted: Any
    foreground: bool
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"ok": True, **to_json(self.mounted)}

    def lines(self) -> Iterator[str]:
        m = self.mounted
        names = ", ".join(os.path.basename(f) for f in m.files)
        yield f"mounted {m.image} on {m.mountpoint} ({human(m.size)}): {names}"
        for f in m.filesystems:
            yield f"  {f.mountpoint}: {f.fstype} (read-only)"
        for s in m.skipped:
            yield f"  {s}"
        if self.foreground:
            yield "serving in the foreground; Ctrl-C or SIGTERM unmounts"
        else:
            yield f"unmount with: diskimg umount {m.mountpoint}"


@dataclass(frozen=True)
class Unmounted:
    """``umount`` (and the end of a foreground ``mount``)."""

    mountpoint: str
    filesystems: list
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"ok": True, "mountpoint": self.mountpoint, "filesystems": self.filesystems}

    def lines(self) -> Iterator[str]:
        inner = f" and {len(self.filesystems)} filesystem(s) inside" if self.filesystems else ""
        yield f"unmounted {self.mountpoint}{inner}"


@dataclass(frozen=True)
class ExportDone:
    """``export``: an ops.export.ExportResult."""

    result: Any
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"ok": True, **to_json(self.result)}

    def lines(self) -> Iterator[str]:
        r = self.result
        if r.out == "-":          # the data went to stdout: the summary goes to stderr
            note(f"exported {r.image} as {r.format} to standard output: {human(r.size)} disk, "
                 f"{human(r.data_bytes)} of data, {human(r.written_bytes)} written in "
                 f"{r.seconds:.1f} s")
            return
        rate = r.size / r.seconds if r.seconds else 0
        yield (f"exported {r.image} to {r.out} ({r.format}): {human(r.size)} disk in "
               f"{r.seconds:.1f} s ({human(rate)}/s)")
        yield (f"  data {human(r.data_bytes)}, zero or unused {human(r.zero_bytes)} (holes); "
               f"{human(r.written_bytes)} written")


@dataclass(frozen=True)
class Served:
    """``serve``, once stopped."""

    image: str
    uri: str
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        return {"ok": True, "image": self.image, "uri": self.uri}

    def lines(self) -> Iterator[str]:
        yield f"stopped serving {self.image}"


# --------------------------------------------------------------------------------------------
# key

@dataclass(frozen=True)
class KeyDone:
    """``diskimg key ...``: an ops.keys.KeyResult."""

    result: Any
    exit_code: int = EXIT_OK

    def json(self) -> dict:
        r = self.result
        out = {"action": r.action, "changed_slots": list(r.changed),
               "images": [{"image": p, "key_fingerprint": kid, "slots": list(slots)}
                          for p, kid, slots in r.images]}
        if r.paper:
            out["paper_key"] = list(r.paper)
        return out

    def lines(self) -> Iterator[str]:
        r = self.result
        if r.paper:
            path, kid, _ = r.images[0]
            yield f"# diskimg paper key of {path}'s chain, key fingerprint {kid}"
            yield "# anyone holding these lines can read every image of the chain: keep them safe"
            yield "# type them back into a file and give it with --paper-key FILE"
            yield from r.paper
            return
        verb = {"add": "added", "remove": "removed",
                "change-passphrase": "new passphrase in"}.get(r.action)
        for path, kid, slots in r.images:
            head = f"{path}: key fingerprint {kid}"
            if verb:
                head += f"; {verb} slot {', '.join(map(str, r.changed))}"
            yield head
            for s in slots:
                kdf = s["kdf"]
                params = ", ".join(f"{k} {v}" for k, v in kdf.items() if k != "name")
                yield (f"  slot {s['id']}: {s['type']}, {kdf.get('name')}"
                       + (f" ({params})" if params else "")
                       + (f", added {s['created']}" if s.get("created") else ""))
