"""Errors and interruption (issue 10): Ctrl-C at any moment, JSON on failure, exit 4 for
permission problems, sources that are not disks, a broken smartctl, global options before the
command, and what the CLI imports at start-up.

Ctrl-C and start-up run the real entry points (``python -m diskimg`` and the ``diskimg`` console
script) as processes and send them real SIGINTs; permission tests run them as ``nobody``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, MiB, cli

from diskimg import health
from diskimg.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PERMISSION, EXIT_USAGE

DISKIMG = str(REPO / ".venv" / "bin" / "diskimg")
ENTRY_POINTS = {"python -m diskimg": [PYTHON, "-m", "diskimg"], "diskimg": [DISKIMG]}
IS_ROOT = os.geteuid() == 0


def _image_of(tmp_path: Path, size: int = 3 * MiB, name: str = "a") -> Path:
    src = tmp_path / f"{name}.raw"
    src.write_bytes(os.urandom(size))
    img = tmp_path / f"{name}.dimg"
    r = cli("image", src, img, "--no-progress")
    assert r.rc == 0, r.err
    return img


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("diskimg: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# Ctrl-C

def _frames_outside_diskimg(err: str) -> bool:
    """A traceback from before diskimg took Ctrl-C over: the interrupt came while CPython
    itself was starting (site, .pth files, the console script's own ``import re``, finding the
    diskimg package) or in diskimg/__main__.py before the line that installs its handler.
    No Python program can catch that one."""
    pkg = str(REPO / "diskimg") + "/"
    main_py = (REPO / "diskimg" / "__main__.py").read_text().splitlines()
    takes_over = next(i for i, line in enumerate(main_py, 1)
                      if "_signal.signal(_signal.SIGINT, _on_sigint)" in line)
    for path, line in re.findall(r'File "([^"]+)", line (\d+)', err):
        if path == pkg + "__init__.py":
            continue
        if path == pkg + "__main__.py" and int(line) <= takes_over:
            continue
        if path.startswith(pkg):
            return False
    return "KeyboardInterrupt" in err


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_ctrl_c_storm_from_the_start(entry, tmp_path):
    """SIGINT every 2 ms, starting at a different moment of start-up each run: during
    CPython's start-up, the imports of the CLI and zstandard, the command, the exit.  Every
    run ends in exactly one line and exit 130, or completes normally."""
    img = _image_of(tmp_path)
    cmd = ENTRY_POINTS[entry] + ["info", str(img)]
    # the storm starts at 20 moments spread over one uninterrupted run's duration (this
    # machine's load decides how long start-up takes); until enough runs were caught by diskimg
    t0 = time.monotonic()
    subprocess.run(cmd, capture_output=True, check=True)
    step = (time.monotonic() - t0) / 16
    outcomes = {"interrupted": 0, "completed": 0, "before diskimg": 0}
    for i in range(200):
        if i >= 40 and outcomes["interrupted"] >= 10:
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep((i % 20) * step)
        while proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        out, err = proc.communicate()
        if proc.returncode == EXIT_INTERRUPTED or (proc.returncode == -signal.SIGINT
                                                   and err == "diskimg: error: interrupted\n"):
            # (-SIGINT: a later Ctrl-C of the storm after Python's finalization gave SIGINT
            # back its default action, a moment before exit; the shell shows 130 for both)
            early, _, line = err.rpartition("diskimg: error: interrupted\n")
            assert line == "", err
            # before it, at most what Python printed for a Ctrl-C that it dropped itself
            # ("Exception ignored in ...") before diskimg's code ran
            assert early == "" or _frames_outside_diskimg(early), err
            outcomes["interrupted"] += 1
        elif proc.returncode == 0:
            assert err == "" and "uuid:" in out
            outcomes["completed"] += 1
        else:
            # the only other ending: killed by SIGINT before Python set up its handler (no
            # output), or Python's traceback from its own start-up, before diskimg's code
            assert proc.returncode in (-signal.SIGINT, 1), (proc.returncode, err)
            assert err == "" or _frames_outside_diskimg(err), (proc.returncode, err)
            outcomes["before diskimg"] += 1
    assert outcomes["interrupted"] >= 10, outcomes


def _drop_a_ctrl_c() -> None:
    """What Python does with a Ctrl-C that lands in a __del__: it is passed to
    sys.unraisablehook ("Exception ignored in ...") instead of being raised."""
    class Dropped:
        def __del__(self):
            raise KeyboardInterrupt
    Dropped()


def test_importing_the_entry_point_changes_nothing():
    """The SIGINT handler and the unraisable hook are main()'s, not a side effect of an
    import."""
    code = ("import signal, sys; hook = sys.unraisablehook; import diskimg.__main__; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "sys.unraisablehook is hook)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_main_in_process_puts_everything_back(monkeypatch):
    """Called from other Python code, main() leaves SIGINT, SIGALRM, the timer and the
    unraisable hook as it found them; other unraisable exceptions reach the previous hook."""
    import diskimg.__main__ as entry
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    hook = sys.unraisablehook
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["diskimg", "--version"])

    class Noisy:
        def __del__(self):
            raise ValueError("not a Ctrl-C")
    import diskimg.cli.main as cli_module
    real = cli_module.main
    monkeypatch.setattr(cli_module, "main", lambda: (Noisy(), real())[1])
    assert entry.main() == 0
    assert seen == [ValueError]
    assert sys.unraisablehook is hook
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_ctrl_c_dropped_at_the_end_of_the_command_is_130(monkeypatch, capsys):
    """A Ctrl-C that Python dropped in the command's last millisecond: main() returns 130 with
    the one line, and no timer is left to raise it after main() returned."""
    import diskimg.__main__ as entry
    import diskimg.cli.main

    def command() -> int:
        _drop_a_ctrl_c()
        return 0
    monkeypatch.setattr(diskimg.cli.main, "main", command)
    assert entry.main() == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "diskimg: error: interrupted\n"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    time.sleep(0.05)   # a timer left behind would raise KeyboardInterrupt here


def test_ctrl_c_dropped_during_cleanup_is_not_raised_again(monkeypatch, capsys):
    """Once the command cleans up after a failure (here: its error was being reported), a
    dropped Ctrl-C is not raised again: the failure's exit code and message stand."""
    import diskimg.__main__ as entry
    import diskimg.cli.main
    from diskimg import errors

    def command() -> int:
        errors.begin_cleanup()
        _drop_a_ctrl_c()
        time.sleep(0.01)      # long past the 1 ms timer, were it armed
        print("diskimg: error: x: failed", file=sys.stderr)
        return EXIT_FAILED
    monkeypatch.setattr(diskimg.cli.main, "main", command)
    assert entry.main() == EXIT_FAILED
    assert capsys.readouterr().err == "diskimg: error: x: failed\n"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_ctrl_c_twice_while_imaging(entry, tmp_path):
    """Two Ctrl-C in a row in the middle of imaging a file: one line, exit 130, no image,
    nothing left but the source."""
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    img = tmp_path / "big.dimg"
    # level 19 on random data is slow enough to be caught in the middle
    proc = subprocess.Popen(ENTRY_POINTS[entry] + ["image", str(src), str(img), "--level", "19",
                                                   "--no-progress", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = Path(str(img) + ".partial")
    while proc.poll() is None and not (partial.exists() and partial.stat().st_size > 0):
        time.sleep(0.01)
    assert proc.poll() is None, "imaging ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err == "diskimg: error: interrupted\n"
    assert out == ""
    assert not img.exists()


def test_ctrl_c_with_json(tmp_path, monkeypatch):
    """In-process: KeyboardInterrupt from inside a command gives the JSON failure object."""
    from diskimg.image import imagefile

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    img = _image_of(tmp_path)
    monkeypatch.setattr(imagefile, "describe", interrupted)
    r = cli("info", img, "--json")
    assert r.rc == EXIT_INTERRUPTED
    assert r.json == {"ok": False, "error": {"message": "interrupted", "path": None,
                                             "exit_code": EXIT_INTERRUPTED}}
    assert r.err_lines == ["diskimg: error: interrupted"]


# --------------------------------------------------------------------------------------------
# JSON on failure, absolute paths

def test_json_failure_of_every_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notimg").write_bytes(b"x" * 5000)
    (tmp_path / "empty").touch()
    cases = [
        (["image", "empty", "out.dimg"], EXIT_USAGE, tmp_path / "empty"),
        (["image", "missing", "out.dimg"], EXIT_USAGE, tmp_path / "missing"),
        (["restore", "notimg", "out.raw", "--yes"], EXIT_USAGE, tmp_path / "notimg"),
        (["verify", "notimg"], EXIT_USAGE, tmp_path / "notimg"),
        (["info", "notimg"], EXIT_USAGE, tmp_path / "notimg"),
        (["health", "nodev", "--smartctl", "/bin/true"], EXIT_USAGE, None),
    ]
    for argv, code, path in cases:
        r = cli(*argv, "--json")
        assert r.rc == code, (argv, r.err)
        assert r.json["ok"] is False
        err = r.json["error"]
        assert err["exit_code"] == code
        assert err["path"] == (str(path) if path else None), (argv, err)
        assert err["message"] and "\n" not in err["message"]
        assert _one_error_line(r.err) == f"diskimg: error: {err['message']}"


def test_json_usage_errors(capsys):
    r = cli("verify", "--json")
    assert r.rc == EXIT_USAGE
    assert r.json["ok"] is False and r.json["error"]["exit_code"] == EXIT_USAGE
    assert "IMAGE" in r.json["error"]["message"]
    r = cli("image", "a", "b", "--level", "x", "--json")
    assert r.rc == EXIT_USAGE and "--level" in r.json["error"]["message"]
    # without --json argparse's usage text stays
    r = cli("verify")
    assert r.rc == EXIT_USAGE and r.out == "" and "usage: diskimg verify" in r.err


def test_json_error_merges_to_dict(tmp_path, monkeypatch):
    """An error with to_dict() (a restore's partial-write details) adds its fields."""
    from diskimg.image import imagefile
    from diskimg.errors import OperationFailed

    class Detailed(OperationFailed):
        def to_dict(self):
            return {"written": [[0, 213]], "message": "not this one"}

    def fail(*a, **k):
        raise Detailed("x: broke", path="x")
    img = _image_of(tmp_path)
    monkeypatch.setattr(imagefile, "describe", fail)
    monkeypatch.chdir(tmp_path)
    r = cli("info", img, "--json")
    assert r.rc == EXIT_FAILED
    assert r.json["error"] == {"message": "x: broke", "path": str(tmp_path / "x"),
                               "exit_code": EXIT_FAILED, "written": [[0, 213]]}


def test_success_json_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("src.raw").write_bytes(os.urandom(2 * MiB))
    r = cli("image", "src.raw", "a.dimg", "--json", "--no-progress")
    assert r.rc == 0, r.err
    assert r.json["path"] == str(tmp_path / "a.dimg")
    r = cli("restore", "a.dimg", "out.raw", "--yes", "--json")
    assert r.rc == 0, r.err
    assert r.json["image"] == str(tmp_path / "a.dimg")
    assert r.json["target"] == str(tmp_path / "out.raw")
    assert r.json["chain_paths"] == [str(tmp_path / "a.dimg")]
    r = cli("verify", "a.dimg", "--json")
    assert r.rc == 0 and r.json["image"] == str(tmp_path / "a.dimg")
    assert [c["path"] for c in r.json["chain"]] == [str(tmp_path / "a.dimg")]
    r = cli("info", "a.dimg", "--json")
    assert r.rc == 0 and r.json["uuid"]


# --------------------------------------------------------------------------------------------
# sources and targets that are not disks or files

def test_sources_that_are_not_disks(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    empty = tmp_path / "empty"
    empty.touch()
    for src, what in [("/proc/cpuinfo", "empty regular file"), (fifo, "is a pipe"),
                      ("/dev/null", "is a character device"), (empty, "empty regular file")]:
        r = cli("image", src, tmp_path / "x.dimg")
        assert r.rc == EXIT_USAGE, (src, r.err)
        line = _one_error_line(r.err)
        assert line.startswith(f"diskimg: error: {src}: ") and what in line, line
        assert not (tmp_path / "x.dimg").exists()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_dev_stdin_from_a_pipe(entry, tmp_path):
    """/dev/stdin fed by a pipe, as SOURCE, IMAGE and TARGET of every command: one line
    naming it, exit 2 (it used to be "Illegal seek" with no path)."""
    img = _image_of(tmp_path)
    src = tmp_path / "a.raw"
    for argv in (["image", "/dev/stdin", str(tmp_path / "x.dimg")],
                 ["image", str(src), "/dev/stdin"],
                 ["image", str(src), "/dev/stdin", "--force"],
                 ["restore", "/dev/stdin", str(tmp_path / "out.raw"), "--yes"],
                 ["restore", str(img), "/dev/stdin", "--yes"],
                 ["verify", "/dev/stdin"],
                 ["info", "/dev/stdin"]):
        proc = subprocess.run(ENTRY_POINTS[entry] + argv, input="some text\n",
                              capture_output=True, text=True)
        assert proc.returncode == EXIT_USAGE, (argv, proc.stderr)
        line = _one_error_line(proc.stderr)
        assert line.startswith("diskimg: error: /dev/stdin: is a pipe"), line
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / "x.dimg").exists()


# --------------------------------------------------------------------------------------------
# permission denied: exit 4

def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           PYTHON, "-m", "diskimg", *argv],
                          capture_output=True, text=True, cwd="/")


