"""Helpers shared by the CLI and root tests: run the CLI in-process or as a command, flip bytes,
hash files and devices, fill a mounted filesystem with real files and hash its tree.

Import as ``from helpers import ...`` (tests/ is on sys.path through tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from diskimg.cli.main import main

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()


def cli(*args: str | os.PathLike) -> CliResult:
    """`diskimg ARGS` in-process through cli.main, with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return CliResult(rc, out.getvalue(), err.getvalue())


def run(*cmd: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; a failure shows its stderr in the assertion."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                             f"{proc.stdout.strip()}\n{proc.stderr.strip()}")
    return proc


def diskimg(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m diskimg ARGS` as a separate process (what a user runs)."""
    return run(PYTHON, "-m", "diskimg", *args, check=check)


def flip_byte(path: str | os.PathLike, offset: int, mask: int = 0xFF) -> tuple[int, int]:
    """XOR the byte at `offset` of a file or device with `mask`; returns (old, new)."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        assert len(old) == 1, f"{path}: no byte at offset {offset}"
        new = old[0] ^ mask
        os.pwrite(fd, bytes([new]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return old[0], new


def read_at(path: str | os.PathLike, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_at(path: str | os.PathLike, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of a file or device and flush it to the device."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str | os.PathLike, chunk: int = 4 * MiB) -> str:
    """SHA-256 of a whole file or block device."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def device_size(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def compressible(rnd: random.Random, n: int) -> bytes:
    """`n` bytes that zstd compresses well but that are not all zero: words from a small
    vocabulary."""
    words = [rnd.randbytes(rnd.randint(3, 9)).hex().encode() for _ in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------
# filesystems

def fill_tree(root: Path, rnd: random.Random, *, budget: int = 12 * MiB,
              fat: bool = False) -> list[Path]:
    """Fill a mounted filesystem with real files: parts of /usr/include and /usr/share/doc,
    random files and a few big ones, then delete some.  `fat` keeps to what vfat can hold
    (regular files only, no names that differ only in case).  Returns the files left."""
    written = 0
    made: list[Path] = []
    seen_lower: set[str] = set()

    def place(rel: str) -> Path | None:
        if fat:
            if rel.lower() in seen_lower or any(c in rel for c in ':*?"<>|\\'):
                return None
            seen_lower.add(rel.lower())
            # the directories too: a/B and A/b would collide on vfat
            parts = Path(rel).parts
            for i in range(1, len(parts)):
                seen_lower.add("/".join(parts[:i]).lower() + "/")
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    for tree, share in (("/usr/include", 0.5), ("/usr/share/doc", 0.25)):
        base = Path(tree)
        if not base.is_dir():
            continue
        files = sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())
        rnd.shuffle(files)
        limit = written + int(budget * share)
        for src in files:
            if written >= limit:
                break
            rel = os.path.join(base.name, str(src.relative_to(base)))
            dst = place(rel)
            if dst is None or dst.exists():
                continue
            shutil.copyfile(src, dst)
            written += dst.stat().st_size
            made.append(dst)
    # random and partly compressible files of assorted sizes, some in nested directories
    i = 0
    while written < budget:
        size = rnd.choice([0, 1, 511, 4096, 70_000, 300_000, 1 * MiB + 17])
        d = root / "random" / f"d{i % 5}" / ("sub" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"file{i}.bin"
        dst.write_bytes(rnd.randbytes(size) if i % 2 else compressible(rnd, size))
        written += size
        made.append(dst)
        i += 1
    # delete a few, so that the filesystem has freed blocks holding old data
    for victim in rnd.sample(made, k=min(8, len(made))):
        victim.unlink()
        made.remove(victim)
    run("sync")
    return made


def tree_sha256(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `root` (plus directories and symlinks
    by kind), to compare two mounts file by file."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == "lost+found" or rel.startswith("lost+found/"):
                continue
            if p.is_symlink():
                out[rel] = "symlink:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = sha256_of(p)
    return out


# --------------------------------------------------------------------------------------------
# block devices (root tests)

SECTOR = 512

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "vfat": ["mkfs.vfat"],
}
FSCK = {
    "ext4": ["e2fsck", "-fn"],
    "xfs": ["xfs_repair", "-n"],
    "vfat": ["fsck.vfat", "-n"],
}


def mkfs(dev: str, fstype: str) -> None:
    run(*MKFS[fstype], dev)


def fsck_clean(dev: str, fstype: str) -> None:
    """fsck in no-change mode reports a clean filesystem (exit 0)."""
    proc = run(*FSCK[fstype], dev, check=False)
    assert proc.returncode == 0, (f"{' '.join(FSCK[fstype])} {dev} exited {proc.returncode}:\n"
                                  f"{proc.stdout}\n{proc.stderr}")


def cmp_same(a: str | os.PathLike, b: str | os.PathLike, n: int | None = None) -> None:
    """`cmp` says the two files or devices are byte for byte identical (the first `n` bytes)."""
    proc = run("cmp", *(["-n", str(n)] if n is not None else []), a, b, check=False)
    assert proc.returncode == 0, f"cmp {a} {b}: {proc.stdout.strip()} {proc.stderr.strip()}"


def dd_copy(dev: str, dest: str | os.PathLike) -> Path:
    """A raw copy of a device as it is now (to compare a restore with)."""
    run("dd", f"if={dev}", f"of={dest}", "bs=4M", "iflag=direct", "status=none")
    return Path(dest)


def dd_write(dev: str, offset: int, data: bytes) -> None:
    """Write `data` at byte `offset` of `dev` with dd (direct I/O, nothing cached)."""
    proc = subprocess.run(["dd", f"of={dev}", f"bs={len(data)}", f"seek={offset}",
                           "iflag=fullblock", "oflag=direct,seek_bytes", "conv=notrunc",
                           "status=none"],
                          input=data, capture_output=True)
    assert proc.returncode == 0, f"dd to {dev}: {proc.stderr.decode(errors='replace')}"


def dumpe2fs_counts(dev: str | os.PathLike) -> tuple[int, int]:
    """(used bytes, filesystem bytes) as e2fsprogs counts them."""
    out = run("dumpe2fs", "-h", str(dev)).stdout
    blocks = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
    free = int(re.search(r"^Free blocks:\s+(\d+)", out, re.M).group(1))
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    return (blocks - free) * bs, blocks * bs


def dumpe2fs_used(dev: str | os.PathLike) -> int:
    return dumpe2fs_counts(dev)[0]


def blanked_copy(src: str | Path, dst: Path, used, fill: int = 0) -> Path:
    """Copy only the used ranges of ``src`` (a usedblocks.UsedMap); every other byte is
    ``fill``: what a used-blocks image of ``src`` must restore to, with fill 0."""
    size = used.size
    pat = bytes([fill]) * (4 * MiB)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = 0
        for off, n in [*used.ranges, (size, 0)]:
            while fill and pos < off:
                k = min(len(pat), off - pos)
                fo.seek(pos)
                fo.write(pat[:k])
                pos += k
            fi.seek(off)
            fo.seek(off)
            left = n
            while left:
                chunk = fi.read(min(left, 4 * MiB))
                fo.write(chunk)
                left -= len(chunk)
            pos = off + n
    return dst


class LoopDevices:
    """Attaches loop devices over files in a directory and always detaches them: the `loops`
    fixture (tests/conftest.py) per test, module fixtures with their own directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.devices: list[str] = []
        self.mounts: list[str] = []

    def attach(self, backing: Path, *extra: str) -> str:
        dev = run("losetup", "--find", "--show", *extra, str(backing)).stdout.strip()
        self.devices.append(dev)
        return dev

    def create(self, size: int, name: str = "disk", *extra: str) -> tuple[str, Path]:
        """A new zero-filled (sparse) backing file of `size` bytes, attached."""
        backing = self.tmp_path / f"{name}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        return self.attach(backing, *extra), backing

    def mount(self, dev: str, mnt: Path, *opts: str) -> Path:
        mnt.mkdir(parents=True, exist_ok=True)
        run("mount", *opts, dev, str(mnt))
        self.mounts.append(str(mnt))
        return mnt

    def umount(self, mnt: Path) -> None:
        run("umount", str(mnt))
        self.mounts.remove(str(mnt))

    def detach(self, dev: str) -> None:
        run("losetup", "-d", dev)
        self.devices.remove(dev)

    def cleanup(self) -> None:
        for mnt in reversed(self.mounts):
            run("umount", "-l", mnt, check=False)
        for dev in reversed(self.devices):
            # a read-only flag set by a test (blockdev --setro) outlives the detach, and so do
            # partitions added with partx -a (BLKPG): the next test to get this device would
            # see them
            run("blockdev", "--setrw", dev, check=False)
            run("partx", "-d", dev, check=False)
            run("losetup", "-d", dev, check=False)


def need(*tools: str) -> None:
    """Skip the test (or the module's fixture) unless every tool is on the PATH."""
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        import pytest
        pytest.skip(f"needs {', '.join(missing)}")


def scan_path(path: str | os.PathLike):
    """The used-block map (diskimg.disk.used.UsedMap) of the file or device at `path`."""
    from diskimg.disk.used import scan
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan(fd, os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)
