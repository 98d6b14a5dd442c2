"""A hostile agent: requests a kernel would never send, straight to the server over its socket.

Every malformed or abusive request must get an error reply (or, when the byte stream itself cannot
be parsed, the connection closed); the server must never crash or hang, never buffer without
bound, never touch anything outside the export, and keep serving other agents throughout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import snapshot
from notifyfs import abi, wire
from notifyfs.abi import Opcode
from notifyfs.protocol import MAX_FRAME, MAX_WRITE, Reply, Request, decode_reply, encode_request
from notifyfs.server.connection import Connection, Server
from notifyfs.server.passthrough import Passthrough

pytestmark = pytest.mark.timeout(30)

SECRET = b"top secret, outside the export\n"
HELLO = b"hello from inside the export\n"
NO_REPLY = (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT)


# --- a hostile client ------------------------------------------------------------------------------

def arg(layout: abi.Layout, **kw: Any) -> Any:
    """An argument tuple of ``layout``; fields not given are zero."""
    return layout.tuple(**{f: kw.get(f, 0) for f in layout.tuple._fields})


def raw_frame(opcode: int, unique: int, nodeid: int = 1, body: bytes = b"", length: int | None = None,
              extlen: int = 0, uid: int = 0, gid: int = 0) -> bytes:
    """A request frame built by hand, so that any field may lie."""
    n = abi.IN_HEADER.size + len(body) if length is None else length
    return abi.IN_HEADER.pack(n, opcode, unique, nodeid, uid, gid, 4242, extlen) + body


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0
        self.buf = bytearray()
        sock.settimeout(10)

    def next_unique(self) -> int:
        self.unique += 2
        return self.unique

    # sending
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, opcode: int, nodeid: int = 1, layout: abi.Layout | None = None,
              names: tuple[bytes, ...] = (), data: bytes = b"", forgets: tuple[tuple[int, int], ...] = (),
              h_uid: int = 0, h_gid: int = 0, **kw: Any) -> tuple[int, bytes]:
        """A request frame; ``h_uid``/``h_gid`` go in the header, ``kw`` are argument fields."""
        u = self.next_unique()
        a = arg(layout, **kw) if layout is not None else None
        req = Request(opcode=opcode, unique=u, nodeid=nodeid, uid=h_uid, gid=h_gid, pid=4242, arg=a,
                      names=names, data=data, forgets=forgets)
        return u, encode_request(req)

    def send(self, opcode: int, nodeid: int = 1, layout: abi.Layout | None = None, **kw: Any) -> int:
        u, f = self.frame(opcode, nodeid, layout, **kw)
        self.send_raw(f)
        return u

    # receiving
    def _recv_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv(self) -> Reply | None:
        """The next reply (notifications skipped), None at end of stream."""
        while True:
            head = self._recv_exact(abi.OUT_HEADER.size)
            if head is None:
                assert not self.buf, "stream ended inside a reply"
                return None
            n = abi.OUT_HEADER.unpack_from(head).len
            assert abi.OUT_HEADER.size <= n <= MAX_FRAME
            rest = self._recv_exact(n - abi.OUT_HEADER.size)
            assert rest is not None, "stream ended inside a reply"
            r = decode_reply(head + rest)
            if not r.is_notification:
                return r

    def call(self, opcode: int, nodeid: int = 1, layout: abi.Layout | None = None, **kw: Any) -> Reply:
        u = self.send(opcode, nodeid, layout, **kw)
        return self.expect(u)

    def expect(self, unique: int) -> Reply:
        r = self.recv()
        assert r is not None, f"connection closed instead of answering request {unique}"
        assert r.unique == unique, f"got a reply to {r.unique}, expected {unique}"
        return r

    def err(self, opcode: int, nodeid: int = 1, layout: abi.Layout | None = None, **kw: Any) -> int:
        return self.call(opcode, nodeid, layout, **kw).error

    def raw_err(self, opcode: int, nodeid: int = 1, body: bytes = b"", **kw: Any) -> int:
        u = self.next_unique()
        self.send_raw(raw_frame(opcode, u, nodeid, body, **kw))
        return self.expect(u).error

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (without sending anything more)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(10)
        assert data == b"", f"unexpected bytes before close: {data[:64]!r}"
        return True

    # well-formed operations
    def init(self) -> Reply:
        r = self.call(Opcode.INIT, 0, abi.INIT_IN, major=7, minor=45, max_readahead=1 << 17,
                      flags=abi.INIT_EXT | abi.ASYNC_READ | abi.BIG_WRITES | abi.DO_READDIRPLUS)
        assert r.error == 0, os.strerror(r.error)
        out = abi.INIT_OUT.unpack_from(r.payload)
        assert (out.major, out.minor) == (7, 45)
        return r

    def lookup(self, parent: int, name: bytes) -> tuple[int, Any]:
        r = self.call(Opcode.LOOKUP, parent, names=(name,))
        assert r.error == 0, f"LOOKUP {name!r}: {os.strerror(r.error)}"
        entry = abi.ENTRY_OUT.unpack_from(r.payload)
        attr = abi.ATTR.unpack_from(r.payload, abi.ENTRY_OUT.size)
        return entry.nodeid, attr

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        r = self.call(Opcode.OPEN, nodeid, abi.OPEN_IN, flags=flags)
        assert r.error == 0, os.strerror(r.error)
        return int(abi.OPEN_OUT.unpack_from(r.payload).fh)

    def opendir(self, nodeid: int) -> int:
        r = self.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN, flags=os.O_RDONLY)
        assert r.error == 0, os.strerror(r.error)
        return int(abi.OPEN_OUT.unpack_from(r.payload).fh)

    def read(self, nodeid: int, fh: int, size: int = 4096, offset: int = 0) -> Reply:
        return self.call(Opcode.READ, nodeid, abi.READ_IN, fh=fh, offset=offset, size=size)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.send(Opcode.FORGET, nodeid, abi.FORGET_IN, nlookup=nlookup)

    def getattr(self, nodeid: int) -> int:
        return self.err(Opcode.GETATTR, nodeid, abi.GETATTR_IN)

    def alive(self) -> None:
        """The connection still answers correctly."""
        nodeid, _ = self.lookup(1, b"hello")
        fh = self.open(nodeid)
        r = self.read(nodeid, fh)
        assert r.error == 0 and r.payload == HELLO
        assert self.err(Opcode.RELEASE, nodeid, abi.RELEASE_IN, fh=fh) == 0
        self.forget(nodeid, 1)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- the export, its hostile neighbourhood, and in-process servers --------------------------------



@dataclass
class Env:
    tmp: Path
    export: Path
    outside: Path
    server: Server
    threads: list[threading.Thread] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    def connect(self, do_init: bool = True, session: bytes = b"") -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t = threading.Thread(target=self.server.serve_socket, args=(theirs, "hostile"), daemon=True)
        t.start()
        self.threads.append(t)
        wire.client_handshake(ours, None, 0, session=session)
        c = Client(ours)
        self.clients.append(c)
        if do_init:
            c.init()
        return c

    def raw_connect(self) -> tuple[socket.socket, threading.Thread]:
        """A socket to a fresh server thread, before any handshake."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t = threading.Thread(target=self.server.serve_socket, args=(theirs, "raw"), daemon=True)
        t.start()
        self.threads.append(t)
        ours.settimeout(10)
        return ours, t

    def connection(self) -> Connection:
        """The only live connection (for looking at its internals)."""
        assert wait(lambda: len(self.server.connections) >= 1)
        conns = list(self.server.connections)
        return conns[0]


def wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def plant(tmp: Path) -> tuple[Path, Path]:
    export, outside = tmp / "export", tmp / "outside"
    export.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    os.chmod(outside / "secret", 0o640)
    os.setxattr(outside / "secret", "user.tag", b"outside")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner").write_bytes(b"inner\n")
    os.utime(outside / "secret", ns=(10**18, 10**18))
    (export / "hello").write_bytes(HELLO)
    (export / "dir").mkdir()
    (export / "dir" / "file").write_bytes(b"file\n")
    os.symlink(outside / "secret", export / "abs_link")
    os.symlink(outside / "dir", export / "abs_dir")
    os.symlink("../outside/secret", export / "rel_link")
    os.symlink("../outside/dir", export / "rel_dir")
    os.symlink("/", export / "root_link")
    os.symlink("../outside/not-yet", export / "dangling")
    return export, outside


@pytest.fixture
def env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Env]:
    export, outside = plant(tmp_path)
    server = Server(lambda: Passthrough(str(export)))
    e = Env(tmp_path, export, outside, server)
    before = snapshot(tmp_path, skip=("export",))
    root_before = set(os.listdir("/"))
    try:
        yield e
    finally:
        for c in e.clients:
            c.close()
        for t in e.threads:
            t.join(timeout=15)
        assert not [t for t in e.threads if t.is_alive()], "a server connection did not end"
    assert snapshot(tmp_path, skip=("export",)) == before, "something outside the export changed"
    assert set(os.listdir("/")) == root_before
    crashes = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not crashes, f"unexpected exceptions in the server: {crashes}"


# --- handshake ------------------------------------------------------------------------------------

HELLO_FMT = struct.Struct("<8sHHQH")


