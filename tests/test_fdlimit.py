"""The open files limit: the server holds one O_PATH fd per inode a guest knows, so its soft
RLIMIT_NOFILE caps how much of an export a guest can hold. ``notifyfs serve`` raises the soft
limit to the hard one; running out of fds anyway gives the guest an error, never a crash."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from conftest import ServedPair, requires_mount

pytestmark = [requires_mount, pytest.mark.timeout(120)]


def _nofile(soft: int, hard: int | None = None):  # type: ignore[no-untyped-def]
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                            if hard is None else hard))
    return set_limit


def _soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open files line in /proc/PID/limits")


def _hold(mnt: Path, names: list[str]) -> tuple[list[int], dict[int, int]]:
    """Look each name up through the mount and keep it referenced (an O_PATH fd: the guest
    kernel holds the inode, so the server holds its fd); errors by errno."""
    fds: list[int] = []
    errors: dict[int, int] = {}
    for name in names:
        try:
            fds.append(os.open(mnt / "many" / name, os.O_PATH))
        except OSError as e:
            errors[e.errno] = errors.get(e.errno, 0) + 1
    return fds, errors


def test_export_holds_more_inodes_than_a_1024_soft_limit(tmp_path: Path) -> None:
    """The server is started with a soft limit of 1024 (the usual default) under a higher hard
    limit; a guest looks up 3,000 files and keeps them referenced, then stats each. Expected:
    the server raised its soft limit to the hard one (and said so), holds an fd for each, and
    every lookup and stat succeeds."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4000:
        pytest.skip(f"the hard open files limit here ({hard}) is too low to show the difference")
    s = ServedPair(tmp_path, preexec=_nofile(1024))
    s.mount()
    assert s.server is not None
    fds: list[int] = []
    try:
        assert _soft_limit(s.server.pid) > 3000, s.server_output()
        assert "open files limit (RLIMIT_NOFILE) raised from 1024 to" in s.server_output()
        (s.export / "many").mkdir()
        names = [f"f{i:05d}" for i in range(3000)]
        for name in names:
            (s.export / "many" / name).write_bytes(name.encode())
        fds, errors = _hold(s.mnt, names)
        assert not errors, errors
        sizes = {os.stat(fd).st_size for fd in fds}
        assert sizes == {6}
        held = len(os.listdir(f"/proc/{s.server.pid}/fd"))
        assert held > 3000, held
        print(f"\nserver holds {held} fds for 3,000 guest inodes (soft limit "
              f"{_soft_limit(s.server.pid)})")
    finally:
        for fd in fds:
            os.close(fd)
        s.close()


@pytest.mark.parametrize("max_inodes", ["default", "explicit"])
def test_out_of_fds_is_an_error_for_the_guest(tmp_path: Path, max_inodes: str) -> None:
    """The server's hard limit is 200 fds. With the default --max-inodes, the server lowers it to
    what the fds allow, so the guest's lookups past it get ENFILE from that limit; with an
    explicit --max-inodes far above, the lookups run the process out of fds and get EMFILE.
    Either way the server logs why (once, not per request), stays up, and what the guest
    already holds keeps working."""
    args = ("--max-inodes", "100000") if max_inodes == "explicit" else ()
    s = ServedPair(tmp_path, *args, preexec=_nofile(200, 200))
    s.mount()
    assert s.server is not None
    fds: list[int] = []
    try:
        (s.export / "many").mkdir()
        names = [f"f{i:03d}" for i in range(400)]
        for name in names:
            (s.export / "many" / name).write_bytes(b"x")
        fds, errors = _hold(s.mnt, names)
        want = errno.ENFILE if max_inodes == "default" else errno.EMFILE
        assert set(errors) == {want}, errors
        assert 50 < len(fds) < 200, len(fds)
        assert s.server.poll() is None, s.server_output()
        out = s.server_output()
        if max_inodes == "default":
            assert "--max-inodes: 150 per agent (what the open files limit of 200 allows)" in out
            assert out.count("(the limit, --max-inodes)") == 1, out
        else:
            assert "--max-inodes 100000 is more than the open files limit (200)" in out
            assert out.count("out of file descriptors") == 1, out
        # what the guest holds still works, and so does the server for it
        assert {os.stat(fd).st_size for fd in fds} == {1}
        if max_inodes == "default":  # the fds kept free for open files are still free
            assert (s.mnt / "many" / "f000").read_bytes() == b"x"
    finally:
        for fd in fds:
            os.close(fd)
        s.close()
