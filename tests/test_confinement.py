"""Confinement through a real mount: nothing the guest does through symlinks, ``..`` or renames
planted in the export reaches outside it.

Symlinks are resolved by the guest kernel, in the guest's view of the world; only the server could
follow one on the host. So the tests make the two views differ: the mount lives at
``tmp/guest/deep/mnt`` while the export is ``tmp/src``, so that ``../outside/secret`` from the
mount root is the decoy ``tmp/guest/deep/outside/secret`` for the guest but would be the real
``tmp/outside/secret`` if the server followed it. Likewise ``/proc/self/cwd/outside/...``: the
share process runs in ``tmp`` and the test (the guest) in ``tmp/guest/deep``. Absolute symlinks to
the real outside are the same file for guest and host on one machine, so through those only
operations that do not follow the link are tried.

After everything, the real outside tree (and everything in ``tmp`` but the export and the guest's
side) must be unchanged byte for byte and metadata for metadata, and nothing new may appear there.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Share, can_mount, snapshot, start_share

from notifyfs.linux import fs as linux_fs

pytestmark = pytest.mark.timeout(60)

SECRET = b"the real secret, outside the export\n"
DECOY = b"decoy: what the guest sees at ../outside\n"
INNER = b"real inner file\n"
DECOY_INNER = b"decoy inner file\n"




def make_tree(top: Path, secret: bytes, inner: bytes) -> None:
    top.mkdir(parents=True)
    (top / "secret").write_bytes(secret)
    os.chmod(top / "secret", 0o640)
    os.setxattr(top / "secret", "user.tag", b"original")
    os.utime(top / "secret", ns=(10**18, 10**18))
    (top / "dir").mkdir()
    (top / "dir" / "inner").write_bytes(inner)
    (top / "dir" / "empty").mkdir()
    os.setxattr(top / "dir", "user.tag", b"dir")
    os.utime(top / "dir", ns=(10**18, 10**18))


@dataclass
class World:
    tmp: Path
    src: Path
    outside: Path  # the real one, which must never change
    decoy: Path  # what the guest's ../outside is
    share: Share
    before: dict[str, tuple[Any, ...]]
    root_before: set[str]

    @property
    def mnt(self) -> Path:
        return self.share.mnt

    def assert_outside_unchanged(self) -> None:
        after = snapshot(self.tmp, skip=("src", "guest"))
        changed = {k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k)}
        assert not changed, f"changed or created outside the export: {sorted(changed)}"
        assert set(os.listdir("/")) == self.root_before
        assert (self.outside / "secret").read_bytes() == SECRET


FILE_LINKS = {  # name -> target; the guest resolves these to the decoy, the host to the real file
    "rel_file": "../outside/secret",
    "cwd_file": "/proc/self/cwd/outside/secret",
    "chain1": "chain2",
    "chain2": "chain3",
    "chain3": "../outside/secret",
}
DIR_LINKS = {
    "rel_dir": "../outside/dir",
    "cwd_dir": "/proc/self/cwd/outside/dir",
    "chain_dir": "rel_dir",
}
DANGLING = {
    "dangling": "../outside/not-yet",
    "dangling_dir": "../outside/not-yet-dir",
}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    reason = can_mount()
    if reason:
        pytest.skip(reason)
    outside = tmp_path / "outside"
    make_tree(outside, SECRET, INNER)
    deep = tmp_path / "guest" / "deep"
    decoy = deep / "outside"
    make_tree(decoy, DECOY, DECOY_INNER)
    src = tmp_path / "src"
    src.mkdir()
    (src / "sub").mkdir()
    (src / "sub" / "file").write_bytes(b"inside\n")
    links = {
        **FILE_LINKS, **DIR_LINKS, **DANGLING,
        "abs_file": str(outside / "secret"),
        "abs_dir": str(outside / "dir"),
        "abs_dangling": str(outside / "not-yet-abs"),
        "root_link": "/",
        "up": "..",
        "sub/up2": "../../outside/secret",
    }
    for name, target in links.items():
        os.symlink(target, src / name)
    # the share runs in tmp (its /proc/self/cwd/outside is the real one) ...
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, skip=("src", "guest"))
    root_before = set(os.listdir("/"))
    share = start_share(src, deep / "mnt", "--entry-timeout", "0", "--attr-timeout", "0")
    w = World(tmp_path, src, outside, decoy, share, before, root_before)
    try:
        assert os.readlink(f"/proc/{share.proc.pid}/cwd") == str(tmp_path)
        # ... and the guest (this test) in tmp/guest/deep
        monkeypatch.chdir(deep)
        yield w
    finally:
        os.chdir(tmp_path)
        share.stop()
    w.assert_outside_unchanged()


def attempt(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run one hostile operation; failing is fine, only its effects are judged."""
    try:
        return fn(*args, **kw)
    except (OSError, NotImplementedError) as e:
        return e


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno or 0
    return 0


