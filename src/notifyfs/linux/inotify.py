"""inotify: constants, a parser for the event stream (no I/O), and a thin fd wrapper."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .libc import check
from .libc import libc as _libc

_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_CREATE = 0x10000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_ONESHOT = 0x80000000
IN_CLOSE = IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
IN_MOVE = IN_MOVED_FROM | IN_MOVED_TO
IN_ALL_EVENTS = 0xFFF
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

NAMES = {
    IN_ACCESS: "ACCESS", IN_MODIFY: "MODIFY", IN_ATTRIB: "ATTRIB", IN_CLOSE_WRITE: "CLOSE_WRITE",
    IN_CLOSE_NOWRITE: "CLOSE_NOWRITE", IN_OPEN: "OPEN", IN_MOVED_FROM: "MOVED_FROM",
    IN_MOVED_TO: "MOVED_TO", IN_CREATE: "CREATE", IN_DELETE: "DELETE",
    IN_DELETE_SELF: "DELETE_SELF", IN_MOVE_SELF: "MOVE_SELF", IN_UNMOUNT: "UNMOUNT",
    IN_Q_OVERFLOW: "Q_OVERFLOW", IN_IGNORED: "IGNORED", IN_ISDIR: "ISDIR",
}

_EVENT = struct.Struct("=iIII")


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    cookie: int
    name: bytes


def mask_names(mask: int) -> str:
    return "|".join(n for bit, n in NAMES.items() if mask & bit) or hex(mask)


def parse_events(buf: bytes) -> Iterator[Event]:
    """Split a buffer read from an inotify fd into events."""
    pos = 0
    while pos + _EVENT.size <= len(buf):
        wd, mask, cookie, length = _EVENT.unpack_from(buf, pos)
        pos += _EVENT.size
        name = buf[pos:pos + length].split(b"\0", 1)[0]
        pos += length
        yield Event(wd, mask, cookie, name)


class Inotify:
    def __init__(self, flags: int = IN_CLOEXEC) -> None:
        self.fd = check(_libc.inotify_init1(flags), "inotify_init1")

    def add_watch(self, path: str | bytes, mask: int) -> int:
        return check(_libc.inotify_add_watch(self.fd, os.fsencode(path), mask),
                     "inotify_add_watch", path)

    def rm_watch(self, wd: int) -> None:
        check(_libc.inotify_rm_watch(self.fd, wd), "inotify_rm_watch")

    def read(self, size: int = 1 << 16) -> list[Event]:
        return list(parse_events(os.read(self.fd, size)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
