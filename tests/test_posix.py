"""Differential POSIX suite: every scenario runs once in a local directory and once through the
share's mountpoint, and everything it observes must be the same on both.

A scenario is a function ``root -> list of observations`` (plain tuples). A failed call is observed
as ``('error', op, errno name)``, never raised, so error paths are compared like results. After
both runs the trees are compared too: the host side of the share (``share.src``) and the view
through the mount, each against the local directory.

What is never compared, because FUSE (or time) makes it differ by design:

* ``st_dev`` (the mount is another device) and ``st_ino`` values (nodeids are the server's; the
  scenarios compare *relations* between inode numbers instead, e.g. two hard links are one inode);
* atime, except right after it was set explicitly (reads update it on the host, on their own clock);
* ctime, and mtime unless the scenario set it explicitly (the two runs happen at different times).
"""

from __future__ import annotations

import ast
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Share, requires_mount
from notifyfs.linux import fs as linux_fs

pytestmark = requires_mount

Obs = tuple[Any, ...]
Scenario = Callable[[Path], list[Obs]]
SCENARIOS: list[Scenario] = []

_libc = ctypes.CDLL(None, use_errno=True)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: explicit timestamps are all before this, so the tree comparison can tell them from "now"
OLD = 1_500_000_000 * 10**9


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS.append(fn)
    return fn


def FD(_fd: int) -> str:  # noqa: N802 - used as a display function for file descriptors
    return "fd"


def st_obs(st: os.stat_result) -> Obs:
    """The stat fields that must match between a local directory and the share."""
    out: Obs = (stat.filemode(st.st_mode), oct(st.st_mode), st.st_size, st.st_nlink, st.st_uid,
                st.st_gid)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out += (os.major(st.st_rdev), os.minor(st.st_rdev))
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Rec:
    """Runs calls and records what they return, or which errno they fail with."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.obs: list[Obs] = []

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def do(self, op: str, fn: Callable[..., Any], *args: Any,
           show: Callable[[Any], Any] | None = None, **kw: Any) -> Any:
        try:
            res = fn(*args, **kw)
        except OSError as e:
            self.obs.append(("error", op, errno.errorcode.get(e.errno or 0, e.errno)))
            return None
        if show is not None:
            shown = show(res)
        elif isinstance(res, os.stat_result):
            shown = st_obs(res)
        elif isinstance(res, bytes) and len(res) > 64:
            shown = ("bytes", len(res), sha(res))
        else:
            shown = res
        self.obs.append((op, shown))
        return res

    def note(self, *obs: Any) -> None:
        self.obs.append(obs)

    def stat(self, op: str, path: str, follow: bool = True) -> os.stat_result | None:
        return self.do(op, os.stat, path, follow_symlinks=follow)

    def content(self, op: str, path: str) -> bytes | None:
        return self.do(op, read_path, path)


def read_path(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_path(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               mode: int = 0o644) -> int:
    fd = os.open(path, flags, mode)
    try:
        n = 0
        while n < len(data):
            n += os.write(fd, data[n:])
        return n
    finally:
        os.close(fd)


# --- libc calls the os module lacks -----------------------------------------------------------
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int], nofollow: bool = False) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = linux_fs.AT_SYMLINK_NOFOLLOW if nofollow else 0
    if _libc.utimensat(linux_fs.AT_FDCWD, os.fsencode(path), times, flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc.fdopendir.restype = ctypes.c_void_p
_libc.fdopendir.argtypes = [ctypes.c_int]
_libc.readdir64.restype = ctypes.POINTER(_Dirent)
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


def dtypes(path: str) -> list[tuple[str, int]]:
    """(name, d_type) of every entry, as readdir(3) gives them, from a directory opened O_RDONLY."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    d = _libc.fdopendir(fd)
    if not d:
        os.close(fd)
        raise OSError(ctypes.get_errno(), "fdopendir")
    out = []
    try:
        while True:
            ctypes.set_errno(0)
            ent = _libc.readdir64(d)
            if not ent:
                if ctypes.get_errno():
                    raise OSError(ctypes.get_errno(), "readdir")
                break
            out.append((os.fsdecode(ent.contents.d_name), ent.contents.d_type))
    finally:
        _libc.closedir(d)
    return sorted(out)


def renameat2(old: str, new: str, flags: int) -> None:
    linux_fs.renameat2(linux_fs.AT_FDCWD, old, linux_fs.AT_FDCWD, new, flags)


# --- scenarios ---------------------------------------------------------------------------------
@scenario
def read_write(root: Path) -> list[Obs]:
    r = Rec(root)
    f = r.p("a.txt")
    fd = r.do("open-creat", os.open, f, os.O_CREAT | os.O_RDWR, 0o644, show=FD)
    r.do("write", os.write, fd, b"hello world")
    r.do("pread", os.pread, fd, 5, 6)
    r.do("pwrite", os.pwrite, fd, b"WORLD", 6)
    r.do("lseek-cur", os.lseek, fd, 0, os.SEEK_CUR)
    r.do("lseek-set", os.lseek, fd, 0, os.SEEK_SET)
    r.do("read", os.read, fd, 100)
    r.do("read-eof", os.read, fd, 100)
    r.do("lseek-end", os.lseek, fd, -3, os.SEEK_END)
    r.do("read-tail", os.read, fd, 100)
    r.do("lseek-negative", os.lseek, fd, -100, os.SEEK_SET)
    r.do("pwrite-past-end", os.pwrite, fd, b"!", 20)
    r.do("pread-gap", os.pread, fd, 100, 0)
    r.do("fstat", os.fstat, fd)
    r.do("ftruncate-down", os.ftruncate, fd, 3)
    r.do("fstat-after-down", os.fstat, fd)
    r.do("pread-after-down", os.pread, fd, 100, 0)
    r.do("ftruncate-up", os.ftruncate, fd, 8192)
    r.do("fstat-after-up", os.fstat, fd)
    r.do("pread-after-up", os.pread, fd, 8192, 0)
    r.do("close", os.close, fd)
    r.do("truncate-path-down", os.truncate, f, 2)
    r.do("truncate-path-up", os.truncate, f, 100_000)
    r.stat("stat", f)
    r.content("content", f)
    r.do("truncate-negative", os.truncate, f, -1)
    r.do("truncate-dir", os.truncate, r.root, 0)
    r.do("truncate-missing", os.truncate, r.p("missing"), 0)
    # O_APPEND: every write goes to the end, whatever the offset (pwrite too, on Linux)
    fd = r.do("open-append", os.open, f, os.O_WRONLY | os.O_APPEND, show=FD)
    r.do("append-1", os.write, fd, b"tail1")
    r.do("lseek-0", os.lseek, fd, 0, os.SEEK_SET)
    r.do("append-2", os.write, fd, b"tail2")
    r.do("lseek-after-append", os.lseek, fd, 0, os.SEEK_CUR)
    r.do("pwrite-append", os.pwrite, fd, b"tail3", 0)
    r.do("read-wronly", os.read, fd, 1)
    r.do("fstat-append", os.fstat, fd)
    os.close(fd)
    r.do("tail", lambda: read_path(f)[-20:])
    fd = r.do("open-rdonly", os.open, f, os.O_RDONLY, show=FD)
    r.do("write-rdonly", os.write, fd, b"x")
    r.do("ftruncate-rdonly", os.ftruncate, fd, 0)
    os.close(fd)
    # a large write and read that span many FUSE requests
    big = rand(3 * 1024 * 1024 + 123, 1)
    r.do("write-big", write_path, r.p("big"), big)
    r.do("read-big", read_path, r.p("big"))
    fd = os.open(r.p("big"), os.O_RDWR)
    r.do("pwrite-mid", os.pwrite, fd, b"X" * 300_000, 1_000_001)
    r.do("pread-mid", os.pread, fd, 300_010, 1_000_000)
    r.do("pread-beyond", os.pread, fd, 10, 10**9)
    os.close(fd)
    r.content("big-after", r.p("big"))
    r.stat("stat-big", r.p("big"))
    # write then read through two descriptors of one file
    fd1 = os.open(r.p("two"), os.O_CREAT | os.O_RDWR, 0o600)
    fd2 = os.open(r.p("two"), os.O_RDONLY)
    r.do("write-fd1", os.write, fd1, b"shared view")
    r.do("read-fd2", os.read, fd2, 100)
    r.do("fstat-fd2", os.fstat, fd2)
    os.close(fd1)
    os.close(fd2)
    return r.obs


