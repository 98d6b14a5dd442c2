"""The differential oracle: the local kernel says which events a change must produce.

The same scripted changes are applied (a) to a local directory watched locally and (b) to the
export on the host while the mount is watched in the guest. After mapping watch descriptors to
paths and cookies to ordinals the two event lists must be identical.
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from notifyfs.linux import inotify as ino

COMMON = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MODIFY | ino.IN_ATTRIB | ino.IN_CLOSE_WRITE
          | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF)
ALL = ino.IN_ALL_EVENTS

Event = tuple[str, str, str, int | None]  # (watched path, mask names, name, cookie ordinal)


@dataclass
class Scenario:
    name: str
    setup: Callable[[Path], None]
    watches: list[str]
    script: Callable[[Path], None]
    outside: bool = False  # the script also uses root.parent / "outside-<name>"
    quiet: float = 0.4  # how long without events means the guest is done
    extra: dict[str, object] = field(default_factory=dict)


class Recorder:
    """A real inotify watcher over some paths below a root."""

    def __init__(self, root: Path, watches: list[str], mask: int) -> None:
        self.root = root
        self.inotify = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
        self.paths: dict[int, str] = {}
        for rel in watches:
            wd = self.inotify.add_watch(str(root / rel) if rel else str(root), mask)
            self.paths[wd] = rel or "."
        self.raw: list[ino.Event] = []

    def queued(self) -> int:
        buf = array.array("i", [0])
        fcntl.ioctl(self.inotify.fd, termios.FIONREAD, buf)
        return buf[0]

    def drain(self, quiet: float, timeout: float = 20.0) -> None:
        """Wait until the queue stopped growing for ``quiet`` seconds, then read it all.

        Not reading while events arrive lets the kernel coalesce identical consecutive events
        exactly as it does for the local run, which is read only at the end.
        """
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.queued()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.02)
        while True:
            try:
                self.raw.extend(ino.parse_events(os.read(self.inotify.fd, 1 << 20)))
            except BlockingIOError:
                return

    def events(self) -> list[Event]:
        cookies: dict[int, int] = {}
        out: list[Event] = []
        for ev in self.raw:
            cookie = None
            if ev.cookie:
                cookie = cookies.setdefault(ev.cookie, len(cookies))
            out.append((self.paths.get(ev.wd, f"wd{ev.wd}"), ino.mask_names(ev.mask),
                        ev.name.decode(errors="replace"), cookie))
        return out

    def close(self) -> None:
        self.inotify.close()


def run_local(scn: Scenario, base: Path, mask: int) -> list[Event]:
    root = base / "local"
    root.mkdir()
    scn.setup(root)
    rec = Recorder(root, scn.watches, mask)
    try:
        scn.script(root)
        rec.drain(0.1)
        return rec.events()
    finally:
        rec.close()


def run_remote(scn: Scenario, src: Path, mnt: Path, mask: int, via_mount: bool = False) -> list[Event]:
    """Watch through the mount (the scenario's setup was made on the host before mounting),
    change on the host (or, with ``via_mount``, through the mount: the echo test)."""
    rec = Recorder(mnt, scn.watches, mask)
    try:
        scn.script(mnt if via_mount else src)
        rec.drain(scn.quiet)
        return rec.events()
    finally:
        rec.close()
