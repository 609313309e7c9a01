"""systemd units that run ``diskimg monitor --once`` on a timer (``monitor timer install``).

Two files in the unit directory (/etc/systemd/system by default): ``diskimg-monitor.service``
(a oneshot at low CPU and I/O priority) and ``diskimg-monitor.timer`` (after boot, then every
interval; ``Persistent`` is not used: it only applies to calendar timers).  Written atomically;
``systemd-analyze verify`` checks them in the tests.  Enabling them is left to the sysadmin
(``systemctl daemon-reload; systemctl enable --now diskimg-monitor.timer``): installing a unit
should not start work on a rescue system that did not ask for it.
"""
from __future__ import annotations

import os

from diskimg import atomicfile
from diskimg.errors import OperationFailed, PermissionDenied, is_permission_error

UNIT_DIR = "/etc/systemd/system"
NAME = "diskimg-monitor"

__all__ = ["NAME", "UNIT_DIR", "exec_line", "install", "units"]


def _quote(arg: str) -> str:
    """One ExecStart argument as systemd reads it (systemd.service(5), "Command lines")."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\n\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def exec_line(argv: list[str]) -> str:
    return " ".join(_quote(a) for a in argv)


def units(argv: list[str], interval_seconds: int) -> dict[str, str]:
    """File name -> contents of the service and the timer running ``argv``."""
    every = f"{interval_seconds}s"
    service = (
        "[Unit]\n"
        "Description=diskimg disk health monitor: SMART history, trends, self-tests, alerts\n"
        "After=local-fs.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={exec_line(argv)}\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        "# exit 1 means a disk is WARN or FAIL: reported, not a failure of the unit\n"
        "SuccessExitStatus=1\n")
    timer = (
        "[Unit]\n"
        f"Description=Run diskimg monitor every {every}\n\n"
        "[Timer]\n"
        "OnBootSec=5min\n"
        f"OnUnitActiveSec={every}\n"
        "AccuracySec=1min\n"
        f"Unit={NAME}.service\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n")
    return {f"{NAME}.service": service, f"{NAME}.timer": timer}


def install(unit_dir: str, argv: list[str], interval_seconds: int) -> list[str]:
    """Write the two units into ``unit_dir``; their paths."""
    paths = []
    try:
        os.makedirs(unit_dir, exist_ok=True)
        for name, text in units(argv, interval_seconds).items():
            path = os.path.join(unit_dir, name)
            atomicfile.write_atomically(path, text.encode())
            paths.append(path)
    except OSError as e:
        if is_permission_error(e):
            raise PermissionDenied(unit_dir, "write systemd units in") from e
        raise OperationFailed(f"{unit_dir}: cannot write systemd units: {e.strerror or e}",
                              path=unit_dir) from e
    return paths
