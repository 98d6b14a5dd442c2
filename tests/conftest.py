"""Shared fixtures: real mounts through real notifyfs processes, always unmounted afterwards."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NOTIFYFS = [sys.executable, "-m", "notifyfs"]


def fuse_mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse"):
                out.append(fields[4].encode().decode("unicode_escape"))
    return out


def is_mounted(path: str | Path) -> bool:
    return os.path.realpath(path) in fuse_mounts()


def wait_for(cond, timeout: float = 10.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def force_unmount(path: str | Path) -> None:
    """Unmount whatever is left; -f aborts the FUSE connection first, which also frees a process
    stuck waiting on its own mount."""
    if is_mounted(path):
        subprocess.run(["umount", "-f", str(path)], check=False, capture_output=True)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def abort_fuse(path: str | Path) -> None:
    """Abort the FUSE connection mounted at ``path`` through fusectl, without touching the mount
    itself (a stat or a fork that closes inherited files would wait on it), then detach it."""
    conns = "/sys/fs/fuse/connections"
    if not os.listdir(conns):
        subprocess.run(["mount", "-t", "fusectl", "none", conns], check=False, capture_output=True)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == os.path.abspath(path):
                try:
                    with open(f"{conns}/{parts[2].split(':')[1]}/abort", "w") as a:
                        a.write("1")
                except OSError:
                    pass
    force_unmount(path)


def can_mount() -> str | None:
    """None if this machine can run FUSE mounts as the tests do, else the reason it cannot."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "FUSE tests mount with mount(2) and need root"
    return None


requires_mount = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")


@dataclass
class Share:
    """A running ``notifyfs share SRC MNT`` process."""

    src: Path
    mnt: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                force_unmount(self.mnt)  # aborts the connection: nothing can stay stuck on it
                self.proc.kill()
                self.proc.wait(5)
        force_unmount(self.mnt)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_share(src: Path, mnt: Path, *args: str, log: Path | None = None) -> Share:
    src.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    log = log or mnt.parent / f"{mnt.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*NOTIFYFS, "-v", "share", str(src), str(mnt), *args],
                                stdout=out, stderr=subprocess.STDOUT)
    share = Share(src, mnt, proc, log)
    if not wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, timeout=20):
        share.stop()
        raise RuntimeError(f"share did not mount: {share.output()}")
    if proc.poll() is not None:
        share.stop()
        raise RuntimeError(f"share exited {proc.returncode}: {share.output()}")
    return share


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Share]:
    """A share of ``tmp_path/src`` at ``tmp_path/mnt`` (the default for tests)."""
    reason = can_mount()
    if reason:
        pytest.skip(reason)
    s = start_share(tmp_path / "src", tmp_path / "mnt")
    try:
        yield s
    finally:
        s.stop()


class ServedPair:
    """``notifyfs serve`` and ``notifyfs mount -f`` as two processes, over a unix socket unless
    ``listen`` says otherwise; the server can be killed and started again on the same address.

    Both run with ``-v``; the server's stderr goes to ``server.log`` (appended across restarts),
    the agent's to ``agent.log`` (files, not pipes: a pipe nobody reads would block a chatty
    process). ``address`` is what the agent connects to (a test may put a relay in between);
    ``preexec`` runs in the server's process before it starts (to set its limits)."""

    def __init__(self, tmp: Path, *serve_args: str, env: dict[str, str] | None = None,
                 listen: str | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.export = tmp / "export"
        self.mnt = tmp / "mnt"
        self.sock = tmp / "notifyfs.sock"
        self.log = tmp / "server.log"
        self.agent_log = tmp / "agent.log"
        self.export.mkdir()
        self.mnt.mkdir()
        self.serve_args = serve_args
        self.env = env
        self.listen = listen or f"unix:{self.sock}"
        self.address = self.listen
        self.preexec = preexec
        self.server: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.start_server()

    def start_server(self) -> None:
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen(
                [*NOTIFYFS, "-v", "serve", str(self.export), "--listen", self.listen,
                 *self.serve_args], stderr=log, env=self.env, preexec_fn=self.preexec)
        server = self.server
        assert wait_for(lambda: self._listening() or server.poll() is not None, 10)
        assert server.poll() is None, f"server did not listen: {self.server_output()}"

    def _listening(self) -> bool:
        kind, _, rest = self.listen.partition(":")
        try:
            if kind == "tcp":
                host, _, port = rest.rpartition(":")
                socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
                return True
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(rest)
            return True
        except OSError:
            return False

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(10)

    def mount(self, *args: str) -> subprocess.Popen[bytes]:
        with open(self.agent_log, "ab") as log:
            agent = self.agent = subprocess.Popen(
                [*NOTIFYFS, "-v", "mount", self.address, str(self.mnt), "-f", *args],
                stderr=log, env=self.env)
        assert wait_for(lambda: is_mounted(self.mnt) or agent.poll() is not None, 15)
        assert is_mounted(self.mnt), self.agent_output()
        return agent

    def server_output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def agent_output(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log.exists() else ""

    def close_holding(self, fds: list[int]) -> None:
        """close(), after closing ``fds`` (the guest's open files on the mount): a close(2) on a
        mount whose agent is gone would wait, so its connection is aborted first."""
        if self.agent is not None and self.agent.poll() is not None:
            abort_fuse(self.mnt)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        for p in (self.agent, self.server):
            if p is not None and p.poll() is None:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    # a thread of it waits on its own mount, in a lock no signal breaks:
                    # abort the connection (no stat of the mountpoint, no fork: both would
                    # wait on the mount too)
                    abort_fuse(self.mnt)
                    p.wait(10)
        force_unmount(self.mnt)


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every path under ``root``: type, mode, owner, size, links, mtime, ctime, content, xattrs."""
    out: dict[str, tuple[Any, ...]] = {}

    def one(p: str) -> None:
        st = os.lstat(p)
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if not stat.S_ISLNK(st.st_mode):
            xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                  for n in os.listxattr(p, follow_symlinks=False)))
        content: bytes | None = None
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                content = f.read()
        elif stat.S_ISLNK(st.st_mode):
            content = os.fsencode(os.readlink(p))
        out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                                         st.st_mtime_ns, st.st_ctime_ns, content, xattrs)

    one(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            one(os.path.join(dirpath, name))
    return out