@scenario
def sparse_files(root: Path) -> list[Obs]:
    r = Rec(root)
    f = r.p("sparse")
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    r.do("seek-past-end", os.lseek, fd, 1 << 20, os.SEEK_SET)
    r.do("write", os.write, fd, b"data" * 1024)
    r.do("seek-far", os.lseek, fd, 3 << 20, os.SEEK_SET)
    r.do("write-far", os.write, fd, b"more")
    r.do("fsync", os.fsync, fd)
    st = r.do("fstat", os.fstat, fd)
    r.note("blocks", st.st_blocks if st else None)
    for whence, name in ((os.SEEK_DATA, "data"), (os.SEEK_HOLE, "hole")):
        for off in (0, 4096, (1 << 20) + 1, (2 << 20), (3 << 20), (3 << 20) + 4, (4 << 20)):
            r.do(f"seek-{name}-{off}", os.lseek, fd, off, whence)
    r.do("pread-hole", os.pread, fd, 16, 5000)
    r.do("pread-data", os.pread, fd, 8, 1 << 20)
    r.do("ftruncate-grow", os.ftruncate, fd, 16 << 20)
    r.do("seek-hole-after-grow", os.lseek, fd, (3 << 20) + 4, os.SEEK_HOLE)
    r.do("seek-data-in-tail", os.lseek, fd, 10 << 20, os.SEEK_DATA)
    st = r.do("fstat-grown", os.fstat, fd)
    r.note("blocks-grown", st.st_blocks if st else None)
    os.close(fd)
    st = r.stat("stat", f)
    r.note("blocks-path", st.st_blocks if st else None)
    # a fully sparse file: only a size
    r.do("truncate-new", lambda: os.close(os.open(r.p("hole-only"), os.O_CREAT | os.O_WRONLY)))
    r.do("truncate-big", os.truncate, r.p("hole-only"), 1 << 27)
    st = r.stat("stat-hole-only", r.p("hole-only"))
    r.note("blocks-hole-only", st.st_blocks if st else None)
    fd = os.open(r.p("hole-only"), os.O_RDONLY)
    r.do("hole-only-data", os.lseek, fd, 0, os.SEEK_DATA)
    r.do("hole-only-hole", os.lseek, fd, 0, os.SEEK_HOLE)
    os.close(fd)
    return r.obs


@scenario
def directories(root: Path) -> list[Obs]:
    r = Rec(root)
    d = r.p("d")
    r.do("mkdir", os.mkdir, d, 0o755)
    r.do("mkdir-again", os.mkdir, d)
    r.do("mkdir-sub", os.mkdir, r.p("d", "sub"))
    r.do("mkdir-sub2", os.mkdir, r.p("d", "sub2"), 0o700)
    r.stat("stat-d", d)
    r.stat("stat-sub2", r.p("d", "sub2"))
    r.do("rmdir-nonempty", os.rmdir, d)
    r.do("rmdir-sub", os.rmdir, r.p("d", "sub"))
    r.stat("stat-d-after", d)
    r.do("rmdir-missing", os.rmdir, r.p("d", "sub"))
    r.do("rmdir-dot", os.rmdir, r.p("d", "sub2", "."))
    r.do("rmdir-dotdot", os.rmdir, r.p("d", "sub2", ".."))
    r.do("mkdir-missing-parent", os.mkdir, r.p("nope", "x"))
    r.do("write-file", write_path, r.p("f"), b"x")
    r.do("mkdir-under-file", os.mkdir, r.p("f", "x"))
    r.do("mkdir-over-file", os.mkdir, r.p("f"))
    r.do("rmdir-file", os.rmdir, r.p("f"))
    r.do("unlink-dir", os.unlink, d)
    r.do("unlink-missing", os.unlink, r.p("missing"))
    r.do("mkdir-sticky", os.mkdir, r.p("sticky"), 0o1777)
    r.stat("stat-sticky", r.p("sticky"))
    r.do("makedirs", os.makedirs, r.p("a", "b", "c", "d"))
    r.do("listdir-root", lambda: sorted(os.listdir(r.root)))
    r.do("listdir-a", os.listdir, r.p("a"))
    r.do("listdir-file", os.listdir, r.p("f"))
    r.do("listdir-missing", os.listdir, r.p("missing"))
    r.do("name-255", write_path, r.p("n" * 255), b"long name")
    r.do("name-256", write_path, r.p("n" * 256), b"too long")
    r.do("mkdir-256", os.mkdir, r.p("m" * 256))
    r.do("stat-256", os.stat, r.p("s" * 256))
    r.do("rmdir-sub2", os.rmdir, r.p("d", "sub2"))
    r.do("rmdir-d", os.rmdir, d)
    r.stat("stat-d-gone", d)
    r.stat("stat-root", r.root)
    return r.obs


