"""Watch scale: an inotify watcher on the guest side watches N directories recursively.

Per N: the watcher's setup time (walk and add a watch on each directory, through the mount), the
server's and the agent's RSS, the host watch count (the server's inotify fdinfo), and the
create-event latency at that scale (a file created in a random watched directory).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from .common import (
    Config,
    Notifyfs,
    Watcher,
    fresh_dir,
    inotify_watches,
    percentiles,
    raised_watch_limit,
    wait_until,
)

log = logging.getLogger(__name__)
FANOUT = 100


def _tree(root: Path, n: int) -> list[str]:
    """``n`` leaf directories, ``FANOUT`` to a parent; returns their paths relative to root."""
    leaves = []
    for i in range(n):
        rel = f"a{i // FANOUT}/b{i % FANOUT}"
        os.makedirs(root / rel)
        leaves.append(rel)
    return leaves


def one(cfg: Config, n: int) -> dict[str, Any]:
    work = cfg.work / f"scale-{n}"
    src = fresh_dir(work / "src")
    leaves = _tree(src / "tree", n)
    dirs = n + (n + FANOUT - 1) // FANOUT + 1
    res: dict[str, Any] = {"dirs": dirs}
    with Notifyfs(src, work / "mnt", log=cfg.out / "notifyfs-scale.log") as nfs:
        idle = nfs.usage()
        res["server_rss_idle"], res["agent_rss_idle"] = idle["server_rss"], idle["agent_rss"]
        t0 = time.monotonic()
        with Watcher(work / "mnt" / "tree", "inotify") as w:
            ready = w.wait_ready(1800)
            res["setup_seconds"] = ready["setup"]
            res["guest_watches"] = int(ready["watches"])
            # the server adds its host watch before each LOOKUP reply: it is there already
            wait_until(lambda: inotify_watches(nfs.server_pid) >= dirs, 30, 0.5)
            res["host_watches"] = inotify_watches(nfs.server_pid)
            res["setup_until_host_seconds"] = time.monotonic() - t0
            u = nfs.usage()
            res["server_rss"], res["agent_rss"] = u["server_rss"], u["agent_rss"]
            samples: list[float] = []
            lost = 0
            rnd = random.Random(n)
            for i in range(cfg.scale_latency_events):
                rel = rnd.choice(leaves)
                t = time.monotonic_ns()
                os.close(os.open(src / "tree" / rel / f"s{i}", os.O_CREAT | os.O_WRONLY, 0o644))
                want = os.path.normpath(f"{rel}/s{i}")
                # the first event after setup may wait for the agent to read every watch
                for line in w.lines(30.0 if i == 0 else 5.0):
                    _, tn, kind, path = line.split(" ", 3)
                    if kind == "CREATE" and path == want:
                        samples.append((int(tn) - t) / 1e6)
                        break
                else:
                    lost += 1
            first = samples[0] if samples else None
            res["latency_first_ms"] = first
            res["latency"] = {**percentiles(samples[1:]), "lost": lost}
            u = nfs.usage()
            res["server_rss_after"], res["agent_rss_after"] = u["server_rss"], u["agent_rss"]
    log.info("scale %d: %s", n, res)
    return res


def run(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"points": []}
    for n in cfg.scale_dirs:
        dirs = n + n // FANOUT + 1
        # the guest watcher and the server each hold one watch per directory (plus whatever
        # else runs on this machine)
        with raised_watch_limit(2 * dirs + 50_000, cfg.notes):
            try:
                out["points"].append(one(cfg, n))
            except Exception as e:
                log.error("scale %d failed: %s", n, e)
                out["points"].append({"dirs": dirs, "error": f"{type(e).__name__}: {e}"})
    return out
