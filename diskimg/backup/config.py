"""The jobs file: TOML (read with the standard library's tomllib) naming each backup job.

::

    state-dir = "/var/lib/diskimg"          # status of each run, locks (default)

    [jobs.root]
    source = "/dev/disk/by-id/ata-WDC_WD40EFRX_WD-WCC4E1234567"   # or a table, one key of:
    # source = { serial = "WD-WCC4E1234567" }  { wwn = "0x50014ee2b1234567" }
    # source = { fs-uuid = "..." }  { ptuuid = "..." }  { path = "/dev/sdb" }
    destination = "/srv/backup/root"        # a directory, or s3://BUCKET/PREFIX
    # endpoint-url = "https://s3.example.net" # the S3 server (default: AWS_ENDPOINT_URL...)
    schedule = "daily"                      # systemd OnCalendar of the timer
    random-delay = "30min"
    full-every = "4w"                       # or "monthly", "weekly", "daily", "never"
    differential-every = "1w"               # or "weekly"...; default "never"
    incremental = true                      # false: every other run is a differential
    full-after-incrementals = 13            # a full when the chain holds this many incrementals
    full-after-percent = 50                 # ... or its changed images add up to 50% of the full
    keep-last = 7
    keep-daily = 14
    keep-weekly = 8
    keep-monthly = 12
    keep-yearly = 2
    health = "stop"                         # on a FAIL verdict: "stop", "rescue" or "ignore"
    compression-level = 3

Every mistake is a ``UsageError`` of one line naming the file and the key
(``/etc/diskimg/jobs.toml: jobs.root.keep-daily: a whole number >= 0 expected, got "7"``).
Unknown keys are refused, since a misspelt ``keep-dialy`` silently keeping nothing is the kind
of mistake found the day a restore is needed.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from diskimg.errors import PermissionDenied, UsageError, is_permission_error
from diskimg.store import is_remote

DEFAULT_CONFIG = "/etc/diskimg/jobs.toml"
DEFAULT_STATE_DIR = "/var/lib/diskimg"
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SOURCE_KEYS = ("path", "serial", "wwn", "fs-uuid", "ptuuid")
HEALTH_ACTIONS = ("stop", "rescue", "ignore")
CALENDAR_PERIODS = ("daily", "weekly", "monthly", "yearly")
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Period:
    """How often a level is due: a calendar period (`calendar`: a new day, ISO week, month or
    year since the last one) or an interval in seconds; `never` when neither."""

    calendar: str | None = None
    seconds: int | None = None

    @property
    def never(self) -> bool:
        return self.calendar is None and self.seconds is None

    def __str__(self) -> str:
        if self.calendar:
            return self.calendar
        if self.seconds is None:
            return "never"
        return format_seconds(self.seconds)


NEVER = Period()


def format_seconds(s: int) -> str:
    for unit, n in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


@dataclass(frozen=True)
class SourceSpec:
    """A job's source: `kind` is one of SOURCE_KEYS, `value` what it must equal."""

    kind: str
    value: str

    def __str__(self) -> str:
        return self.value if self.kind == "path" else f"{self.kind} {self.value}"


@dataclass(frozen=True)
class Keep:
    """restic's and Proxmox's keep rules; 0 leaves a rule out."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    @property
    def any(self) -> bool:
        return any(getattr(self, r) for r in KEEP_RULES)

    def merged(self, **overrides: int | None) -> Keep:
        """These rules with those given (not None) replaced: the command line over the job."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class LevelPolicy:
    full_every: Period = Period(calendar="monthly")
    differential_every: Period = NEVER
    incremental: bool = True
    full_after_incrementals: int | None = None
    full_after_percent: float | None = None


