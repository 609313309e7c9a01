"""Serving an image read-only over NBD (the network block device protocol), so that
``qemu-system-x86_64 -drive file=nbd+unix:///?socket=S,snapshot=on`` boots a backup without
restoring it and ``nbdcopy``, ``nbdinfo`` or ``qemu-img`` read it.

A small server of our own rather than nbdkit's Python plugin: it needs nothing installed
(nbdkit and its plugin are two more Debian packages, and the plugin calls into Python for
every request anyway), it reads through the same in-process `ImageDisk` (block view) as mount
and export, and it is a few hundred lines of the fixed-newstyle protocol
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):

- options: EXPORT_NAME, GO, INFO (with the export size and block sizes), LIST, ABORT,
  STRUCTURED_REPLY, LIST/SET_META_CONTEXT for ``base:allocation``; one export, whatever its
  name;
- commands: READ, BLOCK_STATUS (zero and unused blocks are holes that read as zeros: qemu-img
  and nbdcopy skip them), FLUSH and CACHE (nothing to do), DISC; WRITE, TRIM and WRITE_ZEROES
  fail with EPERM (the export is read-only);
- with structured replies a READ is answered piece by piece: holes as OFFSET_HOLE, data as
  OFFSET_DATA, and a damaged block as an ERROR_OFFSET for exactly its range (the rest of the
  request is still served); with simple replies a READ touching a damaged block fails with EIO
  as a whole.

Each connection reads requests on one thread and answers them on a few worker threads (qemu
keeps several requests in flight); replies are written whole under a lock, in any order, as the
protocol allows.  Read-only and consistent, so CAN_MULTI_CONN is advertised.
"""
from __future__ import annotations

import bisect
import errno
import logging
import os
import socket
import socketserver
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from diskimg.errors import OperationFailed, UsageError
from diskimg.ops.imagedisk import ImageDisk

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_DF = 1, 2, 4, 128
TF_CAN_MULTI_CONN, TF_SEND_CACHE = 256, 1024

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 4, 8

REPLY_FLAG_DONE = 1
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR, REPLY_ERROR_OFFSET = 2**15 + 1, 2**15 + 2

STATE_HOLE, STATE_ZERO = 1, 2
ALLOCATION = b"base:allocation"
ALLOCATION_ID = 1

MAX_REQUEST = 32 << 20          # the largest READ served (advertised as the maximum block)
MAX_DESCRIPTORS = 1 << 14       # per BLOCK_STATUS reply


class _Disconnect(Exception):
    pass


def parse_address(text: str) -> tuple[str | None, tuple[str, int] | None]:
    """``SOCKET`` (a path: a unix socket) or ``HOST:PORT`` (TCP; ``[::1]:10809`` for IPv6)."""
    if "/" in text or ":" not in text:
        return text, None
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"{text}: not a unix socket path nor HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"{text}: port must be 0-65535")
    return None, (host, number)


