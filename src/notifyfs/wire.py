"""Transport: addresses, the notifyfs handshake, and FUSE frames over a byte stream.

After the handshake both directions carry FUSE frames exactly as the kernel writes them: the agent
sends requests (``fuse_in_header.len`` frames them), the server sends replies and notifications
(``fuse_out_header.len``).

Handshake (all integers little-endian)::

    agent  -> server: "notifyfs" u16 version, u16 reserved, u64 features, u16 token_len, token
    server -> agent : "notifyfs" u16 version, u16 status,   u64 features, u16 msg_len,   msg

``features`` in the server's answer are those both sides support. A status other than 0 is
followed by the server closing the connection.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass

from . import abi
from .protocol import MAX_FRAME, ProtocolError, split_frames

MAGIC = b"notifyfs"
VERSION = 1
_HELLO = struct.Struct("<8sHHQH")

# feature bits
FEATURE_FSNOTIFY = 1 << 0  # remote events (NOTIFYFS_FSNOTIFY / NOTIFYFS_NOTIFY_*)
FEATURE_WRITEBACK = 1 << 1  # the server allows the kernel's writeback cache
FEATURE_READONLY = 1 << 2  # the export is read-only (informational: enforced by the server)
SUPPORTED_FEATURES = FEATURE_FSNOTIFY | FEATURE_WRITEBACK | FEATURE_READONLY

STATUS_OK = 0
STATUS_BAD_VERSION = 1
STATUS_BAD_TOKEN = 2
STATUS_REFUSED = 3

HANDSHAKE_TIMEOUT = 10.0


class HandshakeError(Exception):
    """The peer is not a notifyfs peer, speaks another version, or refused us."""


@dataclass(frozen=True)
class Address:
    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:{self.host}:{self.port}"

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


def parse_address(text: str) -> Address:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6)."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"bad address {text!r}: expected unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad address {text!r}: expected tcp:HOST:PORT")
        return Address("tcp", host=host.strip("[]"), port=int(port))
    raise ValueError(f"bad address {text!r}: unknown kind {kind!r} (unix, tcp)")


def listen(addr: Address, token: bytes | None) -> socket.socket:
    if addr.kind == "unix":
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


def connect(addr: Address, timeout: float = 10.0) -> socket.socket:
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


def tune(sock: socket.socket) -> None:
    """Large buffers: a 1 MiB WRITE should not need many round trips through the socket."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _read_hello(sock: socket.socket) -> tuple[int, int, int, bytes]:
    raw = _recv_exact(sock, _HELLO.size)
    magic, version, word, features, n = _HELLO.unpack(raw)
    if magic != MAGIC:
        raise HandshakeError(f"peer is not notifyfs (got {magic!r})")
    tail = _recv_exact(sock, n) if n else b""
    return version, word, features, tail


def client_handshake(sock: socket.socket, token: bytes | None, features: int) -> int:
    """Agent side: returns the features both sides support."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        tok = token or b""
        sock.sendall(_HELLO.pack(MAGIC, VERSION, 0, features, len(tok)) + tok)
        version, status, agreed, msg = _read_hello(sock)
    except TimeoutError as e:
        raise HandshakeError("no handshake answer from the server (is it a notifyfs server?)") from e
    finally:
        sock.settimeout(None)
    if status != STATUS_OK:
        raise HandshakeError(f"server refused: {msg.decode(errors='replace')}")
    if version != VERSION:
        raise HandshakeError(f"server speaks notifyfs protocol {version}, we speak {VERSION}")
    return agreed


def server_handshake(sock: socket.socket, token: bytes | None, features: int) -> int:
    """Server side: check the agent's hello; returns the agreed features or raises."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        version, _reserved, theirs, their_token = _read_hello(sock)

        def answer(status: int, agreed: int, msg: str) -> None:
            m = msg.encode()
            sock.sendall(_HELLO.pack(MAGIC, VERSION, status, agreed, len(m)) + m)

        if version != VERSION:
            answer(STATUS_BAD_VERSION, 0, f"version {version} not supported (server speaks {VERSION})")
            raise HandshakeError(f"agent speaks protocol version {version}")
        if token is not None and not hmac.compare_digest(their_token, token):
            answer(STATUS_BAD_TOKEN, 0, "bad token")
            raise HandshakeError("agent sent a bad token")
        agreed = theirs & features
        answer(STATUS_OK, agreed, "")
        return agreed
    except TimeoutError as e:
        raise HandshakeError("no handshake from the peer within the timeout") from e
    finally:
        sock.settimeout(None)


class FrameReader:
    """Reads whole frames from a stream socket."""

    def __init__(self, sock: socket.socket, min_len: int) -> None:
        self.sock = sock
        self.min_len = min_len
        self.buf = bytearray()
        self.pending: list[bytes] = []

    def read(self) -> bytes | None:
        """The next frame, or None at end of stream. Raises ProtocolError on a bad length."""
        while not self.pending:
            self.pending.extend(split_frames(self.buf, self.min_len, MAX_FRAME))
            if self.pending:
                break
            try:
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

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def write(self, frame: bytes) -> None:
        with self.lock:
            self.sock.sendall(frame)


REQUEST_MIN = abi.IN_HEADER.size
REPLY_MIN = abi.OUT_HEADER.size
