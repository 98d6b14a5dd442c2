"""``notifyfs bench`` / ``python -m notifyfs.bench``: run every part, write JSON, Markdown and
plots into ``--out``. A benchmark reports; it does not fail because a target is missed."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .common import Config

log = logging.getLogger(__name__)

SECTIONS = ("latency", "throughput", "scale", "datapath")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 2 minutes")
    p.add_argument("--out", default="bench-out", help="directory for results.json, results.md, *.png")
    p.add_argument("--work", help="scratch directory (default: a new one under /tmp, removed after)")
    p.add_argument("--sshfs", choices=["auto", "skip"], default="auto",
                   help="auto: install openssh-server and sshfs if missing; skip: no sshfs column")
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only this part (repeatable)")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("notifyfs bench: needs root and /dev/fuse (it mounts for real)", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="notifyfs-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config.make(args.quick, out, work, args.sshfs)
    # the server holds one O_PATH fd per inode the guest knows: 100,000 directories need more
    # than the usual 1024 or 20000; the processes started below inherit this limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 2 * max(cfg.scale_dirs) + 10_000)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            cfg.notes.append(f"RLIMIT_NOFILE raised from {soft} to {want} for the notifyfs processes")
        except (OSError, ValueError) as e:  # no CAP_SYS_RESOURCE: up to the hard limit only
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            cfg.notes.append(f"RLIMIT_NOFILE cannot be raised above {hard} here ({e}); the server "
                             "holds one O_PATH fd per inode the guest knows")
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine(),
                               "notes": cfg.notes}
    started = time.monotonic()
    from . import datapath, latency, report, scale, throughput
    parts = {"latency": latency.run, "throughput": throughput.run, "scale": scale.run,
             "datapath": datapath.run}
    try:
        for name, fn in parts.items():
            if args.only and name not in args.only:
                continue
            t0 = time.monotonic()
            print(f"notifyfs bench: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = fn(cfg)
            except Exception as e:  # a part that breaks is reported, the others still run
                log.error("%s failed: %s", name, e)
                results[name] = {"error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()}
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        results["machine"]["loadavg_end"] = os.getloadavg()[0]
        results["seconds"] = round(time.monotonic() - started, 1)
        report.write(results, out)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print((out / "results.md").read_text())
    print(f"notifyfs bench: results in {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m notifyfs.bench", description=__doc__)
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="bench %(levelname)s %(name)s: %(message)s")
    return run(args)