class _Connection:
    """One client, from the handshake to its disconnection."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.disk = server.disk
        self.sock = sock
        self.structured = False
        self.allocation = False
        self.send_lock = threading.Lock()

    # -- I/O -------------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise _Disconnect()
            buf += chunk
        return bytes(buf)

    def send(self, *parts: bytes) -> None:
        with self.send_lock:
            for p in parts:
                self.sock.sendall(p)

    def reply_opt(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)), data)

    # -- handshake -------------------------------------------------------------------------

    def handshake(self) -> bool:
        """Option haggling; True once in transmission, False when the client went away."""
        self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self.recv(4))
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", self.recv(16))
            if magic != IHAVEOPT:
                return False
            if length > 1 << 20:
                return False
            data = self.recv(length)
            if opt == OPT_EXPORT_NAME:
                self.send(struct.pack(">QH", self.disk.size, self.tflags()),
                          b"" if no_zeroes else bytes(124))
                return True
            if opt == OPT_ABORT:
                self.reply_opt(opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                name = self.server.name.encode()
                self.reply_opt(opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self.reply_opt(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    self.reply_opt(opt, REP_ERR_INVALID)
                    continue
                self.reply_opt(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.disk.size,
                                                          self.tflags()))
                self.reply_opt(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                          MAX_REQUEST))
                self.reply_opt(opt, REP_ACK)
                if opt == OPT_GO:
                    return True
            elif opt == OPT_STRUCTURED_REPLY:
                if length:
                    self.reply_opt(opt, REP_ERR_INVALID)
                    continue
                self.structured = True
                self.reply_opt(opt, REP_ACK)
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self.meta_context(opt, data)
            else:
                self.reply_opt(opt, REP_ERR_UNSUP)

    def meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self.reply_opt(opt, REP_ERR_INVALID)
            return
        try:
            (nlen,) = struct.unpack_from(">I", data, 0)
            pos = 4 + nlen
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                queries.append(data[pos + 4:pos + 4 + qlen])
                pos += 4 + qlen
        except struct.error:
            self.reply_opt(opt, REP_ERR_INVALID)
            return
        want = (opt == OPT_LIST_META_CONTEXT and not queries) or any(
            q in (ALLOCATION, b"base:") for q in queries)
        if opt == OPT_SET_META_CONTEXT:
            self.allocation = want
        if want:
            self.reply_opt(opt, REP_META_CONTEXT, struct.pack(">I", ALLOCATION_ID) + ALLOCATION)
        self.reply_opt(opt, REP_ACK)

    def tflags(self) -> int:
        return TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | \
            TF_SEND_CACHE

    # -- transmission ----------------------------------------------------------------------

    def transmission(self, workers: ThreadPoolExecutor) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", self.recv(28))
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            if cmd == CMD_WRITE:
                self.recv(length)        # the payload is read, then refused
            if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                self.error(handle, errno.EPERM)
            elif cmd in (CMD_FLUSH, CMD_CACHE):
                self.done(handle)
            elif cmd not in (CMD_READ, CMD_BLOCK_STATUS):
                self.error(handle, errno.EINVAL)
            elif offset + length > self.disk.size:
                self.error(handle, errno.EINVAL)
            elif cmd == CMD_READ and length > MAX_REQUEST:
                self.error(handle, errno.EOVERFLOW if length else errno.EINVAL)
            elif cmd == CMD_READ:
                workers.submit(self.guard, self.read, handle, offset, length, flags)
            elif not (self.structured and self.allocation):
                self.error(handle, errno.EINVAL)
            else:
                workers.submit(self.guard, self.block_status, handle, offset, length, flags)

    def guard(self, func, handle: int, *args) -> None:
        try:
            func(handle, *args)
        except OSError:                  # the client went away: the reader notices too
            pass
        except Exception:                # a bug: answer the request, keep serving
            log.exception("NBD request failed")
            try:
                self.error(handle, errno.EIO)
            except OSError:
                pass

    def done(self, handle: int) -> None:
        if self.structured:
            self.send(struct.pack(">IHHQI", STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_NONE,
                                  handle, 0))
        else:
            self.send(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle))

    def error(self, handle: int, code: int, message: str = "") -> None:
        if self.structured:
            msg = message.encode()[:4096]
            payload = struct.pack(">IH", code, len(msg)) + msg
            self.send(struct.pack(">IHHQI", STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_ERROR,
                                  handle, len(payload)), payload)
        else:
            self.send(struct.pack(">IIQ", SIMPLE_MAGIC, code, handle))

    def read(self, handle: int, offset: int, length: int, flags: int) -> None:
        disk = self.disk
        if not length:
            self.done(handle)
            return
        if not self.structured or flags & CMD_FLAG_DF:
            try:
                data = disk.read(offset, length)
            except Exception:       # name the damaged blocks in the log, fail the request
                bad = [p for p in disk.read_blocks(offset, length) if p.error]
                self.error(handle, errno.EIO, str(bad[0].error) if bad else "read failed")
                return
            if self.structured:
                self.send(struct.pack(">IHHQIQ", STRUCTURED_MAGIC, REPLY_FLAG_DONE,
                                      REPLY_OFFSET_DATA, handle, 8 + len(data), offset), data)
            else:
                self.send(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle), data)
            return
        chunks: list[tuple[int, bytes]] = []
        for start, span, zero in self.server.spans(offset, length):
            if zero:
                chunks.append((REPLY_OFFSET_HOLE, struct.pack(">QI", start, span)))
                continue
            for piece in disk.read_blocks(start, span):
                if piece.error is None:
                    chunks.append((REPLY_OFFSET_DATA,
                                   struct.pack(">Q", piece.offset) + piece.data))
                else:
                    msg = str(piece.error).encode()[:4096]
                    chunks.append((REPLY_ERROR_OFFSET, struct.pack(">IH", errno.EIO, len(msg))
                                   + msg + struct.pack(">Q", piece.offset)))
        with self.send_lock:
            for i, (rtype, payload) in enumerate(chunks):
                last = i == len(chunks) - 1
                self.sock.sendall(struct.pack(">IHHQI", STRUCTURED_MAGIC,
                                              REPLY_FLAG_DONE if last else 0, rtype, handle,
                                              len(payload)))
                self.sock.sendall(payload)

    def block_status(self, handle: int, offset: int, length: int, flags: int) -> None:
        desc = bytearray(struct.pack(">I", ALLOCATION_ID))
        n = 0
        for _, span, zero in self.server.spans(offset, length):
            desc += struct.pack(">II", span, STATE_HOLE | STATE_ZERO if zero else 0)
            n += 1
            if flags & CMD_FLAG_REQ_ONE or n >= MAX_DESCRIPTORS:
                break
        self.send(struct.pack(">IHHQI", STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS,
                              handle, len(desc)), bytes(desc))


class NbdServer:
    """Serves `disk` read-only on a unix socket `unix` or on TCP `tcp` (host, port) until
    `shutdown`.  A context manager: leaving it closes the listening socket (and removes the
    unix socket file it created)."""

    def __init__(self, disk: ImageDisk, unix: str | None = None,
                 tcp: tuple[str, int] | None = None, name: str = "",
                 threads: int = 4) -> None:
        self.disk = disk
        self.name = name
        self.threads = threads
        self.unix = unix
        self.error: BaseException | None = None
        extents = list(disk.extents())
        self._starts = [e.offset for e in extents]
        self._extents = extents
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        try:
            if unix is not None:
                if os.path.exists(unix):
                    raise UsageError(f"{unix}: exists already (another server's socket?)")
                cls = type("UnixServer", (socketserver.ThreadingMixIn,
                                          socketserver.UnixStreamServer),
                           {"daemon_threads": True})
                self.server = cls(unix, Handler)
                self.address = unix
            else:
                assert tcp is not None
                family = socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET
                cls = type("TcpServer", (socketserver.ThreadingMixIn, socketserver.TCPServer),
                           {"daemon_threads": True, "allow_reuse_address": True,
                            "address_family": family})
                self.server = cls(tcp, Handler)
                host, port = self.server.server_address[:2]
                self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError as err:
            where = unix or f"{tcp[0]}:{tcp[1]}"
            raise OperationFailed(f"{where}: cannot listen: {err.strerror or err}") from err

    @property
    def uri(self) -> str:
        """The NBD URI clients use (qemu, nbdinfo, nbdcopy)."""
        if self.unix is not None:
            return f"nbd+unix:///?socket={os.path.abspath(self.unix)}"
        return f"nbd://{self.address}"

    def spans(self, offset: int, length: int):
        """(start, length, zero) of the extents covering [offset, offset + length)."""
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        pos = offset
        while pos < end and i < len(self._extents):
            e = self._extents[i]
            stop = min(end, e.offset + e.length)
            if stop > pos:
                yield pos, stop - pos, e.zero
                pos = stop
            i += 1

    def _handle(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, sock)
        try:
            if conn.handshake():
                log.info("NBD client connected")
                with ThreadPoolExecutor(self.threads, thread_name_prefix="nbd") as workers:
                    conn.transmission(workers)
        except (_Disconnect, ConnectionError, struct.error):
            pass
        except OSError as err:
            log.debug("NBD connection ended: %s", err)

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self.server.shutdown()

    def close(self) -> None:
        self.server.server_close()
        if self.unix is not None:
            try:
                os.unlink(self.unix)
            except OSError:
                pass

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_image(image: str, address: str, *, search=(), stop: threading.Event,
                ready=None, threads: int = 4) -> str:
    """Serve `image` on `address` (a unix socket path or HOST:PORT) until `stop` is set;
    `ready(uri)` is called once it listens.  Returns the URI it served."""
    unix, tcp = parse_address(address)
    with ImageDisk(image, search) as disk, NbdServer(disk, unix=unix, tcp=tcp,
                                                      threads=threads) as server:
        thread = threading.Thread(target=server.serve_forever, name="nbd-listen", daemon=True)
        thread.start()
        try:
            if ready is not None:
                ready(server.uri)
            while not stop.is_set():
                stop.wait(0.5)
        finally:
            server.shutdown()
            thread.join(5)
        return server.uri
