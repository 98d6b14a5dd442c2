"""Transport: addresses, the notifyfs handshake, and FUSE frames over a byte stream.

After the handshake both directions carry FUSE frames exactly as the kernel writes them: the agent
sends requests (``fuse_in_header.len`` frames them), the server sends replies and notifications
(``fuse_out_header.len``).

Handshake (all integers little-endian)::

    agent  -> server: "notifyfs" u16 version, u16 reserved, u64 features, u16 token_len, token
    server -> agent : "notifyfs" u16 version, u16 status,   u64 features, u16 msg_len,   msg

``features`` in the server's answer are those both sides support. A status other than 0 is
followed by the server closing the connection.

Feature ``session`` (bit 4): when both sides have it, the agent sends its session id right after
the server's answer, before any FUSE frame::

    agent  -> server: u8 session[16]

The id is random, made once per mount and kept across reconnects: it lets a server tell that a
new connection (one that sends NOTIFYFS_REVIVE) is the same guest mount as an older connection it
still holds, which the network may have left half-open. The server then shuts that older
connection down before it answers the REVIVE (server/connection.py, "fencing"), so no request
still travelling on it can run after the agent has retried it on the new one. An agent that does
not offer the bit sends nothing more; a server that does not agree to it never reads the id
(old agents and old servers work as before, without fencing).
"""

from __future__ import annotations

import errno
import glob
import hmac
import ipaddress
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from . import abi
from .protocol import MAX_FRAME, ProtocolError, split_frames

MAGIC = b"notifyfs"
VERSION = 1
_HELLO = struct.Struct("<8sHHQH")

# feature bits
FEATURE_FSNOTIFY = 1 << 0  # remote events (NOTIFYFS_FSNOTIFY / NOTIFYFS_NOTIFY_*)
FEATURE_WRITEBACK = 1 << 1  # the server allows the kernel's writeback cache
FEATURE_READONLY = 1 << 2  # the export is read-only (informational: enforced by the server)
FEATURE_REVIVE = 1 << 3  # NOTIFYFS_HANDLE / NOTIFYFS_REVIVE: the agent survives a server restart
FEATURE_SESSION = 1 << 4  # the agent's session id follows the handshake (fences an old connection)
SUPPORTED_FEATURES = (FEATURE_FSNOTIFY | FEATURE_WRITEBACK | FEATURE_READONLY | FEATURE_REVIVE
                      | FEATURE_SESSION)
#: bytes of a session id (random: an agent that does not know an id cannot fence its connection)
SESSION_ID_SIZE = 16

STATUS_OK = 0
STATUS_BAD_VERSION = 1
STATUS_BAD_TOKEN = 2
STATUS_REFUSED = 3

HANDSHAKE_TIMEOUT = 10.0


class HandshakeError(Exception):
    """The peer is not a notifyfs peer, speaks another version, or refused us."""


#: ``vsock:any:PORT`` listens for every context id (VMADDR_CID_ANY)
VSOCK_CID_ANY = 0xFFFFFFFF
#: the host's context id as seen from a guest
VSOCK_CID_HOST = 2
#: where Linux lists virtio-serial ports (no udev needed): <dir>/vportNpM/name
VIRTIO_PORTS = "/sys/class/virtio-ports"


