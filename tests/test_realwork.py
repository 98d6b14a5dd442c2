"""Real tools on the share: git and tar, compared with the same work done in a local directory."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Share, requires_mount

pytestmark = requires_mount

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_DATE": "1600000000 +0000",
    "GIT_COMMITTER_DATE": "1600000000 +0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}
GIT_IDENTITY = ["-c", "user.name=Notify Test", "-c", "user.email=test@example.invalid",
                "-c", "init.defaultBranch=main", "-c", "core.fsync=all"]


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *GIT_IDENTITY, "-C", str(repo), *args], env=GIT_ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"git {' '.join(args)} failed in {repo}:\n{out.stdout}{out.stderr}"
    return out.stdout


def git_workflow(repo: Path) -> dict[str, str]:
    """Init, commit, branch, check out, merge; returns what must be the same anywhere."""
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("hello\n")
    (repo / "src").mkdir()
    for i in range(30):
        (repo / "src" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * (i + 1))
    (repo / "run.sh").write_text("#!/bin/sh\necho run\n")
    (repo / "run.sh").chmod(0o755)
    os.symlink("src/mod1.py", repo / "link")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "src" / "mod3.py").write_text("VALUE = 'feature'\n")
    (repo / "src" / "mod4.py").unlink()
    (repo / "feature.txt").write_text("new on feature\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "feature work")
    git(repo, "checkout", "-q", "main")
    assert not (repo / "feature.txt").exists()
    assert (repo / "src" / "mod4.py").exists()
    (repo / "README").write_text("hello from main\n")
    git(repo, "commit", "-q", "-am", "main work")
    git(repo, "merge", "-q", "--no-edit", "feature")
    git(repo, "branch", "-q", "topic", "HEAD~1")
    git(repo, "checkout", "-q", "topic")
    git(repo, "checkout", "-q", "main")
    git(repo, "gc", "-q")
    fsck = subprocess.run(["git", "-C", str(repo), "fsck", "--full", "--strict"], env=GIT_ENV,
                          capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return {
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
        "log": git(repo, "log", "--all", "--format=%H %P %s"),
        "branches": git(repo, "branch", "--format=%(refname) %(objectname)"),
        "head": git(repo, "rev-parse", "HEAD", "HEAD^{tree}"),
        "files": git(repo, "ls-files", "-s"),
        "fsck": fsck.stdout + fsck.stderr,
        "readme": (repo / "README").read_text(),
        "mod3": (repo / "src" / "mod3.py").read_text(),
        "link": os.readlink(repo / "link"),
        "run-mode": oct(os.stat(repo / "run.sh").st_mode),
    }


def test_git_repository(share: Share, tmp_path: Path) -> None:
    want = git_workflow(tmp_path / "local-repo")
    got = git_workflow(share.mnt / "repo")
    assert got == want
    assert got["status"] == ""
    assert got["fsck"] == ""
    # the host sees a sound repository too, with the same commits
    host = share.src / "repo"
    assert git(host, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(host, "log", "--all", "--format=%H %P %s") == want["log"]
    subprocess.run(["git", "-C", str(host), "fsck", "--full", "--strict"], env=GIT_ENV,
                   check=True, capture_output=True, timeout=60)


# --- tar ---------------------------------------------------------------------------------------
def make_tree(root: Path, nfiles: int = 3000) -> None:
    rng = random.Random(11)
    root.mkdir()
    dirs = [root]
    for i in range(60):
        d = rng.choice(dirs) / f"dir{i}"
        d.mkdir()
        dirs.append(d)
    (root / "empty-dir").mkdir()
    modes = [0o644, 0o644, 0o644, 0o755, 0o600, 0o444, 0o640, 0o4755]
    files = []
    for i in range(nfiles):
        path = rng.choice(dirs) / f"file{i}.dat"
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 20_000, rng.randrange(200_000)])
        path.write_bytes(rng.randbytes(size))
        if i % 97 == 0:
            os.chown(path, 1000 + i % 3, 2000 + i % 5)
        path.chmod(modes[i % len(modes)])
        os.utime(path, ns=(1_400_000_000 * 10**9 + i, 1_400_000_000 * 10**9 + i * 1000))
        files.append(path)
    for i in range(100):
        target = rng.choice(files)
        link = rng.choice(dirs) / f"sym{i}"
        os.symlink(os.path.relpath(target, link.parent), link)
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("/absolute/target", root / "absolute")
    for i in range(20):
        os.link(files[i], rng.choice(dirs) / f"hard{i}")
    for d in dirs[1::3]:
        d.chmod(0o750)


def snapshot(root: Path, times: bool = False) -> dict[str, tuple[object, ...]]:
    """Modes, owners, contents, link targets and link counts; with ``times`` also every mtime
    (the tar archive keeps whole seconds only, so the original tree differs there)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry: tuple[object, ...] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                entry += (st.st_size, digest, st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            if times:
                entry += (st.st_mtime_ns,)
            out[os.path.relpath(path, root)] = entry
    return out


def untar(archive: Path, dest: Path) -> float:
    dest.mkdir()
    start = time.monotonic()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True, timeout=240)
    return time.monotonic() - start


@pytest.mark.timeout(240)
def test_tar_extract(share: Share, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orig = tmp_path / "orig"
    make_tree(orig)
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(orig), "."], check=True, timeout=120)
    want = snapshot(orig)
    local_secs = untar(archive, tmp_path / "local-x")
    share_secs = untar(archive, share.mnt / "x")
    assert snapshot(tmp_path / "local-x") == want
    assert snapshot(share.mnt / "x") == want
    want_times = snapshot(tmp_path / "local-x", times=True)
    assert snapshot(share.mnt / "x", times=True) == want_times
    assert snapshot(share.src / "x", times=True) == want_times
    nfiles = sum(1 for v in want.values() if v[0].startswith("-"))
    with capsys.disabled():
        print(f"\ntar -x of {len(want)} entries ({nfiles} files, "
              f"{archive.stat().st_size / 2**20:.1f} MiB): local {local_secs:.2f}s, "
              f"through the share {share_secs:.2f}s")
    shutil.rmtree(share.mnt / "x")
    assert os.listdir(share.src) == []
