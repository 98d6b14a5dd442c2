"""The guest-side watcher the benchmarks measure with: ``python -m notifyfs.bench.watcher ROOT``.

``--mode inotify`` watches ROOT recursively with one ordinary inotify instance (as inotifywait -r
does, every event); ``--mode poll`` rescans the tree every ``--interval`` seconds and reports what
changed, as polling watchers do. ``--report each`` prints ``ev TIME_NS KIND PATH`` per event;
``--report count`` prints running totals (``count KEY=VALUE...``) every 50 ms while they change.
Times are CLOCK_MONOTONIC nanoseconds, comparable across processes. It ends when stdin closes.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from collections import Counter

from ..linux import inotify as ino

_KINDS = {ino.IN_CREATE: "CREATE", ino.IN_CLOSE_WRITE: "CLOSE_WRITE", ino.IN_MOVED_TO: "MOVED_TO",
          ino.IN_MOVED_FROM: "MOVED_FROM", ino.IN_DELETE: "DELETE", ino.IN_ATTRIB: "ATTRIB",
          ino.IN_MODIFY: "MODIFY", ino.IN_Q_OVERFLOW: "OVERFLOW"}


def _out(text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(1, data):]


def _stdin_closed() -> bool:
    r, _, _ = select.select([0], [], [], 0)
    return bool(r) and not os.read(0, 4096)


class Tree:
    def __init__(self, root: str) -> None:
        self.root = root
        self.inotify = ino.Inotify(ino.IN_CLOEXEC)
        self.paths: dict[int, str] = {}

    def add(self, top: str) -> None:
        """Watch ``top`` and every directory below it (what a recursive watcher does)."""
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                wd = self.inotify.add_watch(d, ino.IN_ALL_EVENTS | ino.IN_ONLYDIR)
            except OSError:
                continue
            self.paths[wd] = os.path.relpath(d, self.root)
            try:
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue


def run_inotify(root: str, report: str) -> None:
    t0 = time.monotonic()
    tree = Tree(root)
    tree.add(root)
    _out(f"ready watches={len(tree.paths)} setup={time.monotonic() - t0:.6f}\n")
    counts: Counter[str] = Counter()
    last_print = 0.0
    last_event = 0
    changed = False
    fd = tree.inotify.fd
    while True:
        r, _, _ = select.select([fd, 0], [], [], 0.05)
        if 0 in r and not os.read(0, 4096):
            break
        if fd in r:
            data = os.read(fd, 1 << 16)
            now = time.monotonic_ns()
            lines = []
            for ev in ino.parse_events(data):
                kind = next((k for bit, k in _KINDS.items() if ev.mask & bit), None)
                if ev.mask & ino.IN_CREATE and ev.mask & ino.IN_ISDIR:
                    base = tree.paths.get(ev.wd)
                    if base is not None:
                        tree.add(os.path.join(root, base, os.fsdecode(ev.name)))
                counts["total"] += 1
                if kind is None:
                    continue
                if report == "count":
                    counts[kind] += 1
                    continue
                rel = os.path.normpath(os.path.join(tree.paths.get(ev.wd, "?"), os.fsdecode(ev.name)))
                lines.append(f"ev {now} {kind} {rel}\n")
            last_event = now
            changed = True
            if lines:
                _out("".join(lines))
        if report == "count" and changed and time.monotonic() - last_print >= 0.05:
            last_print = time.monotonic()
            changed = False
            _out("count " + " ".join(f"{k}={v}" for k, v in counts.items()) + f" last={last_event}\n")


def _scan(root: str) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out[os.path.relpath(e.path, root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return out


def run_poll(root: str, interval: float) -> None:
    t0 = time.monotonic()
    before = _scan(root)
    _out(f"ready watches=0 setup={time.monotonic() - t0:.6f}\n")
    while not _stdin_closed():
        time.sleep(interval)
        now_tree = _scan(root)
        now = time.monotonic_ns()
        lines = [f"ev {now} CREATE {p}\n" for p in now_tree.keys() - before.keys()]
        lines += [f"ev {now} DELETE {p}\n" for p in before.keys() - now_tree.keys()]
        lines += [f"ev {now} MODIFY {p}\n" for p, v in now_tree.items()
                  if p in before and before[p] != v]
        before = now_tree
        if lines:
            _out("".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m notifyfs.bench.watcher")
    p.add_argument("root")
    p.add_argument("--mode", choices=["inotify", "poll"], default="inotify")
    p.add_argument("--report", choices=["each", "count"], default="each")
    p.add_argument("--interval", type=float, default=0.1)
    a = p.parse_args(argv)
    if a.mode == "poll":
        run_poll(a.root, a.interval)
    else:
        run_inotify(a.root, a.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
