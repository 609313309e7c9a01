"""Files replaced whole or not at all: written to a temporary file beside the target, made
durable, then renamed over it, so a reader (node_exporter's textfile collector, systemd, a browser)
never sees half a file and a crash leaves the old one.  One place for the metrics textfiles, the
systemd units and the HTML report; callers turn the OSError into their own one-line errors."""
from __future__ import annotations

import os
import tempfile


def temp_beside(path: str) -> tuple[int, str]:
    """A new temporary file (descriptor, name) in the directory of `path`, hidden by a leading
    dot.  Raises OSError (no such directory, permission denied)."""
    directory = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)


def publish(fd: int, tmp: str, path: str, data: bytes) -> None:
    """Write `data` to the temporary file `tmp` (open as `fd`), fsync it, make it world-readable
    and rename it over `path`; `tmp` is removed when anything fails.  Raises OSError."""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` by `data` whole (temp_beside, then publish).  Raises OSError."""
    fd, tmp = temp_beside(path)
    publish(fd, tmp, path, data)
