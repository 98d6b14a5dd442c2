"""One agent connection (a reader thread and a pool of workers), and the accept loop.

Threads per connection: the reader decodes frames and hands them to ``workers`` worker threads
through a bounded queue (a client that floods requests without reading replies blocks only its own
reader). FORGET, BATCH_FORGET and INTERRUPT are cheap and handled by the reader itself. Replies and
notifications go through one :class:`FrameWriter` (its lock is a leaf lock).

Fencing. An agent whose connection dropped reconnects and retries the idempotent requests that
were in flight, WRITE included. If the old connection is only half-open (the server never saw it
end), a request still travelling on it could reach the server after the retry, and after a newer
request of the guest: an old WRITE would then overwrite newer data. So when a connection sends
NOTIFYFS_REVIVE with the session id (wire.py, feature ``session``) of a connection the server
still holds, the server first fences that old connection: it stops reading it, drops every
request read from it and not started, waits (at most ``DRAIN_TIMEOUT``) for the requests being
executed, releases its handles (and so its flocks), inodes and watches, and only then answers the
REVIVE.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable

from .. import abi, wire
from ..protocol import ProtocolError, Request, decode_request, reply, reply_error
from .dispatch import Filesystem, FuseError

log = logging.getLogger(__name__)

_INLINE = (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET)
_NO_REPLY = (*_INLINE, abi.Opcode.INTERRUPT)  # never answered, even when malformed
#: requests that open a session; a revived agent (after a server restart) opens it with REVIVE
_OPENERS = tuple(op for op in (abi.Opcode.INIT, getattr(abi.Opcode, "NOTIFYFS_REVIVE", None))
                 if op is not None)
#: quick requests that never wait for anything but one local system call: when the workers
#: have nothing queued, the reader answers these itself, saving the hand-over to a worker
#: (a queue put and a thread wake-up, ~100 us of CPU, the largest cost of a small request).
#: Not READ/WRITE (a cold 1 MiB read would hold up every other request), locks or fsync.
_QUICK = frozenset({
    abi.Opcode.LOOKUP, abi.Opcode.GETATTR, abi.Opcode.SETATTR, abi.Opcode.READLINK,
    abi.Opcode.SYMLINK, abi.Opcode.MKNOD, abi.Opcode.MKDIR, abi.Opcode.UNLINK, abi.Opcode.RMDIR,
    abi.Opcode.RENAME, abi.Opcode.RENAME2, abi.Opcode.LINK, abi.Opcode.OPEN, abi.Opcode.CREATE,
    abi.Opcode.STATFS, abi.Opcode.FLUSH, abi.Opcode.RELEASE, abi.Opcode.GETXATTR,
    abi.Opcode.LISTXATTR, abi.Opcode.SETXATTR, abi.Opcode.REMOVEXATTR, abi.Opcode.OPENDIR,
    abi.Opcode.READDIR, abi.Opcode.READDIRPLUS, abi.Opcode.RELEASEDIR, abi.Opcode.ACCESS})
#: how long a closing connection waits for the requests its workers are executing
DRAIN_TIMEOUT = 10.0


class Connection:
    def __init__(self, sock: wire.Stream, fs: Filesystem, workers: int = 8,
                 max_pending: int = 256, peer: str = "agent", features: int = 0,
                 session: bytes = b"",
                 fence_session: Callable[[Connection], None] | None = None) -> None:
        self.sock = sock
        self.fs = fs
        self.peer = peer
        #: the agent's session id (wire.py), b"" for an agent without the feature
        self.session = session
        #: called before a NOTIFYFS_REVIVE runs: ends older connections of the same session
        self.fence_session = fence_session
        #: set by fence(): no request of this connection starts any more
        self.fenced = False
        self.dropped = 0  # requests read but never started because of the fence
        self._drop_lock = threading.Lock()
        self.stuck = 0  # workers still executing a request when the connection ended
        self.ended = threading.Event()  # run() is over: everything held is released
        self.writer = wire.FrameWriter(sock)
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_pending)
        self.nworkers = workers
        self.destroyed = False
        #: a kernel sends nothing before INIT's answer; a client that does gets EIO (libfuse's
        #: answer too), so no request ever runs with a session it did not negotiate
        self.initialized = False
        self.early = 0  # requests refused for coming before INIT
        fs.attach(self.send, bool(features & wire.FEATURE_FSNOTIFY),
                  revive=bool(features & wire.FEATURE_REVIVE))

    def send(self, frame: bytes) -> None:
        try:
            self.writer.write(frame)
        except OSError as e:
            log.debug("%s: cannot send: %s", self.peer, e)

    def run(self) -> None:
        """Serve until the peer goes away; then release everything held for it."""
        threads = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                   for i in range(self.nworkers)]
        for t in threads:
            t.start()
        try:
            self._read()
        finally:
            shutdown: Callable[[], None] | None = getattr(self.fs, "shutdown", None)
            if shutdown is not None:
                shutdown()  # a request still waiting (SETLKW) ends now, not after the joins
            for _ in threads:
                self.queue.put(None)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            self.stuck = sum(t.is_alive() for t in threads)
            try:
                self.sock.close()
            except OSError:
                pass
            self.fs.close()
            log.info("%s: disconnected", self.peer)
            self.ended.set()

    def fence(self, timeout: float) -> bool:
        """Shut this connection down for good, from another thread: no request read from it
        starts any more, the ones queued are dropped, the ones running finish; then everything
        it holds is released (run()'s end). Returns whether that was done within ``timeout``
        with no request left running."""
        self.fenced = True
        # wakes the reader (recv) and a worker blocked sending to a peer that reads nothing (a
        # half-open connection fills its send buffer); the plain socket's call, also under TLS
        sock_shutdown: Callable[[int], None] | None = getattr(self.sock, "shutdown", None)
        if sock_shutdown is not None:
            try:
                sock_shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return self.ended.wait(timeout) and not self.stuck

    def _register_thread(self) -> None:
        enter: Callable[[], None] | None = getattr(self.fs, "enter_thread", None)
        if enter is not None:
            enter()

    def _read(self) -> None:
        self._register_thread()  # it answers some requests itself (FORGET, flock RELEASE)
        reader = wire.FrameReader(self.sock, wire.REQUEST_MIN)
        session = getattr(self.fs, "session", None)
        while True:
            try:
                frame = reader.read()
            except ProtocolError as e:
                if not self.fenced:
                    log.error("%s: unreadable stream (%s); closing the connection", self.peer, e)
                return
            if frame is None or self.fenced:
                return
            try:
                req = decode_request(frame, session)
            except ProtocolError as e:
                if e.unique is None:
                    log.error("%s: %s; closing the connection", self.peer, e)
                    return
                log.warning("%s: bad request %d: %s", self.peer, e.unique, e)
                if e.unique and abi.IN_HEADER.unpack_from(frame).opcode not in _NO_REPLY:
                    self.send(reply_error(e.unique, e.errno))
                continue
            if req.opcode in _OPENERS and not self.destroyed:
                if (req.opcode == abi.Opcode.NOTIFYFS_REVIVE and self.session
                        and self.fence_session is not None):
                    # an older connection of this agent must be gone before anything is revived
                    # (and before the agent retries what was in flight on it)
                    self.fence_session(self)
                # answered here, before the next request is read: what INIT negotiates decodes
                # the requests after it
                out = self._call(req)
                if out is not None:
                    self.send(out)
                    if abi.OUT_HEADER.unpack_from(out).error == 0:
                        self.initialized = True
            elif not self.initialized and not self.destroyed:
                self._refuse_uninitialized(req)
            elif req.opcode in _INLINE:
                self._call(req)
            elif (req.opcode == abi.Opcode.RELEASE and not self.destroyed
                  and req.arg.release_flags & abi.RELEASE_FLOCK_UNLOCK):
                # The kernel sends RELEASE in the background after close(2) has returned. Answer
                # it here, in arrival order, so the flock it drops is gone before any later
                # request runs (another process's LOCK_NB must not see a closed file's lock).
                out = self._call(req)
                if out is not None:
                    self.send(out)
            elif req.opcode == abi.Opcode.INTERRUPT:
                interrupt: Callable[[int], None] | None = getattr(self.fs, "interrupt", None)
                if interrupt is not None:
                    interrupt(req.arg.unique)
            elif self.destroyed or req.unique == 0:
                self.send(reply_error(req.unique, errno.ESHUTDOWN)) if req.unique else None
            elif req.opcode in _QUICK and self.queue.empty():
                out = self._call(req)
                if out is not None:
                    self.send(out)
            else:
                if req.opcode == abi.Opcode.DESTROY:
                    self.destroyed = True
                self.queue.put(req)

    def _refuse_uninitialized(self, req: Request) -> None:
        self.early += 1
        if self.early == 1 or self.early % 1000 == 0:
            log.warning("%s: %s before INIT (%d so far): EIO", self.peer, req.opname, self.early)
        if req.opcode not in _NO_REPLY and req.unique:
            self.send(reply_error(req.unique, errno.EIO))

    def _work(self) -> None:
        self._register_thread()
        while True:
            req = self.queue.get()
            if req is None:
                return
            out = self._call(req)
            if out is not None:
                self.send(out)

    def _call(self, req: Request) -> bytes | None:
        if self.fenced:  # read before the fence, not started: it never runs (nor is answered)
            with self._drop_lock:
                self.dropped += 1
            return None
        try:
            payload = self.fs.handle(req)
        except FuseError as e:
            return reply_error(req.unique, e.errno)
        except OSError as e:
            return reply_error(req.unique, e.errno or errno.EIO)
        except OverflowError:  # an offset or size no kernel sends (>= 2**63)
            return reply_error(req.unique, errno.EINVAL)
        except Exception:
            log.exception("%s: %s failed", self.peer, req.opname)
            return reply_error(req.unique, errno.EIO)
        if payload is None or req.opcode in _INLINE:
            return None
        return reply(req.unique, payload)


class Server:
    """Accepts agents on a listening socket; one filesystem object per connection."""

    def __init__(self, make_fs: Callable[[], Filesystem], token: bytes | None = None,
                 features: int = wire.SUPPORTED_FEATURES, workers: int = 8,
                 tls: ssl.SSLContext | None = None, max_connections: int = 64,
                 max_pending: int = 256) -> None:
        self.make_fs = make_fs
        self.token = token
        self.features = features
        self.workers = workers
        self.tls = tls
        #: agents connected or handshaking at once; more are refused (each costs threads and fds)
        self.max_connections = max_connections
        self.max_pending = max_pending  # requests read from one agent and not yet answered
        #: wait for ever for the agent's hello (a VM's serial port is connected at boot)
        self.wait_for_hello = False
        #: else the whole handshake (TLS included) must be done within this many seconds
        self.handshake_timeout = wire.HANDSHAKE_TIMEOUT
        self.connections: set[Connection] = set()
        self.active = 0  # streams in serve_socket: handshaking or connected
        self.refused = 0
        self.lock = threading.Lock()

    def serve_socket(self, sock: wire.Stream, peer: str) -> None:
        """Handshake and serve one connected socket (blocks until it closes)."""
        with self.lock:
            admitted = self.active < self.max_connections
            if admitted:
                self.active += 1
            else:
                self.refused += 1
        if not admitted:
            log.warning("%s: refused: already %d connections (--max-connections)", peer,
                        self.max_connections)
            wire.refuse(sock, f"too many connections (the server allows {self.max_connections})")
            return
        try:
            self._serve(sock, peer)
        finally:
            with self.lock:
                self.active -= 1

    def _serve(self, sock: wire.Stream, peer: str) -> None:
        wire.tune(sock)
        if self.tls is not None and isinstance(sock, socket.socket):
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            agreed, session = wire.server_handshake(sock, self.token, self.features,
                                                    self.wait_for_hello, self.handshake_timeout)
        except (wire.HandshakeError, OSError) as e:
            log.warning("%s: handshake failed: %s", peer, e)
            sock.close()
            return
        log.info("%s: connected%s%s", peer, " (TLS)" if isinstance(sock, ssl.SSLSocket) else "",
                 f", session {session.hex()[:8]}" if session else "")
        fs: Filesystem | None = None
        try:
            fs = self.make_fs()
            conn = Connection(wire.stream(sock), fs, workers=self.workers,
                              max_pending=self.max_pending, peer=peer, features=agreed,
                              session=session, fence_session=self.fence_session)
        except OSError as e:  # no fd left for the export root or the host watcher (EMFILE)
            log.error("%s: cannot serve this agent: %s", peer, e)
            if fs is not None:
                fs.close()
            sock.close()
            return
        with self.lock:
            self.connections.add(conn)
        try:
            conn.run()
        finally:
            with self.lock:
                self.connections.discard(conn)

    def fence_session(self, conn: Connection) -> None:
        """``conn`` revives its agent's session: end every other connection of that session
        first (see the module's docstring). A request still running after the bounded wait
        (one host call stuck for DRAIN_TIMEOUT seconds) is logged, and the revive goes on."""
        with self.lock:
            old = [c for c in self.connections if c is not conn and c.session == conn.session]
        for c in old:
            start = time.monotonic()
            clean = c.fence(DRAIN_TIMEOUT + 5.0)
            took = (time.monotonic() - start) * 1000
            log.info("%s: session %s revived on %s: its old connection was shut down first "
                     "(%d request(s) read and never started, dropped; %.0f ms)", c.peer,
                     conn.session.hex()[:8], conn.peer, c.dropped, took)
            if not clean:
                log.warning("%s: %d request(s) of the old connection still running after "
                            "%.0f ms; reviving anyway", c.peer, max(c.stuck, 1), took)

    def stats(self) -> list[dict[str, object]]:
        with self.lock:
            conns = list(self.connections)
        return [dict(peer=c.peer, **getattr(c.fs, "stats", dict)()) for c in conns]

    def serve_forever(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL):
                    return
                log.warning("accept failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the connection stays queued and accept fails again at once: wait for an
                    # fd to be freed instead of spinning
                    time.sleep(0.1)
                continue
            peer = str(addr) if addr else "agent"
            threading.Thread(target=self.serve_socket, args=(sock, peer), daemon=True,
                             name=f"conn-{peer}").start()
