"""File-system system calls the os module lacks: openat2, renameat2, fchownat/utimensat with
AT_EMPTY_PATH, fallocate, name_to_handle_at. Each raises OSError like the os module does."""

from __future__ import annotations

import ctypes
import os
import struct

from .libc import check as _check
from .libc import libc as _libc

_libc.syscall.restype = ctypes.c_long

SYS_openat2 = 437
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

MAX_HANDLE_SZ = 128


def _b(name: str | bytes) -> bytes:
    return os.fsencode(name)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    res = _libc.syscall(SYS_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(_b(path)),
                        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(res, "openat2", path)


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(olddirfd: int, old: str | bytes, newdirfd: int, new: str | bytes, flags: int = 0) -> None:
    _check(_libc.renameat2(olddirfd, _b(old), newdirfd, _b(new), flags), "renameat2", old)


_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """chown the inode an (O_PATH) fd refers to, never following a symlink; -1 keeps a value."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH), "fchownat")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def utimens_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(fd, "", times, AT_EMPTY_PATH); a time is (sec, nsec), nsec may be UTIME_NOW/OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "utimensat")


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]


def name_to_handle(fd: int) -> tuple[int, bytes, int]:
    """(handle_type, handle bytes, mount id) of the inode behind ``fd``."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=Ii", buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int(0)
    _check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH),
           "name_to_handle_at")
    nbytes, htype = struct.unpack_from("=Ii", buf, 0)
    return htype, buf.raw[8:8 + nbytes], mount_id.value


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def link_empty(fd: int, newdirfd: int, name: str | bytes) -> None:
    """linkat(fd, "", newdirfd, name, AT_EMPTY_PATH): link exactly the inode behind ``fd``
    (needs CAP_DAC_READ_SEARCH; callers fall back to /proc/self/fd)."""
    _check(_libc.linkat(fd, b"", newdirfd, _b(name), AT_EMPTY_PATH), "linkat", name)


def proc_path(fd: int) -> str:
    """A path that reopens exactly the inode behind ``fd`` (an O_PATH fd), wherever it lives."""
    return f"/proc/self/fd/{fd}"


_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]

FUSE_HANDLE_TYPE = 0x81  # fuse_encode_fh: u32 nodeid >> 32, u32 nodeid & 0xffffffff, u32 generation


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """open_by_handle_at (needs CAP_DAC_READ_SEARCH); ``mount_fd`` must not be an O_PATH fd."""
    buf = ctypes.create_string_buffer(struct.pack("=Ii", len(handle), handle_type) + handle)
    return _check(_libc.open_by_handle_at(mount_fd, buf, flags | os.O_CLOEXEC), "open_by_handle_at")


def open_fuse_inode(mount_fd: int, nodeid: int, generation: int, flags: int = os.O_PATH) -> int:
    """Open the guest's cached FUSE inode ``nodeid`` by its file handle; ESTALE when the guest
    kernel does not have the inode any more."""
    body = struct.pack("=III", nodeid >> 32, nodeid & 0xFFFFFFFF, generation & 0xFFFFFFFF)
    return open_by_handle(mount_fd, FUSE_HANDLE_TYPE, body, flags)


def parse_fuse_handle(hexbytes: str) -> tuple[int, int]:
    """(nodeid, generation) from the f_handle hex that /proc/PID/fdinfo shows for a FUSE inode."""
    raw = bytes.fromhex(hexbytes)
    hi, lo, gen = struct.unpack("=III", raw[:12])
    return (hi << 32) | lo, gen


def act_as(uid: int, gid: int) -> None:
    """Make the calling thread's filesystem accesses those of ``uid``:``gid`` (setfsuid and
    setfsgid act on one thread, unlike setuid). Leaving fsuid 0 also drops the thread's
    filesystem capabilities (DAC override, chown, mknod of devices), so the host's own permission
    checks apply to everything the thread does."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    # both calls return the previous id and never fail visibly: read the ids back to be sure
    if _libc.setfsuid(-1 & 0xFFFFFFFF) != uid or _libc.setfsgid(-1 & 0xFFFFFFFF) != gid:
        raise PermissionError(f"cannot act as {uid}:{gid} on the host")