def test_handshake_wrong_magic(env: Env) -> None:
    sock, t = env.raw_connect()
    sock.sendall(HELLO_FMT.pack(b"NOTnotfs", wire.VERSION, 0, 0, 0))
    assert sock.recv(100) == b""  # closed without an answer
    t.join(5)
    assert not t.is_alive()
    sock.close()
    env.connect().alive()


def test_handshake_wrong_version(env: Env) -> None:
    sock, t = env.raw_connect()
    sock.sendall(HELLO_FMT.pack(wire.MAGIC, 99, 0, 0, 0))
    _version, status, _features, _msg = wire._read_hello(sock)  # the refusal arrives...
    assert status == wire.STATUS_BAD_VERSION
    assert sock.recv(100) == b""  # ...and then the close
    t.join(5)
    assert not t.is_alive()
    sock.close()


def test_handshake_bad_token(env: Env) -> None:
    env.server.token = b"s3cret-token"
    for token in (None, b"", b"wrong", b"s3cret-token-and-more", b"s3cret-toke"):
        sock, t = env.raw_connect()
        with pytest.raises(wire.HandshakeError, match="bad token"):
            wire.client_handshake(sock, token, 0)
        assert sock.recv(100) == b""
        t.join(5)
        assert not t.is_alive()
        sock.close()
    sock, _ = env.raw_connect()
    wire.client_handshake(sock, b"s3cret-token", 0)
    c = Client(sock)
    env.clients.append(c)
    c.init()
    c.alive()


def test_handshake_truncated_silent_and_garbage(env: Env) -> None:
    env.server.handshake_timeout = 0.5
    attempts = [
        b"",  # says nothing at all
        b"notif",  # half a magic
        HELLO_FMT.pack(wire.MAGIC, wire.VERSION, 0, 0, 100) + b"x" * 10,  # token shorter than said
        os.urandom(4096),
        b"\0" * 64,
    ]
    for data in attempts:
        sock, t = env.raw_connect()
        if data:
            try:
                sock.sendall(data)
            except OSError:
                pass
        t.join(5)
        assert not t.is_alive(), f"handshake with {data[:16]!r} hangs"
        sock.close()
    env.connect().alive()


def test_handshake_time_limit_is_total(env: Env) -> None:
    """A peer that trickles its hello a byte at a time (each within any per-read timeout) is cut
    off when the whole handshake's time is up, not kept for ever."""
    env.server.handshake_timeout = 1.0
    sock, t = env.raw_connect()
    hello = HELLO_FMT.pack(wire.MAGIC, wire.VERSION, 0, 0, 200) + b"t" * 200
    start = time.monotonic()
    sent = 0
    try:
        while sent < len(hello) and time.monotonic() - start < 6:
            sock.sendall(hello[sent:sent + 1])
            sent += 1
            time.sleep(0.2)
    except OSError:
        pass  # the server closed the connection: what we want
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - start < 4, "the handshake limit is per read, not total"
    assert sent < len(hello)
    sock.close()
    env.connect().alive()


def test_too_many_connections_refused(env: Env) -> None:
    """Past --max-connections a new agent is refused with a clear message (handshaking peers count
    too); the connected agents are still served and a slot frees when one leaves."""
    env.server.max_connections = 3
    a, b = env.connect(), env.connect()
    idle, t = env.raw_connect()  # connected, never says hello: holds a slot while it handshakes
    assert wait(lambda: env.server.active == 3)
    with pytest.raises(wire.HandshakeError, match="too many connections"):
        env.connect()
    assert env.server.refused == 1
    a.alive()
    b.alive()
    idle.close()
    t.join(15)
    assert wait(lambda: env.server.active == 2)
    env.connect().alive()


def test_listen_non_loopback_without_token_refused(tmp_path: Path) -> None:
    for text in ("tcp:0.0.0.0:7000", "tcp:[::]:7000", "tcp:192.0.2.7:7000", "tcp:example.com:7000",
                 "tcp:127.0.0.1.nip.io:7000"):
        addr = wire.parse_address(text)
        assert not addr.is_loopback
        with pytest.raises(ValueError, match="token"):
            wire.listen(addr, None)
        with pytest.raises(ValueError, match="token"):
            wire.listen(addr, b"")
    # loopback without a token, or anywhere with one, is allowed (port 0: any free port)
    for host, token in (("127.0.0.1", None), ("0.0.0.0", b"t0ken")):
        s = wire.listen(wire.Address("tcp", host=host, port=0), token)
        s.close()
    s = wire.listen(wire.parse_address(f"unix:{tmp_path / 'sock'}"), None)
    assert stat.S_IMODE(os.stat(tmp_path / "sock").st_mode) == 0o600
    s.close()


# --- INIT, unknown opcodes, DESTROY -----------------------------------------------------------------

def test_bad_init_then_good(env: Env) -> None:
    c = env.connect(do_init=False)
    assert c.err(Opcode.INIT, 0, abi.INIT_IN, major=6, minor=45) == errno.EPROTO
    assert c.err(Opcode.INIT, 0, abi.INIT_IN, major=8, minor=0) == errno.EPROTO
    assert c.err(Opcode.INIT, 0, abi.INIT_IN, major=7, minor=20) == errno.EPROTO
    assert c.raw_err(Opcode.INIT, 0, b"\x07\0\0\0") == errno.EINVAL  # truncated
    c.init()
    c.init()  # a second INIT is answered too
    c.alive()


def test_requests_before_init(env: Env) -> None:
    """A kernel sends nothing before INIT is answered: a client that does gets EIO for each
    request (no reply for FORGET/INTERRUPT), a failed INIT does not open the session either, and
    nothing is touched; a good INIT afterwards works."""
    c = env.connect(do_init=False)
    assert c.getattr(1) == errno.EIO
    assert c.err(Opcode.LOOKUP, 1, names=(b"hello",)) == errno.EIO
    assert c.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(b"early",), mode=0o755) == errno.EIO
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"early",), flags=os.O_RDWR,
                 mode=0o100644) == errno.EIO
    c.forget(1, 1)
    c.send(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN, unique=12345)
    assert c.err(Opcode.INIT, 0, abi.INIT_IN, major=7, minor=20) == errno.EPROTO
    assert c.getattr(1) == errno.EIO
    c.init()
    assert c.getattr(1) == 0
    assert not (env.export / "early").exists()
    c.alive()


@pytest.mark.parametrize("opcode", [0, 7, 19, 53, 999, 4096, 4099, 4102, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_opcode_gets_enosys(env: Env, opcode: int) -> None:
    c = env.connect()
    assert c.raw_err(opcode, 1) == errno.ENOSYS
    assert c.raw_err(opcode, 1, b"\xff" * 300) == errno.ENOSYS
    c.alive()


def test_unimplemented_opcodes_get_enosys(env: Env) -> None:
    c = env.connect()
    nodeid, _ = c.lookup(1, b"hello")
    fh = c.open(nodeid)
    cases: list[tuple[int, abi.Layout | None, dict[str, Any]]] = [
        (Opcode.BMAP, abi.BMAP_IN, {}),
        (Opcode.POLL, abi.POLL_IN, {"fh": fh}),
        (Opcode.GETLK, abi.LK_IN, {"fh": fh}),
        (Opcode.STATX, abi.STATX_IN, {}),
        (Opcode.SYNCFS, abi.SYNCFS_IN, {}),
        (Opcode.NOTIFYFS_FSNOTIFY, abi.NOTIFY_FSNOTIFY_IN, {}),
    ]
    for opcode, layout, kw in cases:
        assert c.err(opcode, nodeid, layout, **kw) == errno.ENOSYS, abi.OPCODE_NAMES[opcode]
    assert c.err(Opcode.IOCTL, nodeid, abi.IOCTL_IN, fh=fh, cmd=0x5401) == errno.ENOSYS
    assert c.err(Opcode.TMPFILE, 1, abi.CREATE_IN, names=(b"t",), mode=0o100600) == errno.ENOSYS
    assert c.err(Opcode.SETUPMAPPING, nodeid, data=b"\0" * 40) == errno.ENOSYS
    c.alive()


def test_requests_after_destroy(env: Env) -> None:
    c = env.connect()
    nodeid, _ = c.lookup(1, b"hello")
    r = c.call(Opcode.DESTROY, 0)
    assert r.error == 0
    assert c.getattr(1) == errno.ESHUTDOWN
    assert c.err(Opcode.LOOKUP, 1, names=(b"hello",)) == errno.ESHUTDOWN
    assert c.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(b"late",), mode=0o755) == errno.ESHUTDOWN
    assert c.err(Opcode.INIT, 0, abi.INIT_IN, major=7, minor=45) == errno.ESHUTDOWN
    assert c.err(Opcode.DESTROY, 0) == errno.ESHUTDOWN
    c.forget(nodeid, 1)  # no reply, no crash
    assert c.getattr(nodeid) == errno.ESHUTDOWN
    assert not (env.export / "late").exists()


# --- nodeids ----------------------------------------------------------------------------------------

BOGUS_NODEIDS = [0, 2, 3, 12345, 1 << 40, (0xFF << 56) | 2, 1 << 63, (1 << 64) - 1]


def test_nodeids_never_handed_out(env: Env) -> None:
    c = env.connect()
    real, _ = c.lookup(1, b"hello")
    for bogus in BOGUS_NODEIDS + [real + 1, real ^ (1 << 56)]:
        if bogus == real:
            continue
        assert c.getattr(bogus) == errno.ESTALE, bogus
        assert c.err(Opcode.LOOKUP, bogus, names=(b"hello",)) == errno.ESTALE
        assert c.err(Opcode.MKDIR, bogus, abi.MKDIR_IN, names=(b"x",), mode=0o755) == errno.ESTALE
        assert c.err(Opcode.CREATE, bogus, abi.CREATE_IN, names=(b"x",), flags=os.O_RDWR,
                     mode=0o100644) == errno.ESTALE
        assert c.err(Opcode.OPEN, bogus, abi.OPEN_IN) == errno.ESTALE
        assert c.err(Opcode.OPENDIR, bogus, abi.OPEN_IN) == errno.ESTALE
        assert c.err(Opcode.READLINK, bogus) == errno.ESTALE
        assert c.err(Opcode.SETATTR, bogus, abi.SETATTR_IN, valid=abi.FATTR_MODE, mode=0o777) == errno.ESTALE
        assert c.err(Opcode.LINK, 1, abi.LINK_IN, names=(b"x",), oldnodeid=bogus) == errno.ESTALE
        assert c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(b"hello", b"x"), newdir=bogus) == errno.ESTALE
        assert c.err(Opcode.SETXATTR, bogus, abi.SETXATTR_IN, names=(b"user.x",), data=b"v",
                     size=1) == errno.ESTALE
        assert c.err(Opcode.STATFS, bogus) == errno.ESTALE
        assert c.err(Opcode.UNLINK, bogus, names=(b"hello",)) == errno.ESTALE
        c.forget(bogus, 5)  # FORGET of what was never looked up: ignored, no reply
    assert c.getattr(real) == 0
    assert not any((env.export / "x").exists() for _ in [0])
    c.alive()


