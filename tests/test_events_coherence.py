"""When a guest watcher receives a remote event, the guest already sees the new state; and the
``--events local`` mode gives only the guest's own events."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from conftest import can_mount, start_share

from notifyfs.linux import inotify as ino

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")


def _wait_event(fd: int, kind: int, name: bytes, timeout: float = 10.0,
                what: object = "") -> ino.Event:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not poller.poll(100):
            continue
        for e in ino.parse_events(os.read(fd, 1 << 16)):
            if e.mask & kind and e.name == name:
                return e
    raise AssertionError(f"no {ino.mask_names(kind)} for {name!r} {what}")


@pytest.mark.timeout(60)
def test_state_is_current_when_the_event_arrives(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    (src / "f").write_text("old")
    # long cache timeouts: only precise invalidation can make this pass
    share = start_share(src, mnt, "--entry-timeout", "60", "--attr-timeout", "60")
    w = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
    try:
        assert (mnt / "f").read_text() == "old"  # cached in the guest now
        w.add_watch(str(mnt), ino.IN_ALL_EVENTS)
        for i in range(20):
            text = f"version {i} " * (i + 1)
            (src / "f").write_text(text)
            _wait_event(w.fd, ino.IN_CLOSE_WRITE, b"f", what=i)
            assert (mnt / "f").read_text() == text
            assert (mnt / "f").stat().st_size == len(text)
        (src / "new").write_text("n")
        _wait_event(w.fd, ino.IN_CREATE, b"new")
        assert "new" in os.listdir(mnt) and (mnt / "new").exists()
        os.rename(src / "new", src / "renamed")
        _wait_event(w.fd, ino.IN_MOVED_TO, b"renamed")
        assert not (mnt / "new").exists() and (mnt / "renamed").read_text() == "n"
        os.chmod(src / "renamed", 0o600)
        _wait_event(w.fd, ino.IN_ATTRIB, b"renamed")
        assert (mnt / "renamed").stat().st_mode & 0o777 == 0o600
        os.unlink(src / "renamed")
        _wait_event(w.fd, ino.IN_DELETE, b"renamed")
        assert not (mnt / "renamed").exists() and "renamed" not in os.listdir(mnt)
    finally:
        w.close()
        share.stop()


@pytest.mark.timeout(60)
def test_events_local_mode_gives_only_the_guests_own(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    share = start_share(src, mnt, "--events", "local")
    w = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
    try:
        w.add_watch(str(mnt), ino.IN_CREATE)
        (src / "from-host").write_text("x")
        time.sleep(1.5)
        poller = select.poll()
        poller.register(w.fd, select.POLLIN)
        assert not poller.poll(0), "a remote event arrived although --events local"
        (mnt / "from-guest").write_text("y")
        _wait_event(w.fd, ino.IN_CREATE, b"from-guest", timeout=5)
    finally:
        w.close()
        share.stop()
