#!/usr/bin/env python3
"""A stand-in for smartctl that replays recorded outputs, so tests run the real pySMART and
diskimg code against real drives' answers.

Answers come from FAKE_SMARTCTL_DIR, one file per argument list, named like pySMART's datasets:
``'_' + '_'.join(argv)`` with ``/`` replaced by ``_`` (``smartctl -d sat --all /dev/sda`` ->
``_-d_sat_--all__dev_sda``).  Optional companions:

* ``<name>.rc``: the exit status (default 0);
* ``<name>.1``, ``<name>.2``, ...: a sequence; each call serves the next, the last one repeats
  (self-test progress: in progress 90% remaining, then 40%, then completed).  The position is
  kept in FAKE_SMARTCTL_STATE (a writable directory; required for sequences).

FAKE_SMARTCTL_MAP maps device paths given on the command line to the recorded ones
(``/tmp/x/sda=/dev/sda;/tmp/x/nvme=/dev/nvme0``), since tests use nodes that exist on the test
machine.  Every call is appended to FAKE_SMARTCTL_STATE/calls.log.  An argument list without a
recording prints a message on stderr and exits 1 (real smartctl's "command line did not parse").
"""
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    data = Path(os.environ["FAKE_SMARTCTL_DIR"])
    state = os.environ.get("FAKE_SMARTCTL_STATE")
    mapping = dict(pair.split("=", 1) for pair in
                   os.environ.get("FAKE_SMARTCTL_MAP", "").split(";") if "=" in pair)
    argv = [mapping.get(a, a) for a in argv]
    name = ("_" + "_".join(argv)).replace("/", "_")
    if state:
        with open(Path(state) / "calls.log", "a") as log:
            log.write(" ".join(argv) + "\n")
    answer = data / name
    if not answer.exists():
        seq = sorted((p for p in data.glob(name + ".*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]))
        if not seq:
            print(f"fake-smartctl: no recording {name} in {data}", file=sys.stderr)
            return 1
        if not state:
            print("fake-smartctl: sequences need FAKE_SMARTCTL_STATE", file=sys.stderr)
            return 1
        counter = Path(state) / (name + ".count")
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        answer = seq[min(n, len(seq) - 1)]
    sys.stdout.write(answer.read_text(errors="replace"))
    rc = answer.with_name(answer.name + ".rc")
    if not rc.exists():
        rc = data / (name + ".rc")
    return int(rc.read_text()) if rc.exists() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
