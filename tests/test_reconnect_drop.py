"""Fault: the agent's TCP connection drops while the server lives on.

``notifyfs serve`` listens on TCP loopback (with a token) and the agent reaches it through a
relay in this test process that forwards bytes both ways, so the test can cut the connection
when it likes: both sockets are closed with an RST (SO_LINGER 0) and the relay refuses new
connections until it is told to accept again. The server itself is never touched: the agent
must find the same live server again (its ``-o reconnect=`` default), and the server must let
go of everything the old connection held.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ServedPair, abort_fuse, requires_mount, wait_for
from notifyfs.linux import inotify as ino
from oracle import Recorder

pytestmark = [requires_mount, pytest.mark.timeout(150)]

_LINGER_RST = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST and drops unsent data


class TcpCutter:
    """A TCP relay between the agent and the server that the test can cut.

    Each accepted agent connection gets its own connection to the server and two pump threads.
    ``cut()`` stops the pumps, resets both sides and closes the listening socket (the agent's
    reconnect attempts are refused); ``accept_again()`` listens on the same port again.
    ``cut(hold_server_side=True)`` resets only the agent's side and keeps the server's side open
    and silent, as a middlebox that lost the connection would: the server's old connection stays
    alive (half-open) after the agent has reconnected, until ``release_held()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener: socket.socket | None = None
        self.port = 0
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket, list[threading.Thread]]] = []
        self.held: list[socket.socket] = []
        self.accepted = 0
        self.cutting = False  # pumps that end now must not pass the end on (no FIN)
        self.accept_again()

    def accept_again(self) -> None:
        self.cutting = False
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
            pumps = [threading.Thread(target=self._pump, args=(a, b), daemon=True, name="pump")
                     for a, b in ((agent_side, server_side), (server_side, agent_side))]
            with self.lock:
                self.pairs.append((agent_side, server_side, pumps))
                self.accepted += 1
            for t in pumps:
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        if self.cutting:
            return
        # one side ended on its own (not a cut): pass the end on
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self, hold_server_side: bool = False) -> None:
        """Reset the connections now; refuse new ones until accept_again()."""
        assert self.listener is not None
        # shutdown wakes the thread blocked in accept() (close alone would leave the socket
        # listening until that accept returned); connecting is refused from now on
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.listener = None
        self.cutting = True
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for agent_side, server_side, pumps in pairs:
            # SHUT_RD wakes the pumps' recv without sending anything to either peer
            for s in (agent_side, server_side):
                try:
                    s.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            for t in pumps:
                t.join(5)
            ends = [agent_side] if hold_server_side else [agent_side, server_side]
            for s in ends:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                s.close()
            if hold_server_side:
                self.held.append(server_side)

    def release_held(self) -> None:
        for s in self.held:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            s.close()
        self.held.clear()

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
        if pair.agent is not None and pair.agent.poll() is not None:
            abort_fuse(pair.mnt)  # a close(2) on a mount without an agent would wait
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        pair.close()


def test_cut_during_a_write_loop(tmp_path: Path) -> None:
    """Fault: the connection is cut twice while a guest thread writes without pause: first a
    reset of both ends, then a half-open cut (the agent's end is reset, the server's end stays
    open and silent until after the agent has reconnected). Expected: the writer never hangs;
    a write either succeeds or fails with EIO; every write that succeeded is on the host byte
    for byte; the server ends both old connections and the agent keeps its mount."""
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
                # the agent has reconnected while the server's old connection is still open
                assert _disconnects(pair) == 1, pair.server_output()
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
              f"fds {fds_one} with one connection, {held_fds[0]} ({held_fds[1]} threads) while "
              f"the half-open one was held, {fds_end} after it ended")
        assert fds_end <= fds_one + 2, (fds_one, fds_end)
        assert pair.agent is not None and pair.agent.poll() is None, pair.agent_output()
    finally:
        pair.close()
