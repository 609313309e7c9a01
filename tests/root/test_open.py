"""Opening an image without restoring it: `mount` (FUSE), `export` (raw, qcow2, vmdk, vhdx) and
`serve` (NBD), on real filesystems in loop devices, read back with the kernel (loop devices,
mount, diff -r), qemu-img, qemu-io, nbdinfo and nbdcopy.

The images are made once per module: a chain of an ext4 (a full image and an incremental after
files were changed, each with the tree as it was at that time), and a partitioned disk per
partition table (MBR, GPT) with an ext4 and an xfs partition.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import MiB, PYTHON, LoopDevices, diskimg, fill_tree, run

from diskimg import format as fmt
from diskimg.image.imagefile import ImageReader
from diskimg.ops.imagedisk import ImageDisk

pytestmark = pytest.mark.root

NEEDS = ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fusermount3", "mkfs.xfs", "sfdisk"]


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [t for t in NEEDS if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/test installs them)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")


@pytest.fixture(scope="module")
def mloops(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices")
    lo = LoopDevices(tmp_path_factory.mktemp("loops"))
    try:
        yield lo
    finally:
        lo.cleanup()


def _copy_tree(src: Path, dst: Path) -> None:
    run("cp", "-a", f"{src}/.", str(dst))


def _device_copy(dev: str, path: Path) -> Path:
    run("dd", f"if={dev}", f"of={path}", "bs=4M", "conv=sparse", "status=none")
    return path


class Ext4Chain:
    """full.dimg and inc.dimg of one ext4, with the tree and a copy of the device at each."""

    def __init__(self, root: Path, lo: LoopDevices) -> None:
        self.root = root
        dev, _ = lo.create(48 * MiB, "ext4chain")
        run("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        mnt = lo.mount(dev, root / "src")
        rnd = random.Random(15)
        fill_tree(mnt, rnd, budget=8 * MiB)
        (mnt / "big.bin").write_bytes(rnd.randbytes(3 * MiB))
        lo.umount(mnt)
        self.full = root / "full.dimg"
        # without parity: the damage tests flip bytes at places of that layout (reads that heal
        # through parity are tested in tests/*/test_parity*.py)
        diskimg("image", dev, self.full, "--no-progress", "--parity", "0")
        self.all_blocks = root / "all.dimg"       # free space included: equal to the source
        diskimg("image", dev, self.all_blocks, "--all-blocks", "--no-progress", "--parity", "0")
        self.state_full = root / "state-full"
        self.disk_full = _device_copy(dev, root / "disk-full.raw")
        lo.mount(dev, mnt)
        self.state_full.mkdir()
        _copy_tree(mnt, self.state_full)
        # change it: new files, a changed one, a deleted one
        (mnt / "later").mkdir()
        fill_tree(mnt / "later", rnd, budget=3 * MiB)
        with open(mnt / "big.bin", "r+b") as f:
            f.seek(MiB)
            f.write(rnd.randbytes(MiB))
        victims = sorted(p for p in mnt.rglob("*") if p.is_file() and "later" not in p.parts)
        victims[0].unlink()
        lo.umount(mnt)
        self.inc = root / "inc.dimg"
        diskimg("image", dev, self.inc, "--incremental", self.full, "--no-progress",
                "--parity", "0")
        lo.mount(dev, mnt)
        self.state_inc = root / "state-inc"
        self.state_inc.mkdir()
        _copy_tree(mnt, self.state_inc)
        lo.umount(mnt)
        # what restore makes of each image: the reference for exports and NBD
        self.restored = {}
        for name, img in (("full", self.full), ("inc", self.inc)):
            out = root / f"restored-{name}.raw"
            diskimg("restore", img, out, "--yes", "--no-progress")
            self.restored[name] = out
        self.images = {"full": self.full, "inc": self.inc}
        self.states = {"full": self.state_full, "inc": self.state_inc}


@pytest.fixture(scope="module")
def ext4_chain(tmp_path_factory, mloops) -> Ext4Chain:
    return Ext4Chain(tmp_path_factory.mktemp("ext4chain"), mloops)


class Mount:
    """`diskimg mount` (daemonised) on a fresh directory; always undone."""

    def __init__(self, image: Path, where: Path, *extra: str) -> None:
        where.mkdir()
        self.dir = where
        self.proc = diskimg("mount", image, where, *extra)
        self.info = json.loads((where / ".diskimg").read_text())

    def umount(self) -> subprocess.CompletedProcess:
        return diskimg("umount", self.dir)


@pytest.fixture
def mounts():
    made: list[Mount] = []

    def mount(image: Path, where: Path, *extra: str) -> Mount:
        m = Mount(image, where, *extra)
        made.append(m)
        return m
    yield mount
    for m in made:
        if any(line.split()[4] == str(m.dir) for line in
               Path("/proc/self/mountinfo").read_text().splitlines()):
            diskimg("umount", m.dir, check=False)


def _mounted(path: Path) -> bool:
    path = str(path)
    return any(line.split()[4] == path for line in
               Path("/proc/self/mountinfo").read_text().splitlines())


def _loops_over(path: Path) -> list[str]:
    return run("losetup", "--noheadings", "-O", "NAME", "-j", str(path)).stdout.split()


def _diff(a: Path, b: Path) -> None:
    proc = run("diff", "-r", "--no-dereference", str(a), str(b), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# mount

@pytest.mark.parametrize("point", ["full", "inc"])
def test_mount_chain_through_a_loop_device_on_disk(ext4_chain, mounts, mloops, tmp_path, point):
    """Each point of the chain mounts; the ext4 read through a read-only loop device on
    DIR/disk is the tree as it was when that image was taken."""
    m = mounts(ext4_chain.images[point], tmp_path / "m")
    assert sorted(os.listdir(m.dir)) == ["disk"]          # no partition table: the disk only
    assert "unmount with: diskimg umount" in m.proc.stdout
    assert (m.dir / "disk").stat().st_size == ext4_chain.disk_full.stat().st_size
    loop = mloops.attach(m.dir / "disk", "--read-only")
    fs = mloops.mount(loop, tmp_path / "fs", "-o", "ro,noload")
    _diff(fs, ext4_chain.states[point])
    mloops.umount(fs)
    run("losetup", "-d", loop)
    mloops.devices.remove(loop)
    res = m.umount()
    assert "unmounted" in res.stdout
    assert not _mounted(m.dir)
    assert os.listdir(m.dir) == []


def test_mount_reads_what_restore_writes_zeros_included(ext4_chain, mounts, tmp_path):
    """DIR/disk read whole (1 MiB requests) and page by page in its zero extents (its page
    cache dropped) is byte for byte what restore writes, and keeps its size: requests inside
    zero extents are answered short where the kernel grants the writeback cache, and a short
    read must read as zeros, not as the end of the file."""
    ref = ext4_chain.restored["inc"]
    m = mounts(ext4_chain.inc, tmp_path / "m")
    disk = m.dir / "disk"
    size = ref.stat().st_size
    assert run("cmp", str(disk), str(ref), check=False).returncode == 0
    assert disk.stat().st_size == size
    with ImageDisk(str(ext4_chain.inc)) as d:
        zero = [e for e in d.extents() if e.zero]
    assert zero and sum(e.length for e in zero) > size // 4
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # this file's pages only
        for e in zero:          # the first page, the last one, one in the middle of each
            for off in {e.offset, e.offset + e.length - 4096, e.offset + e.length // 8192 * 4096}:
                assert os.pread(fd, 4096, off) == bytes(4096)
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 8192, size - 4096) == Path(ref).read_bytes()[-4096:]
    finally:
        os.close(fd)
    assert disk.stat().st_size == size
    m.umount()


def test_mount_fs_and_sigterm(ext4_chain, mounts, tmp_path):
    """--fs mounts the bare ext4 under DIR/fs/disk (ro, noload); SIGTERM to the serving
    process unmounts it, detaches its loop device and unmounts DIR."""
    m = mounts(ext4_chain.inc, tmp_path / "m", "--fs")
    fsdir = m.dir / "fs" / "disk"
    assert m.info["filesystems"] == [str(fsdir)]
    _diff(fsdir, ext4_chain.state_inc)
    opts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(fsdir)]
    assert opts and "ro" in opts[0].split()[5].split(",")
    assert _loops_over(m.dir / "disk")
    pid = m.info["pid"]
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if not _mounted(m.dir):
            break
        time.sleep(0.05)
    assert not _mounted(m.dir) and not _mounted(fsdir)
    assert not _loops_over(m.dir / "disk")
    for _ in range(100):            # the process is gone too
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"mount process {pid} still running after SIGTERM")


def test_umount_after_the_serving_process_died(ext4_chain, mounts, tmp_path):
    """kill -9 of the serving process leaves a dead FUSE mount ("transport endpoint is not
    connected") with an ext4 on top: `diskimg umount` still undoes all of it."""
    m = mounts(ext4_chain.full, tmp_path / "m", "--fs")
    os.kill(m.info["pid"], signal.SIGKILL)
    for _ in range(100):
        try:
            os.listdir(m.dir)
        except OSError as err:
            assert err.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        time.sleep(0.05)
    res = m.umount()
    assert "unmounted" in res.stdout
    assert not _mounted(m.dir) and not _mounted(m.dir / "fs" / "disk")
    assert os.listdir(m.dir) == []


@pytest.fixture(scope="module", params=["mbr", "gpt"])
def partitioned(request, tmp_path_factory, mloops):
    """A disk with an ext4 and an xfs partition under an MBR or a GPT, its trees, its image."""
    label = request.param
    root = tmp_path_factory.mktemp(f"part-{label}")
    dev, backing = mloops.create(400 * MiB, f"part{label}")
    table = "label: dos\n" if label == "mbr" else "label: gpt\n"
    table += "start=2048, size=131072, type=83\nstart=133120, size=655360, type=83\n"
    if label == "gpt":
        table = table.replace("type=83", "type=0FC63DAF-8483-4772-8E79-3D69145F8E47")
    run("sfdisk", "-q", dev, input=table)
    run("partx", "-a", dev, check=False)
    run("mkfs.ext4", "-q", "-F", f"{dev}p1")
    run("mkfs.xfs", "-q", "-f", f"{dev}p2")
    rnd = random.Random(label)
    states = {}
    for part in ("p1", "p2"):
        mnt = mloops.mount(f"{dev}{part}", root / f"src-{part}")
        fill_tree(mnt, rnd, budget=3 * MiB)
        states[part] = root / f"state-{part}"
        states[part].mkdir()
        _copy_tree(mnt, states[part])
        mloops.umount(mnt)
    image = root / "disk.dimg"
    diskimg("image", dev, image, "--no-progress")
    return label, image, states


def test_mount_partitioned_fs(partitioned, mounts, tmp_path):
    """DIR/p1 and DIR/p2 are the partitions; --fs mounts the ext4 and the xfs inside, each
    the tree that was imaged; umount removes the filesystems and their loop devices."""
    label, image, states = partitioned
    m = mounts(image, tmp_path / "m", "--fs")
    assert sorted(os.listdir(m.dir)) == ["disk", "fs", "p1", "p2"]
    assert (m.dir / "p1").stat().st_size == 131072 * 512
    assert (m.dir / "p2").stat().st_size == 655360 * 512
    types = {f.split("/")[-1]: f for f in m.info["filesystems"]}
    assert sorted(types) == ["p1", "p2"], m.proc.stdout
    assert "ext4" in m.proc.stdout and "xfs" in m.proc.stdout
    for part in ("p1", "p2"):
        _diff(m.dir / "fs" / part, states[part])
    loops = _loops_over(m.dir / "p1") + _loops_over(m.dir / "p2")
    assert len(loops) == 2
    m.umount()
    assert not _mounted(m.dir) and not _mounted(m.dir / "fs" / "p1")
    attached = run("losetup", "-a").stdout
    assert not any(loop + ":" in attached for loop in loops), attached


def _corrupt_block(image: Path) -> tuple[int, int]:
    """Damage the record of one DATA block of `image` (in its payload); returns (block,
    block size)."""
    with ImageReader(str(image)) as r:
        data = [b for b, e in r.iter_entries() if e.kind == fmt.DATA]
        block = data[len(data) // 2]
        entry = r.entry(block)
        bs = r.header.block_size
    with open(image, "r+b") as f:
        f.seek(entry.offset + fmt.RECORD_HEADER_SIZE + entry.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return block, bs


def test_corrupt_block_reads_eio_exactly(ext4_chain, tmp_path):
    """A damaged block reads as EIO for exactly its pages, page by page; the pages around it
    read the right bytes; the log names the block; SIGTERM to a --foreground mount exits 0
    and unmounts."""
    image = tmp_path / "bad.dimg"
    shutil.copy(ext4_chain.full, image)
    block, bs = _corrupt_block(image)
    mnt = tmp_path / "m"
    mnt.mkdir()
    logf = tmp_path / "mount.log"
    proc = subprocess.Popen([PYTHON, "-m", "diskimg", "mount", str(image), str(mnt),
                             "--foreground", "--log-file", str(logf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("mounted "), line + proc.stderr.read()
        # what restore makes of the image (free blocks are unused in the image: zeros, not
        # what the source held there)
        ref = ext4_chain.restored["full"]
        fd = os.open(mnt / "disk", os.O_RDONLY)
        rfd = os.open(ref, os.O_RDONLY)
        try:
            start, end = block * bs, (block + 1) * bs
            for off in (start - 4096, end):         # the neighbours read fine
                assert os.pread(fd, 4096, off) == os.pread(rfd, 4096, off)
            for off in range(start, end, 4096):     # every page of the block fails
                with pytest.raises(OSError) as err:
                    os.pread(fd, 4096, off)
                assert err.value.errno == errno.EIO
            # a big read running into it gets the good bytes before it, then EIO
            got = os.pread(fd, 2 * bs, start - bs)
            assert got == os.pread(rfd, bs, start - bs)
        finally:
            os.close(fd)
            os.close(rfd)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"unmounted {mnt}" in out
        assert not _mounted(mnt)
        text = logf.read_text()
        assert f"bytes {block * bs}-{(block + 1) * bs - 1} unreadable" in text, text
        assert text.count("unreadable (I/O error") == 1       # logged once, not per retry
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _mounted(mnt):
            run("fusermount3", "-u", "-z", str(mnt), check=False)


# --------------------------------------------------------------------------------------------
# export

@pytest.mark.parametrize("fmt_name", ["raw", "qcow2", "vmdk", "vhdx"])
def test_export_formats(ext4_chain, tmp_path, fmt_name):
    """Each format of each point of the chain: qemu-img check finds no error and qemu-img
    compare finds it identical to what restore makes of the image; an --all-blocks image's
    export is identical to the source disk itself."""
    for point in ("full", "inc"):
        out = tmp_path / f"{point}.{fmt_name}"
        res = diskimg("export", ext4_chain.images[point], out, "--format", fmt_name,
                      "--no-progress")
        assert f"exported {ext4_chain.images[point]}" in res.stdout
        if fmt_name != "raw":
            run("qemu-img", "check", "-f", fmt_name, str(out))
        run("qemu-img", "compare", "-f", "raw", "-F", fmt_name,
            str(ext4_chain.restored[point]), str(out))
        if fmt_name == "raw":       # zero and unused blocks are holes
            st = out.stat()
            assert st.st_blocks * 512 < st.st_size
    out = tmp_path / f"all.{fmt_name}"
    diskimg("export", ext4_chain.all_blocks, out, "--format", fmt_name, "--no-progress")
    run("qemu-img", "compare", "-f", "raw", "-F", fmt_name, str(ext4_chain.disk_full), str(out))


def test_export_qcow2_to_a_pipe_and_multiple_tables(ext4_chain, tmp_path):
    """qcow2 to standard output is the same file; a sparse 3 GiB disk with data spread over
    it (several L2 tables) exports to a qcow2 that qemu-img checks and compares equal."""
    out = tmp_path / "file.qcow2"
    diskimg("export", ext4_chain.inc, out, "--format", "qcow2", "--no-progress")
    with open(tmp_path / "pipe.qcow2", "wb") as f:
        proc = subprocess.run([PYTHON, "-m", "diskimg", "export", str(ext4_chain.inc), "-",
                               "--format", "qcow2"], stdout=f, stderr=subprocess.PIPE,
                              text=True)
    assert proc.returncode == 0, proc.stderr
    assert "to standard output" in proc.stderr
    run("cmp", str(out), str(tmp_path / "pipe.qcow2"))
    big = tmp_path / "sparse.raw"
    rnd = random.Random(5)
    with open(big, "wb") as f:
        f.truncate(3 << 30)
        for off in (0, 700 * MiB, (2 << 30) + 123 * 65536, (3 << 30) - 3 * MiB):
            f.seek(off)
            f.write(rnd.randbytes(2 * MiB + 4096))
    diskimg("image", big, tmp_path / "sparse.dimg", "--no-progress")
    q = tmp_path / "sparse.qcow2"
    diskimg("export", tmp_path / "sparse.dimg", q, "--format", "qcow2", "--no-progress")
    run("qemu-img", "check", str(q))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(big), str(q))
    assert q.stat().st_size < 20 * MiB


def test_export_refusals(ext4_chain, tmp_path):
    out = tmp_path / "x.qcow2"
    out.write_bytes(b"precious")
    res = diskimg("export", ext4_chain.full, out, "--format", "qcow2", check=False)
    assert res.returncode == 2 and "exists" in res.stderr and str(out) in res.stderr
    assert out.read_bytes() == b"precious"
    res = diskimg("export", ext4_chain.full, "-", "--format", "vmdk", check=False)
    assert res.returncode == 2 and "pipe" in res.stderr
    bad = tmp_path / "bad.dimg"
    shutil.copy(ext4_chain.full, bad)
    block, _ = _corrupt_block(bad)
    res = diskimg("export", bad, tmp_path / "bad.raw", "--format", "raw", "--no-progress",
                  check=False)
    assert res.returncode == 1 and f"block {block}" in res.stderr, res.stderr
    assert not (tmp_path / "bad.raw").exists() and not (tmp_path / "bad.raw.partial").exists()


# --------------------------------------------------------------------------------------------
# serve

class Server:
    def __init__(self, image: Path, address: str) -> None:
        self.proc = subprocess.Popen([PYTHON, "-m", "diskimg", "serve", str(image), "--nbd",
                                      address], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("serving "), line + self.proc.stderr.read()
        self.uri = line.split(" on ", 1)[1].split(";")[0]

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def servers():
    made: list[Server] = []

    def serve(image: Path, address: str) -> Server:
        s = Server(image, address)
        made.append(s)
        return s
    yield serve
    for s in made:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_serve_unix_socket(ext4_chain, servers, tmp_path):
    """nbdinfo sees a read-only export of the right size with base:allocation, holes where
    the image has zero or unused blocks; qemu-img compare and nbdcopy read the same disk
    restore makes; SIGTERM stops the server and removes its socket."""
    sock = tmp_path / "nbd.sock"
    s = servers(ext4_chain.inc, str(sock))
    assert s.uri == f"nbd+unix:///?socket={sock}"
    info = json.loads(run("nbdinfo", "--json", s.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == ext4_chain.restored["inc"].stat().st_size
    assert export["is_read_only"] is True
    assert "base:allocation" in export["contexts"]
    extents = run("nbdinfo", "--map", s.uri).stdout.splitlines()
    assert any("hole,zero" in line for line in extents)
    assert any(line.split()[-1] == "data" for line in extents)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ext4_chain.restored["inc"]),
        s.uri)
    run("nbdcopy", s.uri, str(tmp_path / "copy.raw"))
    run("cmp", str(tmp_path / "copy.raw"), str(ext4_chain.restored["inc"]))
    # writes are refused
    res = run("qemu-io", "-f", "raw", "-c", "write 0 4k", s.uri, check=False)
    assert res.returncode != 0 or "failed" in res.stdout + res.stderr
    rc, err = s.stop()
    assert rc == 0, err
    assert not sock.exists()


def test_serve_tcp_and_damaged_block(ext4_chain, servers, tmp_path):
    """Over TCP on 127.0.0.1: a damaged block reads as EIO for its range only; the blocks
    around it read fine."""
    bad = tmp_path / "bad.dimg"
    shutil.copy(ext4_chain.full, bad)
    block, bs = _corrupt_block(bad)
    s = servers(bad, "127.0.0.1:17815")
    assert s.uri == "nbd://127.0.0.1:17815"
    ok = run("qemu-io", "-f", "raw", "-r", "-c", f"read {(block - 1) * bs} {bs}", "-c",
             f"read {(block + 1) * bs} 4096", s.uri, check=False)
    assert "read failed" not in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    res = run("qemu-io", "-f", "raw", "-r", "-c", f"read {block * bs + 8192} 4096", s.uri,
              check=False)
    assert "Input/output error" in res.stdout + res.stderr, res.stdout + res.stderr
    rc, err = s.stop()
    assert rc == 0, err
