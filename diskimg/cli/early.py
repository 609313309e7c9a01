"""What the command line starts before it is even parsed: `diskimg image SRC ...` has the
used-block scan of SRC begin at once (diskimg.disk.prescan), while the command line's own
modules are imported and its parser is built (issue 20: the source's first read 0.03-0.05 s
sooner).  The image command then claims that scan when SRC is its source (`prescan.claim`),
else it starts its own.

Only the plain form is recognised (global options, the command, its source right after it),
so no option's value is ever taken for SRC; what needs no scan (--rescue, --all-blocks,
standard input, help) starts nothing.  This module imports nothing heavy: the entry point runs
it first.

The entry point also holds back Python's cyclic garbage collector while the program starts
(`pause_gc`), until the command runs (`resume_gc`): loading the CLI and a command's modules
makes tens of thousands of objects that stay, and the collector walked them over and over.
"""
from __future__ import annotations

import gc
import sys

# the options every command takes before its name (cli.options.common; a test keeps these in
# step with it)
GLOBAL_FLAGS = ("-v", "--verbose", "--debug")
GLOBAL_WITH_VALUE = ("--log-file", "--endpoint-url")


def start_scan(argv: list[str]) -> None:
    """Start the early scan for the command line `argv` (without the program name) when it
    reads `diskimg [global options] image SRC ...`."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in GLOBAL_WITH_VALUE:
            i += 2
        elif argv[i] in GLOBAL_FLAGS or argv[i].split("=", 1)[0] in GLOBAL_WITH_VALUE:
            i += 1
        else:
            return
    argv = argv[i:]
    if len(argv) < 2 or argv[0] != "image" or argv[1].startswith("-"):
        return
    if any(a in ("--rescue", "--all-blocks", "-h", "--help") for a in argv):
        return
    from diskimg.disk import prescan
    prescan.start(argv[1])


_gc_paused = False


def pause_gc() -> None:
    """No cyclic garbage collection while the program starts (the entry point, before it
    imports the CLI).  Measured (README "Start-up"): `diskimg info` ~0.02 s sooner on a warm
    cache, the unchanged incremental's first data read ~0.02 s sooner on a cold one."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """The command is about to run: what start-up loaded is set aside for good (`gc.freeze`:
    the collector no longer walks it), and collection goes on for everything made from now on.
    Does nothing unless `pause_gc` paused it."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def release() -> None:
    """Let go of an early scan no command claimed (a usage error, --help)."""
    prescan = sys.modules.get("diskimg.disk.prescan")
    if prescan is not None:
        prescan.release()
