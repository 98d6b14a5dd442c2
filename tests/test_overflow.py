"""A genuine host inotify queue overflow, and the server's repair of it.

``notifyfs serve`` is stopped with SIGSTOP while the host makes more changes than its inotify
queue holds (``/proc/sys/fs/inotify/max_queued_events``, read, never changed: other tests run
at the same time), then continued. The kernel drops what does not fit and queues IN_Q_OVERFLOW;
the server must rescan what the guest watches and send the difference. Checked from the guest:

* a recursive inotify watcher on the mount, whose view (the listing it started from, changed only
  by the events it reads) must end up exactly the host's tree, and which must have been told of
  every pre-existing file whose content changed;
* the mount's own listing (the guest's caches were invalidated);
* after the repair, new host changes (CREATE, MODIFY, DELETE) still arrive, in the flat directory,
  in a nested one, and in a directory that the rescan itself announced.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import NOTIFYFS, abort_fuse, force_unmount, is_mounted, requires_mount, wait_for
from notifyfs.linux import inotify as ino

pytestmark = [requires_mount, pytest.mark.timeout(120)]

GUEST_MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MODIFY | ino.IN_ATTRIB | ino.IN_CLOSE_WRITE
              | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
              | ino.IN_ONLYDIR)
#: a backlog of ~20,000 injected events drains in 10-20 s on a loaded 2-core machine
CONVERGE_SECONDS = 60.0


def _max_queued() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


class Pair:
    """``notifyfs serve`` and ``notifyfs mount -f`` as two processes, so that the server alone
    can be stopped."""

    def __init__(self, tmp: Path) -> None:
        self.export, self.mnt = tmp / "export", tmp / "mnt"
        self.sock, self.log = tmp / "notifyfs.sock", tmp / "server.log"
        self.export.mkdir()
        self.mnt.mkdir()
        self.server: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # both processes append to one log (O_APPEND: neither overwrites the other's lines)
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen(
                [*NOTIFYFS, "-v", "serve", str(self.export), "--listen", f"unix:{self.sock}",
                 "--watcher", "inotify"], stderr=log)
        assert wait_for(self._listening, 15), self.output()
        with open(self.log, "ab") as log:
            self.agent = subprocess.Popen(
                [*NOTIFYFS, "-v", "mount", f"unix:{self.sock}", str(self.mnt), "-f"], stderr=log)
        assert wait_for(lambda: is_mounted(self.mnt) or self.agent.poll() is not None, 15)
        assert is_mounted(self.mnt), self.output()

    def _listening(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.sock))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGCONT)  # in case the test failed while it was stopped
        for p in (self.agent, self.server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    abort_fuse(self.mnt)
                    p.kill()
                    p.wait(10)
        force_unmount(self.mnt)


class GuestView:
    """A recursive inotify watcher on the mount, as file watchers are: it lists the tree once, then
    knows only what its events say (a new directory is watched and listed when it appears)."""

    def __init__(self, root: Path, listing: set[str]) -> None:
        """``listing``: the tree as it is now (read on the host: a listing through the mount
        would open the directories on the host, which the test uses to see the server read them
        for its snapshots)."""
        self.root = root
        self.inotify = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
        self.paths: dict[int, str] = {}  # wd -> path relative to root ("" for root)
        self.view: set[str] = set(listing)
        self.events: list[tuple[float, str, str]] = []  # (arrival, kind, path)
        self.overflowed = False
        self.lock = threading.Lock()
        dirs = [p for p in listing if (root / p).is_dir()]  # lookups only: no directory opened
        for d in ["", *sorted(dirs)]:
            self.paths[self.inotify.add_watch(str(root / d), GUEST_MASK)] = d
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _add_tree(self, rel: str) -> None:
        stack = [rel]
        while stack:
            d = stack.pop()
            try:
                wd = self.inotify.add_watch(str(self.root / d), GUEST_MASK)
            except OSError:
                continue  # gone already: its removal is an event of its parent
            self.paths[wd] = d
            try:
                with os.scandir(self.root / d) as it:
                    for e in it:
                        p = f"{d}/{e.name}" if d else e.name
                        self.view.add(p)
                        if e.is_dir(follow_symlinks=False):
                            stack.append(p)
            except OSError:
                continue

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.inotify.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                batch = list(ino.parse_events(os.read(self.inotify.fd, 1 << 20)))
            except BlockingIOError:
                continue
            now = time.monotonic()
            with self.lock:
                for ev in batch:
                    self._apply(now, ev)

    def _apply(self, now: float, ev: ino.Event) -> None:
        if ev.mask & ino.IN_Q_OVERFLOW:
            self.overflowed = True
            return
        if ev.mask & ino.IN_IGNORED:
            self.paths.pop(ev.wd, None)
            return
        base = self.paths.get(ev.wd)
        if base is None or not ev.name:
            return
        path = f"{base}/{os.fsdecode(ev.name)}" if base else os.fsdecode(ev.name)
        kind = ino.mask_names(ev.mask & ~ino.IN_ISDIR)
        self.events.append((now, kind, path))
        if ev.mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
            self.view.add(path)
            if ev.mask & ino.IN_ISDIR:
                self._add_tree(path)
        elif ev.mask & (ino.IN_DELETE | ino.IN_MOVED_FROM):
            self.view.discard(path)
            under = path + "/"
            self.view -= {p for p in self.view if p.startswith(under)}

    def snapshot(self) -> set[str]:
        with self.lock:
            return set(self.view)

    def seen(self, kinds: set[str], since: float = 0.0) -> set[str]:
        with self.lock:
            return {p for t, k, p in self.events if t >= since and k in kinds}

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        self.inotify.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def _tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.add(name if rel == "." else f"{rel}/{name}")
    return out


def _write(path: Path, data: str) -> None:
    with open(path, "a") as f:
        f.write(data)


def _make(d: Path, names: list[str], data: str = "v1") -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_text(data)


def _host_dirs_read(export: Path, dirs: list[str]) -> threading.Event:
    """Set once the server has read each of ``dirs`` on the host: it does so when the guest
    starts watching one (the snapshot an overflow is diffed against). The close says the read
    is over (a stop in the middle of it would make the test's changes part of the snapshot)."""
    host = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
    wds = {host.add_watch(str(export / d), ino.IN_CLOSE_NOWRITE | ino.IN_ONLYDIR): d for d in dirs}
    done = threading.Event()

    def run() -> None:
        left = set(dirs)
        deadline = time.monotonic() + 30
        try:
            while left and time.monotonic() < deadline:
                r, _, _ = select.select([host.fd], [], [], 0.1)
                if not r:
                    continue
                for ev in ino.parse_events(os.read(host.fd, 1 << 16)):
                    if not ev.name and ev.wd in wds:
                        left.discard(wds[ev.wd])
            if not left:
                done.set()
        finally:
            host.close()

    threading.Thread(target=run, daemon=True).start()
    return done


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _overflow_while(pair: Pair, change: Callable[[], None]) -> None:
    """Stop the server, make ``change`` on the host, continue the server."""
    assert pair.server is not None
    pair.server.send_signal(signal.SIGSTOP)
    # the signal is delivered asynchronously: events the server still read would not be lost
    assert wait_for(lambda: _state(pair.server.pid) == "T", 10), "the server did not stop"
    try:
        change()
    finally:
        pair.server.send_signal(signal.SIGCONT)


def _converged(view: GuestView, export: Path, top: str) -> bool:
    return view.snapshot() == _tree(export / top)


def _diff(view: GuestView, export: Path, top: str) -> str:
    guest, host = view.snapshot(), _tree(export / top)
    return (f"guest has {len(guest)}, host {len(host)}; only in the guest: "
            f"{sorted(guest - host)[:20]}; only on the host: {sorted(host - guest)[:20]}")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def test_overflow_flat_directory_is_repaired_and_events_keep_coming(pair: Pair) -> None:
    """Fault: the server's queue overflows while one watched directory gets thousands of new
    files, then (events dropped) deletions, modifications, renames and a chmod of files that
    existed before, and deletions of files created before the overflow point."""
    w = pair.export / "w"
    pre = [f"pre{i:03d}" for i in range(100)]
    _make(w, pre)
    listing = _tree(w)  # before the host watch below: the listing opens the directory
    read = _host_dirs_read(pair.export, ["w"])
    pair.start()
    view = GuestView(pair.mnt / "w", listing)
    try:
        assert read.wait(30), "the server never snapshotted the watched directory"
        # three host events per file (CREATE, OPEN, CLOSE_WRITE): this overflows the queue
        bulk = _max_queued() // 3 + 1500
        early = [f"early{i}" for i in range(10)]

        def change() -> None:
            _make(w, early)  # queued before the overflow point
            for i in range(bulk):
                os.close(os.open(w / f"b{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
            # everything from here is dropped by the kernel: only the rescan can tell
            for n in early[:5]:
                (w / n).unlink()
            for n in pre[:20]:
                _write(w / n, "v2")
            for n in pre[20:40]:
                (w / n).unlink()
            os.rename(w / pre[40], w / "pre040.renamed")
            os.rename(w / pre[41], w / pre[42])  # replaces pre042 by another inode
            os.chmod(w / pre[43], 0o600)

        t_cont = time.monotonic()
        _overflow_while(pair, change)
        assert wait_for(lambda: "queue overflowed" in pair.output(), 20), \
            "no genuine overflow happened: the test proves nothing\n" + pair.output()[-3000:]
        assert wait_for(lambda: _converged(view, pair.export, "w"), CONVERGE_SECONDS, 0.2), \
            _diff(view, pair.export, "w")
        assert not view.overflowed, "the guest watcher's own queue overflowed"
        # the content changes the kernel dropped were sent by the rescan
        # (the listing can be right while content events are still queued in the injector)
        assert wait_for(lambda: set(pre[:20]) <= view.seen({"MODIFY", "CLOSE_WRITE"}, t_cont)
                        and pre[43] in view.seen({"ATTRIB"}, t_cont), CONVERGE_SECONDS, 0.2), \
            (sorted(set(pre[:20]) - view.seen({"MODIFY", "CLOSE_WRITE"}, t_cont)),
             pre[43] in view.seen({"ATTRIB"}, t_cont))
        assert sorted(os.listdir(pair.mnt / "w")) == sorted(os.listdir(w))

        # after the repair, the watcher still works: every kind of change still arrives
        t_after = time.monotonic()
        (w / "after").write_text("new")
        _write(w / pre[99], "v3")
        (w / pre[98]).unlink()
        assert wait_for(lambda: "after" in view.seen({"CREATE"}, t_after)
                        and pre[99] in view.seen({"MODIFY"}, t_after)
                        and pre[98] in view.seen({"DELETE"}, t_after), 20), \
            (view.events[-10:], pair.output()[-3000:])
        assert wait_for(lambda: _converged(view, pair.export, "w"), 20, 0.2), \
            _diff(view, pair.export, "w")
    finally:
        view.close()


def test_overflow_in_a_watched_tree_is_repaired(pair: Pair) -> None:
    """Fault: the overflow happens while a watched tree changes below the top directory: files
    come and go in nested directories, a watched directory is removed with its files, another is
    renamed, a new one is made and filled. The guest's recursive view must become the host's tree,
    and each nested directory (old, renamed, or new) must still deliver events afterwards."""
    t = pair.export / "t"
    _make(t / "filler", [])
    _make(t / "sub", [f"s{i:02d}" for i in range(50)])
    _make(t / "sub" / "deep", [f"d{i:02d}" for i in range(20)])
    _make(t / "sub" / "gone", [f"g{i}" for i in range(5)])
    _make(t / "sub" / "moveme", [f"m{i}" for i in range(5)])
    dirs = ["t", "t/filler", "t/sub", "t/sub/deep", "t/sub/gone", "t/sub/moveme"]
    listing = _tree(t)  # before the host watch below: the listing opens the directories
    read = _host_dirs_read(pair.export, dirs)
    pair.start()
    view = GuestView(pair.mnt / "t", listing)
    try:
        assert read.wait(30), "the server never snapshotted every watched directory"
        bulk = _max_queued() // 3 + 1500

        def change() -> None:
            for i in range(bulk):
                os.close(os.open(t / "filler" / f"b{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
            sub = t / "sub"
            _make(sub, [f"snew{i}" for i in range(30)])
            for i in range(10):
                (sub / f"s{i:02d}").unlink()
            for i in range(10, 20):
                _write(sub / f"s{i:02d}", "v2")
            _make(sub / "deep", [f"dnew{i}" for i in range(5)])
            for i in range(5):
                (sub / "deep" / f"d{i:02d}").unlink()
            _write(sub / "deep" / "d05", "v2")
            for n in os.listdir(sub / "gone"):
                (sub / "gone" / n).unlink()
            (sub / "gone").rmdir()
            os.rename(sub / "moveme", sub / "moved")
            _make(sub / "newdir", ["n0", "n1", "n2"])

        t_cont = time.monotonic()
        _overflow_while(pair, change)
        assert wait_for(lambda: "queue overflowed" in pair.output(), 20), \
            "no genuine overflow happened: the test proves nothing\n" + pair.output()[-3000:]
        assert wait_for(lambda: _converged(view, pair.export, "t"), CONVERGE_SECONDS, 0.2), \
            _diff(view, pair.export, "t")
        assert not view.overflowed, "the guest watcher's own queue overflowed"
        want = {f"sub/s{i:02d}" for i in range(10, 20)} | {"sub/deep/d05"}
        assert wait_for(lambda: want <= view.seen({"MODIFY", "CLOSE_WRITE"}, t_cont),
                        CONVERGE_SECONDS, 0.2), \
            sorted(want - view.seen({"MODIFY", "CLOSE_WRITE"}, t_cont))
        assert _tree(pair.mnt / "t") == _tree(t)

        # every level still delivers: the old nested directories, the renamed one, the new one
        t_after = time.monotonic()
        for d in ("sub", "sub/deep", "sub/moved", "sub/newdir"):
            (t / d / "after").write_text("new")
        _write(t / "sub" / "deep" / "d06", "v3")
        (t / "sub" / "s20").unlink()
        (t / "sub" / "moved" / "m0").unlink()
        want_created = {f"{d}/after" for d in ("sub", "sub/deep", "sub/moved", "sub/newdir")}
        assert wait_for(lambda: want_created <= view.seen({"CREATE"}, t_after)
                        and "sub/deep/d06" in view.seen({"MODIFY"}, t_after)
                        and {"sub/s20", "sub/moved/m0"} <= view.seen({"DELETE"}, t_after), 20), \
            (view.events[-12:], pair.output()[-3000:])
        assert wait_for(lambda: _converged(view, pair.export, "t"), 20, 0.2), \
            _diff(view, pair.export, "t")
    finally:
        view.close()
