"""Event latency: a host change until an ordinary watcher on the guest side has read its event.

Methods, all in the same run: ``local`` (inotify on the host directory itself: the physical
limit), ``notifyfs`` (inotify on the notifyfs mount: remote events), ``poll`` (a 100 ms polling
watcher on the mount) and ``touch`` (touch forwarding over a ``--no-events`` mount). One change at
a time, the next after the previous one's event was read (or given up as lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import Config, Notifyfs, Watcher, fresh_dir, percentiles

log = logging.getLogger(__name__)

KINDS = ("create", "modify", "rename", "delete")
#: the event kind each watcher reports for each change
EXPECT = {
    "inotify": {"create": {"CREATE"}, "modify": {"CLOSE_WRITE"}, "rename": {"MOVED_TO"},
                "delete": {"DELETE"}},
    "poll": {"create": {"CREATE"}, "modify": {"MODIFY"}, "rename": {"CREATE"}, "delete": {"DELETE"}},
    # a touched path shows as ATTRIB; a deleted one cannot be touched
    "touch": {"create": {"CREATE", "ATTRIB"}, "modify": {"ATTRIB", "CLOSE_WRITE"},
              "rename": {"ATTRIB", "MOVED_TO"}, "delete": {"DELETE"}},
}


def _prepare(d: Path, kind: str, n: int) -> None:
    if kind in ("modify", "rename", "delete"):
        prefix = kind[0]
        for i in range(n):
            os.close(os.open(d / f"{prefix}{i}", os.O_CREAT | os.O_WRONLY, 0o644))


def _change(d: Path, kind: str, i: int) -> tuple[int, str]:
    """Make change ``i`` of ``kind`` on the host; returns (time just before the call that makes
    the event, the path the watcher reports)."""
    if kind == "create":
        t = time.monotonic_ns()
        os.close(os.open(d / f"c{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        return t, f"c{i}"
    if kind == "modify":
        fd = os.open(d / f"m{i}", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"changed\n")
        t = time.monotonic_ns()
        os.close(fd)
        return t, f"m{i}"
    if kind == "rename":
        t = time.monotonic_ns()
        os.rename(d / f"r{i}", d / f"r{i}.moved")
        return t, f"r{i}.moved"
    t = time.monotonic_ns()
    os.unlink(d / f"d{i}")
    return t, f"d{i}"


def measure(watcher: Watcher, host_dir: Path, kind: str, n: int, style: str,
            timeout: float) -> dict[str, Any]:
    """``n`` changes of ``kind`` in ``host_dir``, each waited for on ``watcher``."""
    expect = EXPECT[style][kind]
    samples: list[float] = []
    lost = 0
    rnd = random.Random(n)
    for i in range(n):
        if style == "poll":
            # a change lands anywhere in the polling period, not just after the last scan
            time.sleep(rnd.uniform(0, 0.1))
        t0, path = _change(host_dir, kind, i)
        for line in watcher.lines(timeout):
            _, t, ev_kind, ev_path = line.split(" ", 3)
            if ev_path == path and ev_kind in expect:
                samples.append((int(t) - t0) / 1e6)
                break
        else:
            lost += 1
    out: dict[str, Any] = {**percentiles(samples), "lost": lost, "attempted": n}
    out["samples_ms"] = [round(s, 4) for s in samples]
    return out


def _quiet(watcher: Watcher, seconds: float) -> None:
    for _ in watcher.lines(seconds):
        pass


def _run_method(name: str, host_root: Path, watch_root: Path, cfg: Config, style: str,
                n: int, timeout: float, start_watcher: Callable[[Path], Watcher]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for kind in KINDS:
        k_n = n
        if style == "touch" and kind == "delete":
            k_n = min(n, 20)  # every one is lost: enough to show it without waiting 1000 timeouts
        d = fresh_dir(host_root / f"lat-{name}-{kind}")
        _prepare(d, kind, k_n)
        with start_watcher(watch_root / d.name) as w:
            w.wait_ready(60)
            _quiet(w, 0.3)
            res[kind] = measure(w, d, kind, k_n, style, timeout)
        log.info("latency %s %s: p50 %s ms, lost %d", name, kind, res[kind]["p50"], res[kind]["lost"])
    return res


def run(cfg: Config) -> dict[str, Any]:
    work = cfg.work / "latency"
    n, npoll = cfg.latency_events, cfg.poll_events
    out: dict[str, Any] = {"events_per_kind": n, "poll_events_per_kind": npoll}
    src = fresh_dir(work / "src")
    out["local"] = _run_method("local", src, src, cfg, "inotify", n, 2.0,
                               lambda p: Watcher(p, "inotify"))
    with Notifyfs(src, work / "mnt", log=cfg.out / "notifyfs-latency.log"):
        out["notifyfs"] = _run_method("notifyfs", src, work / "mnt", cfg, "inotify", n, 2.0,
                                      lambda p: Watcher(p, "inotify"))
        out["poll"] = _run_method("poll", src, work / "mnt", cfg, "poll", npoll, 1.0,
                                  lambda p: Watcher(p, "poll", interval=0.1))
    tsrc = fresh_dir(work / "tsrc")
    with Notifyfs(tsrc, work / "tmnt", "--no-events", log=cfg.out / "notifyfs-latency.log"):
        out["touch"] = _run_method("touch", tsrc, work / "tmnt", cfg, "touch", npoll, 0.5,
                                   lambda p: _TouchWatcher(tsrc / p.name, p))
    for method in ("notifyfs", "poll", "touch"):
        for kind in KINDS:
            here, local = out[method][kind], out["local"][kind]
            out[method][kind]["ratio_p50"] = (here["p50"] / local["p50"]
                                              if here["p50"] and local["p50"] else None)
    return out


class _TouchWatcher(Watcher):
    """A guest watcher on the mount plus the touch forwarder feeding it."""

    def __init__(self, host_dir: Path, guest_dir: Path) -> None:
        import subprocess

        from .common import PY
        self.fwd = subprocess.Popen([PY, "-m", "notifyfs.bench.touchfwd", str(host_dir),
                                     str(guest_dir)], stdin=subprocess.PIPE)
        super().__init__(guest_dir, "inotify")

    def close(self) -> None:
        super().close()
        if self.fwd.stdin is not None:
            with contextlib.suppress(OSError):
                self.fwd.stdin.close()
        try:
            self.fwd.wait(5)
        except Exception:
            self.fwd.kill()
            self.fwd.wait(5)
