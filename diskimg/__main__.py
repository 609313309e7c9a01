"""The entry point of ``diskimg`` and ``python -m diskimg``: catches Ctrl-C from the very start.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread is, including in the
middle of importing the CLI and its libraries, which shows a traceback.  So before anything heavy
is imported this module installs a handler that raises KeyboardInterrupt once and ignores every
later Ctrl-C: the first one stops the command, and pressing it again while the command cleans up
(closing the pipeline, removing a partial file, printing the message) cannot interrupt the
cleanup or add a second traceback.  It imports only the built-in _signal and sys (``import
signal`` would first build its enums, which is long enough for a Ctrl-C to land in).
"""
import _signal
import sys

_interrupted = False


def _on_sigint(signum, frame):  # noqa: ARG001
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    raise KeyboardInterrupt


_signal.signal(_signal.SIGINT, _on_sigint)


def _on_unraisable(unraisable) -> None:
    """Python drops an exception raised where it cannot propagate (a weakref callback during
    an import, a __del__) with an "Exception ignored in" message.  A Ctrl-C that lands there
    is not lost: a timer raises it again a millisecond later, in the main thread's own code.
    (Raising it from here, or sending SIGINT from here, would only be dropped again: Python
    runs the handler before this hook returns.)"""
    global _interrupted
    if unraisable.exc_type is KeyboardInterrupt:
        _interrupted = False
        _signal.signal(_signal.SIGALRM, _on_sigint)
        _signal.setitimer(_signal.ITIMER_REAL, 0.001)
        return
    sys.__unraisablehook__(unraisable)


sys.unraisablehook = _on_unraisable


def _report_interrupted() -> int:
    try:
        sys.stderr.write("diskimg: error: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def main() -> int:
    """Run the CLI with sys.argv; returns the exit code (130 on Ctrl-C at any point)."""
    try:
        try:
            from diskimg.cli.main import main as cli_main
            code = cli_main()
        finally:
            # nothing that happens after the command (interpreter shutdown, joining threads)
            # may turn a late Ctrl-C into a traceback
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    except KeyboardInterrupt:
        # before cli.main could catch it: during the imports, or between its return and here
        return _report_interrupted()
    return code


if __name__ == "__main__":
    sys.exit(main())
