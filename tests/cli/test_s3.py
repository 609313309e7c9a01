"""Images in object storage, end to end through the CLI, against a real SeaweedFS server (and a
subset against moto's server mode, a second, strict implementation).  The servers are started
once per session (tests/conftest.py, tests/s3servers.py)."""
from __future__ import annotations

import json
import os
import uuid

import pytest
from helpers import cli
from s3servers import READ_ONLY_KEY, READ_ONLY_SECRET, SECRET_KEY, Relay, use_s3

BS = 64 << 10
MiB = 1 << 20


def _source(path, size=24 * MiB, data=12 * MiB, seed=b""):
    """A sparse file: `data` bytes of random data in the middle, holes around."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(4 * MiB)
        f.write(os.urandom(data))
    return path


@pytest.fixture
def s3(monkeypatch, seaweedfs):
    use_s3(monkeypatch, seaweedfs)
    seaweedfs.prefix = f"s3://{seaweedfs.bucket}/t-{uuid.uuid4().hex[:10]}/"
    return seaweedfs


@pytest.fixture
def moto(monkeypatch, moto_s3):
    use_s3(monkeypatch, moto_s3)
    moto_s3.prefix = f"s3://{moto_s3.bucket}/t-{uuid.uuid4().hex[:10]}/"
    return moto_s3


def _uploads(server, prefix: str = "") -> list[dict]:
    return server.client().list_multipart_uploads(Bucket=server.bucket,
                                                  Prefix=prefix).get("Uploads", [])


def _roundtrip(server, tmp_path):
    src = _source(tmp_path / "src.raw")
    url = server.prefix + "a.dimg"
    res = cli("image", src, url, "--block-size", "64K", "--json")
    assert res.rc == 0, res.err
    assert res.json["path"] == url
    assert res.json["image_bytes"] == server.client().head_object(
        Bucket=server.bucket, Key=url.split("/", 3)[3])["ContentLength"]
    res = cli("info", url, "--json")
    assert res.rc == 0, res.err
    assert res.json["stored_blocks"] == 12 * MiB // BS
    res = cli("verify", url)
    assert res.rc == 0, res.err
    out = tmp_path / "out.raw"
    res = cli("restore", url, out)
    assert res.rc == 0, res.err
    assert out.read_bytes() == src.read_bytes()
    assert _uploads(server) == []          # every multipart upload completed
    return url


def test_image_info_verify_restore(s3, tmp_path):
    _roundtrip(s3, tmp_path)


def test_moto_image_info_verify_restore(moto, tmp_path):
    _roundtrip(moto, tmp_path)


def test_existing_object_needs_force(s3, tmp_path):
    url = _roundtrip(s3, tmp_path)
    src = tmp_path / "src.raw"
    res = cli("image", src, url)
    assert res.rc == 2 and res.err_lines == [
        f"diskimg: error: {url}: already exists; use --force to overwrite it"]
    # not an image: never replaced, not even with --force
    other = s3.prefix + "notes.txt"
    s3.client().put_object(Bucket=s3.bucket, Key=other.split("/", 3)[3], Body=b"hello")
    res = cli("image", src, other, "--force")
    assert res.rc == 2 and "is not a diskimg image" in res.err
    res = cli("image", src, url, "--force", "--block-size", "64K")
    assert res.rc == 0, res.err


def test_incremental_chain_in_the_store(s3, tmp_path):
    """An incremental reads its parent's index from the store; the parent is found by name
    beside the child, and by UUID in a --search prefix after it was renamed elsewhere."""
    src = _source(tmp_path / "src.raw", size=8 * MiB, data=4 * MiB)
    full, inc = s3.prefix + "full.dimg", s3.prefix + "inc.dimg"
    assert cli("image", src, full, "--block-size", "64K").rc == 0
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(100_000))
    res = cli("image", src, inc, "--incremental", full, "--json")
    assert res.rc == 0, res.err
    assert res.json["changed_blocks"] == 2 and res.json["parent"]
    out = tmp_path / "out.raw"
    assert cli("restore", inc, out).rc == 0
    assert out.read_bytes() == src.read_bytes()
    # move the parent to another prefix under another name: found there by UUID
    c = s3.client()
    key = full.split("/", 3)[3]
    elsewhere = f"s3://{s3.bucket}/other-{uuid.uuid4().hex[:8]}/"
    c.copy_object(Bucket=s3.bucket, Key=elsewhere.split("/", 3)[3] + "monday.dimg",
                  CopySource={"Bucket": s3.bucket, "Key": key})
    c.delete_object(Bucket=s3.bucket, Key=key)
    res = cli("verify", inc)
    assert res.rc == 2 and "parent image" in res.err and "not found" in res.err
    res = cli("verify", inc, "--search", elsewhere, "--json")
    assert res.rc == 0, res.err
    assert [c["path"] for c in res.json["chain"]] == [elsewhere + "monday.dimg", inc]
    out.unlink()
    assert cli("restore", inc, out, "--search", elsewhere).rc == 0
    assert out.read_bytes() == src.read_bytes()


def test_errors_are_one_line_with_their_exit_code(s3, tmp_path, monkeypatch):
    src = _source(tmp_path / "src.raw", size=2 * MiB, data=MiB)
    missing = s3.prefix + "missing.dimg"
    for args in (("info", missing), ("verify", missing), ("restore", missing, tmp_path / "o")):
        res = cli(*args)
        assert res.rc == 2 and res.err_lines == [f"diskimg: error: {missing}: no such object"]
    nobucket = "s3://no-such-bucket-here/x.dimg"
    res = cli("info", nobucket)
    assert res.rc == 2 and res.err_lines == [
        f"diskimg: error: {nobucket}: no such bucket 'no-such-bucket-here'"]
    res = cli("image", src, nobucket)
    assert res.rc == 2 and "no such bucket" in res.err
    # a read-only identity may read but not write: exit 4, and no secret shown anywhere
    url = s3.prefix + "ro.dimg"
    assert cli("image", src, url).rc == 0
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READ_ONLY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READ_ONLY_SECRET)
    assert cli("verify", url).rc == 0
    res = cli("image", src, s3.prefix + "denied.dimg", "--json")
    assert res.rc == 4, res.err
    assert res.json["error"]["message"].startswith(f"{s3.prefix}denied.dimg: permission denied")
    assert READ_ONLY_SECRET not in res.out + res.err
    # a wrong secret: exit 4, the secret nowhere, not even with --debug
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    res = cli("--debug", "info", url, "--json")
    assert res.rc == 4 and "permission denied" in res.err
    assert SECRET_KEY not in res.out + res.err
    # no credentials at all
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    res = cli("info", url)
    assert res.rc == 4 and "no credentials" in res.err and len(res.err_lines) == 1


def test_endpoint_url_option(s3, tmp_path, monkeypatch):
    url = _roundtrip(s3, tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    res = cli("info", url, "--endpoint-url", s3.endpoint, "--json")
    assert res.rc == 0, res.err
    # nothing listens there: retried, then one line, exit 3
    (port,) = __import__("s3servers").free_ports(1)
    monkeypatch.setattr("diskimg.store.s3.ATTEMPTS", 2)
    res = cli("info", url, "--endpoint-url", f"http://127.0.0.1:{port}")
    assert res.rc == 3 and len(res.err_lines) == 1 and "cannot reach the server" in res.err


def test_transient_errors_are_retried_and_said_at_v(s3, tmp_path, monkeypatch):
    url = _roundtrip(s3, tmp_path)
    proxy = Relay(int(s3.endpoint.rsplit(":", 1)[1]), resets=2)
    try:
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        res = cli("-v", "verify", url, "--endpoint-url", f"http://127.0.0.1:{proxy.port}")
    finally:
        proxy.close()
    assert res.rc == 0, res.err
    retries = [line for line in res.err_lines if "retrying in" in line]
    assert retries and all(line.startswith(f"diskimg: {url}: ") for line in retries)


def test_an_interrupted_upload_is_aborted_by_the_next_run(s3, tmp_path):
    """A run killed mid-upload leaves an unfinished multipart upload (no object): the next
    image of that name aborts it, says so, and publishes a whole image."""
    src = _source(tmp_path / "src.raw", size=2 * MiB, data=MiB)
    url = s3.prefix + "killed.dimg"
    key = url.split("/", 3)[3]
    c = s3.client()
    up = c.create_multipart_upload(Bucket=s3.bucket, Key=key)
    c.upload_part(Bucket=s3.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1,
                  Body=b"DIMG" + os.urandom(5 * MiB))
    assert cli("info", url).rc == 2                     # no object passes as an image
    res = cli("image", src, url)
    assert res.rc == 0, res.err
    assert "aborted an unfinished upload of this name" in res.err
    assert _uploads(s3, key) == []
    assert cli("verify", url).rc == 0


def test_a_failed_upload_leaves_nothing(s3, tmp_path, monkeypatch):
    """An error while imaging (the source shrinks away under it) aborts the upload."""
    src = _source(tmp_path / "src.raw", size=40 * MiB, data=30 * MiB)
    url = s3.prefix + "failed.dimg"
    from diskimg.store import s3 as s3mod
    monkeypatch.setattr(s3mod, "MIN_PART", 5 * MiB)
    real = s3mod.S3Sink.commit

    def commit(self):
        assert self._upload_id is not None and len(self._parts) >= 2   # parts were sent
        raise KeyboardInterrupt
    monkeypatch.setattr(s3mod.S3Sink, "commit", commit)
    res = cli("image", src, url, "--block-size", "64K")
    monkeypatch.setattr(s3mod.S3Sink, "commit", real)
    assert res.rc == 130, res.err
    assert cli("info", url).rc == 2
    assert _uploads(s3, url.split("/", 3)[3]) == []


def test_json_keeps_urls(s3, tmp_path):
    src = _source(tmp_path / "src.raw", size=2 * MiB, data=MiB)
    url = s3.prefix + "j.dimg"
    res = cli("image", src, url, "--json")
    assert res.rc == 0 and res.json["path"] == url
    res = cli("verify", url, "--json", "--search", s3.prefix)
    assert res.rc == 0 and json.dumps(res.json).count(url) >= 1


def test_incremental_stream_against_a_parent_in_the_store(s3, tmp_path):
    """`image SRC - --incremental s3://...` streams an incremental whose parent is in the store;
    `restore - TARGET --search s3://prefix/` restores it, reading the parent from the store."""
    import subprocess

    from helpers import PYTHON
    src = _source(tmp_path / "src.raw", size=8 * MiB, data=4 * MiB)
    full = s3.prefix + "full.dimg"
    assert cli("image", src, full).rc == 0
    with open(src, "r+b") as f:
        f.seek(6 * MiB)
        f.write(os.urandom(50_000))
    env = {**os.environ}
    inc = tmp_path / "inc.dimg"
    with open(inc, "wb") as out:
        r = subprocess.run([PYTHON, "-m", "diskimg", "image", str(src), "-", "--incremental",
                            full], stdout=out, stderr=subprocess.PIPE, env=env)
    assert r.returncode == 0, r.stderr
    target = tmp_path / "out.raw"
    with open(inc, "rb") as f:
        r = subprocess.run([PYTHON, "-m", "diskimg", "restore", "-", str(target), "--search",
                            s3.prefix], stdin=f, capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == src.read_bytes()


def test_the_program_ends_at_once_with_its_output_and_log_whole(s3, tmp_path):
    """After an s3:// command the program skips the interpreter's teardown of boto3's client
    (diskimg/__main__.py _exit_now): its exit code, its output and its log file are still
    complete, for a success and for a failure, run as the real program."""
    import subprocess

    from helpers import PYTHON
    src = _source(tmp_path / "src.raw", size=2 * MiB, data=MiB)
    url = s3.prefix + "x.dimg"
    assert cli("image", src, url).rc == 0
    r = subprocess.run([PYTHON, "-m", "diskimg", "info", url, "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["uuid"]                  # the whole JSON document, flushed
    r = subprocess.run([PYTHON, "-m", "diskimg", "verify", url], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout.upper(), (r.stdout, r.stderr)
    missing = s3.prefix + "missing.dimg"
    log = tmp_path / "log.txt"
    r = subprocess.run([PYTHON, "-m", "diskimg", "info", missing, "--json", "--log-file",
                        str(log)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    error = json.loads(r.stdout)["error"]
    assert "no such object" in error["message"] and error["path"] == missing
    assert "no such object" in log.read_text(), log.read_text()   # flushed and closed
    out = tmp_path / "out.raw"
    r = subprocess.run([PYTHON, "-m", "diskimg", "restore", url, str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    assert "restored" in r.stdout
