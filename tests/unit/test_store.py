"""One suite for every Store backend (after borgstore's tests/test_backends.py and restic's
backend/test/suite.go): each test runs against every available backend, so that a new backend
(object storage, a stream) plugs in by adding a fixture param and passes the same tests.

Only the local directory store exists now.  Permission tests run the store as user nobody in a
forked child (root bypasses mode bits), so that the kernel itself refuses.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from diskimg.errors import (
    EXIT_PERMISSION,
    EXIT_USAGE,
    DiskimgError,
    NotAnImage,
    PermissionDenied,
    UsageError,
)
from diskimg.store import Store, open_directory, open_store
from diskimg.store.local import LocalStore

IS_ROOT = os.geteuid() == 0
NOBODY = 65534


@dataclass
class Backend:
    """A store to test and what the suite needs to know of it: `deny(name)` makes `name` and
    the store itself closed to the user `as_other` runs code as (None: not testable here)."""

    store: Store
    deny: Callable[[str], None] | None
    as_other: Callable[[Callable[[], object]], dict] | None


def _as_nobody(fn: Callable[[], object]) -> dict:
    """Run `fn` as user nobody in a forked child; what it raised (class, exit code, message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                fn()
                out = {"raised": None}
            except DiskimgError as err:
                out = {"raised": type(err).__name__, "exit_code": err.exit_code,
                       "message": str(err), "path": err.path}
            except BaseException as err:   # noqa: BLE001 (reported to the parent)
                out = {"raised": type(err).__name__, "message": repr(err)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _local_backend():
    # mkdtemp, not tmp_path: user nobody must reach the directory (tmp_path is root's alone)
    d = Path(tempfile.mkdtemp(prefix="diskimg-store-"))
    d.chmod(0o755)

    def deny(name: str) -> None:
        (d / name).chmod(0o600)   # root's file: nobody may not read it
        d.chmod(0o711)            # root's directory: nobody may not list or write it

    can_switch = IS_ROOT and hasattr(os, "setuid")
    try:
        yield Backend(LocalStore(str(d)), deny if can_switch else None,
                      _as_nobody if can_switch else None)
    finally:
        shutil.rmtree(d)


def _s3_backend(server_fixture: str):
    """A fresh prefix of the session's S3 server's bucket; `deny` is not testable through the
    store (403s are tested with a read-only identity in tests/cli/test_s3.py)."""
    def make(request):
        import uuid

        from s3servers import use_s3
        server = request.getfixturevalue(server_fixture)
        mp = request.getfixturevalue("monkeypatch")
        use_s3(mp, server)
        from diskimg.store.s3 import S3Store
        yield Backend(S3Store(server.bucket, f"suite-{uuid.uuid4().hex[:12]}/"), None, None)
    return make


BACKENDS = {"local": lambda request: _local_backend(),
            "s3-seaweedfs": _s3_backend("seaweedfs"), "s3-moto": _s3_backend("moto_s3")}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    yield from BACKENDS[request.param](request)


@pytest.fixture
def store(backend) -> Store:
    return backend.store


def _put(store: Store, name: str, data: bytes) -> None:
    sink = store.create(name)
    try:
        sink.write([data[:3], memoryview(data)[3:]])
        sink.commit()
    except BaseException:
        sink.abort()
        raise


# -- listing and stat -------------------------------------------------------------------------

def test_list_is_sorted_and_filters_by_prefix(store):
    assert store.list() == []
    for name in ("b.dimg", "a.dimg", "a2.dimg"):
        _put(store, name, name.encode())
    assert store.list() == ["a.dimg", "a2.dimg", "b.dimg"]
    assert store.list("a") == ["a.dimg", "a2.dimg"]
    assert store.list("c") == []


def test_stat_gives_size_and_identity(store):
    _put(store, "x", b"12345")
    _put(store, "y", b"12345")
    st = store.stat("x")
    assert st.size == 5 and st.is_file
    assert store.stat("x").identity == st.identity
    if st.identity:     # a store that can tell objects apart tells these two apart
        assert store.stat("y").identity != st.identity
    assert store.exists("x") and not store.exists("nothing")


# -- reading ----------------------------------------------------------------------------------

def test_open_pread_and_read_into(store):
    data = os.urandom(100_000)
    _put(store, "img", data)
    with store.open("img") as r:
        assert r.size == len(data)
        assert r.path == store.path("img")
        assert r.pread(10, 0) == data[:10]
        assert r.pread(1000, 50_000) == data[50_000:51_000]
        assert r.pread(1000, len(data) - 10) == data[-10:]      # short only at the end
        assert r.pread(10, len(data) + 5) == b""
        buf = bytearray(4096)
        assert r.read_into(buf, 777) == 4096 and buf == data[777:777 + 4096]
        view = memoryview(buf)[:100]                           # a reused buffer's slice
        assert r.read_into(view, 0) == 100 and buf[:100] == data[:100]
        assert r.read_into(buf, len(data) - 96) == 96 and buf[:96] == data[-96:]


def test_reads_of_every_pattern_return_the_bytes(store):
    """The patterns an image is read in, over an object larger than S3Reader's windows (8 MiB):
    small scattered reads near each other (header, trailer, footer: served from chunks kept),
    one crossing a chunk's end, a sequential run of records across windows (read ahead), the
    same into a buffer, and scattered reads again."""
    data = os.urandom(20 << 20)
    _put(store, "big", data)
    with store.open("big") as r:
        for off, n in [(0, 10), (100, 4000), (len(data) - 32, 32), (len(data) - 300_000, 5000),
                       (len(data) - 70_000, 60_000), ((256 << 10) - 10, 20), (1 << 20, 70_000)]:
            assert r.pread(n, off) == data[off:off + n], (off, n)
        off, n = 0, 300_000
        buf = bytearray(n)
        while off < len(data):
            if (off // n) % 2:
                got = r.read_into(buf, off)
                assert bytes(buf[:got]) == data[off:off + n], off
            else:
                assert r.pread(n, off) == data[off:off + n], off
            off += n
        assert r.pread(5000, 3 << 20) == data[3 << 20:(3 << 20) + 5000]
        assert r.pread(9 << 20, 10 << 20) == data[10 << 20:19 << 20]


def test_missing_names_are_errors_naming_the_path(store):
    for op in (store.stat, store.open, store.delete):
        with pytest.raises(NotAnImage) as exc:
            op("missing.dimg")
        assert exc.value.path == store.path("missing.dimg")
        # "no such file" in a directory, "no such object" in object storage
        assert str(exc.value).startswith(f"{store.path('missing.dimg')}: no such ")
        assert exc.value.exit_code == EXIT_USAGE


# -- writing ----------------------------------------------------------------------------------

def test_name_appears_only_at_commit(store):
    sink = store.create("new.dimg")
    sink.write([b"header", b"records"])
    sink.sync()
    assert sink.pos == len(b"headerrecords")
    assert "new.dimg" not in store.list() and not store.exists("new.dimg")
    with pytest.raises(NotAnImage):
        store.open("new.dimg")
    sink.write([memoryview(b"index")])
    sink.commit()
    assert "new.dimg" in store.list()
    assert store.list() == ["new.dimg"]       # nothing left behind but the image
    with store.open("new.dimg") as r:
        assert r.pread(100, 0) == b"headerrecordsindex"
    sink.abort()                              # after commit: harmless, the image stays
    assert store.exists("new.dimg")


def test_commit_replaces_an_existing_name(store):
    _put(store, "img", b"old contents")
    _put(store, "img", b"new")
    with store.open("img") as r:
        assert r.pread(100, 0) == b"new"


def test_abort_leaves_nothing(store):
    _put(store, "kept", b"k")
    sink = store.create("gone.dimg")
    sink.write([b"x" * 1000])
    sink.abort()
    assert store.list() == ["kept"]
    sink.abort()                              # twice: harmless


def test_resume_a_partial(store):
    if not store.resumable:
        pytest.skip(f"{type(store).__name__} cannot resume a sink")
    sink = store.create("rescue.dimg")
    sink.write([b"A" * 100, b"torn"])
    sink.sync()
    sink.close()                              # an interrupted run: unpublished, kept
    assert not store.exists("rescue.dimg")
    with store.open(store.partial_name("rescue.dimg")) as r:   # what a resume scans
        assert r.pread(200, 0) == b"A" * 100 + b"torn"
    sink = store.create("rescue.dimg", resume_at=100)           # the torn tail is dropped
    assert sink.pos == 100
    sink.write([b"B" * 10])
    sink.commit()
    with store.open("rescue.dimg") as r:
        assert r.pread(200, 0) == b"A" * 100 + b"B" * 10
    assert store.list() == ["rescue.dimg"]


def _interrupted(store: Store, name: str) -> None:
    """What a run killed while it wrote `name` leaves: a ``.partial`` file in a directory, an
    uncompleted multipart upload (parts, no object) in object storage."""
    if isinstance(store, LocalStore):
        sink = store.create(name)
        sink.write([b"x" * 1000])
        sink.close()
        return
    from diskimg.store.s3 import _client
    c = _client()
    up = c.create_multipart_upload(Bucket=store.bucket, Key=store.key(name))
    c.upload_part(Bucket=store.bucket, Key=store.key(name), UploadId=up["UploadId"],
                  PartNumber=1, Body=b"x" * 1000)


def test_unfinished_writes_are_found_and_discarded(store):
    _put(store, "job-a.dimg", b"image")
    _interrupted(store, "job-b.dimg")
    _interrupted(store, "other-c.dimg")
    assert store.unfinished() == ["job-b.dimg", "other-c.dimg"]
    assert store.unfinished("job-") == ["job-b.dimg"]
    assert not store.exists("job-b.dimg")          # no image under the name
    assert "job-b.dimg" in store.unfinished_label("job-b.dimg")
    store.discard_unfinished("job-b.dimg")
    assert store.unfinished("job-") == [] and store.list("job-") == ["job-a.dimg"]
    with pytest.raises(NotAnImage):
        store.discard_unfinished("job-b.dimg")
    store.discard_unfinished("other-c.dimg")
    assert store.unfinished() == []


def test_delete(store):
    _put(store, "a", b"1")
    _put(store, "b", b"2")
    store.delete("a")
    assert store.list() == ["b"] and not store.exists("a")


def test_rename_puts_one_object_in_the_place_of_another(store):
    """`diskimg repair` publishes the repaired image so; a store that cannot says so."""
    _put(store, "a", b"new")
    _put(store, "b", b"old")
    try:
        store.rename("a", "b")
    except UsageError as err:
        assert "cannot replace an image in place" in str(err)
        return
    assert store.list() == ["b"]
    with store.open("b") as r:
        assert r.pread(10, 0) == b"new"


# -- permission: exit 4, naming the path ------------------------------------------------------

def test_permission_errors_exit_4(backend):
    if backend.deny is None:
        pytest.skip("needs root (to run the store as user nobody)" if isinstance(
            backend.store, LocalStore) else "403s: tests/cli/test_s3.py (a read-only identity)")
    store = backend.store
    _put(store, "secret.dimg", b"secret")
    backend.deny("secret.dimg")
    cases = {
        "open": (lambda: store.open("secret.dimg"), store.path("secret.dimg")),
        "delete": (lambda: store.delete("secret.dimg"), store.path("secret.dimg")),
        "create": (lambda: store.create("new.dimg"), store.path(store.partial_name("new.dimg"))),
        "list": (lambda: store.list(), store.location),
    }
    for what, (op, path) in cases.items():
        got = backend.as_other(op)
        assert got["raised"] == PermissionDenied.__name__, (what, got)
        assert got["exit_code"] == EXIT_PERMISSION, (what, got)
        assert "permission denied" in got["message"], (what, got)
        assert got["path"] == path and got["message"].startswith(f"{path}: "), (what, got)
    assert store.exists("secret.dimg") and not store.exists("new.dimg")


# -- picking a backend ------------------------------------------------------------------------

def test_open_store_gives_back_the_path_as_written(tmp_path):
    for location in ("img.dimg", "dir/img.dimg", "dir//img.dimg", "/abs/dir/img.dimg",
                     str(tmp_path / "x.dimg")):
        store, name = open_store(location)
        assert isinstance(store, LocalStore)
        assert store.path(name) == location and name == os.path.basename(location)
    store, name = open_store("img.dimg")
    assert store.location == os.getcwd()
    assert open_directory(str(tmp_path)).location == str(tmp_path)


def test_s3_urls_pick_the_object_store():
    from diskimg.store.s3 import S3Store
    store, name = open_store("s3://bucket/images/host1/a.dimg")
    assert isinstance(store, S3Store) and name == "a.dimg"
    assert (store.bucket, store.prefix) == ("bucket", "images/host1/")
    assert store.path(name) == "s3://bucket/images/host1/a.dimg"
    assert open_directory("s3://bucket/images").location == "s3://bucket/images/"
    assert open_directory("S3://bucket").location == "s3://bucket/"
    for location in ("s3://", "s3:///a.dimg", "s3://bucket/images/"):
        with pytest.raises(UsageError) as exc:
            open_store(location)
        assert str(exc.value).startswith(f"{location}: no ")
        assert exc.value.exit_code == EXIT_USAGE


def test_part_size_grows_with_the_source():
    from diskimg.store.s3 import MAX_PARTS, MIN_PART, part_size_for
    assert part_size_for(None) == part_size_for(1 << 20) == MIN_PART
    for size in (1 << 30, 1 << 40, 4 << 40, 5 << 40):
        part = part_size_for(size)
        assert part % (1 << 20) == 0 and part * (MAX_PARTS - 1000) >= size


def test_only_the_store_lists_renames_or_preads_images():
    """Everything above the store reaches images through it: no os.listdir, os.scandir,
    os.rename, os.replace or os.pread in image/, format/, ops/ or cli/ (the source device and
    the restore target are not images; disk/ reads them)."""
    pkg = Path(__file__).resolve().parents[2] / "diskimg"
    banned = {"listdir", "scandir", "rename", "replace", "pread"}
    found = []
    for sub in ("image", "format", "ops", "cli"):
        for path in sorted((pkg / sub).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in banned and \
                        isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{path.relative_to(pkg)}:{node.lineno}: os.{node.attr}")
    assert found == []


def test_s3_window_buffers_are_reused_only_once_no_read_copies_from_them(seaweedfs, monkeypatch):
    """S3Reader reuses the buffer of a read-ahead window dropped from its cache, but only once
    no read is copying from it: readers on several threads taking the next record in turn (as
    restore's workers do), over windows made small so that dozens are fetched, dropped and
    reused, all get their bytes right, with pread and read_into alike."""
    import threading
    import uuid

    from diskimg.store import s3
    from s3servers import use_s3
    use_s3(monkeypatch, seaweedfs)
    monkeypatch.setattr(s3, "WINDOW", 64 << 10)
    store = s3.S3Store(seaweedfs.bucket, f"suite-{uuid.uuid4().hex[:12]}/")
    data = os.urandom(6 << 20)
    _put(store, "big", data)
    step, errors = 100_000, []
    for pass_ in range(2):
        with store.open("big") as r:
            cursor = iter(range(0, len(data), step))
            lock = threading.Lock()

            def work() -> None:
                buf = bytearray(step)
                while True:
                    with lock:
                        off = next(cursor, None)
                    if off is None:
                        return
                    want = data[off:off + step]
                    if pass_:
                        got = bytes(buf[:r.read_into(buf, off)])
                    else:
                        got = r.pread(step, off)
                    if got != want:
                        errors.append(off)
            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == []
            assert r._free, "no window buffer was reused"
            assert not r._pins          # every read let go of its windows


def test_the_collector_paused_for_boto3_is_put_back_as_it_was():
    """boto3 is imported and its client made with the cyclic garbage collector held back
    (store.collector_paused); afterwards the collector is as it was: on again when it was on,
    still off when something else had turned it off (the entry point, while the program
    starts), also when what ran inside failed."""
    import gc

    from diskimg.store import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ImportError), collector_paused():
        raise ImportError("no boto3")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
