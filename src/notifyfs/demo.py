"""``notifyfs demo``: share a temporary directory and show remote events arriving live.

It starts ``notifyfs share`` as a child process (exactly what a user would run), puts an
ordinary inotify watcher on the mount (the guest's side), changes files directly in the shared
directory (the host's side), and prints each event the guest watcher receives as it arrives.
Then it changes a file through the mount, to show that the guest's own changes come once.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time

from .linux import inotify as ino
from .linux.mount import mount_id

MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MODIFY | ino.IN_ATTRIB | ino.IN_CLOSE_WRITE
        | ino.IN_MOVED_FROM | ino.IN_MOVED_TO)


def _mounted(path: str) -> bool:
    return mount_id(path) >= 0


class _Watcher:
    def __init__(self, root: str) -> None:
        self.inotify = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
        self.paths = {self.inotify.add_watch(root, MASK): ""}
        self.root = root
        self.poller = select.poll()
        self.poller.register(self.inotify.fd, select.POLLIN)
        self.count = 0

    def add(self, rel: str) -> None:
        self.paths[self.inotify.add_watch(os.path.join(self.root, rel), MASK)] = rel + "/"

    def show(self, started: float, wait: float = 0.5) -> None:
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poller.poll(left * 1000):
                return
            try:
                events = self.inotify.read()
            except BlockingIOError:
                continue
            ms = (time.monotonic() - started) * 1000
            for e in events:
                self.count += 1
                name = self.paths.get(e.wd, "?") + e.name.decode(errors="replace")
                cookie = f" cookie={e.cookie}" if e.cookie else ""
                print(f"    guest watcher: {ino.mask_names(e.mask):<18} {name}{cookie}"
                      f"   (+{ms:.1f} ms)", flush=True)


def demo() -> int:
    base = tempfile.mkdtemp(prefix="notifyfs-demo-")
    host, guest = os.path.join(base, "host"), os.path.join(base, "guest")
    os.mkdir(host)
    os.mkdir(os.path.join(host, "docs"))
    os.mkdir(guest)
    print(f"notifyfs demo: sharing {host} (the host side) at {guest} (the guest side)")
    proc = subprocess.Popen([sys.executable, "-m", "notifyfs", "share", host, guest])
    try:
        deadline = time.monotonic() + 20
        while not _mounted(guest):
            if proc.poll() is not None or time.monotonic() > deadline:
                print("notifyfs demo: the share did not come up", file=sys.stderr)
                return 1
            time.sleep(0.05)
        watcher = _Watcher(guest)
        watcher.add("docs")
        print("a guest program watches the mount with inotify; now the host changes files:\n")

        def step(what: str, action) -> None:  # type: ignore[no-untyped-def]
            print(f"  host: {what}", flush=True)
            started = time.monotonic()
            action()
            watcher.show(started)

        h = os.path.join
        step("echo hello > notes.txt", lambda: _write(h(host, "notes.txt"), "hello\n"))
        step("echo more >> notes.txt", lambda: _write(h(host, "notes.txt"), "more\n", "a"))
        step("chmod 600 notes.txt", lambda: os.chmod(h(host, "notes.txt"), 0o600))
        step("mv notes.txt docs/notes.md",
             lambda: os.rename(h(host, "notes.txt"), h(host, "docs", "notes.md")))
        step("mkdir build", lambda: os.mkdir(h(host, "build")))
        step("rm docs/notes.md", lambda: os.unlink(h(host, "docs", "notes.md")))
        remote = watcher.count
        watcher.add("build")
        print("\nand the guest changes a file through the mount (its own events, once, no echo):")
        started = time.monotonic()
        print("  guest: echo hi > build/out.txt", flush=True)
        _write(h(guest, "build", "out.txt"), "hi\n")
        watcher.show(started)
        own = watcher.count - remote
        with open(h(host, "build", "out.txt")) as f:
            ok = remote >= 9 and own == 3 and f.read() == "hi\n"
        print(f"\nnotifyfs demo: {remote} remote events delivered to an unmodified inotify watcher;",
              "the host sees the guest's file" if ok else "SOMETHING WENT WRONG")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if _mounted(guest):
            subprocess.run(["umount", "-l", guest], check=False)
        subprocess.run(["rm", "-rf", base], check=False)


def _write(path: str, text: str, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(text)
