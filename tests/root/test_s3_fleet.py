"""Several hosts, one store: imaging jobs run at once as separate processes, each in its own
network namespace (where `ip netns` works here; on loopback otherwise), into one bucket under
their own prefixes.  One is killed mid-upload.  Every other image restores and verifies to its
own source; the killed one left no object, and its rerun aborts the unfinished upload and says
so."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest
from helpers import PYTHON
from s3servers import NetNamespace, Relay

pytestmark = pytest.mark.root

MiB = 1 << 20
JOBS = 4
KILLED = 2          # the job killed mid-upload


def _source(path, n: int):
    """A distinct source per host: a sparse file with random data (incompressible: the
    killed job's upload lasts long enough to be caught in the middle)."""
    with open(path, "wb") as f:
        f.truncate(48 * MiB)
        f.seek(n * MiB)
        f.write(os.urandom(24 * MiB + n * 4096))
    return path


def test_jobs_into_one_bucket_one_killed(seaweedfs, tmp_path):
    fleet = f"fleet-{uuid.uuid4().hex[:8]}"
    port = int(seaweedfs.endpoint.rsplit(":", 1)[1])
    use_netns = NetNamespace.works()
    spaces: list[NetNamespace] = []
    relays: list[Relay] = []
    procs: list[subprocess.Popen] = []
    base = 10 + os.getpid() % 200
    try:
        for i in range(JOBS):
            # the killed job goes through a slow link, so that it is caught mid-upload
            rate = 4 * MiB if i == KILLED else None
            if use_netns:
                ns = NetNamespace(f"diskimg-{os.getpid()}-{i}", base + i)
                spaces.append(ns)
                relay = Relay(port, host=ns.host_ip, rate=rate)
            else:
                relay = Relay(port, rate=rate)
            relays.append(relay)
        urls = [f"s3://{seaweedfs.bucket}/{fleet}/host{i}/disk.dimg" for i in range(JOBS)]
        sources = [_source(tmp_path / f"src{i}.raw", i) for i in range(JOBS)]
        env = {**os.environ, **seaweedfs.env()}
        for i in range(JOBS):
            env_i = {**env, "AWS_ENDPOINT_URL": relays[i].endpoint}
            cmd = [PYTHON, "-m", "diskimg", "image", str(sources[i]), urls[i],
                   "--block-size", "256K"]
            prefix = spaces[i].prefix() if use_netns else []
            procs.append(subprocess.Popen(prefix + cmd, env=env_i, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
        # kill the slow job once its upload has parts on the server
        c = seaweedfs.client()
        key = urls[KILLED].split("/", 3)[3]
        deadline = time.monotonic() + 120
        while True:
            ups = [u for u in c.list_multipart_uploads(Bucket=seaweedfs.bucket,
                                                       Prefix=key).get("Uploads", [])
                   if u["Key"] == key]
            if ups and c.list_parts(Bucket=seaweedfs.bucket, Key=key,
                                    UploadId=ups[0]["UploadId"]).get("Parts"):
                break
            assert procs[KILLED].poll() is None, procs[KILLED].communicate()
            assert time.monotonic() < deadline, "the job to kill never started uploading"
            time.sleep(0.05)
        os.kill(procs[KILLED].pid, signal.SIGKILL)   # ip netns exec execs the job in place
        results = [p.communicate(timeout=300) for p in procs]
        for i, p in enumerate(procs):
            if i != KILLED:
                assert p.returncode == 0, results[i][1].decode()
        assert procs[KILLED].returncode != 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for r in relays:
            r.close()
        for ns in spaces:
            ns.delete()

    from helpers import cli
    from s3servers import use_s3
    mp = pytest.MonkeyPatch()
    try:
        use_s3(mp, seaweedfs)
        for i in range(JOBS):
            if i == KILLED:
                continue
            assert cli("verify", urls[i]).rc == 0
            out = tmp_path / f"out{i}.raw"
            res = cli("restore", urls[i], out)
            assert res.rc == 0, res.err
            assert out.read_bytes() == sources[i].read_bytes(), f"host{i} mixed up"
        # the killed job: no object, one unfinished upload; the rerun aborts it and says so
        res = cli("info", urls[KILLED])
        assert res.rc == 2 and "no such object" in res.err
        res = cli("image", sources[KILLED], urls[KILLED], "--block-size", "256K")
        assert res.rc == 0, res.err
        assert "aborted an unfinished upload of this name" in res.err
        assert c.list_multipart_uploads(Bucket=seaweedfs.bucket,
                                        Prefix=f"{fleet}/").get("Uploads", []) == []
        out = tmp_path / "out-killed.raw"
        assert cli("restore", urls[KILLED], out).rc == 0
        assert out.read_bytes() == sources[KILLED].read_bytes()
        names = sorted(o["Key"] for o in c.list_objects_v2(
            Bucket=seaweedfs.bucket, Prefix=f"{fleet}/").get("Contents", []))
        assert names == [u.split("/", 3)[3] for u in urls]
    finally:
        mp.undo()