def test_forgotten_nodeids_are_stale(env: Env) -> None:
    c = env.connect()
    nodeid, _ = c.lookup(1, b"hello")
    dnode, _ = c.lookup(1, b"dir")
    c.forget(nodeid, 1)
    assert c.getattr(nodeid) == errno.ESTALE
    assert c.err(Opcode.OPEN, nodeid, abi.OPEN_IN) == errno.ESTALE
    # FORGET more than looked up: clamped, and neither a crash nor a negative count
    for _ in range(3):
        c.lookup(1, b"dir")
    c.forget(dnode, 1000)
    c.forget(dnode, 1)
    c.forget(dnode, (1 << 64) - 1)
    assert c.getattr(dnode) == errno.ESTALE
    assert c.err(Opcode.MKDIR, dnode, abi.MKDIR_IN, names=(b"sub",), mode=0o755) == errno.ESTALE
    # BATCH_FORGET of junk, of the root, and twice of the same nodeid
    again, _ = c.lookup(1, b"dir")
    c.send(Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN, count=4,
           forgets=((1, 1 << 60), (12345, 1), (again, 1), (again, 1)))
    assert c.getattr(again) == errno.ESTALE
    # the root is never forgotten
    c.forget(1, (1 << 64) - 1)
    assert c.getattr(1) == 0
    # a name looked up again after all that gets a working nodeid
    fresh, _ = c.lookup(1, b"dir")
    assert c.getattr(fresh) == 0
    fh = c.opendir(fresh)
    r = c.call(Opcode.READDIR, fresh, abi.READ_IN, fh=fh, size=4096)
    assert r.error == 0 and b"file" in r.payload
    assert not (env.export / "dir" / "sub").exists()
    c.alive()


# --- names ------------------------------------------------------------------------------------------

BAD_NAMES: list[tuple[bytes, int]] = [
    (b"a/b", errno.EINVAL),
    (b"/", errno.EINVAL),
    (b"../outside", errno.EINVAL),
    (b"../outside/secret", errno.EINVAL),
    (b"..", errno.EINVAL),
    (b".", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"/etc/passwd", errno.EINVAL),
    (b"x" * 256, errno.ENAMETOOLONG),
    (b"\xff" * 300, errno.ENAMETOOLONG),
]


def name_ops(c: Client, name: bytes, dnode: int) -> dict[str, int]:
    """Every request that takes a name, with ``name`` in each name position."""
    create = dict(layout=abi.CREATE_IN, flags=os.O_RDWR, mode=0o100644)
    return {
        "lookup": c.err(Opcode.LOOKUP, 1, names=(name,)),
        "mkdir": c.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(name,), mode=0o755),
        "create": c.err(Opcode.CREATE, 1, names=(name,), **create),
        "create-in-dir": c.err(Opcode.CREATE, dnode, names=(name,), **create),
        "mknod": c.err(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(name,), mode=stat.S_IFIFO | 0o644),
        "unlink": c.err(Opcode.UNLINK, 1, names=(name,)),
        "rmdir": c.err(Opcode.RMDIR, 1, names=(name,)),
        "symlink": c.err(Opcode.SYMLINK, 1, names=(name, b"hello")),
        "rename-from": c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(name, b"new"), newdir=1),
        "rename-to": c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(b"hello", name), newdir=1),
        "rename-to-dir": c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(b"hello", name), newdir=dnode),
        "rename2-to": c.err(Opcode.RENAME2, 1, abi.RENAME2_IN, names=(b"hello", name), newdir=1),
        "exchange": c.err(Opcode.RENAME2, 1, abi.RENAME2_IN, names=(b"dir", name), newdir=1,
                          flags=2),
        "link": c.err(Opcode.LINK, 1, abi.LINK_IN, names=(name,), oldnodeid=dnode),
    }


@pytest.mark.parametrize("name,want", BAD_NAMES, ids=[repr(n[:12]) for n, _ in BAD_NAMES])
def test_bad_names(env: Env, name: bytes, want: int) -> None:
    c = env.connect()
    dnode, _ = c.lookup(1, b"dir")
    before = snapshot(env.export)
    for op, got in name_ops(c, name, dnode).items():
        if op == "link" and want == errno.EINVAL:
            pass  # linking a directory is refused; the name is still checked first or EPERM
        if op == "link":
            assert got in (want, errno.EPERM), f"{op} {name!r}: {errno.errorcode.get(got)}"
        else:
            assert got == want, f"{op} {name!r}: {errno.errorcode.get(got)}"
    assert snapshot(env.export) == before
    c.alive()


def test_names_without_nul_or_with_stray_bytes(env: Env) -> None:
    c = env.connect()
    before = snapshot(env.export)
    mk = abi.MKDIR_IN.pack(mode=0o755)
    cr = abi.CREATE_IN.pack(flags=os.O_RDWR, mode=0o100644)
    rn = abi.RENAME_IN.pack(newdir=1)
    cases = [
        (Opcode.LOOKUP, b"hello"),
        (Opcode.LOOKUP, b"hello\0junk"),
        (Opcode.LOOKUP, b"hello\0\0"),
        (Opcode.LOOKUP, b""),
        (Opcode.MKDIR, mk + b"newdir"),
        (Opcode.MKDIR, mk + b"new\0dir\0"),
        (Opcode.MKDIR, mk[:4]),
        (Opcode.CREATE, cr + b"newfile"),
        (Opcode.CREATE, cr),
        (Opcode.UNLINK, b"hello"),
        (Opcode.SYMLINK, b"newlink\0../outside/secret"),
        (Opcode.SYMLINK, b"newlink"),
        (Opcode.RENAME, rn + b"hello\0renamed"),
        (Opcode.RENAME, rn + b"hello"),
        (Opcode.RENAME, rn + b"hello\0renamed\0extra\0"),
        (Opcode.LINK, abi.LINK_IN.pack(oldnodeid=1) + b"x"),
        (Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=100) + b"user.tag"),
        (Opcode.REMOVEXATTR, b"user.tag"),
        (Opcode.SETXATTR, abi.SETXATTR_IN_COMPAT.pack(size=1, flags=0) + b"user.tag"),
        (Opcode.LOOKUP, b"x" * 300 + b"\0"),
    ]
    for opcode, body in cases:
        got = c.raw_err(opcode, 1, body)
        assert got in (errno.EINVAL, errno.ENAMETOOLONG), (abi.OPCODE_NAMES[opcode], body, got)
    # a symlink target may be long (PATH_MAX) but not longer
    assert c.err(Opcode.SYMLINK, 1, names=(b"longlink", b"a/" * 2049)) == errno.ENAMETOOLONG
    assert c.err(Opcode.SYMLINK, 1, names=(b"longlink", b"a" * 4096)) == errno.ENAMETOOLONG
    assert snapshot(env.export) == before
    assert c.err(Opcode.SYMLINK, 1, names=(b"longlink", b"../" * 1365)) == 0
    assert os.readlink(env.export / "longlink") == "../" * 1365
    c.alive()


# --- symlinks, directories and files used as what they are not -------------------------------------