@dataclass(frozen=True)
class Address:
    """``unix``, ``tcp``, ``vsock`` (host = the context id) or ``virtio-serial``.

    ``virtio-serial:X`` means the port named X when an agent connects, and the unix socket X that
    QEMU's ``-chardev socket,path=X`` connects to when a server listens.
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind in ("unix", "virtio-serial"):
            return f"{self.kind}:{self.path}"
        return f"{self.kind}:{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.kind != "tcp":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False


ADDRESS_FORMS = "unix:PATH, tcp:HOST:PORT, vsock:CID:PORT or virtio-serial:NAME"


def parse_address(text: str) -> Address:
    """``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6), ``vsock:CID:PORT`` (CID a
    number, ``host`` for 2 or ``any`` to listen on every CID) or ``virtio-serial:NAME``."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"bad address {text!r}: expected {ADDRESS_FORMS}")
    if kind in ("unix", "virtio-serial"):
        return Address(kind, path=rest)
    if kind in ("tcp", "vsock"):
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < (
                65536 if kind == "tcp" else 1 << 32):
            what = "HOST" if kind == "tcp" else "CID"
            raise ValueError(f"bad address {text!r}: expected {kind}:{what}:PORT")
        if kind == "tcp":
            return Address("tcp", host=host.strip("[]"), port=int(port))
        cid = {"any": VSOCK_CID_ANY, "host": VSOCK_CID_HOST}.get(host)
        if cid is None:
            if not host.isdigit() or int(host) >= 1 << 32:
                raise ValueError(f"bad address {text!r}: the vsock CID is a number, host or any")
            cid = int(host)
        return Address("vsock", host=str(cid), port=int(port))
    raise ValueError(f"bad address {text!r}: unknown kind {kind!r} ({ADDRESS_FORMS})")


