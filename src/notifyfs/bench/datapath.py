"""The data path: the same file work on the local disk, through notifyfs, and through sshfs over
loopback. Metadata operations of many small files, sequential write and read, extracting a source
tarball, ``git status`` on a real repository."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import Config, Notifyfs, fresh_dir
from .sshfs import Sshfs, SshfsUnavailable, ensure_installed

log = logging.getLogger(__name__)
CHUNK = 1 << 20

#: (line, unit, higher is better)
LINES = [("create", "ops/s", True), ("stat", "ops/s", True), ("readdir", "entries/s", True),
         ("unlink", "ops/s", True), ("seq_write", "MB/s", True), ("seq_read", "MB/s", True),
         ("tar_x", "s", False), ("git_status", "s", False)]


def _timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def make_inputs(cfg: Config) -> tuple[Path, Path]:
    """A source tarball (the first files of Python's standard library, uncompressed so that the
    file system, not gzip, is measured) and a git repository of the same files."""
    inputs = cfg.work / "inputs"
    tar_path, repo = inputs / "src.tar", inputs / "repo"
    if tar_path.exists() and repo.exists():
        return tar_path, repo
    fresh_dir(inputs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages"))
        files.extend(Path(dirpath) / f for f in sorted(filenames))
        if len(files) >= cfg.tar_files:
            break
    files = files[:cfg.tar_files]
    with tarfile.open(tar_path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f"pysrc/{f.relative_to(stdlib)}", recursive=False)
    repo.mkdir()
    subprocess.run(["tar", "-xf", str(tar_path), "-C", str(repo)], check=True)
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], check=True)
    return tar_path, repo


def measure(cfg: Config, target: Path, backing: Path, tar_path: Path, repo: Path) -> dict[str, float]:
    """Every line on ``target`` (a mount of ``backing``, or the same directory)."""
    out: dict[str, float] = {}
    n = cfg.meta_files
    meta = target / "meta"
    meta.mkdir()
    names = [os.fsencode(meta / f"f{i}") for i in range(n)]

    def create() -> None:
        for p in names:
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))

    out["create"] = n / _timed(create)
    out["stat"] = n / _timed(lambda: [os.stat(p) for p in names])
    rounds = 5
    out["readdir"] = rounds * n / _timed(lambda: [os.listdir(meta) for _ in range(rounds)])
    def unlink() -> None:
        for p in names:
            os.unlink(p)

    out["unlink"] = n / _timed(unlink)

    size = cfg.seq_bytes
    buf = os.urandom(CHUNK)

    def write() -> None:
        fd = os.open(target / "big.w", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for _ in range(size // CHUNK):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)

    out["seq_write"] = size / 1e6 / _timed(write)
    # read a file made on the backing side, so that no target has it in its own page cache
    with open(backing / "big.r", "wb") as f:
        for _ in range(size // CHUNK):
            f.write(buf)

    def read() -> None:
        fd = os.open(target / "big.r", os.O_RDONLY)
        while os.read(fd, CHUNK):
            pass
        os.close(fd)

    out["seq_read"] = size / 1e6 / _timed(read)
    os.unlink(target / "big.w")
    os.unlink(backing / "big.r")

    (target / "tar").mkdir()
    out["tar_x"] = _timed(lambda: subprocess.run(["tar", "-xf", str(tar_path), "-C",
                                                  str(target / "tar")], check=True))
    shutil.copytree(repo, backing / "repo", symlinks=True)
    times = []
    for _ in range(3):
        times.append(_timed(lambda: subprocess.run(["git", "-C", str(target / "repo"), "status",
                                                    "--porcelain"], check=True,
                                                   capture_output=True)))
    out["git_status"] = statistics.median(times)
    return out


@contextlib.contextmanager
def _local(work: Path) -> Iterator[Path]:
    yield fresh_dir(work / "local")


def run(cfg: Config) -> dict[str, Any]:
    work = cfg.work / "datapath"
    tar_path, repo = make_inputs(cfg)
    res: dict[str, Any] = {"meta_files": cfg.meta_files, "seq_bytes": cfg.seq_bytes,
                           "tar_files": cfg.tar_files, "targets": {}}
    t = res["targets"]
    local = fresh_dir(work / "local")
    t["local"] = measure(cfg, local, local, tar_path, repo)
    log.info("datapath local: %s", t["local"])
    src = fresh_dir(work / "nfs-src")
    with Notifyfs(src, work / "nfs-mnt", log=cfg.out / "notifyfs-datapath.log"):
        t["notifyfs"] = measure(cfg, work / "nfs-mnt", src, tar_path, repo)
    log.info("datapath notifyfs: %s", t["notifyfs"])
    if cfg.sshfs == "skip":
        res["sshfs_skipped"] = "skipped on request (--sshfs skip)"
    else:
        try:
            ensure_installed(120 if cfg.quick else 600)
            backing = fresh_dir(work / "ssh-src")
            with Sshfs(backing, work / "ssh-mnt", work / "ssh"):
                t["sshfs"] = measure(cfg, work / "ssh-mnt", backing, tar_path, repo)
            log.info("datapath sshfs: %s", t["sshfs"])
        except (SshfsUnavailable, OSError, subprocess.SubprocessError) as e:
            res["sshfs_skipped"] = str(e)
    res["ratios"] = {}
    for line, _unit, higher in LINES:
        nf = t["notifyfs"][line]
        r: dict[str, float | None] = {}
        for other in ("local", "sshfs"):
            if other in t:
                o = t[other][line]
                # > 1: notifyfs is that many times faster than the other
                r[f"vs_{other}"] = (nf / o) if higher else (o / nf)
        res["ratios"][line] = r
    return res