def write(path: Path | str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def test_server_never_follows_file_symlinks(world: World) -> None:
    mnt = world.mnt
    for name in [*FILE_LINKS, "sub/up2"]:
        p = mnt / name
        # the guest resolves the link in its own view: the decoy, not the host's secret
        assert p.read_bytes() == DECOY, name
        assert os.readlink(p) == os.readlink(world.src / name)
    for name in [*FILE_LINKS, "sub/up2"]:
        p = mnt / name
        attempt(write, p, b"overwritten\n", "r+b")
        attempt(write, p, b"appended\n", "ab")
        attempt(write, p, b"truncated\n", "wb")
        attempt(os.truncate, p, 3)
        attempt(os.chmod, p, 0o4777)
        attempt(os.chown, p, 4321, 4321)
        attempt(os.utime, p, ns=(5, 5))
        attempt(os.setxattr, p, "user.evil", b"1")
        attempt(os.setxattr, p, "user.tag", b"changed")
        attempt(os.removexattr, p, "user.tag")
        attempt(os.link, p, mnt / f"{name}.hardlink")  # follows: another filesystem
        fd = attempt(os.open, p, os.O_RDWR)
        if isinstance(fd, int):
            attempt(os.ftruncate, fd, 0)
            attempt(os.fchmod, fd, 0o777)
            attempt(os.fchown, fd, 4321, 4321)
            attempt(os.pwrite, fd, b"pwrite", 0)
            os.close(fd)
    # `..` in the guest's paths is the guest's business too
    assert (mnt / ".." / "outside" / "secret").exists()
    assert os.path.samefile(mnt / "..", world.decoy.parent)
    assert os.path.samefile(mnt / "sub" / ".." / "..", world.decoy.parent)
    assert os.path.samefile(mnt / "up", world.decoy.parent)  # `up` -> .. from the mount root
    # the decoy took the writes: they really happened, in the guest's view
    assert (world.decoy / "secret").read_bytes() != DECOY


def test_server_never_follows_directory_symlinks(world: World) -> None:
    mnt = world.mnt
    for name in DIR_LINKS:
        assert sorted(os.listdir(mnt / name)) == ["empty", "inner"]
        assert (mnt / name / "inner").read_bytes() == DECOY_INNER
    for name in DIR_LINKS:
        d = mnt / name
        attempt(write, d / "created", b"new\n")
        attempt(write, d / "inner", b"clobbered\n")
        attempt(os.open, d / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        attempt(os.mkdir, d / "newdir")
        attempt(os.mkfifo, d / "fifo")
        attempt(os.symlink, "/etc/passwd", d / "sl")
        attempt(os.link, mnt / "sub" / "file", d / "hl")
        attempt(os.rename, mnt / "sub" / "file", d / "moved")
        attempt(os.rename, d / "inner", d / "inner2")
        attempt(os.rename, d / "inner2", mnt / "stolen")
        attempt(os.unlink, d / "inner")
        attempt(os.rmdir, d / "empty")
        attempt(os.chmod, d, 0o777)
        attempt(os.chown, d, 4321, 4321)
        attempt(os.utime, d, ns=(7, 7))
        attempt(os.setxattr, d, "user.tag", b"changed")
        attempt(os.removexattr, d, "user.tag")
        attempt(os.truncate, d / "inner", 0)
    # the dangling links, followed by the guest, create in the guest's view only
    write(mnt / "dangling", b"created through a dangling link\n")
    assert (world.decoy / "not-yet").exists()
    assert not (world.outside / "not-yet").exists()
    attempt(os.mkdir, mnt / "dangling_dir")  # mkdir never follows: EEXIST
    attempt(os.open, mnt / "dangling_dir", os.O_CREAT | os.O_WRONLY, 0o644)
    assert not (world.outside / "not-yet-dir").exists()
    assert sorted(os.listdir(world.outside / "dir")) == ["empty", "inner"]
    assert (world.outside / "dir" / "inner").read_bytes() == INNER


ALL_LINKS = [*FILE_LINKS, *DIR_LINKS, *DANGLING, "abs_file", "abs_dir", "abs_dangling", "root_link",
             "up"]


def test_operations_on_links_themselves(world: World) -> None:
    """What does not follow a link acts on the link inside the export, whatever it points to
    (absolute links to the real outside included: these the guest must not follow here)."""
    mnt, src = world.mnt, world.src
    for name in ALL_LINKS:
        p = mnt / name
        target = os.readlink(src / name)
        assert os.readlink(p) == target
        assert stat.S_ISLNK(os.lstat(p).st_mode)
        assert errno_of(os.open, p, os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
        assert errno_of(os.open, p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644) == errno.ELOOP
        assert errno_of(os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) == errno.EEXIST
        assert errno_of(os.open, p, os.O_RDWR | os.O_TRUNC | os.O_NOFOLLOW) == errno.ELOOP
        fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            assert stat.S_ISLNK(os.fstat(fd).st_mode)
            assert errno_of(os.fchmod, fd, 0o777) == errno.EBADF
        finally:
            os.close(fd)
        assert errno_of(os.mkdir, p) == errno.EEXIST
        assert errno_of(os.symlink, "x", p) == errno.EEXIST
        assert errno_of(os.mknod, p, stat.S_IFIFO | 0o644) == errno.EEXIST
        assert errno_of(os.rmdir, p) == errno.ENOTDIR
        attempt(os.chmod, p, 0o777, follow_symlinks=False)  # EOPNOTSUPP
        assert errno_of(os.setxattr, p, "user.evil", b"1", follow_symlinks=False) == errno.EPERM
        assert errno_of(os.getxattr, p, "user.tag", follow_symlinks=False) == errno.ENODATA
        attempt(os.removexattr, p, "user.tag", follow_symlinks=False)
        os.chown(p, 4321, 4322, follow_symlinks=False)
        os.utime(p, ns=(3 * 10**9, 4 * 10**9), follow_symlinks=False)
        lst = os.lstat(src / name)
        assert (lst.st_uid, lst.st_gid, lst.st_mtime_ns) == (4321, 4322, 4 * 10**9)
        os.link(p, mnt / f"{name}.hard", follow_symlinks=False)
        assert os.readlink(src / f"{name}.hard") == target
        os.rename(p, mnt / f"{name}.moved")
        os.rename(mnt / f"{name}.moved", p)
        os.replace(mnt / f"{name}.hard", p)  # a link replacing a link
        assert os.readlink(src / name) == target
    # O_NOFOLLOW on a regular file is fine (it only concerns the last component)
    with open(os.open(mnt / "sub" / "file", os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        assert f.read() == b"inside\n"
    # a regular file renamed over a link replaces the link, never its target
    write(mnt / "sub" / "over", b"over\n")
    os.rename(mnt / "sub" / "over", mnt / "abs_file")
    assert (src / "abs_file").read_bytes() == b"over\n"
    os.mkdir(mnt / "over_dir")
    attempt(os.rename, mnt / "over_dir", mnt / "abs_dir")  # ENOTDIR: the link stays
    for name in ALL_LINKS:
        attempt(os.unlink, mnt / name)
    assert not any(os.path.lexists(src / n) for n in ALL_LINKS)
    world.assert_outside_unchanged()


def test_rename_race_swaps_directory_with_outside_link(world: World) -> None:
    """The host keeps swapping a directory of the export with a symlink to the outside while the
    guest creates, writes, renames and unlinks in it, by path and through a held directory fd."""
    mnt, src = world.mnt, world.src
    (src / "d").mkdir()
    (src / "d" / "keep").write_bytes(b"keep\n")
    stop = threading.Event()
    errors: list[BaseException] = []
    stats = {"swaps": 0, "ok": 0, "failed": 0}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            stats[key] += 1

    def host() -> None:
        # relative and /proc/self/cwd targets: the real outside for the host, the decoy for the
        # guest (an absolute one would be the real outside for both, and the guest may follow it)
        targets = ["../outside/dir", "/proc/self/cwd/outside/dir"]
        i = 0
        try:
            while not stop.is_set():
                target = targets[i % 2]
                i += 1
                if i % 2:
                    os.symlink(target, src / "d.link")
                    os.rename(src / "d", src / "d.real")
                    os.rename(src / "d.link", src / "d")  # the symlink over the name
                    time.sleep(0.002)
                    os.rename(src / "d", src / "d.link")
                    os.rename(src / "d.real", src / "d")
                    os.unlink(src / "d.link")
                else:
                    os.symlink(target, src / "d.swap")
                    linux_fs.renameat2(-100, str(src / "d"), -100, str(src / "d.swap"),
                                       linux_fs.RENAME_EXCHANGE)
                    time.sleep(0.002)
                    linux_fs.renameat2(-100, str(src / "d"), -100, str(src / "d.swap"),
                                       linux_fs.RENAME_EXCHANGE)
                    os.unlink(src / "d.swap")
                count("swaps")
                time.sleep(0.002)  # as long a directory as a symlink
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def run(op: Callable[..., Any], *args: Any, **kw: Any) -> None:
        count("failed" if isinstance(attempt(op, *args, **kw), BaseException) else "ok")

    def guest_paths(k: int) -> None:
        d = mnt / "d"
        i = 0
        while not stop.is_set():
            i += 1
            f, r, m, h = (d / f"{c}{k}-{i}" for c in "grmh")
            run(write, f, b"data %d\n" % i)
            run(write, f, b"more\n", "ab")
            run(os.truncate, f, 1)
            run(os.chmod, f, 0o600)
            run(os.utime, f, ns=(1, 1))
            run(os.setxattr, f, "user.x", b"1")
            run(os.rename, f, r)
            run(os.unlink, r)
            run(os.mkdir, m)
            run(os.rmdir, m)
            run(os.link, d / "keep", h)
            run(os.unlink, h)
            run(os.listdir, d)

    def create_at(dfd: int, name: str) -> None:
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, dir_fd=dfd)
        try:
            os.write(fd, b"via dirfd\n")
            os.fchmod(fd, 0o666)
        finally:
            os.close(fd)

    def guest_dirfd(k: int) -> None:
        i = 0
        while not stop.is_set():
            dfd = attempt(os.open, mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
            if not isinstance(dfd, int):
                count("failed")
                continue
            try:
                for _ in range(20):
                    i += 1
                    name = f"fd{k}-{i}"
                    run(create_at, dfd, name)
                    run(os.rename, name, name + ".r", src_dir_fd=dfd, dst_dir_fd=dfd)
                    run(os.unlink, name + ".r", dir_fd=dfd)
                    run(os.mkdir, name + ".d", dir_fd=dfd)
                    run(os.rmdir, name + ".d", dir_fd=dfd)
                    run(os.symlink, "../../outside/dir", name + ".s", dir_fd=dfd)
                    run(os.unlink, name + ".s", dir_fd=dfd)
            finally:
                os.close(dfd)

    threads = [threading.Thread(target=host, daemon=True)]
    threads += [threading.Thread(target=guest_paths, args=(k,), daemon=True) for k in range(2)]
    threads += [threading.Thread(target=guest_dirfd, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(15)
    assert not [t for t in threads if t.is_alive()], "a thread hangs"
    assert not errors, errors
    assert stats["swaps"] > 20 and stats["ok"] > 100, stats
    assert (src / "d").is_dir() and not os.path.lexists(src / "d.real")
    world.assert_outside_unchanged()
    # the mount still works
    write(mnt / "after", b"after\n")
    assert (src / "after").read_bytes() == b"after\n"
