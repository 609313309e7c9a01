"""The entry point of ``diskimg`` and ``python -m diskimg``: catches Ctrl-C from the very start.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread is, including in the
middle of importing the CLI and its libraries, which shows a traceback.  So before anything heavy
is imported, main() installs a handler that raises KeyboardInterrupt once and ignores every
later Ctrl-C: the first one stops the command, and pressing it again while the command cleans up
(closing the pipeline, removing a partial file, printing the message) cannot interrupt the
cleanup or add a second traceback.  This module imports only the built-in _signal and sys
(``import signal`` would first build its enums, which is long enough for a Ctrl-C to land in),
and importing it changes nothing: the handler and the unraisable hook are installed by main()
and the previous ones put back when it returns (SIGINT stays ignored when main() is the
program itself, which exits right after: a late Ctrl-C must not add a traceback to its exit).
"""
import _signal
import sys

_interrupted = False
_pending = False          # a dropped Ctrl-C is to be raised again by the timer


def _cleanup_begun() -> bool:
    # diskimg.errors is imported by the CLI; before that no cleanup can have begun
    errors = sys.modules.get("diskimg.errors")
    return bool(getattr(errors, "cleanup_begun", False))


def _on_sigint(signum, frame):  # noqa: ARG001
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    raise KeyboardInterrupt


def _on_alarm(signum, frame):  # noqa: ARG001
    """The timer that raises a dropped Ctrl-C again; not once the command cleans up."""
    global _pending
    if not _pending:
        return
    _pending = False
    if _cleanup_begun():
        return
    _on_sigint(signum, frame)


def _make_unraisable_hook(previous):
    def _on_unraisable(unraisable) -> None:
        """Python drops an exception raised where it cannot propagate (a weakref callback
        during an import, a __del__) with an "Exception ignored in" message.  A Ctrl-C that
        lands there is not lost: a timer raises it again a millisecond later, in the main
        thread's own code, unless the command already cleans up.  (Raising it from here, or
        sending SIGINT from here, would only be dropped again: Python runs the handler before
        this hook returns.)"""
        global _interrupted, _pending
        if unraisable.exc_type is KeyboardInterrupt:
            if not _cleanup_begun():
                _interrupted = False
                _pending = True
                _signal.setitimer(_signal.ITIMER_REAL, 0.001)
            return
        previous(unraisable)
    return _on_unraisable


def _report_interrupted() -> int:
    try:
        sys.stderr.write("diskimg: error: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def _is_the_program() -> bool:
    """Whether main() runs as the program (the console script or ``python -m diskimg``), which
    exits as soon as it returns, rather than called by other Python code."""
    top = sys.modules.get("__main__")
    return getattr(top, "main", None) is main


def _exit_now(code: int) -> None:
    """End the program at once with `code`, skipping the interpreter's teardown, once output
    is flushed and the exit handlers (logging's flush among them) have run.  Only when boto3
    is loaded: freeing its client's object graph takes 0.1-0.4 s at exit, as long as some
    whole commands; only with no other thread alive (none is left working), and not when
    flushing the output fails (the ordinary exit then reports it)."""
    import threading
    if "botocore" not in sys.modules or threading.active_count() > 1:
        return
    import atexit
    import os
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the ordinary exit says what failed
        return
    os._exit(code)


def main() -> int:
    """Run the CLI with sys.argv; returns the exit code (130 on Ctrl-C at any point)."""
    global _interrupted, _pending
    _interrupted = _pending = False
    previous_sigint = _signal.signal(_signal.SIGINT, _on_sigint)
    previous_alarm = _signal.signal(_signal.SIGALRM, _on_alarm)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _make_unraisable_hook(previous_hook)
    try:
        try:
            try:
                program = _is_the_program()
                if program:
                    from diskimg.cli.early import pause_gc, start_scan
                    pause_gc()                    # until the command runs (cli.main)
                    start_scan(sys.argv[1:])      # the used-block scan of `image SRC`, now
                from diskimg.cli.main import main as cli_main
                code = cli_main()
                if _pending and not _cleanup_begun():
                    # a Ctrl-C dropped in the command's last millisecond: it still counts
                    raise KeyboardInterrupt
            finally:
                # nothing that happens after the command (interpreter shutdown, joining
                # threads) may turn a late Ctrl-C into a traceback
                try:
                    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
                    _signal.setitimer(_signal.ITIMER_REAL, 0)
                except OSError:
                    # a Ctrl-C that came as it was being ignored: Python reports it when it
                    # finds it pending with no handler ("Signal 2 ignored due to race
                    # condition"); it is ignored, as it was meant to be
                    _signal.setitimer(_signal.ITIMER_REAL, 0)
                _pending = False
                early = sys.modules.get("diskimg.cli.early")
                if early is not None:
                    early.release()
        except KeyboardInterrupt:
            # before cli.main could catch it: during the imports, or between its return and here
            return _report_interrupted()
        except RuntimeError as err:
            # the same, wrapped by Python while it made a class during an import ("Error
            # calling __set_name__" of a dataclass field)
            if isinstance(err.__cause__, KeyboardInterrupt):
                return _report_interrupted()
            raise
        if program:
            _exit_now(code)
        return code
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous_alarm if previous_alarm is not None
                       else _signal.SIG_DFL)
        sys.unraisablehook = previous_hook
        if not _is_the_program() and previous_sigint is not None:
            _signal.signal(_signal.SIGINT, previous_sigint)


if __name__ == "__main__":
    sys.exit(main())
