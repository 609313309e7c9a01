"""devices.py on real loop devices: usage() (mounts, swap, holders), holding_devices(), identify()
and `diskimg list`, plus `diskimg health` on a loop device with the real smartctl."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from helpers import run

from diskimg import devices
from diskimg.cli.main import main

pytestmark = pytest.mark.root

MiB = 1 << 20


def _write_mbr(path: Path, parts: list[tuple[int, int, int]]) -> None:
    """An MBR partition table (no sfdisk here): (type, first sector, sectors) per partition."""
    mbr = bytearray(512)
    for i, (ptype, start, count) in enumerate(parts):
        mbr[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype,
                                                        b"\0\0\0", start, count)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)


@pytest.fixture
def partitioned(loops, tmp_path):
    """A 64 MiB loop device with p1 (16 MiB, ext4) and p2 (the rest)."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    _write_mbr(backing, [(0x83, 2048, 32768), (0x82, 34816, 131072 - 34816)])
    dev = loops.attach(backing, "-P")
    if not os.path.exists(dev + "p2"):
        run("partx", "-a", dev, check=False)     # no udev here: ask the kernel explicitly
    if not os.path.exists(dev + "p2"):
        pytest.skip("the kernel did not create loop partitions")
    run("mkfs.ext4", "-q", dev + "p1")
    return dev, backing


@pytest.fixture
def swapon():
    active: list[str] = []

    def on(dev: str) -> None:
        run("mkswap", "-q", dev)
        run("swapon", dev)
        active.append(dev)
    try:
        yield on
    finally:
        for dev in active:
            run("swapoff", dev, check=False)


def test_free_device_and_regular_file(loops, tmp_path):
    dev, backing = loops.create(8 * MiB)
    assert devices.usage(dev) == []
    assert devices.usage(str(backing)) == []
    assert devices.usage(str(tmp_path / "missing")) == []


def test_usage_mounted_partition(partitioned, loops, tmp_path):
    dev, _ = partitioned
    mnt = loops.mount(dev + "p1", tmp_path / "mnt")
    whole = devices.usage(dev)
    assert whole == [f"{dev}p1 is mounted on {mnt} (ext4)"]
    assert devices.usage(dev + "p1") == whole
    assert devices.usage(dev + "p2") == []
    # through a symlink, as /dev/disk/by-id/... would be
    link = tmp_path / "by-id-link"
    link.symlink_to(dev + "p1")
    assert devices.usage(str(link)) == whole
    loops.umount(mnt)
    assert devices.usage(dev) == []


def test_usage_mounted_whole_device_with_space_in_mountpoint(loops, tmp_path):
    dev, _ = loops.create(16 * MiB)
    run("mkfs.ext4", "-q", dev)
    mnt = loops.mount(dev, tmp_path / "my mount")
    assert devices.usage(dev) == [f"{dev} is mounted on {mnt} (ext4)"]


def test_usage_swap(partitioned, swapon):
    dev, _ = partitioned
    swapon(dev + "p2")
    assert devices.usage(dev) == [f"{dev}p2 used as swap ({dev}p2)"]
    assert devices.usage(dev + "p1") == []


def test_usage_swap_whole_device(loops, swapon):
    dev, _ = loops.create(16 * MiB)
    swapon(dev)
    assert devices.usage(dev) == [f"{dev} used as swap ({dev})"]


@pytest.mark.skipif(not shutil.which("dmsetup"), reason="dmsetup not installed")
def test_usage_holder(loops, tmp_path):
    dev, _ = loops.create(16 * MiB)
    name = f"diskimg-test-{os.getpid()}"
    sectors = 16 * MiB // 512
    proc = run("dmsetup", "create", name, "--table", f"0 {sectors} linear {dev} 0", check=False)
    if proc.returncode:
        pytest.skip(f"device-mapper unavailable: {proc.stderr.strip()}")
    try:
        reasons = devices.usage(dev)
        assert len(reasons) == 1 and reasons[0].startswith(f"{dev} is held by /dev/dm-")
        assert name in reasons[0]
    finally:
        run("dmsetup", "remove", name, check=False)


def test_holding_devices(partitioned, loops, tmp_path):
    dev, _ = partitioned
    mnt = loops.mount(dev + "p1", tmp_path / "mnt")
    (mnt / "dir").mkdir()
    assert devices.holding_devices(str(mnt / "dir" / "not-yet" / "image.dimg")) == [dev + "p1", dev]
    assert devices.holding_devices(str(mnt / "dir")) == [dev + "p1", dev]
    assert devices.holding_devices("/dev/shm/x") == []          # tmpfs: no block device
    assert devices.holding_devices("/proc/self/status") == []


def test_identify(partitioned):
    dev, backing = partitioned
    info = devices.identify(dev + "p1")
    assert info == {"path": dev + "p1", "model": None, "serial": None, "wwn": None,
                    "backing_file": str(backing)}
    assert devices.identify(str(backing)) == {"path": str(backing), "model": None,
                                              "serial": None, "wwn": None}


def test_list_shows_attached_loop(partitioned, loops, tmp_path, capsys):
    dev, backing = partitioned
    mnt = loops.mount(dev + "p1", tmp_path / "mnt")
    assert main(["list", "--json"]) == 0
    rows = {d["path"]: d for d in json.loads(capsys.readouterr().out)}
    row = rows[dev]
    assert row["backing_file"] == str(backing)
    assert row["size"] == 64 * MiB
    assert row["transport"] == "loop"
    assert row["mountpoints"] == [str(mnt)]
    assert [p["path"] for p in row["partitions"]] == [dev + "p1", dev + "p2"]
    assert row["partitions"][0]["size"] == 16 * MiB
    assert row["partitions"][0]["mountpoints"] == [str(mnt)]
    assert row["smart_available"] is False
    if not os.path.isdir("/run/udev/data"):
        assert row["source"] == "sysfs"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(os.path.basename(dev) + " "))
    assert str(backing) in line and "64.0 MiB" in line and str(mnt) in line


def test_unattached_loops_only_with_all(loops, capsys):
    main(["list", "--json"])
    names = {d["name"] for d in json.loads(capsys.readouterr().out)}
    main(["list", "--json", "--all"])
    every = json.loads(capsys.readouterr().out)
    unattached = {d["name"] for d in every if d["transport"] == "loop" and not d["backing_file"]}
    assert not unattached & names


@pytest.mark.skipif(not shutil.which("smartctl", path="/usr/sbin:/sbin:" + os.environ["PATH"]),
                    reason="smartctl (smartmontools) not installed")
def test_health_on_loop_device_is_unknown(loops, capsys):
    dev, _ = loops.create(8 * MiB)
    assert main(["health", dev]) == 3
    out = capsys.readouterr().out
    assert out.startswith(f"{dev}: UNKNOWN")
    assert main(["health", dev, "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "UNKNOWN" and report["smart_overall"] is None
    from diskimg import health
    assert health.precheck(dev) is None