@pytest.fixture
def shared_dir():
    """A directory that user nobody can reach (tmp_path is root's alone)."""
    if not IS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run diskimg as another user")
    d = Path(tempfile.mkdtemp(prefix="diskimg-perm-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_permission_denied_exits_4(shared_dir):
    d = shared_dir
    img = _image_of(d, name="full")
    child_src = d / "full.raw"
    with open(child_src, "r+b") as f:
        f.write(b"changed")
    inc = d / "inc.dimg"
    assert cli("image", child_src, inc, "--incremental", img, "--no-progress").rc == 0
    for p in d.iterdir():
        p.chmod(0o644)
    secret = d / "secret"
    secret.mkdir(mode=0o700)
    shutil.copy(img, secret / "s.dimg")
    closed = d / "closed"
    closed.mkdir(mode=0o755)
    private_src = d / "private.raw"
    private_src.write_bytes(os.urandom(MiB))
    private_src.chmod(0o600)
    out = d / "out"
    out.mkdir(mode=0o755)
    (out / "nobody.dimg").write_bytes(bytes(4 * MiB))    # root's, read-only to others

    cases = [
        (["image", str(private_src), str(out / "x.dimg")], str(private_src)),
        (["image", str(child_src), str(closed / "x.dimg")], None),            # dir not writable
        (["info", str(secret / "s.dimg")], str(secret / "s.dimg")),          # unreadable parent dir
        (["verify", str(secret / "s.dimg")], str(secret / "s.dimg")),
        (["restore", str(img), str(secret / "new" / "t.raw"), "--yes"], str(secret)),
        (["restore", str(img), str(out / "nobody.dimg"), "--yes"], str(out / "nobody.dimg")),
        (["restore", str(img), str(closed / "t.raw"), "--yes"], None),
        (["info", str(img), "--log-file", str(secret / "log")], str(secret / "log")),
    ]
    for argv, path in cases:
        proc = _as_nobody(*argv)
        assert proc.returncode == EXIT_PERMISSION, (argv, proc.stderr)
        line = _one_error_line(proc.stderr)
        assert "permission denied" in line, (argv, line)
        if path:
            assert line.startswith(f"diskimg: error: {path}"), (argv, line)
    # the parent of an incremental image may not be read: permission denied, not "not found"
    img.chmod(0o600)
    proc = _as_nobody("verify", str(inc))
    assert proc.returncode == EXIT_PERMISSION, proc.stderr
    assert _one_error_line(proc.stderr).startswith(f"diskimg: error: {img}: permission denied")
    # --json: the same, as an object
    proc = _as_nobody("info", str(secret / "s.dimg"), "--json")
    assert proc.returncode == EXIT_PERMISSION
    assert json.loads(proc.stdout)["error"]["path"] == str(secret / "s.dimg")
    assert json.loads(proc.stdout)["error"]["exit_code"] == EXIT_PERMISSION


def test_immutable_target_as_root(tmp_path):
    """As root mode bits do not stop a write, but an immutable file does (EPERM)."""
    if not IS_ROOT or not shutil.which("chattr"):
        pytest.skip("needs root and chattr")
    img = _image_of(tmp_path)
    target = tmp_path / "target.raw"
    target.write_bytes(bytes(4 * MiB))
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        r = cli("restore", img, target, "--yes")
        assert r.rc == EXIT_PERMISSION, r.err
        assert _one_error_line(r.err).startswith(f"diskimg: error: {target}: permission denied")
        assert target.read_bytes() == bytes(4 * MiB)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


# --------------------------------------------------------------------------------------------
# a broken smartctl

BROKEN_SMARTCTL = {
    "exit3": ("#!/bin/sh\necho 'garbage line one'\necho 'more junk'\nexit 3\n",
              "failed: exit 3: garbage line one"),
    "exit0": ("#!/bin/sh\necho '%%garbage{{'\nexit 0\n",
              "printed output diskimg cannot read: %%garbage{{"),
    "killed": ("#!/bin/sh\necho 'half an answer'\nkill -SEGV $$\n",
               "failed: killed by SIGSEGV: half an answer"),
}


@pytest.fixture(params=sorted(BROKEN_SMARTCTL))
def broken_smartctl(request, tmp_path, monkeypatch):
    """A smartctl on PATH that is broken in one of three ways; yields (path, expected text)."""
    script, expected = BROKEN_SMARTCTL[request.param]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = bindir / "smartctl"
    path.write_text(script)
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("DISKIMG_SMARTCTL", raising=False)
    return str(path), expected


def test_broken_smartctl_is_named(broken_smartctl, tmp_path):
    path, expected = broken_smartctl
    node = tmp_path / "sda"
    node.touch()
    for argv in (["health", node], ["selftest", node]):
        r = cli(*argv)
        assert r.rc == EXIT_FAILED, r.err
        line = _one_error_line(r.err)
        assert line == f"diskimg: error: smartctl at {path} {expected}", line
        assert "no SMART" not in line
    r = cli("health", node, "--json")
    assert r.json["error"]["path"] == path


def test_broken_smartctl_does_not_stop_the_precheck(broken_smartctl, caplog):
    path, expected = broken_smartctl
    with caplog.at_level("WARNING", logger="diskimg"):
        assert health.precheck("/dev/null") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: no health check of /dev/null before imaging: smartctl at {path} {expected}"]


# --------------------------------------------------------------------------------------------
# global options before and after the command

@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_in_both_places(where, tmp_path):
    (tmp_path / "notimg").write_bytes(b"y" * 100)
    log = tmp_path / "log"

    def run(*opts):
        argv = [*opts, "info", tmp_path / "notimg"] if where == "before" else \
            ["info", tmp_path / "notimg", *opts]
        return cli(*argv)
    r = run("--debug")
    assert r.rc == EXIT_USAGE and "Traceback" in r.err
    r = run("-v", "--log-file", log)
    assert r.rc == EXIT_USAGE and "Traceback" not in r.err
    assert "ERROR error: " in log.read_text() and "not a diskimg image" in log.read_text()
    r = run()
    assert "Traceback" not in r.err


def test_global_options_before_and_after_together(tmp_path):
    img = _image_of(tmp_path)
    log = tmp_path / "log"
    r = cli("--log-file", log, "verify", img, "-v", "--no-progress")
    assert r.rc == 0, r.err
    assert r.out.splitlines()[-1].startswith("OK: ")
    assert log.exists()


# --------------------------------------------------------------------------------------------
# start-up imports

def _imported(*argv: str, cwd: Path) -> set[str]:
    proc = subprocess.run([PYTHON, "-X", "importtime", "-m", "diskimg", *argv],
                          capture_output=True, text=True, cwd=cwd)
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "diskimg.cli.main" in names, proc.stderr[-2000:]
    return names


def test_startup_imports_only_what_the_command_needs(tmp_path):
    img = _image_of(tmp_path)
    heavy = {"pySMART", "pyudev", "tqdm", "zstandard", "crcmod", "diskimg.ops.imaging",
             "diskimg.health.smart", "diskimg.devices"}
    for argv in (["--version"], ["--help"], ["info", "--help"]):
        assert not heavy & _imported(*argv, cwd=tmp_path), argv
    got = _imported("info", str(img), cwd=tmp_path)
    assert "zstandard" in got
    assert not {"pySMART", "pyudev", "tqdm", "diskimg.ops.imaging", "diskimg.health.smart"} & got
    got = _imported("verify", str(img), "--no-progress", cwd=tmp_path)
    assert not {"pySMART", "pyudev", "tqdm", "diskimg.ops.imaging", "diskimg.health.smart"} & got
    got = _imported("image", str(tmp_path / "a.raw"), str(tmp_path / "b.dimg"), cwd=tmp_path)
    assert "diskimg.ops.imaging" in got and not {"pySMART", "tqdm"} & got
    # only the image commands' parsers are built: the other groups' modules stay unread
    assert not {"diskimg.cli.backup", "diskimg.cli.monitor", "diskimg.cli.devices",
                "diskimg.cli.keys", "diskimg.cli.mounts"} & got
    # health history (issue 17): nothing of it unless asked
    assert not {"sqlite3", "diskimg.health.history", "diskimg.health.monitor",
                "diskimg.report"} & got
    got = _imported("health", str(tmp_path / "nonexistent"), cwd=tmp_path)
    assert not {"zstandard", "pyudev", "diskimg.ops.imaging"} & got
    got = _imported("list", cwd=tmp_path)
    assert not {"zstandard", "pySMART", "diskimg.ops.imaging"} & got


def test_a_command_word_given_as_an_option_value_still_parses(tmp_path):
    """The parser is built for the first word that names a command; when that word was an
    option's value (here the log file is called "list"), the line is parsed again with every
    command, so it means what it always meant."""
    img = _image_of(tmp_path)
    r = subprocess.run([PYTHON, "-m", "diskimg", "--log-file", "list", "info", str(img)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "uuid" in r.stdout and (tmp_path / "list").exists()
    r = subprocess.run([PYTHON, "-m", "diskimg", "--log-file", "list", "imag"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'imag'" in r.stderr
    assert "'backup'" in r.stderr       # the full list of commands, as always


def test_entry_point_is_light():
    """The console script's module imports nothing but signal and sys before it takes
    Ctrl-C over."""
    text = (REPO / "diskimg" / "__main__.py").read_text()
    before = text[:text.index("_signal.signal(_signal.SIGINT, _on_sigint)")]
    imports = re.findall(r"^(?:import|from) (\S+)", before, re.M)
    assert imports == ["_signal", "sys"]
    assert "diskimg.__main__:main" in (REPO / "pyproject.toml").read_text()
    assert stat.S_IMODE(os.stat(DISKIMG).st_mode) & 0o111


def _scans_logged(log: Path) -> int:
    return log.read_text().count("reading its used-block map")


@pytest.mark.parametrize("form", ["plain", "global options first", "option before the source"])
def test_the_entry_point_starts_the_scan_and_the_image_command_takes_it(tmp_path, form):
    """`diskimg image SRC IMG`: the entry point starts the used-block scan of SRC before the
    command line's modules are imported, and the image command takes that scan over: the
    source is scanned once, as when the command starts the scan itself (an option right after
    `image`: the entry point does not guess)."""
    src = tmp_path / "a.raw"
    src.write_bytes(os.urandom(3 * MiB))
    log, img = tmp_path / "log", tmp_path / "a.dimg"
    argv = {"plain": ["image", str(src), str(img), "--log-file", str(log)],
            "global options first": ["-v", "--log-file", str(log), "image", str(src), str(img)],
            "option before the source": ["image", "--level", "2", str(src), str(img),
                                         "--log-file", str(log)]}[form]
    r = subprocess.run([PYTHON, "-m", "diskimg", *argv, "--no-progress"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _scans_logged(log) == 1, log.read_text()
    claimed = "the used-block scan begun at start-up goes on" in log.read_text()
    assert claimed == (form != "option before the source"), log.read_text()
    assert cli("verify", img).rc == 0


def test_a_scan_the_entry_point_started_for_nothing_is_let_go(tmp_path):
    """A command refused before imaging (here a usage error, and a source that is no file)
    exits at once with its one error line: the early scan is not waited for."""
    src = tmp_path / "a.raw"
    src.write_bytes(os.urandom(3 * MiB))
    r = subprocess.run([PYTHON, "-m", "diskimg", "image", str(src), str(tmp_path / "a.dimg"),
                        "--level", "99"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == EXIT_USAGE and "--level 99" in _one_error_line(r.stderr)
    r = subprocess.run([PYTHON, "-m", "diskimg", "image", str(tmp_path / "missing"),
                        str(tmp_path / "b.dimg")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "missing" in _one_error_line(r.stderr)
    assert not (tmp_path / "a.dimg").exists() and not (tmp_path / "b.dimg").exists()


_GC_PROBE = """
import gc, sys
import diskimg.__main__ as entry
from diskimg.cli import images, main as cli_main
seen = {}
real_main, real_image = cli_main.main, images._cmd_image
def starting(*a, **k):
    seen["while starting"] = gc.isenabled()
    return real_main(*a, **k)
def imaging(args):
    seen["while imaging"] = (gc.isenabled(), gc.get_freeze_count() > 0)
    return real_image(args)
cli_main.main, images._cmd_image = starting, imaging
sys.modules["__main__"].main = entry.main      # run as the program, as `python -m diskimg`
sys.argv = ["diskimg"] + sys.argv[1:]
code = entry.main()
print(seen, file=sys.stderr)
sys.exit(code)
"""


def test_the_program_collects_no_garbage_while_it_starts_and_does_while_the_command_runs(
        tmp_path):
    """The entry point holds Python's cyclic garbage collector back while the CLI and the
    command's modules load (start-up time, issue 20), and the command runs with it on again,
    start-up's objects set aside (gc.freeze); called as a library, main() leaves it alone."""
    src = tmp_path / "a.raw"
    src.write_bytes(os.urandom(3 * MiB))
    r = subprocess.run([PYTHON, "-c", _GC_PROBE, "image", str(src), str(tmp_path / "a.dimg"),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "{'while starting': False, 'while imaging': (True, True)}" in r.stderr, r.stderr
    import gc
    assert gc.isenabled()
    assert cli("info", tmp_path / "a.dimg").rc == 0     # in-process: not the program
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_entry_points_global_options_are_the_parsers():
    """The entry point's early scan skips the global options before `image` by name: the same
    names, with and without values, as the parser's."""
    from diskimg.cli import early as entry
    from diskimg.cli.options import common

    flags, valued = set(), set()
    for action in common(top=True)._actions:
        (valued if action.nargs is None and action.const is None else flags).update(
            action.option_strings)
    assert flags == set(entry.GLOBAL_FLAGS) and valued == set(entry.GLOBAL_WITH_VALUE)


def test_a_ctrl_c_that_python_wrapped_while_making_a_class_is_still_ctrl_c(monkeypatch, tmp_path):
    """Python turns a KeyboardInterrupt raised in a descriptor's __set_name__ (a dataclass
    field's, while a module is imported) into a RuntimeError; the Ctrl-C storm above caught
    one as an "internal error", exit 3. It is a Ctrl-C: one line, exit 130."""
    from diskimg.cli import images

    class Interrupts:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def info_while_a_class_is_made(args):
        class Made:
            field = Interrupts()
    monkeypatch.setattr(images, "_cmd_info", info_while_a_class_is_made)
    r = cli("info", _image_of(tmp_path))
    assert r.rc == EXIT_INTERRUPTED and r.err == "diskimg: error: interrupted\n"