def test_symlink_nodeid_as_directory(env: Env) -> None:
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    before = snapshot(env.export)
    for link in (b"abs_dir", b"rel_dir", b"root_link", b"abs_link", b"dangling", b"hello"):
        node, attr = c.lookup(1, link)
        assert stat.S_ISLNK(attr.mode) or link == b"hello"
        want = errno.ENOTDIR
        assert c.err(Opcode.LOOKUP, node, names=(b"inner",)) == want
        assert c.err(Opcode.LOOKUP, node, names=(b"etc",)) == want
        assert c.err(Opcode.MKDIR, node, abi.MKDIR_IN, names=(b"new",), mode=0o755) == want
        assert c.err(Opcode.CREATE, node, abi.CREATE_IN, names=(b"new",), flags=os.O_RDWR | os.O_CREAT,
                     mode=0o100644) == want
        assert c.err(Opcode.MKNOD, node, abi.MKNOD_IN, names=(b"new",), mode=stat.S_IFREG | 0o644) == want
        assert c.err(Opcode.SYMLINK, node, names=(b"new", b"x")) == want
        assert c.err(Opcode.UNLINK, node, names=(b"inner",)) == want
        assert c.err(Opcode.RMDIR, node, names=(b"inner",)) == want
        assert c.err(Opcode.RENAME, node, abi.RENAME_IN, names=(b"inner", b"x"), newdir=1) == want
        assert c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(b"hello", b"x"), newdir=node) == want
        assert c.err(Opcode.RENAME2, 1, abi.RENAME2_IN, names=(b"dir", b"inner"), newdir=node,
                     flags=2) == want
        assert c.err(Opcode.LINK, node, abi.LINK_IN, names=(b"new",), oldnodeid=fnode) == want
        assert c.err(Opcode.OPENDIR, node, abi.OPEN_IN) == want
        c.forget(node, 1)
    assert snapshot(env.export) == before
    c.alive()


def test_operations_on_symlink_nodeids_stay_on_the_link(env: Env) -> None:
    c = env.connect()
    for link in (b"abs_link", b"rel_link", b"abs_dir", b"rel_dir", b"root_link", b"dangling"):
        node, _ = c.lookup(1, link)
        target = os.readlink(env.export / link.decode())
        r = c.call(Opcode.READLINK, node)
        assert r.error == 0 and r.payload == os.fsencode(target)
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND):
            assert c.err(Opcode.OPEN, node, abi.OPEN_IN, flags=flags) == errno.ELOOP
        assert c.err(Opcode.SETATTR, node, abi.SETATTR_IN, valid=abi.FATTR_MODE,
                     mode=0o100777) == errno.EOPNOTSUPP
        assert c.err(Opcode.SETATTR, node, abi.SETATTR_IN, valid=abi.FATTR_SIZE, size=0) == errno.EINVAL
        assert c.err(Opcode.SETXATTR, node, abi.SETXATTR_IN, names=(b"user.evil",), data=b"1",
                     size=1) == errno.EPERM
        assert c.err(Opcode.REMOVEXATTR, node, names=(b"user.tag",)) == errno.ENODATA
        assert c.err(Opcode.GETXATTR, node, abi.GETXATTR_IN, names=(b"user.tag",),
                     size=100) == errno.ENODATA
        r = c.call(Opcode.LISTXATTR, node, abi.GETXATTR_IN, size=100)
        assert r.error == 0 and r.payload == b""
        # chown and utimes act on the link itself
        assert c.err(Opcode.SETATTR, node, abi.SETATTR_IN, valid=abi.FATTR_UID | abi.FATTR_GID,
                     uid=4321, gid=4321) == 0
        assert c.err(Opcode.SETATTR, node, abi.SETATTR_IN, valid=abi.FATTR_ATIME | abi.FATTR_MTIME,
                     atime=1, mtime=2) == 0
        lst = os.lstat(env.export / link.decode())
        assert (lst.st_uid, lst.st_gid, lst.st_mtime_ns) == (4321, 4321, 2 * 10**9)
        assert c.err(Opcode.ACCESS, node, abi.ACCESS_IN, mask=os.W_OK) == 0
        assert c.err(Opcode.STATFS, node) == 0
        # a hard link to the symlink is a symlink inside the export
        newname = link + b".hard"
        r = c.call(Opcode.LINK, 1, abi.LINK_IN, names=(newname,), oldnodeid=node)
        if r.error == 0:
            assert os.path.islink(env.export / newname.decode())
        else:
            assert r.error == errno.EPERM
    c.alive()


def test_open_what_is_not_a_regular_file(env: Env) -> None:
    c = env.connect()
    dnode, _ = c.lookup(1, b"dir")
    assert c.err(Opcode.OPEN, dnode, abi.OPEN_IN) == errno.EISDIR
    assert c.err(Opcode.OPEN, dnode, abi.OPEN_IN, flags=os.O_RDWR) == errno.EISDIR
    assert c.err(Opcode.OPEN, 1, abi.OPEN_IN) == errno.EISDIR
    assert c.err(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(b"fifo",), mode=stat.S_IFIFO | 0o666) == 0
    fifo, _ = c.lookup(1, b"fifo")
    assert c.err(Opcode.OPEN, fifo, abi.OPEN_IN) == errno.EINVAL
    fnode, _ = c.lookup(1, b"hello")
    assert c.err(Opcode.OPENDIR, fnode, abi.OPEN_IN) == errno.ENOTDIR
    assert c.err(Opcode.READLINK, fnode) == errno.EINVAL
    # O_CREAT / O_EXCL / O_PATH / O_DIRECTORY smuggled into OPEN
    for flags in (os.O_CREAT | os.O_EXCL, os.O_PATH, os.O_DIRECTORY, os.O_NOFOLLOW, os.O_TMPFILE):
        r = c.call(Opcode.OPEN, fnode, abi.OPEN_IN, flags=flags)
        if r.error == 0:
            fh = abi.OPEN_OUT.unpack_from(r.payload).fh
            assert c.read(fnode, fh).payload == HELLO
            assert c.err(Opcode.RELEASE, fnode, abi.RELEASE_IN, fh=fh) == 0
    c.alive()


def test_create_over_existing_special_files(env: Env) -> None:
    """CREATE without O_EXCL of a name that exists must not open a FIFO (hangs a worker) or a device
    (a hostile agent could mknod a block device and write the host's disk), nor chown what exists."""
    c = env.connect()
    assert c.err(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(b"fifo",), mode=stat.S_IFIFO | 0o666) == 0
    zero = os.stat("/dev/zero").st_rdev
    rdev = (os.minor(zero) & 0xFF) | (os.major(zero) << 8)
    r = c.call(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(b"zero",), mode=stat.S_IFCHR | 0o666, rdev=rdev)
    have_dev = r.error == 0
    if have_dev:
        assert os.stat(env.export / "zero").st_rdev == zero
    names = [b"fifo", b"zero"] if have_dev else [b"fifo"]
    for name in names:
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC):
            r = c.call(Opcode.CREATE, 1, abi.CREATE_IN, names=(name,), flags=flags | os.O_CREAT,
                       mode=0o100644)
            assert r.error != 0, f"CREATE opened the existing {name!r} (flags {flags:#o})"
    # an existing directory or symlink
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"dir",), flags=os.O_RDWR | os.O_CREAT,
                 mode=0o100644) == errno.EISDIR
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"abs_link",), flags=os.O_RDWR | os.O_CREAT,
                 mode=0o100644) == errno.ELOOP
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"dangling",), flags=os.O_RDWR | os.O_CREAT,
                 mode=0o100644) == errno.ELOOP
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"hello",),
                 flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o100644) == errno.EEXIST
    # an existing regular file keeps its owner and mode
    owned = env.export / "owned"
    owned.write_bytes(b"owned\n")
    os.chown(owned, 4242, 4243)
    os.chmod(owned, 0o664)
    r = c.call(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"owned",), flags=os.O_RDWR | os.O_CREAT,
               mode=0o104777, h_uid=1000, h_gid=1000)
    assert r.error == 0
    st = os.stat(owned)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4243, 0o664)
    entry = abi.ENTRY_OUT.unpack_from(r.payload)
    fh = abi.OPEN_OUT.unpack_from(r.payload, abi.ENTRY_OUT_SIZE).fh
    assert c.read(entry.nodeid, fh).payload == b"owned\n"
    # a new file does belong to the caller
    r = c.call(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"mine",), flags=os.O_RDWR | os.O_CREAT,
               mode=0o100640, h_uid=1000, h_gid=1001)
    assert r.error == 0
    st = os.stat(env.export / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o640)
    c.alive()


# --- file handles -----------------------------------------------------------------------------------