@dataclass(frozen=True)
class Job:
    name: str
    source: SourceSpec
    destination: str
    config_path: str
    state_dir: str
    schedule: str = "daily"
    random_delay: int = 1800
    levels: LevelPolicy = LevelPolicy()
    keep: Keep = Keep()
    health: str = "stop"
    smartctl: str | None = None
    compression_level: int | None = None
    block_size: int | None = None
    digest: str | None = None
    all_blocks: bool = False
    # settings that become ImageOptions fields where this diskimg has them (parity,
    # encryption): name -> value; refused when loading if the field does not exist
    image_options: dict = field(default_factory=dict)
    # the S3 server of an s3:// destination (None: AWS_ENDPOINT_URL, the profile, or AWS);
    # `--endpoint-url` on the command line wins
    endpoint_url: str | None = None

    @property
    def remote(self) -> bool:
        """Whether the images live in object storage (an s3:// destination)."""
        return is_remote(self.destination)


@dataclass(frozen=True)
class Config:
    path: str
    state_dir: str
    jobs: dict[str, Job]

    def job(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise UsageError(f"{self.path}: no job named {name!r} (jobs: {known})") from None


class _Reader:
    """Reads one table, naming each key in its errors, and refuses keys left unread."""

    def __init__(self, path: str, prefix: str, table: dict) -> None:
        self.path, self.prefix, self.table = path, prefix, table
        self.read: set[str] = set()

    def fail(self, key: str, what: str) -> UsageError:
        return UsageError(f"{self.path}: {self.prefix}{key}: {what}")

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.table.get(key, default)

    def string(self, key: str, default: str | None = None) -> str | None:
        v = self.get(key, default)
        if v is not None and (not isinstance(v, str) or not v):
            raise self.fail(key, f"a non-empty string expected, got {_show(v)}")
        return v

    def count(self, key: str, default: int | None = None, minimum: int = 0) -> int | None:
        v = self.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            raise self.fail(key, f"a whole number >= {minimum} expected, got {_show(v)}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, f"true or false expected, got {_show(v)}")
        return v

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.read)
        if unknown:
            raise self.fail(unknown[0], "unknown key" + _did_you_mean(unknown[0], self.read))


def _did_you_mean(key: str, known: set[str]) -> str:
    import difflib
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return str(v)


def parse_duration(text: str) -> int:
    """'30min', '12h', '7d', '4w', '90s' or '1h30min' -> seconds.  Raises ValueError."""
    total, pos = 0, 0
    text = text.strip()
    for m in re.finditer(r"\s*(\d+)\s*([a-z]+)", text):
        if m.start() != pos or m.group(2) not in _UNITS:
            raise ValueError(f"not a duration: {text!r} (e.g. 30min, 12h, 7d, 4w)")
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (e.g. 30min, 12h, 7d, 4w)")
    return total


def _period(r: _Reader, key: str, default: Period) -> Period:
    v = r.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise r.fail(key, f'a period expected ("monthly", "weekly", "daily", "4w", "7d", '
                          f'"never"), got {_show(v)}')
    if v == "never":
        return NEVER
    if v in CALENDAR_PERIODS:
        return Period(calendar=v)
    try:
        seconds = parse_duration(v)
    except ValueError:
        raise r.fail(key, f'a period expected ("monthly", "weekly", "daily", "4w", "7d", '
                          f'"never"), got {_show(v)}') from None
    if seconds <= 0:
        raise r.fail(key, "must be longer than 0")
    return Period(seconds=seconds)


def _source(r: _Reader) -> SourceSpec:
    v = r.get("source")
    if v is None:
        raise r.fail("source", "missing (a device path such as /dev/disk/by-id/..., or a table "
                               "{ serial = ... } / { wwn = ... } / { fs-uuid = ... })")
    if isinstance(v, str) and v:
        return SourceSpec("path", v)
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in SOURCE_KEYS:
            raise r.fail("source", f"a table with exactly one of {', '.join(SOURCE_KEYS)} "
                                   f"expected, got {{{', '.join(v)}}}")
        kind, value = next(iter(v.items()))
        if not isinstance(value, str) or not value:
            raise r.fail(f"source.{kind}", f"a non-empty string expected, got {_show(value)}")
        return SourceSpec(kind, value)
    raise r.fail("source", f"a device path or a table expected, got {_show(v)}")


def _image_options(r: _Reader) -> dict:
    """parity and encryption: accepted in the file now, passed to ImageOptions by the fields of
    the same purpose once this diskimg has them, refused until then."""
    out: dict = {}
    parity = r.get("parity")
    if parity is not None:
        if isinstance(parity, bool) or not isinstance(parity, (int, float)) or \
                not (parity == 0 or 0.5 <= parity <= 100):
            raise r.fail("parity", f"0 (none) or 0.5 to 100 (percent) expected, got "
                                   f"{_show(parity)}")
        out["parity"] = float(parity)
    enc = r.get("encryption")
    if enc is not None:
        if not isinstance(enc, dict):
            raise r.fail("encryption", "a table expected: { key-file = PATH } or "
                                       "{ passphrase-file = PATH }")
        er = _Reader(r.path, f"{r.prefix}encryption.", enc)
        key_file, pass_file = er.string("key-file"), er.string("passphrase-file")
        er.finish()
        if bool(key_file) == bool(pass_file):
            raise r.fail("encryption", "exactly one of key-file and passphrase-file expected")
        out["key_file" if key_file else "passphrase_file"] = key_file or pass_file
    return out


def _job(path: str, name: str, table: Any, state_dir: str) -> Job:
    prefix = f"jobs.{name}."
    if not JOB_NAME.match(name):
        raise UsageError(f"{path}: jobs.{name}: a job name is letters, digits, '.', '_' and "
                         f"'-' (it names the images and the systemd units)")
    if not isinstance(table, dict):
        raise UsageError(f"{path}: jobs.{name}: a table expected, got {_show(table)}")
    r = _Reader(path, prefix, table)
    source = _source(r)
    destination = r.string("destination")
    if destination is None:
        raise r.fail("destination", "missing (the directory the images go to)")
    if is_remote(destination):
        bucket = destination[5:].partition("/")[0]
        if not bucket:
            raise r.fail("destination", f"{destination}: no bucket in the URL "
                                        f"(s3://BUCKET/PREFIX)")
        if "//" in destination[5:] or destination[5:].startswith("/"):
            raise r.fail("destination", f"{destination}: an empty name between slashes "
                                        f"(s3://BUCKET/PREFIX)")
    elif "://" in destination:
        raise r.fail("destination", f"{destination}: a directory or s3://BUCKET/PREFIX "
                                    f"expected")
    elif not os.path.isabs(destination):
        raise r.fail("destination", f"an absolute directory expected, got {_show(destination)}")
    endpoint_url = r.string("endpoint-url")
    if endpoint_url is not None:
        if not is_remote(destination):
            raise r.fail("endpoint-url", "only for an s3:// destination")
        if not re.match(r"https?://[^/\s]+", endpoint_url):
            raise r.fail("endpoint-url", f"an http:// or https:// URL expected, got "
                                         f"{_show(endpoint_url)}")
        if "@" in endpoint_url.partition("://")[2].partition("/")[0]:
            # user:secret@host would end up in messages: credentials come the AWS ways
            raise r.fail("endpoint-url", "no credentials in the URL (use AWS_ACCESS_KEY_ID/"
                                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                         "~/.aws/credentials)")
    schedule = r.string("schedule", "daily")
    delay_text = r.string("random-delay", "30min")
    try:
        random_delay = parse_duration(delay_text) if delay_text != "0" else 0
    except ValueError as err:
        raise r.fail("random-delay", str(err)) from None
    levels = LevelPolicy(
        full_every=_period(r, "full-every", Period(calendar="monthly")),
        differential_every=_period(r, "differential-every", NEVER),
        incremental=r.boolean("incremental", True),
        full_after_incrementals=r.count("full-after-incrementals", None, minimum=1),
        full_after_percent=None,
    )
    pct = r.get("full-after-percent")
    if pct is not None:
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1000:
            raise r.fail("full-after-percent", f"a percentage above 0 expected, got {_show(pct)}")
        levels = dataclasses.replace(levels, full_after_percent=float(pct))
    keep = Keep(**{rule: r.count(f"keep-{rule}", 0) for rule in KEEP_RULES})
    health = r.string("health", "stop")
    if health not in HEALTH_ACTIONS:
        raise r.fail("health", f"one of {', '.join(HEALTH_ACTIONS)} expected, got {_show(health)}")
    if health == "rescue" and is_remote(destination):
        raise r.fail("health", "rescue needs a local destination (a rescue image is written "
                               "to a local file it can resume); use \"stop\" or \"ignore\" "
                               "with an s3:// destination")
    level = r.count("compression-level", None, minimum=1)
    if level is not None and level > 22:
        raise r.fail("compression-level", f"1 to 22 expected, got {level}")
    bs_text = r.get("block-size")
    block_size = None
    if bs_text is not None:
        from diskimg.units import parse_size
        from diskimg.format.v1 import check_block_size
        try:
            block_size = parse_size(str(bs_text))
            check_block_size(block_size)
        except ValueError as err:
            raise r.fail("block-size", str(err)) from None
    digest = r.string("digest")
    from diskimg.defaults import DIGESTS
    if digest is not None and digest not in DIGESTS:
        raise r.fail("digest", f"one of {', '.join(DIGESTS)} expected, got {_show(digest)}")
    job = Job(
        name=name, source=source, destination=destination, config_path=path,
        state_dir=state_dir, schedule=schedule, random_delay=random_delay, levels=levels,
        keep=keep, health=health, smartctl=r.string("smartctl"), compression_level=level,
        block_size=block_size, digest=digest, all_blocks=r.boolean("all-blocks", False),
        image_options=_image_options(r), endpoint_url=endpoint_url,
    )
    r.finish()
    _check_image_options(path, prefix, job.image_options)
    return job


def _check_image_options(path: str, prefix: str, wanted: dict) -> None:
    """Refuse parity and encryption settings this diskimg cannot honour yet, rather than make
    images without them."""
    if not wanted:
        return
    from diskimg.ops.imaging import ImageOptions
    have = {f.name for f in dataclasses.fields(ImageOptions)}
    for name in wanted:
        if name not in have:
            key = "parity" if name == "parity" else "encryption"
            raise UsageError(f"{path}: {prefix}{key}: this diskimg cannot make "
                             f"{'parity' if key == 'parity' else 'encrypted'} images yet")


def parse_config(text: str, path: str) -> Config:
    import tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path}: not valid TOML: {err}") from None
    r = _Reader(path, "", data)
    state_dir = r.string("state-dir", DEFAULT_STATE_DIR)
    jobs_table = r.get("jobs", {})
    r.finish()
    if not isinstance(jobs_table, dict):
        raise UsageError(f"{path}: jobs: a table of jobs expected ([jobs.NAME])")
    jobs = {name: _job(path, name, table, state_dir) for name, table in jobs_table.items()}
    return Config(path=path, state_dir=state_dir, jobs=jobs)


def load_config(path: str | None = None) -> Config:
    """Read the jobs file (default /etc/diskimg/jobs.toml).  Raises UsageError (missing, not
    TOML, a wrong key) or PermissionDenied."""
    path = os.path.abspath(path or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such jobs file (write one, or name it with "
                         f"--config)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a jobs file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text: {err}") from None
    except OSError as err:
        if is_permission_error(err):
            raise PermissionDenied(path, "read the jobs file") from err
        raise UsageError(f"{path}: cannot read the jobs file: {err.strerror or err}") from err
    return parse_config(text, path)
