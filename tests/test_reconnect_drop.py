"""Fault: the agent's TCP connection drops while the server lives on.

``notifyfs serve`` listens on TCP loopback (with a token) and the agent reaches it through a
relay in this test process that forwards bytes both ways, so the test can cut the connection
when it likes: both sockets are closed with an RST (SO_LINGER 0) and the relay refuses new
connections until it is told to accept again. The server itself is never touched: the agent
must find the same live server again (its ``-o reconnect=`` default), and the server must let
go of everything the old connection held. The relay can also keep what the agent sends and hand
it to the server late, on the old connection, as a router's queue would: the server must never
run it once the agent has revived its session on a new connection (fencing).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ServedPair, requires_mount, wait_for
from notifyfs import wire
from notifyfs.linux import inotify as ino
from oracle import Recorder

pytestmark = [requires_mount, pytest.mark.timeout(150)]

_LINGER_RST = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST and drops unsent data


@dataclass(eq=False)
class _Link:
    """One agent connection through the relay: its two sockets and two pumps. Once the agent
    sends a request of opcode ``hold_from``, that request and everything after it is kept in
    ``held`` instead of reaching the server."""

    agent_side: socket.socket
    server_side: socket.socket
    pumps: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    hold_from: int | None = None
    holding: bool = False
    held: bytearray = field(default_factory=bytearray)


class TcpCutter:
    """A TCP relay between the agent and the server that the test can cut.

    Each accepted agent connection gets its own connection to the server and two pump threads.
    ``cut()`` stops the pumps, resets both sides and closes the listening socket (the agent's
    reconnect attempts are refused); ``accept_again()`` listens on the same port again.
    ``cut(hold_server_side=True)`` resets only the agent's side and keeps the server's side open
    and silent, as a middlebox that lost the connection would: the server's old connection stays
    open (half-open) until ``release_held()``. ``hold_from()`` makes the current connections keep
    what the agent sends from a request of a given opcode on (bytes in a router's queue);
    ``deliver_held()`` hands those bytes to the server late, on the held old connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener: socket.socket | None = None
        self.port = 0
        self.lock = threading.Lock()
        self.links: list[_Link] = []
        self.held: list[_Link] = []
        self.accepted = 0
        self.accept_again()

    def accept_again(self) -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(8)
        self.port = lsock.getsockname()[1]
        self.listener = lsock
        threading.Thread(target=self._accept, args=(lsock,), daemon=True,
                         name="cutter-accept").start()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                agent_side, _ = lsock.accept()
            except OSError:
                return  # the listener was closed by cut()
            try:
                server_side = socket.create_connection(self.target, timeout=5)
                server_side.settimeout(None)
            except OSError:
                agent_side.close()
                continue
            link = _Link(agent_side, server_side)
            link.pumps = [threading.Thread(target=self._pump, args=(link, a, b), daemon=True,
                                           name="pump")
                          for a, b in ((agent_side, server_side), (server_side, agent_side))]
            with self.lock:
                self.links.append(link)
                self.accepted += 1
            for t in link.pumps:
                t.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        # poll with a timeout, so that cut() can stop the pump without a shutdown() that would
        # change the held server side's state
        poller = select.poll()
        poller.register(src, select.POLLIN)
        uplink = src is link.agent_side
        partial = b""  # the agent's requests are passed on whole (fuse_in_header.len) ...
        handshake: int | None = None  # ... after its handshake (bytes of it not passed on yet)
        try:
            while not link.stop.is_set():
                if not poller.poll(50):
                    continue
                data = src.recv(1 << 16)
                if not data:
                    break
                if not uplink:
                    dst.sendall(data)
                    continue
                partial += data
                if handshake is None and len(partial) >= wire._HELLO.size:
                    # the hello, its token and the session id (the server agrees to it)
                    *_, features, ntoken = wire._HELLO.unpack_from(partial)
                    handshake = wire._HELLO.size + ntoken + (
                        wire.SESSION_ID_SIZE if features & wire.FEATURE_SESSION else 0)
                if handshake is None:
                    continue
                if handshake:
                    n = min(handshake, len(partial))
                    dst.sendall(partial[:n])
                    partial, handshake = partial[n:], handshake - n
                while not handshake and len(partial) >= 8:
                    size, opcode = struct.unpack_from("=II", partial)
                    if len(partial) < size:
                        break
                    frame, partial = partial[:size], partial[size:]
                    if opcode == link.hold_from:
                        link.holding = True
                    if link.holding:
                        link.held += frame
                    else:
                        dst.sendall(frame)
        except OSError:
            pass
        if link.stop.is_set():
            return
        # one side ended on its own (not a cut): pass the end on
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def hold_from(self, opcode: int) -> None:
        """From the next request of ``opcode`` on, the current connections keep what the agent
        sends (the requests before it still go through: a WRITE follows the GETXATTR of
        security.capability that the kernel sends for it)."""
        with self.lock:
            for link in self.links:
                link.hold_from = opcode

    def held_requests(self) -> list[bytes]:
        """The whole request frames kept so far (fuse_in_header.len frames them)."""
        with self.lock:
            data = b"".join(bytes(link.held) for link in self.links + self.held)
        frames = []
        while len(data) >= 4:
            (size,) = struct.unpack_from("=I", data)
            if size < 40 or len(data) < size:
                break
            frames.append(data[:size])
            data = data[size:]
        return frames

    def cut(self, hold_server_side: bool = False) -> None:
        """Reset the connections now; refuse new ones until accept_again()."""
        assert self.listener is not None
        # shutdown wakes the thread blocked in accept() (close alone would leave the socket
        # listening until that accept returned); connecting is refused from now on
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.listener = None
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.stop.set()
            for t in link.pumps:
                t.join(5)
            ends = [link.agent_side] if hold_server_side else [link.agent_side, link.server_side]
            for s in ends:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                s.close()
            if hold_server_side:
                with self.lock:
                    self.held.append(link)

    def deliver_held(self, unique: int, timeout: float = 10.0) -> str:
        """Send the kept bytes to the server on the held old connection(s), then wait for the
        server's answer to request ``unique``: "answered" (the server ran it), "closed" (the
        server had closed that connection) or "silent" (neither within ``timeout``)."""
        with self.lock:
            links = list(self.held)
        outcome = "silent"
        for link in links:
            s = link.server_side
            try:
                s.sendall(bytes(link.held))
            except OSError:
                return "closed"
            link.held.clear()
            s.settimeout(timeout)
            buf = b""
            try:
                while True:
                    data = s.recv(1 << 16)
                    if not data:
                        return "closed"
                    buf += data
                    while len(buf) >= 16:  # fuse_out_header: len, error, unique
                        size, _err, got = struct.unpack_from("=IiQ", buf)
                        if len(buf) < size:
                            break
                        if got == unique:
                            return "answered"
                        buf = buf[size:]
            except TimeoutError:
                continue
            except OSError:
                return "closed"
        return outcome

    def release_held(self) -> None:
        with self.lock:
            links, self.held = self.held, []
        for link in links:
            link.server_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            link.server_side.close()

    def close(self) -> None:
        if self.listener is not None:
            self.cut()
        self.release_held()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpPair(ServedPair):
    """The server on TCP loopback with a token; the agent reaches it through a TcpCutter."""

    def __init__(self, tmp: Path) -> None:
        self.token = tmp / "token"
        self.token.write_text("tcp-drop-secret\n")
        os.chmod(self.token, 0o600)
        self.cutter: TcpCutter | None = None
        port = _free_port()
        super().__init__(tmp, "--token-file", str(self.token), listen=f"tcp:127.0.0.1:{port}")
        self.cutter = TcpCutter(("127.0.0.1", port))
        self.address = f"tcp:127.0.0.1:{self.cutter.port}"

    def mount(self, *args: str) -> subprocess.Popen[bytes]:
        return super().mount("--token-file", str(self.token), *args)

    def server_fds(self) -> int:
        assert self.server is not None
        return len(os.listdir(f"/proc/{self.server.pid}/fd"))

    def server_threads(self) -> int:
        assert self.server is not None
        return len(os.listdir(f"/proc/{self.server.pid}/task"))

    def wait_stable(self, what, timeout: float = 10.0) -> int:  # type: ignore[no-untyped-def]
        """``what()`` once it has not changed for half a second."""
        deadline = time.monotonic() + timeout
        last, since = what(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = what()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.5:
                break
        return int(last)

    def close(self) -> None:
        if self.cutter is not None:
            self.cutter.close()
        super().close()


def _names(rec: Recorder) -> list[tuple[str, str]]:
    return [("IN_" + ino.mask_names(e.mask & ~ino.IN_ISDIR), os.fsdecode(e.name))
            for e in rec.raw]


def _disconnects(pair: TcpPair) -> int:
    return len(re.findall(r": disconnected$", pair.server_output(), re.M))


def _fences(pair: TcpPair) -> int:
    return len(re.findall(r"its old connection was shut down first", pair.server_output()))


def test_dropped_connection_reconnects_to_the_live_server(tmp_path: Path) -> None:
    """Fault: the TCP connection is reset (both ends) while the guest holds an open file, cached
    lookups and an inotify watcher; while it is down the host changes the watched directory and
    a guest stat is made. Expected: the stat waits, then succeeds; the agent reconnects to the
    same server; open files go on reading and writing; the watcher gets exactly the outage's
    changes once, later host changes once each, and the guest's own changes once (no echo);
    the server lets go of the old connection's fds and threads."""
    pair = TcpPair(tmp_path)
    rec = None
    fds: list[int] = []
    try:
        d = pair.export / "dir"
        d.mkdir()
        for name, text in (("keep", "keep"), ("edit", "v1"), ("gone", "x"), ("chmod", "x")):
            (d / name).write_text(text)
        (pair.export / "big").write_bytes(b"a" * 100_000)
        pair.mount()
        m = pair.mnt
        assert sorted(os.listdir(m / "dir")) == ["chmod", "edit", "gone", "keep"]
        for n in ("keep", "edit", "gone", "chmod"):
            os.stat(m / "dir" / n)
        wfd = os.open(m / "dir" / "keep", os.O_WRONLY | os.O_APPEND)
        rfd = os.open(m / "big", os.O_RDONLY)
        rwfd = os.open(m / "rw", os.O_CREAT | os.O_RDWR, 0o644)
        fds += [wfd, rfd, rwfd]
        os.pwrite(rwfd, b"before-cut", 0)
        rec = Recorder(m, ["dir"], ino.IN_ALL_EVENTS & ~(ino.IN_OPEN | ino.IN_ACCESS
                                                         | ino.IN_CLOSE_NOWRITE))
        time.sleep(1.0)  # the injector publishes the watch to the server
        fds_before = pair.wait_stable(pair.server_fds)
        threads_before = pair.wait_stable(pair.server_threads)
        assert _disconnects(pair) == 0
        assert pair.cutter is not None

        pair.cutter.cut()
        # the server sees the reset and ends the old connection on its own
        assert wait_for(lambda: _disconnects(pair) == 1, 10), pair.server_output()
        (d / "new").write_text("created while cut")
        (d / "edit").write_text("v2 (longer)")
        (d / "gone").unlink()
        os.chmod(d / "chmod", 0o600)
        time.sleep(1.1)  # the guest's cached attributes and names (1 s) expire

        result: dict[str, object] = {}

        def during() -> None:
            start = time.monotonic()
            try:
                result["size"] = os.stat(m / "dir" / "keep").st_size
            except OSError as e:
                result["error"] = e
            result["waited"] = time.monotonic() - start

        t = threading.Thread(target=during, daemon=True)
        t.start()
        time.sleep(1.0)
        assert t.is_alive(), f"a stat during the cut did not wait: {result}\n{pair.agent_output()}"
        assert pair.agent is not None and pair.agent.poll() is None, pair.agent_output()
        pair.cutter.accept_again()
        t.join(30)
        assert not t.is_alive(), "a stat made during the cut hung"
        assert "error" not in result, result
        assert result["size"] == 4
        assert pair.cutter.accepted == 2  # the same relay, the same server: one reconnect
        assert "reconnected" in pair.agent_output()
        assert "revived" in pair.server_output()
        assert pair.server is not None and pair.server.poll() is None

        assert wait_for(lambda: rec is not None and rec.queued() > 0, 15), pair.agent_output()
        rec.drain(quiet=1.0)
        got = _names(rec)
        outage = [("IN_CREATE", "new"), ("IN_DELETE", "gone"), ("IN_MODIFY", "edit"),
                  ("IN_CLOSE_WRITE", "edit"), ("IN_ATTRIB", "chmod")]
        for ev in outage:
            assert got.count(ev) == 1, (ev, got)
        assert not any(n == "keep" for _k, n in got), got  # unchanged: no event

        # open files go on working through the new connection
        os.write(wfd, b"+guest")
        os.fsync(wfd)
        assert (d / "keep").read_text() == "keep+guest"
        assert os.pread(rfd, 10, 99_990) == b"a" * 10
        assert os.pread(rwfd, 10, 0) == b"before-cut"
        os.pwrite(rwfd, b"after-cut!", 0)
        os.fsync(rwfd)
        assert (pair.export / "rw").read_bytes() == b"after-cut!"
        assert (m / "dir" / "edit").read_text() == "v2 (longer)"
        assert not (m / "dir" / "gone").exists()

        # the guest's own change: its events once, not echoed back by either connection
        rec.raw.clear()
        (m / "dir" / "mine").write_text("guest")
        rec.drain(quiet=1.0)
        assert _names(rec).count(("IN_CREATE", "mine")) == 1, _names(rec)
        # later host changes arrive, once each (an old connection's watch would double them)
        rec.raw.clear()
        (d / "after").write_text("x")
        with open(d / "edit", "a") as f:
            f.write("+host")
        assert wait_for(lambda: rec is not None and rec.queued() > 0, 10)
        rec.drain(quiet=1.0)
        got = _names(rec)
        assert got.count(("IN_CREATE", "after")) == 1, got
        assert got.count(("IN_CLOSE_WRITE", "after")) == 1, got
        assert got.count(("IN_CLOSE_WRITE", "edit")) == 1, got

        # the server holds what one connection holds, not two
        fds_after = pair.wait_stable(pair.server_fds)
        threads_after = pair.wait_stable(pair.server_threads)
        print(f"\nserver fds {fds_before} -> {fds_after}, threads {threads_before} -> "
              f"{threads_after}; the stat during the cut waited {result['waited']:.2f} s")
        # +4: the files the guest added since (mine, after, new) and the revive's mount fd
        assert fds_after <= fds_before + 4, (fds_before, fds_after)
        assert threads_after <= threads_before + 1, (threads_before, threads_after)
        assert _disconnects(pair) == 1
        assert pair.agent.poll() is None
    finally:
        if rec is not None:
            rec.close()
        pair.close_holding(fds)


def test_cut_during_a_write_loop(tmp_path: Path) -> None:
    """Fault: the connection is cut twice while a guest thread writes without pause: first a
    reset of both ends, then a half-open cut (the agent's end is reset, the server's end stays
    open and silent until after the agent has reconnected). Expected: the writer never hangs;
    a write either succeeds or fails with EIO; every write that succeeded is on the host byte
    for byte; the server ends both old connections (the half-open one when the agent revives,
    before the revive is answered) and the agent keeps its mount."""
    pair = TcpPair(tmp_path)
    try:
        pair.mount()
        m = pair.mnt
        stop = threading.Event()
        errors: list[BaseException] = []
        counts = {"ok": 0, "eio": 0}
        written = bytearray()
        progress = threading.Event()

        def writer() -> None:
            fd = os.open(m / "loop", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                i = 0
                while not stop.is_set():
                    chunk = f"{i:08d}\n".encode() * 64
                    try:
                        os.pwrite(fd, chunk, len(written))
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        counts["eio"] += 1
                        continue
                    written.extend(chunk)
                    counts["ok"] += 1
                    progress.set()
                    i += 1
                os.fsync(fd)
            except BaseException as e:
                errors.append(e)
            finally:
                os.close(fd)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        assert pair.cutter is not None
        held_fds: list[int] = []
        fds_one = 0
        for hold in (False, True):
            progress.clear()
            assert progress.wait(10), "the writer makes no progress"
            time.sleep(0.5)
            pair.cutter.cut(hold_server_side=hold)
            time.sleep(0.5)
            pair.cutter.accept_again()
            progress.clear()
            assert progress.wait(30), f"no write succeeded after the cut: {pair.agent_output()}"
            if hold:
                # the agent has reconnected while the server's old connection was still open:
                # the server ended that one before it answered the revive (fencing)
                assert _disconnects(pair) == 2, pair.server_output()
                assert _fences(pair) == 1, pair.server_output()
                time.sleep(0.5)
                held_fds[:] = [pair.server_fds(), pair.server_threads()]
                pair.cutter.release_held()
            ended = 2 if hold else 1
            assert wait_for(lambda n=ended: _disconnects(pair) == n, 10), pair.server_output()
            if not hold:
                fds_one = pair.wait_stable(pair.server_fds)
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert not t.is_alive(), "the writer hung"
        assert not errors, errors
        assert pair.cutter.accepted == 3
        host = (pair.export / "loop").read_bytes()
        assert host == bytes(written), (len(host), len(written))
        fds_end = pair.wait_stable(pair.server_fds)
        print(f"\nwrite loop: {counts['ok']} writes, {counts['eio']} EIO over two cuts; server "
              f"fds {fds_one} with one connection, {held_fds[0]} ({held_fds[1]} threads) after "
              f"the revive fenced the half-open one, {fds_end} after the relay let it go")
        assert fds_end <= fds_one + 2, (fds_one, fds_end)
        assert pair.agent is not None and pair.agent.poll() is None, pair.agent_output()
    finally:
        pair.close()


_WRITE = 16  # FUSE_WRITE
_VERSION_A = (b"version A: the old write, retried\n" * 130)[:4096]
_VERSION_B = (b"version B: written after the retry\n" * 130)[:4096]


def _held_write(cutter: TcpCutter, data: bytes) -> int | None:
    """The unique of a held WRITE request carrying ``data``, if the relay holds one."""
    for frame in cutter.held_requests():
        opcode, unique = struct.unpack_from("=IQ", frame, 4)
        if opcode == _WRITE and frame.endswith(data):
            return int(unique)
    return None


def test_late_write_on_the_old_connection_never_runs(tmp_path: Path) -> None:
    """Fault: the guest's WRITE of version A is stuck in the network (the relay holds it) when
    the agent's end of the connection is reset; the server's end stays open and silent. The
    agent reconnects through a new relay connection, revives and retries the WRITE; the guest
    then writes version B over it and fsyncs; only then does the old WRITE reach the server, on
    the old connection. Expected: the guest's write of A waits and then succeeds; the host
    file is B (the old WRITE never runs: the server shut the old connection down when the
    session revived, before answering the revive); the guest reads B."""
    assert len(_VERSION_A) == len(_VERSION_B) == 4096
    pair = TcpPair(tmp_path)
    fd = -1
    try:
        (pair.export / "f").write_bytes(b"0" * 4096)
        pair.mount()
        assert pair.cutter is not None
        cutter = pair.cutter
        # without --writeback on the server the guest's page cache writes through: pwrite sends
        # its WRITE at once and returns with its answer
        fd = os.open(pair.mnt / "f", os.O_RDWR)
        assert os.pread(fd, 4096, 0) == b"0" * 4096
        time.sleep(0.5)  # the agent's own requests after the mount have gone through

        cutter.hold_from(_WRITE)
        result: dict[str, object] = {}

        def write_a() -> None:
            start = time.monotonic()
            try:
                result["written"] = os.pwrite(fd, _VERSION_A, 0)
            except OSError as e:
                result["error"] = e
            result["waited"] = time.monotonic() - start

        t = threading.Thread(target=write_a, daemon=True)
        t.start()
        assert wait_for(lambda: _held_write(cutter, _VERSION_A) is not None, 10), \
            cutter.held_requests()
        unique = _held_write(cutter, _VERSION_A)
        assert unique is not None
        assert t.is_alive(), result  # the guest waits for the WRITE's answer
        assert (pair.export / "f").read_bytes() == b"0" * 4096

        cutter.cut(hold_server_side=True)
        cutter.accept_again()
        t.join(30)
        assert not t.is_alive(), f"the guest's write hung: {pair.agent_output()}"
        assert result.get("written") == 4096, (result, pair.agent_output())
        assert (pair.export / "f").read_bytes() == _VERSION_A  # the retry, on the new connection
        assert cutter.accepted == 2

        os.pwrite(fd, _VERSION_B, 0)
        os.fsync(fd)
        assert (pair.export / "f").read_bytes() == _VERSION_B

        outcome = cutter.deliver_held(unique, timeout=10)
        time.sleep(0.2)
        host = (pair.export / "f").read_bytes()
        assert host == _VERSION_B, (f"the old WRITE ran after the retry and overwrote the newer "
                                    f"data (server: {outcome})")
        assert outcome == "closed", outcome
        assert os.pread(fd, 4096, 0) == _VERSION_B
        assert _fences(pair) == 1, pair.server_output()
        assert _disconnects(pair) == 1, pair.server_output()
        fence = re.search(r"dropped; (\d+) ms\)", pair.server_output())
        print(f"\nthe guest's write of A waited {result['waited']:.2f} s (held, cut, reconnect, "
              f"retry); the server fenced the old connection in "
              f"{fence.group(1) if fence else '?'} ms; the late WRITE found it {outcome}")
        assert pair.agent is not None and pair.agent.poll() is None, pair.agent_output()
    finally:
        pair.close()  # first: a close(2) whose requests the relay still holds would wait
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def test_flock_of_the_old_connection_released_on_revive(tmp_path: Path) -> None:
    """Fault: a guest process holds an flock through the connection when the agent's end is
    reset and the server's end stays open and silent (half-open). Expected: once the agent has
    reconnected, the old connection's lock is gone on the host at once (not after TCP gives
    up on it, ~30 s): another guest locker and then a host locker get it with LOCK_NB."""
    pair = TcpPair(tmp_path)
    fds: list[int] = []
    host_fd = -1
    try:
        (pair.export / "lock").write_text("x")
        pair.mount()
        assert pair.cutter is not None
        holder = os.open(pair.mnt / "lock", os.O_RDWR)
        fds.append(holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        host_fd = os.open(pair.export / "lock", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(host_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the guest's lock is on the host

        start = time.monotonic()
        pair.cutter.cut(hold_server_side=True)
        pair.cutter.accept_again()
        assert wait_for(lambda: "reconnected" in pair.agent_output(), 20), pair.agent_output()
        reconnected = time.monotonic() - start
        # another guest process: the lock is free on the host (the guest's own lock of the old
        # connection is not carried over, as after a server restart)
        other = os.open(pair.mnt / "lock", os.O_RDWR)
        fds.append(other)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
        fcntl.flock(host_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        took = time.monotonic() - start
        fcntl.flock(host_fd, fcntl.LOCK_UN)
        assert _fences(pair) == 1, pair.server_output()
        assert len(pair.cutter.held) == 1  # the old connection is still open on the relay
        print(f"\nflock of the half-open connection: agent reconnected {reconnected:.2f} s after "
              f"the cut; a guest and a host locker had the lock {took:.2f} s after it")
        assert pair.agent is not None and pair.agent.poll() is None, pair.agent_output()
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if host_fd >= 0:
            os.close(host_fd)
        pair.close()
