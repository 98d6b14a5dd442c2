"""Shared fixtures: real mounts through real notifyfs processes, always unmounted afterwards."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
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
