"""Modules imported when a command first uses them, not when the CLI starts: ``--help``,
``--version`` and ``info`` do not pay for the imaging code, and only the commands that need them
import zstandard, pyudev (``list``) or pySMART (``health``).  The renderer too: building the
parser needs none of it (its result classes take a few ms to define).
tests/cli/test_errors.py checks what each command imports."""
from __future__ import annotations

import sys


class LazyModule:
    """A module imported at the first attribute looked up on it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        # __import__, not importlib.import_module: the same import machinery as an import
        # statement, which is what -X importtime measures
        __import__(self._name)
        return getattr(sys.modules[self._name], attr)


blockdev = LazyModule("diskimg.disk.blockdev")
devices = LazyModule("diskimg.devices")
health = LazyModule("diskimg.health")
imagefile = LazyModule("diskimg.image.imagefile")
imaging = LazyModule("diskimg.ops.imaging")
pipeline = LazyModule("diskimg.ops.pipeline")
repair = LazyModule("diskimg.ops.repair")
rescue = LazyModule("diskimg.ops.rescue")
restore = LazyModule("diskimg.ops.restore")
stream_restore = LazyModule("diskimg.ops.stream_restore")
verify = LazyModule("diskimg.ops.verify")
chain = LazyModule("diskimg.image.chain")
render = LazyModule("diskimg.cli.render")
