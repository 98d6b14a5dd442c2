"""What every benchmark part needs: the notifyfs processes under test, process counters, the
guest watcher subprocess, percentiles and met / not met."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    """Sizes of everything: ``quick`` is a smoke run of about two minutes, else the full run."""

    quick: bool
    out: Path
    work: Path
    sshfs: str = "auto"  # auto: install if missing; skip: leave that column out
    latency_events: int = 1000
    poll_events: int = 200
    throughput_files: int = 100_000
    scale_dirs: tuple[int, ...] = (1_000, 10_000, 100_000)
    scale_latency_events: int = 200
    meta_files: int = 10_000
    seq_bytes: int = 1 << 30
    tar_files: int = 3000
    notes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, quick: bool, out: Path, work: Path, sshfs: str) -> Config:
        if not quick:
            return cls(quick, out, work, sshfs)
        return cls(quick, out, work, sshfs, latency_events=200, poll_events=40,
                   throughput_files=5_000, scale_dirs=(1_000, 5_000), scale_latency_events=50,
                   meta_files=1_000, seq_bytes=64 << 20, tar_files=500)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of ``values`` (nearest rank), in the unit they came in."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))]

    return {"n": len(s), "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": s[-1]}


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "not met")


# --- processes ---------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def inotify_watches(pid: int) -> int:
    """Inotify watches held by ``pid`` (lines of its inotify fds' fdinfo)."""
    n = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                n += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return n


def fuse_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                return True
    return False


def wait_until(cond: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def unmount(path: Path) -> None:
    if fuse_mounted(path):
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
    if fuse_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Notifyfs:
    """``notifyfs serve SRC`` and ``notifyfs mount`` as two processes, so that the server's and
    the agent's CPU time and memory can be told apart."""

    def __init__(self, src: Path, mnt: Path, *server_args: str, log: Path) -> None:
        self.src, self.mnt, self.log = src, mnt, log
        self.sock = mnt.parent / f"{mnt.name}.sock"
        self.server_args = server_args
        self.server: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Notifyfs:
        self.src.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        out = open(self.log, "ab")  # noqa: SIM115 - the children keep it
        try:
            self.server = subprocess.Popen(
                [PY, "-m", "notifyfs", "serve", str(self.src), "--listen", f"unix:{self.sock}",
                 *self.server_args], stdout=out, stderr=subprocess.STDOUT)
            if not wait_until(lambda: self.sock.exists() or self.server.poll() is not None, 20):
                raise RuntimeError(f"notifyfs serve did not listen; see {self.log}")
            self.agent = subprocess.Popen(
                [PY, "-m", "notifyfs", "mount", "-f", f"unix:{self.sock}", str(self.mnt)],
                stdout=out, stderr=subprocess.STDOUT)
            if not wait_until(lambda: fuse_mounted(self.mnt) or self.agent.poll() is not None, 20):
                raise RuntimeError(f"notifyfs mount did not mount; see {self.log}")
            if self.agent.poll() is not None or self.server.poll() is not None:
                raise RuntimeError(f"notifyfs exited early; see {self.log}")
        except BaseException:
            self.__exit__()
            raise
        finally:
            out.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(15)
            except subprocess.TimeoutExpired:
                subprocess.run(["umount", "-f", str(self.mnt)], check=False, capture_output=True)
                self.agent.kill()
                self.agent.wait(5)
        unmount(self.mnt)
        stop(self.server)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()

    @property
    def server_pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    @property
    def agent_pid(self) -> int:
        assert self.agent is not None
        return self.agent.pid

    def usage(self) -> dict[str, float]:
        """CPU seconds and RSS of both processes now."""
        return {"server_cpu": cpu_seconds(self.server_pid), "agent_cpu": cpu_seconds(self.agent_pid),
                "server_rss": rss_bytes(self.server_pid), "agent_rss": rss_bytes(self.agent_pid)}


# --- the watcher subprocess ------------------------------------------------------------------
class Watcher:
    """A ``notifyfs.bench.watcher`` process: an ordinary inotify (or polling) watcher whose lines
    the benchmark reads; every time in them is CLOCK_MONOTONIC, shared by all processes."""

    def __init__(self, root: Path, mode: str = "inotify", report: str = "each",
                 interval: float = 0.1) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "notifyfs.bench.watcher", str(root), "--mode", mode, "--report", report,
             "--interval", str(interval)], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready: dict[str, float] = {}

    def lines(self, timeout: float) -> Iterator[str]:
        """Lines as they come, until ``timeout`` passes without one."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                yield line.decode()
            r, _, _ = select.select([self.fd], [], [], timeout)
            if not r:
                return
            data = os.read(self.fd, 1 << 20)
            if not data:
                return
            self.buf += data

    def wait_ready(self, timeout: float) -> dict[str, float]:
        for line in self.lines(timeout):
            if line.startswith("ready "):
                self.ready = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
                return self.ready
        raise RuntimeError("the watcher did not get ready")

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop(self.proc, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def raised_watch_limit(needed: int, notes: list[str]) -> Iterator[None]:
    """Raise fs.inotify.max_user_watches for a run that needs more, and put it back after."""
    path = "/proc/sys/fs/inotify/max_user_watches"
    try:
        with open(path) as f:
            old = int(f.read())
    except OSError:
        yield
        return
    if needed <= old:
        yield
        return
    try:
        with open(path, "w") as f:
            f.write(str(needed))
        notes.append(f"fs.inotify.max_user_watches raised from {old} to {needed} for the run "
                     "(guest watcher and server each hold one watch per directory)")
    except OSError as e:
        notes.append(f"cannot raise fs.inotify.max_user_watches ({old}): {e}")
        yield
        return
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(old))