def test_bad_file_handles(env: Env) -> None:
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    dnode, _ = c.lookup(1, b"dir")
    other, _ = c.lookup(dnode, b"file")
    fh = c.open(fnode, os.O_RDWR)
    dfh = c.opendir(dnode)
    for bogus in (0, fh + 1000, 1 << 63, (1 << 64) - 1):
        assert c.read(fnode, bogus).error == errno.EBADF
        assert c.err(Opcode.WRITE, fnode, abi.WRITE_IN, fh=bogus, size=3, data=b"bad") == errno.EBADF
        assert c.err(Opcode.FLUSH, fnode, abi.FLUSH_IN, fh=bogus) == errno.EBADF
        assert c.err(Opcode.FSYNC, fnode, abi.FSYNC_IN, fh=bogus) == errno.EBADF
        assert c.err(Opcode.RELEASE, fnode, abi.RELEASE_IN, fh=bogus) == errno.EBADF
        assert c.err(Opcode.RELEASEDIR, dnode, abi.RELEASE_IN, fh=bogus) == errno.EBADF
        assert c.err(Opcode.READDIR, dnode, abi.READ_IN, fh=bogus, size=4096) == errno.EBADF
        assert c.err(Opcode.READDIRPLUS, dnode, abi.READ_IN, fh=bogus, size=4096) == errno.EBADF
        assert c.err(Opcode.LSEEK, fnode, abi.LSEEK_IN, fh=bogus, whence=os.SEEK_DATA) == errno.EBADF
        assert c.err(Opcode.FALLOCATE, fnode, abi.FALLOCATE_IN, fh=bogus, length=10) == errno.EBADF
        assert c.err(Opcode.GETATTR, fnode, abi.GETATTR_IN, getattr_flags=abi.GETATTR_FH,
                     fh=bogus) == errno.EBADF
        assert c.err(Opcode.SETATTR, fnode, abi.SETATTR_IN, valid=abi.FATTR_FH | abi.FATTR_SIZE,
                     fh=bogus) == errno.EBADF
        assert c.err(Opcode.SETLK, fnode, abi.LK_IN, fh=bogus, lk_flags=abi.LK_FLOCK) == errno.EBADF
        assert c.err(Opcode.COPY_FILE_RANGE, fnode, abi.COPY_FILE_RANGE_IN, fh_in=bogus,
                     nodeid_out=fnode, fh_out=fh, len=10) == errno.EBADF
    # a handle used with another nodeid
    assert c.read(other, fh).error == errno.EBADF
    assert c.err(Opcode.WRITE, other, abi.WRITE_IN, fh=fh, size=3, data=b"bad") == errno.EBADF
    assert c.err(Opcode.COPY_FILE_RANGE, fnode, abi.COPY_FILE_RANGE_IN, fh_in=fh,
                 nodeid_out=other, fh_out=fh, len=10) == errno.EBADF
    # a directory handle used as a file handle and the reverse
    assert c.read(dnode, dfh).error == errno.EISDIR
    assert c.err(Opcode.WRITE, dnode, abi.WRITE_IN, fh=dfh, size=3, data=b"bad") in (errno.EBADF,
                                                                                    errno.EISDIR)
    assert c.err(Opcode.READDIR, fnode, abi.READ_IN, fh=fh, size=4096) == errno.EBADF
    # READ larger than max_write, at absurd offsets
    assert c.read(fnode, fh, size=MAX_WRITE + 1).error == errno.EINVAL
    assert c.read(fnode, fh, size=0xFFFFFFFF).error == errno.EINVAL
    assert c.read(fnode, fh, size=MAX_WRITE).payload == HELLO
    for off in (1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        r = c.read(fnode, fh, offset=off)
        assert r.error in (0, errno.EINVAL), errno.errorcode.get(r.error)
        assert r.payload == b""
    for off in (1 << 63, (1 << 64) - 1):  # negative as off_t (smaller ones would make sparse giants)
        r = c.call(Opcode.WRITE, fnode, abi.WRITE_IN, fh=fh, offset=off, size=1, data=b"x")
        assert r.error in (errno.EINVAL, errno.EFBIG), errno.errorcode.get(r.error)
        r = c.call(Opcode.SETATTR, fnode, abi.SETATTR_IN, valid=abi.FATTR_SIZE, size=off)
        assert r.error in (errno.EINVAL, errno.EFBIG), errno.errorcode.get(r.error)
    assert c.err(Opcode.LSEEK, fnode, abi.LSEEK_IN, fh=fh, whence=99) == errno.EINVAL
    assert (env.export / "hello").read_bytes() == HELLO
    # released handles are gone, and a second RELEASE is an error, not a double close
    assert c.err(Opcode.RELEASE, fnode, abi.RELEASE_IN, fh=fh) == 0
    assert c.err(Opcode.RELEASE, fnode, abi.RELEASE_IN, fh=fh) == errno.EBADF
    assert c.read(fnode, fh).error == errno.EBADF
    assert c.err(Opcode.RELEASEDIR, dnode, abi.RELEASE_IN, fh=dfh) == 0
    assert c.err(Opcode.READDIR, dnode, abi.READ_IN, fh=dfh, size=4096) == errno.EBADF
    c.alive()


def test_blocked_flock_is_interruptible(env: Env) -> None:
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    fh1, fh2 = c.open(fnode), c.open(fnode)
    assert c.err(Opcode.SETLK, fnode, abi.LK_IN, fh=fh1, lk_flags=abi.LK_FLOCK,
                 type=1) == 0  # F_WRLCK
    u = c.send(Opcode.SETLKW, fnode, abi.LK_IN, fh=fh2, lk_flags=abi.LK_FLOCK, type=1)
    assert c.getattr(fnode) == 0  # other requests are still answered meanwhile
    time.sleep(0.1)
    c.send_raw(raw_frame(Opcode.INTERRUPT, c.next_unique(), 0, abi.INTERRUPT_IN.pack(unique=u)))
    assert c.expect(u).error == errno.EINTR
    c.alive()


def test_disconnect_with_requests_waiting_on_a_lock(env: Env) -> None:
    """An agent that leaves with SETLKW requests waiting: the connection ends at once (it used to
    wait 10 s per stuck worker, polling flock on fds being closed) and its locks are dropped."""
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    fh1, fh2 = c.open(fnode), c.open(fnode)
    assert c.err(Opcode.SETLK, fnode, abi.LK_IN, fh=fh1, lk_flags=abi.LK_FLOCK, type=1) == 0
    for _ in range(12):  # more than there are workers
        c.send(Opcode.SETLKW, fnode, abi.LK_IN, fh=fh2, lk_flags=abi.LK_FLOCK, type=1)
    time.sleep(0.2)
    t0 = time.monotonic()
    c.close()
    env.threads[-1].join(8)
    assert not env.threads[-1].is_alive(), "the connection did not end"
    assert time.monotonic() - t0 < 5
    other = env.connect()
    node, _ = other.lookup(1, b"hello")
    fh = other.open(node)
    assert other.err(Opcode.SETLK, node, abi.LK_IN, fh=fh, lk_flags=abi.LK_FLOCK, type=1) == 0
    other.alive()


# --- sessions: a revive fences the older connection of the same agent ----------------------------

def _revive(c: Client) -> Reply:
    from notifyfs import revive
    u = c.next_unique()
    c.send_raw(revive.encode_revive(u, revive.Revive()))
    return c.expect(u)


def test_session_handshake_compatibility(env: Env) -> None:
    """A new agent and an old server (no ``session`` bit): the id is not sent and the stream
    stays in step; an old agent (no id) with a new server: nothing more is read; a hello that
    offers the bit and never sends the id is cut off at the handshake's time limit."""
    env.server.features &= ~wire.FEATURE_SESSION
    old_server = env.connect(session=os.urandom(wire.SESSION_ID_SIZE))
    old_server.alive()
    env.server.features |= wire.FEATURE_SESSION
    env.connect().alive()
    with pytest.raises(ValueError):
        wire.client_handshake(socket.socket(), None, 0, session=b"short")
    env.server.handshake_timeout = 0.5
    sock, t = env.raw_connect()
    sock.sendall(HELLO_FMT.pack(wire.MAGIC, wire.VERSION, 0, wire.FEATURE_SESSION, 0))
    _v, status, agreed, _m = wire._read_hello(sock)
    assert status == wire.STATUS_OK and agreed & wire.FEATURE_SESSION
    sock.sendall(b"12345")  # 5 of the 16 bytes, then nothing
    t.join(5)
    assert not t.is_alive(), "a handshake waiting for a session id is not bounded"
    sock.close()


def test_revive_fences_the_older_connection_of_its_session(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Fault: an agent's connection is half-open (the server never saw it end) while the agent
    revives on a new one. Expected: when the REVIVE of the same session id arrives, the old
    connection is closed before the REVIVE is answered; its flock is released, its SETLKW that
    was waiting ends, and requests it had queued never run; a REVIVE of another session and
    connections without an id are left alone."""
    caplog.set_level(logging.INFO, logger="notifyfs.server.connection")
    sid = os.urandom(wire.SESSION_ID_SIZE)
    old = env.connect(session=sid)
    fnode, _ = old.lookup(1, b"hello")
    fh1, fh2 = old.open(fnode, os.O_RDWR), old.open(fnode, os.O_RDWR)
    assert old.err(Opcode.SETLK, fnode, abi.LK_IN, fh=fh1, lk_flags=abi.LK_FLOCK, type=1) == 0
    # queued behind a SETLKW that waits for the host's lock, in every worker: never started
    host = os.open(env.export / "dir" / "file", os.O_RDONLY)
    try:
        fcntl.flock(host, fcntl.LOCK_EX)
        dnode, _ = old.lookup(1, b"dir")
        file_node, _ = old.lookup(dnode, b"file")
        lfh = old.open(file_node)
        for _ in range(env.server.workers):
            old.send(Opcode.SETLKW, file_node, abi.LK_IN, fh=lfh, lk_flags=abi.LK_FLOCK, type=1)
        time.sleep(0.2)
        late = b"late write that must never land"
        old.send_raw(raw_frame(Opcode.WRITE, old.next_unique(), fnode,
                               abi.WRITE_IN.pack(fh=fh2, size=len(late)) + late))
        time.sleep(0.2)

        bystander = env.connect()  # no session id
        other = env.connect(session=os.urandom(wire.SESSION_ID_SIZE))
        assert _revive(other).error == 0
        assert _revive(env.connect()).error == 0  # no id: fences nothing
        bystander.alive()

        new = env.connect(session=sid)
        start = time.monotonic()
        assert _revive(new).error == 0
        took = time.monotonic() - start
        # the old connection is gone by the time the REVIVE is answered: its lock is free
        probe = os.open(env.export / "hello", os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        assert took < 5, took
    finally:
        fcntl.flock(host, fcntl.LOCK_UN)
        os.close(host)
    time.sleep(0.3)
    assert (env.export / "hello").read_bytes() == HELLO  # the queued WRITE never ran
    assert old.closed_by_peer()
    other.alive()
    bystander.alive()
    new.alive()
    fences = [r.getMessage() for r in caplog.records if "old connection was shut down" in
              r.getMessage()]
    assert len(fences) == 1 and f"session {sid.hex()[:8]}" in fences[0], fences
    dropped = re.search(r"\((\d+) request\(s\) read and never started", fences[0])
    assert dropped is not None and int(dropped.group(1)) >= 1, fences  # the WRITE


# --- lying lengths and unparsable streams -----------------------------------------------------------

def test_lying_lengths_get_errors(env: Env) -> None:
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    fh = c.open(fnode, os.O_RDWR)
    w = abi.WRITE_IN
    # WRITE whose size field disagrees with its payload, both ways
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, size=100) + b"short") == errno.EINVAL
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, size=1) + b"longer") == errno.EINVAL
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, size=0xFFFFFFFF)) == errno.EINVAL
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, size=5)[:20]) == errno.EINVAL
    big = bytes(MAX_WRITE + 1)  # honest, but more than max_write
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, size=len(big)) + big) == errno.E2BIG
    assert (env.export / "hello").read_bytes() == HELLO
    # SETXATTR and BATCH_FORGET counts that lie
    sx = abi.SETXATTR_IN_COMPAT
    assert c.raw_err(Opcode.SETXATTR, fnode, sx.pack(size=50, flags=0) + b"user.a\0xy") == errno.EINVAL
    assert c.raw_err(Opcode.SETXATTR, fnode, sx.pack(size=1 << 20, flags=0) + b"user.a\0") == errno.EINVAL
    # truncated fixed arguments and stray bytes
    for opcode in (Opcode.GETATTR, Opcode.SETATTR, Opcode.OPEN, Opcode.READ, Opcode.RELEASE,
                   Opcode.MKDIR, Opcode.RENAME, Opcode.LINK, Opcode.LSEEK, Opcode.COPY_FILE_RANGE,
                   Opcode.SETLKW, Opcode.ACCESS, Opcode.FALLOCATE, Opcode.SETXATTR):
        assert c.raw_err(opcode, fnode, b"\1\2\3") == errno.EINVAL, abi.OPCODE_NAMES[opcode]
    # malformed requests that are never answered (FORGET, BATCH_FORGET, INTERRUPT) get no reply
    # either: the next reply is the GETATTR's
    for opcode, body in ((Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=1000)),
                         (Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=0xFFFFFFFF) + b"\0" * 16),
                         (Opcode.FORGET, b"\1\2\3"), (Opcode.INTERRUPT, b"\1\2\3"),
                         (Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1) + b"stray")):
        c.send_raw(raw_frame(opcode, c.next_unique(), fnode, body))
        assert c.getattr(fnode) == 0
    assert c.raw_err(Opcode.GETATTR, fnode, abi.GETATTR_IN.pack() + b"stray") == errno.EINVAL
    assert c.raw_err(Opcode.READLINK, fnode, b"stray") == errno.EINVAL
    assert c.raw_err(Opcode.DESTROY, 0, b"stray") == errno.EINVAL
    # extension length beyond the request
    assert c.raw_err(Opcode.GETATTR, fnode, abi.GETATTR_IN.pack(), extlen=100) == errno.EINVAL
    assert c.raw_err(Opcode.GETATTR, fnode, abi.GETATTR_IN.pack(), extlen=0xFFFF) == errno.EINVAL
    assert (env.export / "hello").read_bytes() == HELLO
    c.alive()


@pytest.mark.parametrize("case", ["zero", "short", "below-header", "huge", "max", "truncated-frame",
                                  "truncated-header", "random"])
def test_unparsable_stream_closes_connection(env: Env, case: str) -> None:
    c = env.connect()
    good = env.connect()
    hdr = abi.IN_HEADER
    data = {
        "zero": b"\0" * 64,
        "short": struct.pack("=I", 4) + b"\0" * 60,
        "below-header": hdr.pack(hdr.size - 1, Opcode.GETATTR, 99, 1, 0, 0, 0, 0),
        "huge": hdr.pack(MAX_FRAME + 1, Opcode.WRITE, 99, 1, 0, 0, 0, 0) + b"\0" * 100,
        "max": hdr.pack(0xFFFFFFFF, Opcode.WRITE, 99, 1, 0, 0, 0, 0),
        # the header promises more than ever comes: the stream ends inside the frame
        "truncated-frame": hdr.pack(1000, Opcode.WRITE, 99, 1, 0, 0, 0, 0) + b"\0" * 100,
        "truncated-header": hdr.pack(100, Opcode.GETATTR, 99, 1, 0, 0, 0, 0)[:20],
        "random": bytes(random.Random(7).randrange(256) for _ in range(200)),
    }[case]
    c.send_raw(data)
    if case.startswith("truncated"):
        c.sock.shutdown(socket.SHUT_WR)
    assert c.closed_by_peer(), f"{case}: the server kept an unparsable connection open"
    good.alive()


# --- huge sizes and per-agent limits ---------------------------------------------------------------

def test_huge_reads_and_writes(env: Env) -> None:
    """Sizes and offsets no kernel sends: errors or short answers, never a giant allocation."""
    c = env.connect()
    fnode, _ = c.lookup(1, b"hello")
    dnode, _ = c.lookup(1, b"dir")
    fh = c.open(fnode, os.O_RDWR)
    dfh = c.opendir(dnode)
    assert c.read(fnode, fh, size=0xFFFFFFFF).error == errno.EINVAL
    assert c.read(fnode, fh, size=MAX_WRITE + 1).error == errno.EINVAL
    r = c.read(fnode, fh, size=MAX_WRITE)  # the largest allowed: only what the file has
    assert r.error == 0 and r.payload == HELLO
    r = c.read(fnode, fh, size=4096, offset=(1 << 63) - 1)
    assert r.error in (0, errno.EINVAL) and r.payload == b""
    assert c.read(fnode, fh, size=4096, offset=(1 << 64) - 1).error == errno.EINVAL
    w = abi.WRITE_IN
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, offset=(1 << 64) - 10, size=3) + b"abc") \
        == errno.EINVAL
    assert c.raw_err(Opcode.WRITE, fnode, w.pack(fh=fh, offset=1 << 62, size=3) + b"abc") \
        == errno.EFBIG
    assert c.err(Opcode.FALLOCATE, fnode, abi.FALLOCATE_IN, fh=fh, offset=0,
                 length=1 << 62) in (errno.EFBIG, errno.ENOSPC, errno.EOPNOTSUPP)
    assert c.err(Opcode.SETATTR, fnode, abi.SETATTR_IN, valid=abi.FATTR_SIZE,
                 size=(1 << 64) - 1) in (errno.EINVAL, errno.EFBIG)
    r = c.call(Opcode.READDIR, dnode, abi.READ_IN, fh=dfh, size=0xFFFFFFFF)
    assert r.error == 0 and len(r.payload) <= MAX_WRITE
    r = c.call(Opcode.GETXATTR, fnode, abi.GETXATTR_IN, names=(b"user.none",), size=0xFFFFFFFF)
    assert r.error == errno.ENODATA
    r = c.call(Opcode.LISTXATTR, fnode, abi.GETXATTR_IN, size=0xFFFFFFFF)
    assert r.error == 0
    assert os.path.getsize(env.export / "hello") == len(HELLO)
    c.alive()


def test_per_agent_limits(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """An agent that looks up or opens without end hits its own limits (ENFILE for inodes,
    EMFILE for open files), logged; another agent is unaffected; forgetting and releasing make
    room again."""
    from notifyfs.server.passthrough import Options

    opts = Options(max_inodes=40, max_handles=15)
    env.server.make_fs = lambda: Passthrough(str(env.export), opts)
    for i in range(60):
        (env.export / f"f{i:02d}").write_bytes(b"x")
    greedy = env.connect()
    other = env.connect()
    got: list[int] = []
    errors = []
    for i in range(60):
        r = greedy.call(Opcode.LOOKUP, 1, names=(f"f{i:02d}".encode(),))
        if r.error:
            errors.append(r.error)
        else:
            got.append(abi.ENTRY_OUT.unpack_from(r.payload).nodeid)
    assert 35 <= len(got) <= 41 and set(errors) == {errno.ENFILE}, (len(got), set(errors))
    # a name it already holds is still found (no new inode)
    assert greedy.call(Opcode.LOOKUP, 1, names=(b"f00",)).error == 0
    # nothing is created that the agent could not be told about
    assert greedy.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(b"newdir",), mode=0o755) == errno.ENFILE
    assert greedy.err(Opcode.SYMLINK, 1, names=(b"newlink", b"f00")) == errno.ENFILE
    assert not (env.export / "newdir").exists() and not (env.export / "newlink").is_symlink()
    other.alive()  # its own table, its own limits
    fhs = []
    for _ in range(30):
        r = greedy.call(Opcode.OPEN, got[0], abi.OPEN_IN, flags=os.O_RDONLY)
        if r.error:
            assert r.error == errno.EMFILE
        else:
            fhs.append(abi.OPEN_OUT.unpack_from(r.payload).fh)
    assert len(fhs) == 15
    assert greedy.call(Opcode.OPENDIR, 1, abi.OPEN_IN).error == errno.EMFILE
    assert greedy.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"nope",), flags=os.O_RDWR,
                      mode=0o100644) == errno.EMFILE
    assert not (env.export / "nope").exists()  # refused before anything was created
    other.alive()
    # room again
    assert greedy.err(Opcode.RELEASE, got[0], abi.RELEASE_IN, fh=fhs.pop()) == 0
    assert greedy.call(Opcode.OPENDIR, 1, abi.OPEN_IN).error == 0
    for n in got[5:]:
        greedy.forget(n, 1)
    assert greedy.call(Opcode.LOOKUP, 1, names=(b"f59",)).error == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any("--max-inodes" in m and "ENFILE" in m for m in msgs), msgs
    assert any("--max-handles" in m and "EMFILE" in m for m in msgs), msgs
    stats = [c.fs.stats() for c in env.server.connections]  # type: ignore[attr-defined]
    assert any(s["refused"].get("inodes") and s["refused"].get("handles") for s in stats)


# --- floods -----------------------------------------------------------------------------------------

def test_flood_is_bounded_and_another_agent_is_served(env: Env) -> None:
    """Thousands of requests written without reading any reply: the server stops reading (its
    queue is bounded), keeps serving a second agent, and answers everything once we read again."""
    (env.export / "big").write_bytes(os.urandom(1 << 16))
    flood = env.connect()
    conn = env.connection()
    assert 0 < conn.queue.maxsize <= 4096
    good = env.connect()
    fnode, _ = flood.lookup(1, b"big")
    fh = flood.open(fnode)

    count = 50000
    frames = []
    offsets: dict[int, int | None] = {}  # unique -> offset read, None for an expected error
    for i in range(count):
        if i % 10 == 9:
            u, f = flood.frame(Opcode.READ, fnode, abi.READ_IN, fh=fh + 777, size=1024)  # EBADF
            offsets[u] = None
        elif i % 10 == 8:
            u, f = flood.frame(Opcode.LOOKUP, 1, names=(b"../outside",))  # EINVAL
            offsets[u] = None
        else:
            off = (i % 16) * 4096
            u, f = flood.frame(Opcode.READ, fnode, abi.READ_IN, fh=fh, offset=off, size=1024)
            offsets[u] = off
        frames.append(f)
    blob = b"".join(frames)
    sent = [0]
    done = threading.Event()

    def writer() -> None:
        view = memoryview(blob)
        while sent[0] < len(blob):
            n = flood.sock.send(view[sent[0]:sent[0] + 65536])
            sent[0] += n
        done.set()

    flood.sock.settimeout(None)
    wt = threading.Thread(target=writer, daemon=True)
    wt.start()
    # the server must stop reading: the writer blocks with most of the flood unsent
    last = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if sent[0] == last:
            break
        last = sent[0]
    assert not done.is_set(), "the server read the whole flood without anyone reading replies"
    assert conn.queue.qsize() <= conn.queue.maxsize
    assert wait(conn.queue.full, 5), "backpressure should fill the queue"
    stalled_at = sent[0]
    assert stalled_at < len(blob) - (1 << 20)
    # a well-behaved agent keeps getting correct answers while the flood is stuck
    for _ in range(20):
        good.alive()
    assert sent[0] == stalled_at and conn.queue.qsize() <= conn.queue.maxsize

    # now read: every request is answered exactly once, and correctly
    big = (env.export / "big").read_bytes()
    flood.sock.settimeout(20)
    draining = threading.Event()
    results: list[BaseException] = []

    def good_loop() -> None:
        try:
            while not draining.is_set():
                good.alive()
        except BaseException as e:  # noqa: BLE001
            results.append(e)

    gt = threading.Thread(target=good_loop, daemon=True)
    gt.start()
    for got in range(count):
        r = flood.recv()
        assert r is not None, f"connection closed after {got} replies"
        assert r.unique in offsets, f"reply to {r.unique}: unknown or answered twice"
        off = offsets.pop(r.unique)
        if off is None:
            assert r.error in (errno.EBADF, errno.EINVAL)
        else:
            assert r.error == 0 and r.payload == big[off:off + 1024]
    draining.set()
    wt.join(10)
    gt.join(15)
    assert done.is_set() and not offsets
    assert not results, results
    flood.sock.settimeout(10)
    flood.alive()
    good.alive()


def test_fuzzed_frames_always_answered(env: Env) -> None:
    """Well-framed requests with random opcodes, nodeids and bodies: each gets exactly one reply."""
    c = env.connect()
    rnd = random.Random(20240501)
    fnode, _ = c.lookup(1, b"hello")
    dnode, _ = c.lookup(1, b"dir")
    lnode, _ = c.lookup(1, b"abs_dir")
    fh = c.open(fnode)
    opcodes = sorted(abi.OPCODE_NAMES) + [0, 99, 5000]
    skip = {Opcode.INIT, Opcode.DESTROY, Opcode.SETLKW, Opcode.CUSE_INIT}
    nodeids = [0, 1, fnode, dnode, lnode, 777, (1 << 64) - 1]
    expect = []
    for i in range(3000):
        opcode = rnd.choice(opcodes)
        if opcode in skip:
            continue
        body = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 3, 8, 16, 24, 40, 64, 80, 120])))
        if rnd.random() < 0.5:  # plausible names, some of them hostile
            body += rnd.choice([b"x\0", b"..\0", b"a/b\0", b"\0", b"hello\0", b"dir\0y\0", b"z"])
        if rnd.random() < 0.3:
            body = struct.pack("=Q", fh) + body[8:]
        u = c.next_unique()
        c.send_raw(raw_frame(opcode, u, rnd.choice(nodeids), body, uid=rnd.choice([0, 1000])))
        if opcode not in NO_REPLY:
            expect.append(u)
        if i % 50 == 0:  # keep the pipe moving
            while expect:
                r = c.recv()
                assert r is not None, "connection closed on a well-framed request"
                assert r.unique in expect
                expect.remove(r.unique)
    while expect:
        r = c.recv()
        assert r is not None
        expect.remove(r.unique)
    assert c.getattr(1) == 0


# --- the real server process ------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def serve_process(export: Path, run: Path, token: bytes,
                  *args: str) -> Iterator[tuple[subprocess.Popen[bytes], wire.Address]]:
    """A real ``notifyfs serve`` on ``run/sock``, listening when this yields; stopped, and its
    log checked for tracebacks, afterwards."""
    sock_path = run / "sock"
    log = open(run / "serve.log", "wb")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen([sys.executable, "-m", "notifyfs", "serve", str(export),
                             "--listen", f"unix:{sock_path}", *args],
                            env={**os.environ, "NOTIFYFS_TOKEN": token.decode()},
                            stdout=log, stderr=subprocess.STDOUT)
    addr = wire.parse_address(f"unix:{sock_path}")
    try:
        def listening() -> bool:
            try:
                wire.connect(addr).close()  # the socket file appears before listen(2)
                return True
            except OSError:
                return proc.poll() is not None

        assert wait(listening)
        assert proc.poll() is None
        yield proc, addr
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    out = (run / "serve.log").read_text(errors="replace")
    assert "Traceback" not in out, out


def test_serve_process_survives_hostile_agents(tmp_path: Path) -> None:
    export, outside = plant(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    before = snapshot(tmp_path, skip=("export", "run"))
    token = b"the-right-token"
    clients: list[socket.socket] = []
    with serve_process(export, run, token) as (proc, addr):
        try:
            _survive(proc, addr, token, clients)
        finally:
            for s in clients:
                s.close()
    assert snapshot(tmp_path, skip=("export", "run")) == before


def _survive(proc: subprocess.Popen[bytes], addr: wire.Address, token: bytes,
             clients: list[socket.socket]) -> None:
    def connect(tok: bytes | None = token) -> Client:
        s = wire.connect(addr)
        clients.append(s)
        wire.client_handshake(s, tok, wire.SUPPORTED_FEATURES)
        return Client(s)

    # refused handshakes
    for bad in (None, b"wrong"):
        with pytest.raises(wire.HandshakeError, match="bad token"):
            connect(bad)
    s = wire.connect(addr)
    clients.append(s)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 16)
    assert Client(s).closed_by_peer()
    s = wire.connect(addr)
    clients.append(s)
    s.sendall(HELLO_FMT.pack(wire.MAGIC, 2, 0, 0, len(token)) + token)
    assert wire._read_hello(s)[1] == wire.STATUS_BAD_VERSION

    good = connect()
    good.init()
    good.alive()
    # a garbage stream after a good handshake, then a flood nobody reads
    bad = connect()
    bad.init()
    bad.send_raw(struct.pack("=I", 7) + b"\0" * 100)
    assert bad.closed_by_peer()
    flood = connect()
    flood.init()
    rss0 = rss_kib(proc.pid)
    blob = b"".join(flood.frame(Opcode.GETATTR, 1, abi.GETATTR_IN)[1] for _ in range(60000))
    flood.sock.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + 8
    stuck_since = None
    while pushed < len(blob) and time.monotonic() < deadline:
        try:
            pushed += flood.sock.send(blob[pushed:pushed + 65536])
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 1.5:
                break  # the server stopped reading: backpressure
            time.sleep(0.05)
            good.alive()
    assert pushed < len(blob), "the server swallowed the whole flood"
    # the server did not swallow everything into memory
    assert rss_kib(proc.pid) - rss0 < 64 * 1024
    good.alive()
    flood.sock.setblocking(True)
    flood.sock.close()
    good.alive()
    assert proc.poll() is None, "the server died"


def _collect(c: Client, uniques: list[int]) -> list[int]:
    """The errors of pipelined requests, whatever order the workers answered them in."""
    want = set(uniques)
    got: dict[int, int] = {}
    while len(got) < len(want):
        r = c.recv()
        assert r is not None and r.unique in want and r.unique not in got
        got[r.unique] = r.error
    return [got[u] for u in uniques]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
def test_serve_process_bounded_under_hostile_load(tmp_path: Path) -> None:
    """A real ``notifyfs serve`` with per-agent limits, attacked at once by an agent that looks up
    every name and forgets nothing, one that opens without releasing, one that pushes 1 MiB WRITEs
    and GETATTRs without reading a reply, and a crowd of connections past --max-connections. Its
    memory and fds stay bounded, a good agent is served throughout, and when the attackers leave
    every fd they cost is released."""
    export, _ = plant(tmp_path)
    for i in range(3000):
        (export / f"f{i:04d}").write_bytes(b"x")
    run = tmp_path / "run"
    run.mkdir()
    token = b"bounded-token"
    socks: list[socket.socket] = []
    with serve_process(export, run, token, "--no-events", "--max-inodes", "1000",
                       "--max-handles", "200", "--max-connections", "8") as (proc, addr):
        try:
            _bounded(proc, addr, token, socks)
        finally:
            for s in socks:
                s.close()
    out = (run / "serve.log").read_text(errors="replace")
    assert "--max-inodes" in out and "--max-handles" in out and "--max-connections" in out


def _bounded(proc: subprocess.Popen[bytes], addr: wire.Address, token: bytes,
             socks: list[socket.socket]) -> None:
    def connect() -> Client:
        s = wire.connect(addr)
        socks.append(s)
        wire.client_handshake(s, token, 0)
        c = Client(s)
        c.init()
        return c

    good = connect()
    good.alive()
    rss0, fds0 = rss_kib(proc.pid), _fds(proc.pid)

    # 1: look up every name, forget nothing (pipelined)
    greedy = connect()
    us = []
    for i in range(3000):
        u, f = greedy.frame(Opcode.LOOKUP, 1, names=(f"f{i:04d}".encode(),))
        greedy.send_raw(f)
        us.append(u)
    errs = _collect(greedy, us)
    # the limit is checked without a lock: concurrent workers may each pass it once
    assert errs.count(0) <= 1000 + 8 and set(errs) <= {0, errno.ENFILE}, (errs.count(0), set(errs))
    good.alive()
    # 2: open without releasing
    opener = connect()
    fnode, _ = opener.lookup(1, b"hello")
    us = []
    for _ in range(1000):
        u, f = opener.frame(Opcode.OPEN, fnode, abi.OPEN_IN, flags=os.O_RDONLY)
        opener.send_raw(f)
        us.append(u)
    errs = _collect(opener, us)
    assert errs.count(0) == 200 and set(errs) == {0, errno.EMFILE}, (errs.count(0), set(errs))
    good.alive()
    # 3: huge writes and small requests, never reading a reply
    flood = connect()
    hnode, _ = flood.lookup(1, b"hello")  # each agent has its own nodeids
    hfh = flood.open(hnode, os.O_RDWR)
    big = flood.frame(Opcode.WRITE, hnode, abi.WRITE_IN, fh=hfh + 1000, size=MAX_WRITE,
                      data=bytes(MAX_WRITE))[1]  # EBADF: nothing is written
    blob = b"".join([big] * 64 + [flood.frame(Opcode.GETATTR, 1, abi.GETATTR_IN)[1]
                                  for _ in range(20000)])
    flood.sock.setblocking(False)
    pushed, stuck = 0, 0.0
    deadline = time.monotonic() + 20
    while pushed < len(blob) and time.monotonic() < deadline:
        try:
            pushed += flood.sock.send(blob[pushed:pushed + (1 << 20)])
            stuck = 0.0
        except BlockingIOError:
            stuck = stuck or time.monotonic()
            if time.monotonic() - stuck > 2:
                break
            time.sleep(0.05)
    assert pushed < len(blob), "the server swallowed everything without anyone reading"
    good.alive()
    # 4: a crowd of connections; past 8 they are refused with a reason
    refused = 0
    for _ in range(12):
        s = wire.connect(addr)
        socks.append(s)
        try:
            wire.client_handshake(s, token, 0)
        except wire.HandshakeError as e:
            assert "too many connections" in str(e)
            refused += 1
    assert refused >= 12 - (8 - 4), f"only {refused} of 12 refused"
    good.alive()
    rss1, fds1 = rss_kib(proc.pid), _fds(proc.pid)
    print(f"\nserve under hostile load: RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}, "
          f"{refused} connections refused")
    assert rss1 - rss0 < 128 * 1024, "memory grew without bound"
    assert fds1 - fds0 < 1000 + 200 + 100, "fds beyond the per-agent limits"
    # the attackers leave: everything they cost is released
    for c in (greedy, opener, flood):
        c.close()
    for s in socks[4:]:
        s.close()
    assert wait(lambda: _fds(proc.pid) <= fds0 + 2, 40), (fds0, _fds(proc.pid))
    good.alive()
    assert proc.poll() is None


def test_hostile_agent_cannot_flood_the_servers_log(tmp_path: Path) -> None:
    """Each malformed request is logged, but a message repeated thousands of times is written a
    bounded number of times (with a count of what was left out), so an agent cannot fill the
    host's disk through the server's log."""
    export, _ = plant(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    token = b"log-token"
    with serve_process(export, run, token, "--no-events") as (_proc, addr):
        s = wire.connect(addr)
        try:
            wire.client_handshake(s, token, 0)
            c = Client(s)
            c.init()
            nodeid, _ = c.lookup(1, b"hello")
            us = []
            for _ in range(3000):
                u = c.next_unique()
                c.send_raw(raw_frame(Opcode.LOOKUP, u, 1, b"no-terminating-nul"))  # bad request
                us.append(u)
                c.forget(nodeid, 1 << 40)  # FORGET of more than was looked up
            assert set(_collect(c, us)) == {errno.EINVAL}
            c.alive()
        finally:
            s.close()
    lines = (run / "serve.log").read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if "bad request" in ln]
    assert 1 <= len(bad) <= 60, len(bad)
    assert len(lines) < 200, len(lines)


def test_revive_garbage_and_forged_handles(env: Env) -> None:
    """NOTIFYFS_REVIVE from a hostile agent: a body that is not the format gets EINVAL; a host
    file handle of a file outside the export (the handle is valid on the host's filesystem) and
    a nodeid that names nothing are reported stale and never become usable nodeids."""
    from notifyfs import revive
    from notifyfs.linux import fs as linux_fs

    c = env.connect()
    for body in (b"", b"not json", b"[]", b'{"nodes": [[1, 2]]}', b'{"nodes": "x"}',
                 b'{"nodes": [[5, 1, "zz", 1, "", null]]}', b"\xff" * 100):
        assert c.raw_err(Opcode.NOTIFYFS_REVIVE, 1, body) == errno.EINVAL, body
    secret = env.outside / "secret"
    fd = os.open(secret, os.O_PATH)
    try:
        htype, handle, _mnt = linux_fs.name_to_handle(fd)
    finally:
        os.close(fd)
    ino = secret.stat().st_ino
    forged = htype.to_bytes(4, "little", signed=True) + handle
    req = revive.Revive([revive.NodeRecord(ino, 1, forged, 1, b"", None),
                         revive.NodeRecord(123456789, 1, b"", 1, b"no-such-name", None)],
                        [revive.FileRecord(7, ino, os.O_RDWR, False)])
    u = c.next_unique()
    c.send_raw(revive.encode_revive(u, req))
    r = c.expect(u)
    assert r.error == 0
    result = revive.decode_result(r.payload)
    assert sorted(result.stale) == sorted([ino, 123456789]) and result.revived == 0
    assert result.stale_files == [7]
    assert c.err(Opcode.GETATTR, ino, abi.GETATTR_IN) == errno.ESTALE
    assert secret.read_bytes() == SECRET
    c.alive()