def listen(addr: Address, token: bytes | None) -> socket.socket:
    if addr.kind == "vsock":
        # every VM on this host can reach a host vsock port: the token is what tells them apart
        if not token:
            raise ValueError(f"refusing to listen on {addr} without a token "
                             "(--token-file or NOTIFYFS_TOKEN): every guest on the host can connect")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((int(addr.host), addr.port))
    elif addr.kind in ("unix", "virtio-serial"):  # virtio-serial: QEMU's chardev connects here
        try:
            st = os.lstat(addr.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{addr.path} exists and is not a socket")
            os.unlink(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only the owner may connect
        try:
            sock.bind(addr.path)
        finally:
            os.umask(old)
        os.chmod(addr.path, 0o600)
    else:
        if not addr.is_loopback and not token:
            raise ValueError(
                f"refusing to listen on non-loopback {addr} without a token "
                "(--token-file or NOTIFYFS_TOKEN)")
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
    sock.listen(16)
    return sock


class Stream(Protocol):
    """What the framing and the handshake need of a connection: a socket or a :class:`PortStream`."""

    def recv(self, n: int, /) -> bytes: ...
    def sendall(self, data: bytes, /) -> None: ...
    def settimeout(self, timeout: float | None, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


class PortStream:
    """A virtio-serial port (a character device, not a socket) with the socket calls wire.py uses.

    The guest kernel blocks writes while nothing is connected on the host side of the port, and
    a read returns end of file when the host side goes away (virtio_console's read and write).
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.timeout: float | None = None
        self._closed = False

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def _wait(self, events: int) -> None:
        if self.timeout is None:
            return
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(self.fd, events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"virtio-serial port {self.name}: timed out")
            ready = poller.poll(left * 1000)
            if any(ev & (events | select.POLLERR) for _, ev in ready):
                return
            if ready:  # only POLLHUP: the host side is not connected yet (QEMU reconnects)
                time.sleep(min(0.1, left))

    def recv(self, n: int) -> bytes:
        self._wait(select.POLLIN)
        return os.read(self.fd, n)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(select.POLLOUT)
            view = view[os.write(self.fd, view):]  # the driver takes at most 32 KiB at a time

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def find_virtio_port(name: str, root: str = VIRTIO_PORTS) -> str:
    """The device node of the virtio-serial port called ``name`` (``/dev/vportNpM``)."""
    for entry in sorted(glob.glob(os.path.join(root, "*", "name"))):
        try:
            with open(entry) as f:
                if f.read().strip() != name:
                    continue
        except OSError:
            continue
        return os.path.join("/dev", os.path.basename(os.path.dirname(entry)))
    raise FileNotFoundError(errno.ENOENT, f"no virtio-serial port named {name!r} in {root}")


# --- TLS ------------------------------------------------------------------------------------------

def server_tls(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS context: its certificate and key; with ``ca``, agents must present a
    certificate signed by it (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The agent's TLS context: the server's certificate is verified against ``ca`` (else the
    system's CAs) and its name checked; ``cert``/``key`` are the agent's own, for mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.load_default_certs()
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class TLSStream:
    """A TLS connection that one thread reads while others write.

    OpenSSL does not allow one SSL object to be used by two threads at once, and the relay and the
    server read in one thread and write in others. So the socket is non-blocking, every SSL call
    is made under one lock, and waiting for the network happens outside it.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.family = sock.family
        self.lock = threading.Lock()
        self.timeout: float | None = None
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Like socket.settimeout: each wait for the network ends in TimeoutError after it."""
        self.timeout = timeout

    def _wait(self, for_write: bool) -> None:
        fd = self.sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "TLS stream closed")
        # poll, not select: with the open files limit raised (fdlimit.py) a server holding many
        # inodes gives new connections fds above select's FD_SETSIZE (1024)
        poller = select.poll()
        poller.register(fd, select.POLLOUT if for_write else select.POLLIN)
        if not poller.poll(None if self.timeout is None else self.timeout * 1000):
            raise TimeoutError("timed out")

    def recv(self, n: int) -> bytes:
        while True:
            with self.lock:
                try:
                    return self.sock.recv(n)
                except ssl.SSLWantReadError:
                    for_write = False
                except ssl.SSLWantWriteError:
                    for_write = True
                except ssl.SSLZeroReturnError:
                    return b""
            self._wait(for_write)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            with self.lock:
                try:
                    view = view[self.sock.send(view):]
                    continue
                except ssl.SSLWantReadError:
                    for_write = False
                except ssl.SSLWantWriteError:
                    for_write = True
            self._wait(for_write)

    def shutdown(self, how: int) -> None:
        # the plain socket's shutdown: wakes a reader without touching the SSL object under it
        socket.socket.shutdown(self.sock, how)

    def close(self) -> None:
        self.sock.close()

    def getpeername(self) -> object:
        return self.sock.getpeername()


def stream(sock: Stream) -> Stream:
    """What to read and write frames on once the handshake is done: a TLS socket is wrapped so
    that its reader and writers can be different threads."""
    if isinstance(sock, ssl.SSLSocket):
        return TLSStream(sock)
    return sock


def connect(addr: Address, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
            server_name: str | None = None) -> Stream:
    """Connect to ``addr``; with ``tls``, the TLS handshake itself is made by
    :func:`client_handshake`, inside its time limit."""
    sock = _connect(addr, timeout)
    if tls is None:
        return sock
    if not isinstance(sock, socket.socket):
        sock.close()
        raise ValueError(f"TLS is not available over {addr.kind} (a VM's own channel)")
    name = server_name or (addr.host if addr.kind == "tcp" else None)
    if name is None:
        tls.check_hostname = False  # no name to check (a unix socket): the CA check remains
    return tls.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)


def _connect(addr: Address, timeout: float) -> Stream:
    if addr.kind == "virtio-serial":
        path = find_virtio_port(addr.path)
        return PortStream(os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY), addr.path)
    if addr.kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((int(addr.host), addr.port))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock
    sock.settimeout(timeout)
    sock.connect(addr.path)
    sock.settimeout(None)
    return sock


#: TCP dead-peer detection (see tune): probes after this many idle seconds, one every
#: KEEPALIVE_INTERVAL, KEEPALIVE_PROBES unanswered ones end the connection; data unacknowledged
#: for DEAD_PEER_TIMEOUT seconds ends it too
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_PROBES = 3
DEAD_PEER_TIMEOUT = 30


def tune(sock: Stream) -> None:
    """Large buffers: a 1 MiB WRITE should not need many round trips through the socket.

    Over TCP, also detect a peer that vanished without a FIN or RST (a network drop, a NAT or
    firewall that forgot the connection, a VM that was powered off): without it such a
    connection is half-open for ever. The server would keep the old connection's inodes,
    handles, inotify watches and threads (and its event writer blocks once the buffers are
    full) while the agent reconnects; the agent would wait for ever for replies instead of
    reconnecting. Keepalive covers an idle connection, TCP_USER_TIMEOUT one with data in flight.
    """
    if not isinstance(sock, socket.socket):
        return
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in ((socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
                           (socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
                           (socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
                           (socket.TCP_USER_TIMEOUT, DEAD_PEER_TIMEOUT * 1000)):
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


class _Deadline:
    """One time limit for a whole handshake: a peer that trickles a byte at a time gets no more
    time than one that sends nothing (a timeout per recv would let it hold a slot for ever)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def arm(self, sock: Stream) -> None:
        if self.end is None:
            sock.settimeout(None)
            return
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake deadline passed")
        sock.settimeout(left)


def _recv_exact(sock: Stream, n: int, deadline: _Deadline | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            deadline.arm(sock)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _looks_like_tls(data: bytes) -> bool:
    """A TLS record (handshake 0x16 or alert 0x15, version 3.x) where a notifyfs hello should be."""
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 3


def _read_hello(sock: Stream, deadline: _Deadline | None = None) -> tuple[int, int, int, bytes]:
    raw = _recv_exact(sock, _HELLO.size, deadline)
    magic, version, word, features, n = _HELLO.unpack(raw)
    if magic != MAGIC:
        if _looks_like_tls(raw):
            raise HandshakeError("peer speaks TLS and this side does not (--tls-* options)")
        raise HandshakeError(f"peer is not notifyfs (got {magic!r})")
    tail = _recv_exact(sock, n, deadline) if n else b""
    return version, word, features, tail


def client_handshake(sock: Stream, token: bytes | None, features: int,
                     timeout: float | None = HANDSHAKE_TIMEOUT, session: bytes = b"") -> int:
    """Agent side: returns the features both sides support. ``FEATURE_SESSION`` is offered only
    with a ``session`` id (``SESSION_ID_SIZE`` bytes), which is then sent if the server agrees."""
    if session:
        if len(session) != SESSION_ID_SIZE:
            raise ValueError(f"a session id is {SESSION_ID_SIZE} bytes")
        features |= FEATURE_SESSION
    else:
        features &= ~FEATURE_SESSION
    deadline = _Deadline(timeout)
    try:
        if isinstance(sock, ssl.SSLSocket):
            deadline.arm(sock)
            sock.do_handshake()
        deadline.arm(sock)
        tok = token or b""
        try:
            sock.sendall(_HELLO.pack(MAGIC, VERSION, 0, features, len(tok)) + tok)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server that refuses us may answer and close before reading: read why
        version, status, agreed, msg = _read_hello(sock, deadline)
        if status == STATUS_OK and version == VERSION and agreed & FEATURE_SESSION:
            deadline.arm(sock)
            sock.sendall(session)
    except TimeoutError as e:
        raise HandshakeError("no handshake answer from the server (is it a notifyfs server?)") from e
    except ssl.SSLError as e:
        raise HandshakeError(f"TLS: {e.reason or e}") from e
    except (ConnectionResetError, BrokenPipeError) as e:
        raise HandshakeError(f"the server closed the connection ({e.strerror}); "
                             "does it want TLS (--tls-ca) or a token?") from e
    except HandshakeError as e:
        if "closed" in str(e) and not isinstance(sock, ssl.SSLSocket):
            raise HandshakeError(f"{e} (a TLS server closes plaintext clients: --tls-ca?)") from e
        raise
    finally:
        sock.settimeout(None)
    if status != STATUS_OK:
        raise HandshakeError(f"server refused: {msg.decode(errors='replace')}")
    if version != VERSION:
        raise HandshakeError(f"server speaks notifyfs protocol {version}, we speak {VERSION}")
    return agreed


def refuse(sock: Stream, msg: str) -> None:
    """Answer a connection we will not serve (too many agents) without reading its hello."""
    m = msg.encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(_HELLO.pack(MAGIC, VERSION, STATUS_REFUSED, 0, len(m)) + m)
        # read what the peer sends before closing: closing with unread data makes TCP reset the
        # connection, which can destroy our answer before the peer reads it
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_WR)
        deadline = _Deadline(1.0)  # one second in all: a refused crowd must not pile up threads
        for _ in range(16):
            deadline.arm(sock)
            if not sock.recv(4096):
                break
    except OSError:
        pass
    finally:
        sock.close()


def server_handshake(sock: Stream, token: bytes | None, features: int,
                     wait_forever: bool = False,
                     timeout: float = HANDSHAKE_TIMEOUT) -> tuple[int, bytes]:
    """Server side: check the agent's hello; returns the agreed features and the agent's session
    id (empty without ``FEATURE_SESSION``), or raises. ``timeout`` bounds the whole handshake
    (TLS included), not each read.

    ``wait_forever`` is for virtio-serial: QEMU connects the port's chardev when the VM starts,
    long before the guest's agent speaks."""
    deadline = _Deadline(None if wait_forever else timeout)
    try:
        if isinstance(sock, ssl.SSLSocket):
            deadline.arm(sock)
            sock.do_handshake()
        version, _reserved, theirs, their_token = _read_hello(sock, deadline)

        def answer(status: int, agreed: int, msg: str) -> None:
            m = msg.encode()
            deadline.arm(sock)
            sock.sendall(_HELLO.pack(MAGIC, VERSION, status, agreed, len(m)) + m)

        if version != VERSION:
            answer(STATUS_BAD_VERSION, 0, f"version {version} not supported (server speaks {VERSION})")
            raise HandshakeError(f"agent speaks protocol version {version}")
        if token is not None and not hmac.compare_digest(their_token, token):
            answer(STATUS_BAD_TOKEN, 0, "bad token")
            raise HandshakeError("agent sent a bad token")
        agreed = theirs & features
        answer(STATUS_OK, agreed, "")
        session = _recv_exact(sock, SESSION_ID_SIZE, deadline) if agreed & FEATURE_SESSION else b""
        return agreed, session
    except TimeoutError as e:
        raise HandshakeError(f"no complete handshake from the peer within {timeout:g} s") from e
    except ssl.SSLError as e:
        raise HandshakeError(f"TLS handshake failed: {e.reason or e}") from e
    finally:
        sock.settimeout(None)


class FrameReader:
    """Reads whole frames from a stream socket."""

    def __init__(self, sock: Stream, min_len: int) -> None:
        self.sock = sock
        self.min_len = min_len
        self.buf = bytearray()
        self.pending: list[bytes] = []
        # recv(1 MiB) allocates and frees a 1 MiB bytes object per call (~16 us of CPU, most of
        # a small request's cost); receiving into one reused buffer costs ~2 us
        self._chunk = bytearray(1 << 20)
        self._view = memoryview(self._chunk)
        self._recv_into = getattr(sock, "recv_into", None)

    def read(self) -> bytes | None:
        """The next frame, or None at end of stream. Raises ProtocolError on a bad length."""
        while not self.pending:
            self.pending.extend(split_frames(self.buf, self.min_len, MAX_FRAME))
            if self.pending:
                break
            try:
                if self._recv_into is not None:
                    chunk: bytes | memoryview = self._view[:self._recv_into(self._chunk)]
                else:
                    chunk = self.sock.recv(1 << 20)
            except OSError:
                return None
            if not chunk:
                if self.buf:
                    raise ProtocolError(f"connection closed inside a frame ({len(self.buf)} bytes)")
                return None
            self.buf += chunk
        return self.pending.pop(0)


class FrameWriter:
    """Writes whole frames; safe to call from many threads."""

    def __init__(self, sock: Stream) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def write(self, frame: bytes) -> None:
        with self.lock:
            self.sock.sendall(frame)


REQUEST_MIN = abi.IN_HEADER.size
REPLY_MIN = abi.OUT_HEADER.size
