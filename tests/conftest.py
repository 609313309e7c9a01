"""Shared fixtures: loop devices that are always detached, and a report header saying what this
machine can test (root, losetup, smartctl, mkfs.*, FUSE)."""
from __future__ import annotations

import os
import shutil

import pytest
from faulty import faulty  # noqa: F401  (faulty-device factory fixture, tests/faulty.py)
from helpers import LoopDevices

IS_ROOT = os.geteuid() == 0
TOOLS = ["losetup", "smartctl", "mkfs.ext4", "mkfs.xfs", "mkfs.vfat", "fsck.ext4", "ddrescue",
         "partclone.ext4", "fusermount3"]


def pytest_report_header(config):
    have = {t: bool(shutil.which(t)) for t in TOOLS}
    fuse = os.path.exists("/dev/fuse")
    return [
        f"diskimg: root={IS_ROOT} fuse={fuse} "
        + " ".join(f"{t}={'yes' if ok else 'no'}" for t, ok in have.items())
    ]


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: loop devices, mkfs and mount")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _probe_only_loop_devices(monkeypatch):
    """`diskimg list` probes every disk's superblocks with blkid; in tests it may only read the
    loop devices tests create, never the machine's own disks."""
    from diskimg import devices
    real = devices.probe_fs

    def probe(path: str) -> dict[str, str]:
        ok = os.path.basename(path).startswith("loop") or os.path.isfile(path)
        return real(path) if ok else {}
    monkeypatch.setattr(devices, "probe_fs", probe)


@pytest.fixture
def loops(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root: loop devices")
    if not shutil.which("losetup"):
        pytest.skip("losetup not installed")
    lo = LoopDevices(tmp_path)
    try:
        yield lo
    finally:
        lo.cleanup()


@pytest.fixture(scope="module")
def no_default_parity():
    """Images made in-process without parity, as before parity became the default: for the
    tests that damage or craft bytes at fixed places of the layout of format versions 1 and 2,
    which every image made with --parity 0 (and every older image) still has.  Images with
    parity are tested in tests/*/test_parity*.py.  Use as
    ``pytestmark = pytest.mark.usefixtures("no_default_parity")``."""
    from diskimg import defaults
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(defaults, "DEFAULT_PARITY", 0)
        yield

# -- S3 servers (tests/s3servers.py): started once per session, stopped whatever happens ----

def _server_fixture(cls, bucket: str):
    from s3servers import MotoServer, SeaweedFS  # noqa: F401
    if cls.available() is None:
        pytest.skip(f"{cls.name} is not installed (scripts/test installs it)")
    server = cls()
    try:
        server.start()
        server.make_bucket(bucket)
        server.bucket = bucket
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs():
    """A SeaweedFS S3 server on 127.0.0.1 with the bucket `diskimg` (see tests/s3servers.py)."""
    from s3servers import SeaweedFS
    yield from _server_fixture(SeaweedFS, "diskimg")


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1 with the bucket `diskimg`."""
    from s3servers import MotoServer
    yield from _server_fixture(MotoServer, "diskimg")

