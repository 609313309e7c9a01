"""The used-block scan of a source, started before the imaging code is even imported.

`diskimg image` spends its first tenth of a second importing the modules that compress, hash,
write and protect an image, and the used-block scan (the filesystem's bitmaps and the walk of
its inode tables: 0.07-0.1 s on the benchmark disk) used to wait for all of them.  An
`EarlyScan` opens the source read-only and scans it on its own thread while those imports run,
so that the disk is read from the start and the scan's reads overlap the imports' (issue 20).

For `diskimg image SRC ...` the entry point (diskimg.__main__) `start`s it before the command
line's own modules are imported, and the image command `claim`s it (or starts its own when the
command line named another source).

It is only ever a head start: `take` hands over the map when the source that imaging opened is
the same device or file, of the same size, as the one scanned; otherwise, or when the early
scan failed in any way, imaging scans again itself, exactly as without it.  Nothing here
raises: a source that cannot be opened is imaging's to report.
"""
from __future__ import annotations

import logging
import os
import stat
import threading

from diskimg.disk.blockdev import Source, open_source

log = logging.getLogger(__name__)

_started: EarlyScan | None = None    # started by the entry point, not yet claimed


def start(path: str) -> None:
    """Start the scan of `path` before the command line is even parsed (diskimg.__main__,
    when the command line reads `diskimg image SRC ...`); `claim` hands it over."""
    global _started
    release()
    _started = EarlyScan(path)


def claim(path: str) -> EarlyScan:
    """The early scan of `path`: the one `start` began when it was for that very argument,
    else a new one."""
    global _started
    early, _started = _started, None
    if early is not None and early.path == path:
        log.debug("%s: the used-block scan begun at start-up goes on", path)
        return early
    if early is not None:
        early.close()
    return EarlyScan(path)


def release() -> None:
    """Let go of a scan `start` began that no command claimed (a usage error, --help)."""
    global _started
    early, _started = _started, None
    if early is not None:
        early.close()


class EarlyScan:
    """The used-block map of `path`, computed on a thread from construction on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._source: Source | None = None
        self._id: tuple[int, int, int, int, int] | None = None   # what was scanned
        self._result = None
        self._said: list[logging.LogRecord] = []     # the scan's log records, held back
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = False          # the scan thread has finished
        self._abandoned = False     # closed while it ran: the thread lets go of the source
        try:
            st = os.stat(path)
            # only what imaging reads at offsets; never a pipe or a character device, whose
            # open or read could block or consume what the real run needs
            if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
                return
            self._source = source = open_source(path)
            self._id = _identity(source)
        except Exception as err:      # imaging opens it again and says what is wrong
            log.debug("%s: no early scan: %s", path, err)
            self._release()
            return
        self._thread = threading.Thread(target=self._scan, name="early-scan", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        source = self._source
        held = _Held(threading.get_ident())
        loggers: list[logging.Logger] = []
        levels: list[int] = []
        try:
            from diskimg.disk.used import scan
            # what the scan says (a filesystem read fully, a repaired allocation map) is said
            # when its map is taken, where imaging would have scanned: not at all when the
            # command is refused first (a mounted source, an image on the source)
            loggers = [log] + [
                logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                if name == "diskimg.disk.used" or name.startswith("diskimg.disk.used.")]
            for lg in loggers:
                # every record made, whatever the level then: the scan may run before the
                # command line has set logging up, and what is shown is decided when the
                # records are handed on (by the handlers' levels)
                levels.append(lg.level)
                lg.setLevel(logging.DEBUG)
                lg.addFilter(held)
            # the moment the source is first read: scripts/bench times start-up by this line
            # (held back like the rest, with its time: logging may not be set up yet)
            log.debug("%s: reading its used-block map", source.path)
            self._result = scan(source.fd, source.size, sector_size=source.logical_sector)
        except BaseException as err:   # a thread's failure is only a missed head start
            log.debug("%s: early scan failed: %s", source.path, err, exc_info=True)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
                lg.removeFilter(held)
            self._said = held.records
            with self._lock:
                self._done = True
                if self._abandoned:
                    self._release()

    def take(self, source: Source):
        """The used-block map (disk.used.UsedMap) of `source` when the early scan read that
        very device or file at that size and finished; else None (the caller scans).
        Waits for the scan."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._result is not None and _identity(source) != self._id:
            log.debug("%s: the early scan was of another source; scanning again", source.path)
            self._release()
            return None
        said, self._said = self._said, []
        for record in said:      # what it found, or (at --debug) why it failed
            logging.getLogger(record.name).handle(record)
        self._release()
        return self._result

    def close(self) -> None:
        """Let go of the scan (idempotent) without waiting for it: a command refused before
        imaging (or interrupted) must not wait for the scan of a large filesystem; a scan
        still running finishes on its own (daemon) thread and closes its descriptor then."""
        with self._lock:
            if self._thread is not None and not self._done:
                self._abandoned = True
                return
        self._release()

    def _release(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


class _Held(logging.Filter):
    """Holds back the records the scan thread logs (other threads' pass)."""

    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.append(record)
        return False


def _identity(source: Source) -> tuple[int, int, int, int, int]:
    """The device or file open as `source`, and the size and sector it was read at."""
    st = os.fstat(source.fd)
    return st.st_dev, st.st_ino, st.st_rdev, source.size, source.logical_sector