@scenario
def renames(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p

    def ls(op: str, *path: str) -> None:
        r.do(op, lambda: sorted(os.listdir(p(*path))))

    write_path(p("a"), b"A")
    write_path(p("b"), b"B")
    os.makedirs(p("d1", "inner"))
    write_path(p("d1", "inner", "x"), b"X")
    os.mkdir(p("empty"))
    os.makedirs(p("full", "child"))
    os.mkdir(p("other"))
    # a file, with an open descriptor that must survive the rename
    fd = os.open(p("a"), os.O_RDONLY)
    r.do("file", os.rename, p("a"), p("a2"))
    r.stat("old-gone", p("a"))
    r.content("new", p("a2"))
    r.do("fd-after-rename", os.pread, fd, 10, 0)
    os.close(fd)
    r.do("over-file", os.rename, p("a2"), p("b"))
    r.content("over-file-content", p("b"))
    r.stat("over-file-src-gone", p("a2"))
    r.do("same-name", os.rename, p("b"), p("b"))
    r.content("same-name-content", p("b"))
    r.do("file-over-dir", os.rename, p("b"), p("empty"))
    r.do("dir-over-file", os.rename, p("empty"), p("b"))
    r.do("dir", os.rename, p("d1"), p("d2"))
    ls("dir-list", "d2", "inner")
    r.content("dir-content", p("d2", "inner", "x"))
    r.stat("dir-old-gone", p("d1"))
    r.do("dir-over-empty-dir", os.rename, p("d2"), p("empty"))
    ls("after-over-empty", ".")
    r.content("over-empty-content", p("empty", "inner", "x"))
    r.do("dir-over-nonempty", os.rename, p("other"), p("full"))
    r.do("into-own-subdir", os.rename, p("empty"), p("empty", "inner", "sub"))
    r.do("onto-own-subdir", os.rename, p("empty"), p("empty", "inner"))
    r.do("parent-onto-child", os.rename, p("full"), p("full", "child"))
    r.do("across-dirs", os.rename, p("empty", "inner", "x"), p("other", "y"))
    r.content("across-content", p("other", "y"))
    ls("across-src", "empty", "inner")
    ls("across-dst", "other")
    r.stat("nlink-src-dir", p("empty"))
    r.do("dir-across-dirs", os.rename, p("empty", "inner"), p("other", "inner"))
    r.stat("nlink-after-dir-move-src", p("empty"))
    r.stat("nlink-after-dir-move-dst", p("other"))
    r.do("missing", os.rename, p("nothing"), p("x"))
    r.do("into-missing-dir", os.rename, p("b"), p("nodir", "b"))
    r.do("through-file", os.rename, p("b"), p("b", "c"))
    r.do("dot", os.rename, p("other", "."), p("z"))
    # hard links to one inode: rename(2) does nothing and both names stay
    os.link(p("b"), p("b-link"))
    r.do("onto-own-hardlink", os.rename, p("b"), p("b-link"))
    ls("hardlinks-kept", ".")
    r.stat("hardlink-nlink", p("b"))
    # renameat2
    write_path(p("n1"), b"N1")
    write_path(p("n2"), b"N2")
    r.do("noreplace-existing", renameat2, p("n1"), p("n2"), linux_fs.RENAME_NOREPLACE)
    r.do("noreplace-new", renameat2, p("n1"), p("n3"), linux_fs.RENAME_NOREPLACE)
    r.content("noreplace-content", p("n3"))
    r.stat("noreplace-src-gone", p("n1"))
    r.do("noreplace-dir-over-empty", renameat2, p("other"), p("full", "child"),
         linux_fs.RENAME_NOREPLACE)
    r.do("exchange", renameat2, p("n2"), p("n3"), linux_fs.RENAME_EXCHANGE)
    r.content("exchange-n2", p("n2"))
    r.content("exchange-n3", p("n3"))
    r.do("exchange-file-dir", renameat2, p("n2"), p("other"), linux_fs.RENAME_EXCHANGE)
    r.stat("exchange-file-dir-a", p("n2"))
    r.stat("exchange-file-dir-b", p("other"))
    ls("exchange-file-dir-list", "n2")
    r.do("exchange-dirs-across", renameat2, p("n2", "inner"), p("full", "child"),
         linux_fs.RENAME_EXCHANGE)
    ls("exchange-dirs-across-a", "n2", "inner")
    ls("exchange-dirs-across-b", "full", "child")
    r.do("exchange-missing", renameat2, p("n3"), p("missing"), linux_fs.RENAME_EXCHANGE)
    r.do("exchange-noreplace", renameat2, p("n3"), p("b"),
         linux_fs.RENAME_EXCHANGE | linux_fs.RENAME_NOREPLACE)
    r.do("bad-flags", renameat2, p("n3"), p("n9"), 1 << 10)
    ls("final", ".")
    return r.obs


@scenario
def hard_links(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    write_path(p("f"), b"one")
    os.mkdir(p("sub"))
    r.do("link", os.link, p("f"), p("g"))
    r.do("link-into-subdir", os.link, p("f"), p("sub", "h"))
    r.stat("nlink-f", p("f"))
    r.stat("nlink-g", p("g"))
    r.do("same-inode", lambda: os.stat(p("f")).st_ino == os.stat(p("sub", "h")).st_ino)
    r.do("write-via-g", write_path, p("g"), b"changed", os.O_WRONLY | os.O_TRUNC)
    r.content("read-via-f", p("f"))
    r.content("read-via-h", p("sub", "h"))
    r.do("link-existing", os.link, p("f"), p("g"))
    r.do("link-dir", os.link, p("sub"), p("sub-link"))
    r.do("link-missing", os.link, p("missing"), p("m"))
    r.do("link-into-missing", os.link, p("f"), p("nodir", "m"))
    r.do("unlink-f", os.unlink, p("f"))
    r.stat("nlink-after-unlink", p("g"))
    r.stat("f-gone", p("f"))
    fd = os.open(p("g"), os.O_RDONLY)
    r.do("fstat-open", os.fstat, fd)
    r.do("unlink-g", os.unlink, p("g"))
    r.do("unlink-h", os.unlink, p("sub", "h"))
    r.do("fstat-unlinked", os.fstat, fd)
    r.do("read-unlinked", os.pread, fd, 100, 0)
    os.close(fd)
    # a file unlinked while open for writing stays usable
    fd = os.open(p("tmp"), os.O_CREAT | os.O_RDWR, 0o600)
    os.unlink(p("tmp"))
    r.do("write-unlinked", os.write, fd, b"ghost data")
    r.do("pread-unlinked", os.pread, fd, 100, 0)
    r.do("ftruncate-unlinked", os.ftruncate, fd, 4)
    r.do("fstat-ghost", os.fstat, fd)
    os.close(fd)
    # hard links to a symlink (linkat without AT_SYMLINK_FOLLOW) and through one (with it)
    write_path(p("target"), b"T")
    os.symlink("target", p("sym"))
    r.do("link-symlink-itself", os.link, p("sym"), p("sym2"), follow_symlinks=False)
    r.stat("sym2-lstat", p("sym2"), follow=False)
    r.do("sym2-readlink", os.readlink, p("sym2"))
    r.do("link-through-symlink", os.link, p("sym"), p("target2"), follow_symlinks=True)
    r.stat("target-nlink", p("target"))
    r.stat("target2-lstat", p("target2"), follow=False)
    return r.obs


@scenario
def symlinks(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    write_path(p("target.txt"), b"through the link")
    os.mkdir(p("dir"))
    write_path(p("dir", "inside"), b"in")
    r.do("symlink", os.symlink, "target.txt", p("ln"))
    r.do("readlink", os.readlink, p("ln"))
    r.stat("lstat", p("ln"), follow=False)
    r.stat("stat", p("ln"))
    r.content("read-through", p("ln"))
    r.do("symlink-existing", os.symlink, "x", p("ln"))
    r.do("symlink-dangling", os.symlink, "nowhere/at/all", p("dangling"))
    r.stat("dangling-stat", p("dangling"))
    r.stat("dangling-lstat", p("dangling"), follow=False)
    r.do("dangling-readlink", os.readlink, p("dangling"))
    r.do("dangling-open", os.open, p("dangling"), os.O_RDONLY, show=FD)
    r.do("symlink-to-new", os.symlink, "created-through-link", p("creator"))
    r.do("creat-through-dangling", write_path, p("creator"), b"made", os.O_WRONLY | os.O_CREAT)
    r.content("created-content", p("created-through-link"))
    r.do("symlink-to-new2", os.symlink, "excl-target", p("excl"))
    r.do("excl-through-dangling", os.open, p("excl"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
         show=FD)
    r.do("nofollow-open", os.open, p("ln"), os.O_RDONLY | os.O_NOFOLLOW, show=FD)
    r.do("readlink-file", os.readlink, p("target.txt"))
    r.do("readlink-dir", os.readlink, p("dir"))
    r.do("readlink-missing", os.readlink, p("missing"))
    r.do("symlink-abs", os.symlink, "/nonexistent/absolute/path", p("abs"))
    r.do("readlink-abs", os.readlink, p("abs"))
    long_target = "/".join(["segment"] * 500)
    r.do("symlink-long", os.symlink, long_target, p("long"))
    r.do("readlink-long", os.readlink, p("long"))
    r.stat("lstat-long", p("long"), follow=False)
    r.do("symlink-too-long", os.symlink, "x" * 5000, p("toolong"))
    r.do("symlink-dir", os.symlink, "dir", p("dirlink"))
    r.do("listdir-through", os.listdir, p("dirlink"))
    r.content("read-through-dir", p("dirlink", "inside"))
    r.do("symlink-loop-a", os.symlink, "loop-b", p("loop-a"))
    r.do("symlink-loop-b", os.symlink, "loop-a", p("loop-b"))
    r.stat("loop-stat", p("loop-a"))
    r.do("loop-open", os.open, p("loop-a"), os.O_RDONLY, show=FD)
    r.do("rmdir-symlink-to-dir", os.rmdir, p("dirlink"))
    r.do("unlink-symlink", os.unlink, p("ln"))
    r.content("target-kept", p("target.txt"))
    r.do("utime-nofollow", os.utime, p("abs"), ns=(OLD - 7, OLD - 5), follow_symlinks=False)
    st = r.stat("lstat-after-utime", p("abs"), follow=False)
    r.note("symlink-times", st and (st.st_atime_ns, st.st_mtime_ns))
    r.do("chown-nofollow", os.chown, p("abs"), 4321, 8765, follow_symlinks=False)
    r.stat("lstat-after-chown", p("abs"), follow=False)
    r.do("listdir", lambda: sorted(os.listdir(r.root)))
    return r.obs


@scenario
def modes_times_owners(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    f = p("f")
    write_path(f, b"mode bits")
    os.mkdir(p("d"))
    for mode in (0o600, 0o000, 0o4755, 0o2755, 0o1777, 0o7777, 0o644):
        r.do(f"chmod-{mode:o}", os.chmod, f, mode)
        r.stat(f"stat-{mode:o}", f)
    r.do("chmod-dir", os.chmod, p("d"), 0o2711)
    r.stat("stat-dir", p("d"))
    r.do("chmod-missing", os.chmod, p("missing"), 0o600)
    fd = os.open(f, os.O_RDWR)
    r.do("fchmod", os.fchmod, fd, 0o640)
    r.do("fstat", os.fstat, fd)
    # set-id bits survive a write by root (CAP_FSETID), but not a chown
    r.do("fchmod-suid", os.fchmod, fd, 0o6755)
    r.do("write-suid", os.pwrite, fd, b"x", 0)
    r.do("fstat-after-write", os.fstat, fd)
    r.do("chown", os.chown, f, 1234, 5678)
    r.do("fstat-after-chown", os.fstat, fd)
    r.do("fchown-gid-only", os.fchown, fd, -1, 99)
    r.do("fstat-after-fchown", os.fstat, fd)
    r.do("chown-uid-only", os.chown, f, 4321, -1)
    r.stat("stat-after-uid-only", f)
    os.close(fd)
    # times set explicitly, to the nanosecond, before 1970 and far in the future
    for name, (at, mt) in (("ns", (OLD - 10**9 + 123456789, OLD - 987654321)),
                           ("pre-1970", (-1_500_000_000 * 10**9 + 5, -(10**9) + 7)),
                           ("y2100", (4_102_444_800 * 10**9, 4_102_444_800 * 10**9 + 1))):
        r.do(f"utime-{name}", os.utime, f, ns=(at, mt))
        st = r.stat(f"stat-utime-{name}", f)
        r.note(f"times-{name}", st and (st.st_atime_ns, st.st_mtime_ns))
    r.do("utime-seconds", os.utime, f, (OLD // 10**9 - 100, OLD // 10**9 - 50))
    st = os.stat(f)
    r.note("times-seconds", st.st_atime_ns, st.st_mtime_ns)
    # only one of the two times: the other is left alone (UTIME_OMIT)
    r.do("omit-atime", utimensat, f, (0, linux_fs.UTIME_OMIT), (OLD // 10**9 - 3000, 42))
    st = os.stat(f)
    r.note("times-omit-atime", st.st_atime_ns, st.st_mtime_ns)
    r.do("omit-mtime", utimensat, f, (OLD // 10**9 - 4000, 43), (0, linux_fs.UTIME_OMIT))
    st = os.stat(f)
    r.note("times-omit-mtime", st.st_atime_ns, st.st_mtime_ns)
    st = os.stat(f)
    r.do("utime-mtime-only", os.utime, f, ns=(st.st_atime_ns, OLD - 77))
    st = os.stat(f)
    r.note("times-utime-mtime-only", st.st_atime_ns, st.st_mtime_ns)
    r.do("omit-both", utimensat, f, (0, linux_fs.UTIME_OMIT), (0, linux_fs.UTIME_OMIT))
    st = os.stat(f)
    r.note("times-omit-both", st.st_atime_ns, st.st_mtime_ns)
    r.do("bad-nsec", utimensat, f, (0, 10**9), (0, 0))
    # "now": only that the times moved to the present, since the two runs happen at other times
    before = time.time_ns() - 10**9
    r.do("utime-now", os.utime, f)
    st = os.stat(f)
    r.note("now-is-recent", st.st_mtime_ns >= before, st.st_atime_ns >= before)
    r.do("now-mtime-only", utimensat, f, (OLD // 10**9, 0), (0, linux_fs.UTIME_NOW))
    st = os.stat(f)
    r.note("now-mtime-only", st.st_atime_ns, st.st_mtime_ns >= before)
    os.utime(f, ns=(OLD, OLD))
    fd = os.open(f, os.O_RDONLY)
    r.do("futimens", os.utime, fd, ns=(OLD - 11, OLD - 13))
    st = os.fstat(fd)
    r.note("times-futimens", st.st_atime_ns, st.st_mtime_ns)
    os.close(fd)
    # a write moves mtime (and leaves the explicit atime alone)
    r.do("write-moves-mtime", write_path, f, b"new", os.O_WRONLY)
    st = os.stat(f)
    r.note("mtime-moved", st.st_mtime_ns >= before, st.st_atime_ns)
    r.do("utime-dir", os.utime, p("d"), ns=(OLD - 21, OLD - 22))
    st = os.stat(p("d"))
    r.note("times-dir", st.st_atime_ns, st.st_mtime_ns)
    r.do("chown-dir", os.chown, p("d"), 7, 8)
    r.stat("stat-dir-chown", p("d"))
    # creating in a set-gid directory inherits its group (and set-gid for subdirectories)
    r.do("mkdir-in-sgid", os.mkdir, p("d", "sub"))
    r.stat("stat-sgid-sub", p("d", "sub"))
    r.do("create-in-sgid", write_path, p("d", "file"), b"")
    r.stat("stat-sgid-file", p("d", "file"))
    r.do("utime-missing", os.utime, p("missing"), ns=(1, 1))
    return r.obs


@scenario
def xattrs(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    f = p("f")
    write_path(f, b"x")
    os.mkdir(p("d"))
    os.symlink("f", p("ln"))
    r.do("set", os.setxattr, f, "user.a", b"1")
    r.do("set-empty", os.setxattr, f, "user.empty", b"")
    r.do("set-big", os.setxattr, f, "user.big", rand(3000, 2))
    r.do("get", os.getxattr, f, "user.a")
    r.do("get-empty", os.getxattr, f, "user.empty")
    r.do("get-big", os.getxattr, f, "user.big")
    r.do("list", os.listxattr, f)
    r.do("get-missing", os.getxattr, f, "user.nope")
    r.do("create-existing", os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    r.do("replace-missing", os.setxattr, f, "user.nope", b"2", os.XATTR_REPLACE)
    r.do("replace", os.setxattr, f, "user.a", b"22", os.XATTR_REPLACE)
    r.do("create-new", os.setxattr, f, "user.b", b"3", os.XATTR_CREATE)
    r.do("get-replaced", os.getxattr, f, "user.a")
    r.do("remove", os.removexattr, f, "user.a")
    r.do("remove-missing", os.removexattr, f, "user.a")
    r.do("get-removed", os.getxattr, f, "user.a")
    r.do("list-after", os.listxattr, f)
    r.do("set-unknown-namespace", os.setxattr, f, "bogus.a", b"1")
    r.do("set-name-too-long", os.setxattr, f, "user." + "n" * 300, b"1")
    r.do("set-too-big", os.setxattr, f, "user.huge", b"v" * 70000)
    r.do("set-trusted", os.setxattr, f, "trusted.t", b"root only")
    r.do("get-trusted", os.getxattr, f, "trusted.t")
    r.do("set-dir", os.setxattr, p("d"), "user.dir", b"on a dir")
    r.do("get-dir", os.getxattr, p("d"), "user.dir")
    r.do("list-dir", os.listxattr, p("d"))
    r.do("get-through-symlink", os.getxattr, p("ln"), "user.b")
    r.do("set-on-symlink", os.setxattr, p("ln"), "user.s", b"1", follow_symlinks=False)
    r.do("get-on-symlink", os.getxattr, p("ln"), "user.b", follow_symlinks=False)
    r.do("list-on-symlink", os.listxattr, p("ln"), follow_symlinks=False)
    r.do("remove-on-symlink", os.removexattr, p("ln"), "user.b", follow_symlinks=False)
    r.do("get-missing-file", os.getxattr, p("missing"), "user.a")
    r.do("list-missing-file", os.listxattr, p("missing"))
    fd = os.open(f, os.O_RDONLY)
    r.do("fsetxattr", os.setxattr, fd, "user.fd", b"via fd")
    r.do("fgetxattr", os.getxattr, fd, "user.fd")
    r.do("flistxattr", os.listxattr, fd)
    os.close(fd)
    many = [f"user.k{i:03d}" for i in range(50)]
    for name in many:
        os.setxattr(p("d"), name, name.encode() * 3)
    r.do("list-many", os.listxattr, p("d"))
    return r.obs


@scenario
def open_flags(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    f = p("f")
    fd = r.do("excl-new", os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640, show=FD)
    r.do("write", os.write, fd, b"0123456789")
    os.close(fd)
    r.stat("stat-new", f)
    r.do("excl-existing", os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, show=FD)
    r.do("excl-dir", os.open, r.root, os.O_CREAT | os.O_EXCL | os.O_RDONLY, show=FD)
    fd = r.do("creat-existing", os.open, f, os.O_CREAT | os.O_RDWR, 0o600, show=FD)
    r.do("creat-existing-keeps", os.read, fd, 100)
    r.do("creat-existing-fstat", os.fstat, fd)
    os.close(fd)
    fd = r.do("trunc", os.open, f, os.O_TRUNC | os.O_RDWR, show=FD)
    r.do("trunc-fstat", os.fstat, fd)
    r.do("trunc-write", os.write, fd, b"abc")
    os.close(fd)
    r.content("after-trunc", f)
    fd = r.do("rdonly-trunc", os.open, f, os.O_TRUNC | os.O_RDONLY, show=FD)
    os.close(fd)
    r.stat("after-rdonly-trunc", f)
    write_path(f, b"base")
    fd = r.do("append-creat", os.open, f, os.O_APPEND | os.O_CREAT | os.O_RDWR, show=FD)
    r.do("append-write", os.write, fd, b"+1")
    r.do("append-pos", os.lseek, fd, 0, os.SEEK_CUR)
    r.do("append-read-start", os.pread, fd, 100, 0)
    os.close(fd)
    fd = r.do("trunc-append", os.open, f, os.O_APPEND | os.O_TRUNC | os.O_WRONLY, show=FD)
    r.do("trunc-append-write", os.write, fd, b"fresh")
    os.close(fd)
    r.content("after-trunc-append", f)
    r.do("directory-flag-on-file", os.open, f, os.O_RDONLY | os.O_DIRECTORY, show=FD)
    r.do("dir-wronly", os.open, r.root, os.O_WRONLY, show=FD)
    r.do("dir-rdwr", os.open, r.root, os.O_RDWR, show=FD)
    r.do("missing", os.open, p("missing"), os.O_RDONLY, show=FD)
    r.do("creat-missing-dir", os.open, p("nodir", "x"), os.O_CREAT | os.O_WRONLY, 0o644, show=FD)
    r.do("through-file", os.open, p("f", "x"), os.O_RDONLY, show=FD)
    r.do("creat-through-file", os.open, p("f", "x"), os.O_CREAT | os.O_RDWR, show=FD)
    r.do("creat-trailing-slash", os.open, p("newdir/"), os.O_CREAT | os.O_RDWR, show=FD)
    fd = r.do("creat-mode-000", os.open, p("locked"), os.O_CREAT | os.O_WRONLY, 0o000, show=FD)
    r.do("write-mode-000", os.write, fd, b"root may")
    os.close(fd)
    r.stat("stat-mode-000", p("locked"))
    fd = r.do("creat-setid", os.open, p("setid"), os.O_CREAT | os.O_WRONLY, 0o6755, show=FD)
    os.close(fd)
    r.stat("stat-setid", p("setid"))
    old = os.umask(0o077)
    try:
        fd = r.do("creat-umask", os.open, p("umasked"), os.O_CREAT | os.O_WRONLY, 0o666, show=FD)
        os.close(fd)
        r.do("mkdir-umask", os.mkdir, p("umasked-dir"), 0o777)
    finally:
        os.umask(old)
    r.stat("stat-umask", p("umasked"))
    r.stat("stat-umask-dir", p("umasked-dir"))
    fd = r.do("noatime", os.open, f, os.O_RDONLY | os.O_NOATIME, show=FD)
    os.close(fd)
    fd = r.do("sync-flags", os.open, f, os.O_WRONLY | os.O_SYNC | os.O_DSYNC, show=FD)
    r.do("sync-write", os.write, fd, b"S")
    os.close(fd)
    r.content("final", f)
    return r.obs


@scenario
def special_files(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    r.do("mkfifo", os.mkfifo, p("fifo"), 0o640)
    r.stat("stat-fifo", p("fifo"))
    r.do("mkfifo-existing", os.mkfifo, p("fifo"))
    r.do("mknod-fifo", os.mknod, p("fifo2"), stat.S_IFIFO | 0o600)
    r.stat("stat-fifo2", p("fifo2"))
    r.do("mknod-reg", os.mknod, p("reg"), stat.S_IFREG | 0o604)
    r.stat("stat-reg", p("reg"))
    r.do("mknod-sock", os.mknod, p("sock"), stat.S_IFSOCK | 0o755)
    r.stat("stat-sock", p("sock"))
    r.do("mknod-chr", os.mknod, p("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    r.stat("stat-chr", p("null"))
    r.do("mknod-blk", os.mknod, p("blk"), stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    r.stat("stat-blk", p("blk"))
    r.do("mknod-dir", os.mknod, p("dir"), stat.S_IFDIR | 0o755)
    # a fifo on the share is still a pipe of this kernel: data goes through it
    rfd = r.do("fifo-open-reader", os.open, p("fifo"), os.O_RDONLY | os.O_NONBLOCK, show=FD)
    wfd = r.do("fifo-open-writer", os.open, p("fifo"), os.O_WRONLY | os.O_NONBLOCK, show=FD)
    r.do("fifo-write", os.write, wfd, b"through the pipe")
    r.do("fifo-read", os.read, rfd, 100)
    r.do("fifo-read-empty", os.read, rfd, 100)
    r.do("fifo-lseek", os.lseek, rfd, 0, os.SEEK_SET)
    os.close(wfd)
    os.close(rfd)
    r.do("fifo2-writer-no-reader", os.open, p("fifo2"), os.O_WRONLY | os.O_NONBLOCK, show=FD)
    r.do("fifo-chmod", os.chmod, p("fifo"), 0o600)
    r.stat("fifo-after-chmod", p("fifo"))
    r.do("fifo-rename", os.rename, p("fifo"), p("fifo-renamed"))
    r.do("fifo-link", os.link, p("fifo-renamed"), p("fifo-link"))
    r.stat("fifo-nlink", p("fifo-renamed"))
    r.do("fifo-truncate", os.truncate, p("fifo2"), 0)
    r.do("listdir", lambda: sorted(os.listdir(r.root)))
    r.do("dtypes", dtypes, r.root)
    return r.obs


@scenario
def statvfs(root: Path) -> list[Obs]:
    # f_bsize/f_frsize/f_namemax describe the host file system; counts of free blocks and
    # f_flag (the mount's own nosuid/nodev) legitimately differ
    r = Rec(root)
    write_path(r.p("f"), b"x")
    for path in (r.root, r.p("f")):
        r.do("statvfs", lambda path=path: (lambda s: (s.f_bsize, s.f_frsize, s.f_namemax))(
            os.statvfs(path)))
    fd = os.open(r.p("f"), os.O_RDONLY)
    r.do("fstatvfs", lambda: (lambda s: (s.f_bsize, s.f_frsize, s.f_namemax))(os.fstatvfs(fd)))
    os.close(fd)
    r.do("statvfs-missing", os.statvfs, r.p("missing"))
    return r.obs


@scenario
def big_directory(root: Path) -> list[Obs]:
    r = Rec(root)
    d = r.p("many")
    os.mkdir(d)
    names = [f"entry-{i:05d}{'-' + 'x' * (i % 40)}" for i in range(2000)]
    for i, name in enumerate(names):
        if i % 10 == 0:
            os.mkdir(os.path.join(d, name))
        else:
            write_path(os.path.join(d, name), name.encode())
    listed = sorted(os.listdir(d))
    r.note("listed-all", len(listed), sha("\n".join(listed).encode()), listed == sorted(names))
    r.note("scandir-dirs", sum(1 for e in os.scandir(d) if e.is_dir(follow_symlinks=False)))
    r.stat("stat-many", d)
    for name in names[::2]:
        path = os.path.join(d, name)
        if os.path.isdir(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    listed = sorted(os.listdir(d))
    r.note("listed-half", len(listed), sha("\n".join(listed).encode()), listed == sorted(names[1::2]))
    r.do("dtypes-half", lambda: sha(repr(dtypes(d)).encode()))
    r.stat("stat-many-half", d)
    # entries added and removed while a directory stream is open: the names that were there
    # all along are seen exactly once
    with os.scandir(d) as it:
        first = [next(it).name for _ in range(10)]
        for i in range(100):
            write_path(os.path.join(d, f"added-{i}"), b"")
        seen = first + [e.name for e in it]
    stable = set(names[1::2])
    r.note("stable-seen-once", sorted(n for n in seen if n in stable) == sorted(stable))
    return r.obs


@scenario
def directory_handles(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    os.mkdir(p("d"))
    write_path(p("d", "file"), b"f")
    os.mkdir(p("d", "sub"))
    os.symlink("file", p("d", "link"))
    os.symlink("missing", p("d", "dangling"))
    os.mkfifo(p("d", "fifo"))
    os.mknod(p("d", "sock"), stat.S_IFSOCK | 0o600)
    fd = r.do("open-dir-rdonly", os.open, p("d"), os.O_RDONLY, show=FD)
    r.do("fstat-dir", os.fstat, fd)
    r.do("read-dir-fd", os.read, fd, 10)
    r.do("write-dir-fd", os.write, fd, b"x")
    r.do("listdir-fd", lambda: sorted(os.listdir(fd)))
    r.do("scandir-fd", lambda: sorted(
        (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
         e.is_symlink()) for e in os.scandir(fd)))
    r.do("fsync-dir", os.fsync, fd)
    r.do("stat-at", lambda: st_obs(os.stat("file", dir_fd=fd)))
    r.do("open-at", lambda: read_path(f"/proc/self/fd/{fd}/file"))
    r.do("mkdir-at", os.mkdir, "made-at", dir_fd=fd)
    r.do("unlink-at-dir", os.unlink, "made-at", dir_fd=fd)
    r.do("rmdir-at", os.rmdir, "made-at", dir_fd=fd)
    os.close(fd)
    r.do("open-directory-flag", lambda: os.close(os.open(p("d"), os.O_RDONLY | os.O_DIRECTORY)))
    r.do("scandir", lambda: sorted(
        (e.name, e.is_dir(), e.is_file(), e.is_symlink(), e.is_dir(follow_symlinks=False),
         e.is_file(follow_symlinks=False)) for e in os.scandir(p("d"))))
    r.do("scandir-stat", lambda: sorted(
        (e.name, st_obs(e.stat(follow_symlinks=False))) for e in os.scandir(p("d"))))
    r.do("dtypes", dtypes, p("d"))
    r.do("dtypes-root", dtypes, r.root)
    r.do("dtypes-file", dtypes, p("d", "file"))
    r.do("walk", lambda: sorted((os.path.relpath(dp, r.root), sorted(dn), sorted(fn))
                                for dp, dn, fn in os.walk(r.root)))
    return r.obs


@scenario
def sync_copy_allocate(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    data = rand(1 << 20, 3)
    fd = os.open(p("src"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, data)
    r.do("fsync", os.fsync, fd)
    r.do("fdatasync", os.fdatasync, fd)
    out = os.open(p("dst"), os.O_CREAT | os.O_RDWR, 0o644)
    r.do("cfr-all", os.copy_file_range, fd, out, 1 << 20, 0, 0)
    r.do("cfr-part", os.copy_file_range, fd, out, 1000, 5000, (1 << 20) + 10)
    r.do("cfr-src-eof", os.copy_file_range, fd, out, 1000, 1 << 20, 0)
    r.do("cfr-overlap-same", os.copy_file_range, fd, fd, 1000, 0, 500)
    r.do("cfr-same-file", os.copy_file_range, fd, fd, 1000, 0, 4 << 20)
    r.do("fstat-dst", os.fstat, out)
    r.content("dst", p("dst"))
    ro = os.open(p("src"), os.O_RDONLY)
    r.do("cfr-to-rdonly", os.copy_file_range, fd, ro, 10, 0, 0)
    ap = os.open(p("dst"), os.O_WRONLY | os.O_APPEND)
    r.do("cfr-to-append", os.copy_file_range, fd, ap, 10, 0, 0)
    os.close(ap)
    # fallocate and posix_fallocate
    r.do("fallocate", linux_fs.fallocate, out, 0, 0, 4 << 20)
    st = r.do("fstat-fallocated", os.fstat, out)
    r.note("blocks-fallocated", st and st.st_blocks)
    r.do("fallocate-keep-size", linux_fs.fallocate, out, FALLOC_FL_KEEP_SIZE, 8 << 20, 1 << 20)
    st = r.do("fstat-keep-size", os.fstat, out)
    r.note("blocks-keep-size", st and st.st_blocks)
    r.do("punch-hole", linux_fs.fallocate, out, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
         8192, 65536)
    r.do("read-punched", os.pread, out, 65536 + 16384, 4096)
    st = r.do("fstat-punched", os.fstat, out)
    r.note("blocks-punched", st and st.st_blocks)
    r.do("seek-hole-punched", os.lseek, out, 0, os.SEEK_HOLE)
    r.do("seek-data-punched", os.lseek, out, 8192, os.SEEK_DATA)
    r.do("punch-no-keep-size", linux_fs.fallocate, out, FALLOC_FL_PUNCH_HOLE, 0, 4096)
    r.do("zero-range", linux_fs.fallocate, out, FALLOC_FL_ZERO_RANGE, 100_000, 50_000)
    r.do("read-zeroed", os.pread, out, 50_010, 99_995)
    r.do("fallocate-bad-len", linux_fs.fallocate, out, 0, 0, 0)
    r.do("fallocate-rdonly", linux_fs.fallocate, ro, 0, 0, 4096)
    r.do("posix-fallocate", os.posix_fallocate, out, 0, 6 << 20)
    r.do("fstat-posix-fallocate", os.fstat, out)
    r.do("posix-fadvise", os.posix_fadvise, out, 0, 0, os.POSIX_FADV_DONTNEED)
    r.do("fsync-dst", os.fsync, out)
    os.close(ro)
    os.close(out)
    os.close(fd)
    r.content("dst-final", p("dst"))
    r.do("sync", os.sync)
    return r.obs


@scenario
def odd_names(root: Path) -> list[Obs]:
    r = Rec(root)
    base = os.fsencode(r.root)
    names = [b"with space", b"new\nline", b"tab\tand\\back", "\u00fcn\u00efc\u00f8d\u00e9".encode(),
             b"\xff\xfe not utf-8", b".hidden", b"-dash", b"...", b"a:b*c?d|e<f>g\"h'",
             "\u00e9".encode() * 127, "\u00e9".encode() * 128, b" ", b"\x01\x7f"]
    for i, name in enumerate(names):
        path = base + b"/" + name
        r.do(f"create-{i}", write_path, path, name)
        r.do(f"read-{i}", read_path, path)
        r.do(f"rename-{i}", os.rename, path, path + b".moved")
        r.do(f"mkdir-{i}", os.mkdir, path)
        r.do(f"symlink-{i}", os.symlink, name, path + b"/link")
        r.do(f"readlink-{i}", os.readlink, path + b"/link")
    r.do("listdir", lambda: sorted(os.listdir(base)))
    r.do("dtypes", dtypes, r.root)
    return r.obs


@scenario
def open_files_survive(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    os.makedirs(p("dir", "sub"))
    write_path(p("dir", "sub", "f"), b"original")
    write_path(p("replacement"), b"replacement")
    fd = os.open(p("dir", "sub", "f"), os.O_RDWR)
    r.do("rename-parent", os.rename, p("dir"), p("dir2"))
    r.do("write-after-parent-rename", os.pwrite, fd, b"ORIG", 0)
    r.content("read-new-path", p("dir2", "sub", "f"))
    r.do("rename-over-open", os.rename, p("replacement"), p("dir2", "sub", "f"))
    r.do("read-replaced-fd", os.pread, fd, 100, 0)
    r.do("fstat-replaced-fd", os.fstat, fd)
    r.content("read-replacement", p("dir2", "sub", "f"))
    r.do("chmod-000-open", os.fchmod, fd, 0o000)
    r.do("read-after-chmod-000", os.pread, fd, 4, 0)
    os.close(fd)
    fd = os.open(p("dir2", "sub", "f"), os.O_RDONLY)
    r.do("fstat-other-fd-size", lambda: os.fstat(fd).st_size)
    with open(p("dir2", "sub", "f"), "ab") as f:
        f.write(b" grown elsewhere")
    r.do("seek-end-sees-growth", os.lseek, fd, 0, os.SEEK_END)
    r.do("read-growth", os.pread, fd, 100, 0)
    os.close(fd)
    # very large offsets: sparse, and past what the file system allows
    fd = os.open(p("huge"), os.O_CREAT | os.O_RDWR, 0o644)
    for off in (1 << 32, 1 << 40, (1 << 44) - 10, 1 << 44, (1 << 63) - 2):
        r.do(f"pwrite-at-{off}", os.pwrite, fd, b"edge", off)
        r.do(f"fstat-at-{off}", lambda: os.fstat(fd).st_size)
    r.do("seek-data-huge", os.lseek, fd, 0, os.SEEK_DATA)
    r.do("pread-huge", os.pread, fd, 8, 1 << 40)
    r.do("ftruncate-too-big", os.ftruncate, fd, 1 << 50)
    r.do("ftruncate-back", os.ftruncate, fd, 10)
    os.close(fd)
    r.stat("stat-huge", p("huge"))
    # a directory removed while it is some process's cwd
    os.mkdir(p("cwd"))
    cwd = os.getcwd()
    try:
        os.chdir(p("cwd"))
        r.do("rmdir-cwd", os.rmdir, p("cwd"))
        r.do("create-in-removed-cwd", write_path, "x", b"")
        r.do("listdir-removed-cwd", os.listdir, ".")
    finally:
        os.chdir(cwd)
    return r.obs


@scenario
def mmap_and_direct(root: Path) -> list[Obs]:
    r = Rec(root)
    f = r.p("mapped")
    write_path(f, rand(5 * 4096 + 100, 4))
    fd = os.open(f, os.O_RDWR)
    m = mmap.mmap(fd, 0)
    r.do("mmap-read", lambda: sha(m[4000:9000]))
    m[10:20] = b"0123456789"
    m[4096 * 5:4096 * 5 + 5] = b"TAIL!"
    r.do("msync", m.flush)
    r.do("read-after-msync", os.pread, fd, 30, 0)
    r.do("pwrite-seen-by-map", os.pwrite, fd, b"via write", 100)
    r.do("map-sees-write", lambda: m[100:109])
    m.close()
    r.do("ftruncate-after-map", os.ftruncate, fd, 8192)
    m = mmap.mmap(fd, 8192, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:4] = b"PRIV"
    r.do("private-map-not-written", os.pread, fd, 4, 0)
    m.close()
    os.close(fd)
    r.content("mapped-final", f)
    # O_DIRECT with page-aligned buffers, offsets and sizes (what the local fs demands)
    fd = r.do("open-direct", os.open, r.p("direct"), os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644,
              show=FD)
    buf = mmap.mmap(-1, 3 * 4096)
    buf[:] = rand(3 * 4096, 5)
    r.do("direct-write", os.write, fd, buf)
    r.do("direct-pwrite", os.pwrite, fd, memoryview(buf)[:4096], 8192)
    # (an unaligned buffer is EINVAL on a local block file system but works on the share: the
    # server does its I/O without O_DIRECT, and FUSE itself does not demand alignment)
    rbuf = mmap.mmap(-1, 3 * 4096)
    r.do("direct-preadv", os.preadv, fd, [rbuf], 0)
    r.do("direct-read-data", lambda: sha(bytes(rbuf)))
    r.do("direct-fstat", os.fstat, fd)
    os.close(fd)
    r.content("direct-final", r.p("direct"))
    # vectored I/O
    fd = os.open(r.p("vec"), os.O_CREAT | os.O_RDWR, 0o644)
    r.do("writev", os.writev, fd, [b"abc", b"", b"defgh", b"i" * 70000])
    r.do("pwritev", os.pwritev, fd, [b"XY", b"Z"], 1)
    a, b = bytearray(4), bytearray(70010)
    r.do("preadv", os.preadv, fd, [a, b], 0)
    r.note("preadv-data", bytes(a), sha(bytes(b)))
    r.do("sendfile", lambda: os.sendfile(fd, os.open(r.p("mapped"), os.O_RDONLY), 0, 3000))
    os.close(fd)
    r.content("vec-final", r.p("vec"))
    return r.obs


_AS_USER = r"""
import errno, os, sys
os.chdir(sys.argv[1])  # while still root: the test's temporary directories are private
root = "."
os.setgroups([3000])
os.setgid(2000)
os.setuid(1000)
obs = []
def do(op, fn, *a, **k):
    try:
        res = fn(*a, **k)
    except OSError as e:
        obs.append(("error", op, errno.errorcode[e.errno]))
        return None
    if isinstance(res, os.stat_result):
        res = (oct(res.st_mode), res.st_uid, res.st_gid, res.st_size, res.st_nlink)
    obs.append((op, res))
p = lambda *x: os.path.join(root, *x)
def write(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644):
    fd = os.open(path, flags, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)
def read(path):
    with open(path, "rb") as f:
        return f.read()
do("read-private", read, p("private"))
do("read-public", read, p("public"))
do("write-public", write, p("public"), b"x", os.O_WRONLY)
do("truncate-public", os.truncate, p("public"), 0)
do("create-in-closed", write, p("closed", "x"), b"x")
do("listdir-closed", lambda: sorted(os.listdir(p("closed"))))
do("listdir-search-only", os.listdir, p("search-only"))
do("stat-in-search-only", os.stat, p("search-only", "f"))
do("stat-in-list-only", os.stat, p("list-only", "f"))
do("listdir-list-only", os.listdir, p("list-only"))
do("create-in-open", write, p("open", "mine"), b"mine")
do("stat-mine", os.stat, p("open", "mine"))
do("mkdir-in-open", os.mkdir, p("open", "mydir"), 0o775)
do("stat-mydir", os.stat, p("open", "mydir"))
do("symlink-in-open", os.symlink, "mine", p("open", "mylink"))
do("lstat-mylink", os.lstat, p("open", "mylink"))
do("mkfifo-in-open", os.mkfifo, p("open", "myfifo"))
do("stat-myfifo", os.stat, p("open", "myfifo"))
do("mknod-chr-in-open", os.mknod, p("open", "mychr"), 0o20644, os.makedev(1, 3))
do("create-in-sgid", write, p("sgid", "f"), b"")
do("stat-in-sgid", os.stat, p("sgid", "f"))
do("mkdir-in-sgid", os.mkdir, p("sgid", "d"))
do("stat-mkdir-in-sgid", os.stat, p("sgid", "d"))
do("create-suid-sgid", write, p("open", "setid"), b"", mode=0o6755)
do("stat-setid", os.stat, p("open", "setid"))
do("chmod-others", os.chmod, p("public"), 0o777)
do("chown-mine-to-root", os.chown, p("open", "mine"), 0, -1)
do("chgrp-mine-not-member", os.chown, p("open", "mine"), -1, 0)
do("chgrp-mine-member", os.chown, p("open", "mine"), -1, 3000)
do("stat-chgrp", os.stat, p("open", "mine"))
do("chmod-mine-setgid-nonmember", os.chmod, p("open", "mydir"), 0o2775)
do("chmod-mine", os.chmod, p("open", "mine"), 0o4750)
do("stat-chmod-mine", os.stat, p("open", "mine"))
do("write-own-suid", write, p("open", "mine"), b"again", os.O_WRONLY)
do("stat-after-own-suid-write", os.stat, p("open", "mine"))
do("utime-now-writable", os.utime, p("shared-rw"))
do("utime-explicit-not-owner", os.utime, p("shared-rw"), ns=(1, 1))
do("write-suid-kills", write, p("suid-rw"), b"y", os.O_WRONLY)
do("stat-suid-rw", os.stat, p("suid-rw"))
do("truncate-sgid-kills", os.truncate, p("sgid-rw"), 1)
do("stat-sgid-rw", os.stat, p("sgid-rw"))
do("unlink-sticky-others", os.unlink, p("sticky", "roots"))
do("rename-sticky-others", os.rename, p("sticky", "roots"), p("sticky", "x"))
do("create-sticky-own", write, p("sticky", "own"), b"")
do("rename-sticky-own", os.rename, p("sticky", "own"), p("sticky", "own2"))
do("unlink-sticky-own", os.unlink, p("sticky", "own2"))
do("setxattr-readonly", os.setxattr, p("public"), "user.x", b"1")
do("getxattr-public", os.getxattr, p("public"), "user.tag")
do("setxattr-trusted", os.setxattr, p("open", "mine"), "trusted.x", b"1")
do("setxattr-own", os.setxattr, p("open", "mine"), "user.mine", b"1")
do("link-others-file", os.link, p("private"), p("open", "stolen"))
do("link-own-file", os.link, p("open", "mine"), p("open", "mine2"))
do("access-private-r", os.access, p("private"), os.R_OK)
do("access-public-w", os.access, p("public"), os.W_OK)
do("access-exec", os.access, p("script"), os.X_OK)
do("rmdir-others-empty", os.rmdir, p("open", "roots-dir"))
do("rename-dir-others-into", os.rename, p("open", "mydir"), p("closed", "mydir"))
print(repr(obs))
"""


@scenario
def other_user(root: Path) -> list[Obs]:
    """Permission checks and ownership of what an unprivileged user (uid 1000) does."""
    r = Rec(root)
    p = r.p
    write_path(p("private"), b"secret", mode=0o600)
    write_path(p("public"), b"public", mode=0o644)
    os.setxattr(p("public"), "user.tag", b"t")
    write_path(p("script"), b"#!/bin/sh\n", mode=0o755)
    write_path(p("shared-rw"), b"rw", mode=0o666)
    os.chmod(p("shared-rw"), 0o666)
    for name, mode in (("suid-rw", 0o6777), ("sgid-rw", 0o2777)):
        write_path(p(name), b"setid")
        os.chmod(p(name), mode)
    for name, mode in (("closed", 0o755), ("open", 0o777), ("sticky", 0o1777),
                       ("search-only", 0o711), ("list-only", 0o744), ("sgid", 0o2777)):
        os.mkdir(p(name))
        os.chmod(p(name), mode)
    os.chown(p("sgid"), 0, 4000)
    os.mkdir(p("open", "roots-dir"))
    write_path(p("search-only", "f"), b"")
    write_path(p("list-only", "f"), b"")
    write_path(p("sticky", "roots"), b"", mode=0o666)
    out = subprocess.run([sys.executable, "-c", _AS_USER, r.root], capture_output=True,
                         text=True, timeout=60)
    r.note("child", out.returncode, out.stderr)
    r.obs.extend(ast.literal_eval(out.stdout or "[]"))
    for name in ("open/mine", "open/mine2", "open/mydir", "open/mylink", "open/myfifo",
                 "sgid/f", "sgid/d", "open/setid", "suid-rw", "sgid-rw", "public"):
        r.stat(f"root-sees-{name}", p(name), follow=False)
    return r.obs


_WRITER = r"""
import os, sys
path, other, tag, parity = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
chunk = 65536
fd = os.open(path, os.O_WRONLY)
for i in range(parity, 64, 2):
    os.pwrite(fd, tag * chunk, i * chunk)
os.close(fd)
with open(other, "wb") as f:
    for i in range(64):
        f.write(tag * 4096 + str(i).encode())
"""


@scenario
def concurrent_writers(root: Path) -> list[Obs]:
    r = Rec(root)
    f = r.p("shared")
    write_path(f, b"\0" * (64 * 65536))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, f, r.p(f"own-{t}"), t, str(n)])
             for n, t in enumerate("AB")]
    r.note("exit", [proc.wait(60) for proc in procs])
    data = read_path(f)
    r.note("interleaved", sha(data), data[:1] + data[65536:65537] + data[-1:])
    r.content("own-A", r.p("own-A"))
    r.content("own-B", r.p("own-B"))
    return r.obs


_LOCKER = r"""
import errno, fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
what = sys.argv[2]
if what == "hold-flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
elif what == "hold-posix":
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
else:
    op = {"try-ex": fcntl.LOCK_EX, "try-sh": fcntl.LOCK_SH}[what]
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        print("got", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
    sys.exit(0)
print("locked", flush=True)
sys.stdin.read()
"""


def _lock_child(path: str, what: str) -> str:
    out = subprocess.run([sys.executable, "-c", _LOCKER, path, what], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip() + out.stderr.strip()


@scenario
def locks(root: Path) -> list[Obs]:
    r = Rec(root)
    f = r.p("lockfile")
    write_path(f, b"x" * 1000)
    fd = os.open(f, os.O_RDWR)
    holder = subprocess.Popen([sys.executable, "-c", _LOCKER, f, "hold-flock"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    r.note("holder", holder.stdout.readline().strip())
    r.do("ex-nb-while-held", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r.do("sh-nb-while-held", fcntl.flock, fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    holder.stdin.close()
    r.note("holder-exit", holder.wait(30))
    r.do("ex-nb-after-exit", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r.note("child-try-ex", _lock_child(f, "try-ex"))
    r.note("child-try-sh", _lock_child(f, "try-sh"))
    r.do("downgrade-sh", fcntl.flock, fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    r.note("child-try-sh-shared", _lock_child(f, "try-sh"))
    r.note("child-try-ex-shared", _lock_child(f, "try-ex"))
    r.do("unlock", fcntl.flock, fd, fcntl.LOCK_UN)
    r.note("child-try-ex-free", _lock_child(f, "try-ex"))
    # flock belongs to the open file description: a second open in this process conflicts
    fd2 = os.open(f, os.O_RDONLY)
    r.do("ex-fd1", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r.do("ex-fd2-conflict", fcntl.flock, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
    dup = os.dup(fd)
    r.do("dup-shares-lock", fcntl.flock, dup, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)  # the dup keeps the description, and so the lock
    r.do("ex-fd2-still-conflicts", fcntl.flock, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(dup)
    r.do("ex-fd2-after-last-close", fcntl.flock, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd2)
    # the lock goes with the last close, at once: a new description can take it right away
    fails = 0
    for _ in range(200):
        fd1 = os.open(f, os.O_RDWR)
        fcntl.flock(fd1, fcntl.LOCK_EX)
        os.close(fd1)
        fd2 = os.open(f, os.O_RDWR)
        try:
            fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fails += 1
        os.close(fd2)
    r.note("relock-after-close-failures", fails)
    # POSIX record locks between processes
    fd = os.open(f, os.O_RDWR)
    holder = subprocess.Popen([sys.executable, "-c", _LOCKER, f, "hold-posix"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    r.note("posix-holder", holder.stdout.readline().strip())
    r.do("posix-overlap", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
    r.do("posix-disjoint", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 200)
    holder.stdin.close()
    r.note("posix-holder-exit", holder.wait(30))
    r.do("posix-after-exit", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
    os.close(fd)
    return r.obs


@scenario
def errors(root: Path) -> list[Obs]:
    r = Rec(root)
    p = r.p
    write_path(p("file"), b"f")
    os.mkdir(p("dir"))
    r.do("stat-missing", os.stat, p("missing"))
    r.do("stat-through-file", os.stat, p("file", "x"))
    r.do("stat-trailing-slash-file", os.stat, p("file") + "/")
    r.do("stat-trailing-slash-dir", os.stat, p("dir") + "/")
    r.do("stat-dotdot-in-dir", lambda: st_obs(os.stat(p("dir", "..")))[0])
    r.do("unlink-trailing-slash", os.unlink, p("file") + "/")
    r.do("access-missing", os.access, p("missing"), os.F_OK)
    r.do("access-file", os.access, p("file"), os.R_OK | os.W_OK)
    r.do("access-exec", os.access, p("file"), os.X_OK)
    os.chmod(p("file"), 0o755)
    r.do("access-exec-755", os.access, p("file"), os.X_OK)
    r.do("chdir-file", os.chdir, p("file"))
    cwd = os.getcwd()
    try:
        r.do("chdir", os.chdir, p("dir"))
        r.do("relative-create", write_path, "relative", b"rel")
        r.do("getcwd-tail", lambda: os.path.basename(os.getcwd()))
    finally:
        os.chdir(cwd)
    r.content("relative", p("dir", "relative"))
    r.do("deep", os.makedirs, p(*["deep"] * 40))
    r.do("deep-file", write_path, p(*["deep"] * 40, "leaf"), b"leaf")
    r.content("deep-read", p(*["deep"] * 40, "leaf"))
    return r.obs


# --- the comparison ---------------------------------------------------------------------------
def tree(root: Path) -> dict[str, Obs]:
    """Everything that must match in a directory tree (no inode numbers, no "now" times)."""
    out: dict[str, Obs] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: Obs = st_obs(st)
            if stat.S_ISREG(st.st_mode):
                entry += (sha(read_path(path)),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            if stat.S_ISDIR(st.st_mode):
                entry = entry[:2] + entry[3:]  # a directory's st_size is the host fs's business
            # hard links: which earlier name is the same inode (a relation, not a number)
            entry += (inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None,)
            if st.st_mtime_ns < OLD:  # set explicitly by the scenario
                entry += (st.st_mtime_ns,)
            if not stat.S_ISLNK(st.st_mode):
                entry += (sorted((x, os.getxattr(path, x, follow_symlinks=False))
                                 for x in os.listxattr(path, follow_symlinks=False)),)
            out[rel] = entry
    return out


def assert_same(local: list[Obs], shared: list[Obs]) -> None:
    for i, (want, got) in enumerate(zip(local, shared, strict=False)):  # lengths: below
        assert got == want, f"observation {i} differs: local {want!r}, share {got!r}"
    assert len(shared) == len(local), f"local made {len(local)} observations, share {len(shared)}"


def assert_same_tree(local: dict[str, Obs], shared: dict[str, Obs], what: str) -> None:
    assert sorted(shared) == sorted(local), f"{what}: the names differ"
    for name in local:
        assert shared[name] == local[name], f"{what}: {name} differs"


@pytest.mark.parametrize("fn", SCENARIOS, ids=lambda f: f.__name__)
def test_scenario(fn: Scenario, share: Share, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    want = fn(local)
    got = fn(share.mnt)
    assert_same(want, got)
    want_tree = tree(local)
    assert_same_tree(want_tree, tree(share.src), "host side")
    assert_same_tree(want_tree, tree(share.mnt), "through the mount")
    assert share.proc.poll() is None, share.output()


# --- not differential: sizes and round trips ---------------------------------------------------
def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_stream(path: Path, size: int, seed: int) -> str:
    h = hashlib.sha256()
    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            chunk = bytes([i & 0xFF]) + block[1:]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


@pytest.mark.timeout(300)
def test_large_file_round_trip(share: Share) -> None:
    size = 100 << 20
    want = _write_stream(share.mnt / "guest.bin", size, 7)
    assert os.stat(share.src / "guest.bin").st_size == size
    assert _sha_file(share.src / "guest.bin") == want
    assert _sha_file(share.mnt / "guest.bin") == want
    want = _write_stream(share.src / "host.bin", size + (1 << 20), 8)
    assert os.stat(share.mnt / "host.bin").st_size == size + (1 << 20)
    assert _sha_file(share.mnt / "host.bin") == want
