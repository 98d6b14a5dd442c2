"""Throughput and loss: the host creates, modifies and deletes many files as fast as it can; an
inotify watcher on the guest side counts what arrives.

Per phase: events delivered per second (from the first change to the last event read), files whose
event never came (lost), time to drain after the host finished, and CPU seconds of the server and
the agent per 1,000 delivered events (``notifyfs serve`` and ``notifyfs mount`` run as separate
processes). An overflow the server announced and repaired by rescanning is counted separately.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .common import Config, Notifyfs, Watcher, fresh_dir

log = logging.getLogger(__name__)

#: phase -> the event each file must give
PRIMARY = {"create": "CREATE", "modify": "CLOSE_WRITE", "delete": "DELETE"}


def _host(d: Path, phase: str, n: int) -> None:
    base = os.fsencode(d) + b"/f"
    if phase == "create":
        for i in range(n):
            os.close(os.open(base + b"%d" % i, os.O_CREAT | os.O_WRONLY, 0o644))
    elif phase == "modify":
        for i in range(n):
            fd = os.open(base + b"%d" % i, os.O_WRONLY)
            os.write(fd, b"x")
            os.close(fd)
    else:
        for i in range(n):
            os.unlink(base + b"%d" % i)


def _counts(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def _overflows(log_path: Path, start: int) -> int:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            # the server's line only: the agent logs each overflow it is told of too ("the
            # server's event queue overflowed"), which counted every overflow twice
            data = f.read()
            return data.count(b"host inotify queue overflowed") + data.count(
                b"host fanotify queue overflowed")
    except OSError:
        return 0


def run(cfg: Config) -> dict[str, Any]:
    work = cfg.work / "throughput"
    n = cfg.throughput_files
    src = fresh_dir(work / "src")
    d = fresh_dir(src / "tp")
    logf = cfg.out / "notifyfs-throughput.log"
    out: dict[str, Any] = {"files": n}
    with Notifyfs(src, work / "mnt", log=logf) as nfs, \
            Watcher(work / "mnt" / "tp", "inotify", report="count") as w:
        w.wait_ready(60)
        counts: dict[str, int] = {}
        for phase, primary in PRIMARY.items():
            before = dict(counts)
            log_start = logf.stat().st_size if logf.exists() else 0
            u0 = nfs.usage()
            t0 = time.monotonic_ns()
            _host(d, phase, n)
            t_host = time.monotonic_ns()
            target = before.get(primary, 0) + n
            last = t_host
            quiet = 20.0  # a stall this long ends the phase: what has not arrived is lost
            for line in w.lines(quiet):
                if not line.startswith("count "):
                    continue
                counts = _counts(line)
                last = counts.get("last", last)
                if counts.get(primary, 0) >= target:
                    break
            u1 = nfs.usage()
            delivered = counts.get(primary, 0) - before.get(primary, 0)
            total = counts.get("total", 0) - before.get("total", 0)
            span = max(last - t0, 1) / 1e9
            per_k = 1000 / max(total, 1)
            out[phase] = {
                "host_seconds": (t_host - t0) / 1e9,
                "host_changes_per_s": n / ((t_host - t0) / 1e9),
                "delivered": delivered, "lost": n - delivered, "events_total": total,
                "events_per_s": total / span, "changes_per_s": delivered / span,
                "drain_seconds": max(0, last - t_host) / 1e9,
                "server_overflows": _overflows(logf, log_start),
                "watcher_overflows": counts.get("OVERFLOW", 0) - before.get("OVERFLOW", 0),
                "server_cpu_per_1k_events": (u1["server_cpu"] - u0["server_cpu"]) * per_k,
                "agent_cpu_per_1k_events": (u1["agent_cpu"] - u0["agent_cpu"]) * per_k,
                "server_rss": u1["server_rss"], "agent_rss": u1["agent_rss"],
            }
            log.info("throughput %s: %s", phase, out[phase])
    total_events = sum(out[p]["events_total"] for p in PRIMARY)
    span = sum(out[p]["events_total"] / out[p]["events_per_s"] for p in PRIMARY
               if out[p]["events_per_s"])
    out["events_per_s"] = total_events / span if span else 0.0
    out["lost"] = sum(out[p]["lost"] for p in PRIMARY)
    return out
