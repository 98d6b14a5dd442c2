"""fanotify with file-handle reporting: constants, a parser for the event stream (no I/O), and
thin wrappers for fanotify_init / fanotify_mark. Handles are kept as reported: type (4 bytes,
native order) then the handle bytes."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .libc import check
from .libc import libc as _libc

_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100

FAN_ACCESS = 0x1
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_CLOSE_NOWRITE = 0x10
FAN_OPEN = 0x20
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

INFO_FID = 1
INFO_DFID_NAME = 2
INFO_DFID = 3
INFO_OLD_DFID_NAME = 10
INFO_NEW_DFID_NAME = 12

_META = struct.Struct("=IBBHQii")
_INFO = struct.Struct("=BBH")
_FID = struct.Struct("=iiIi")  # fsid[2], handle_bytes, handle_type


@dataclass
class Event:
    mask: int
    tid: int
    fid: bytes = b""  # the object: handle type (4 bytes LE) + handle
    dir_fid: bytes = b""  # the directory named with ``name``
    name: bytes = b""
    old_dir_fid: bytes = b""  # FAN_RENAME: where it was ...
    old_name: bytes = b""
    new_dir_fid: bytes = b""  # ... and where it is
    new_name: bytes = b""
    extra: dict[int, bytes] = field(default_factory=dict)


def parse_events(buf: bytes) -> Iterator[Event]:
    pos = 0
    while pos + _META.size <= len(buf):
        event_len, _vers, _res, meta_len, mask, fd, pid = _META.unpack_from(buf, pos)
        if event_len < meta_len or pos + event_len > len(buf):
            return
        if fd >= 0:
            os.close(fd)  # not in FID mode; never leak one
        ev = Event(mask, pid)
        p = pos + meta_len
        end = pos + event_len
        while p + _INFO.size <= end:
            itype, _pad, ilen = _INFO.unpack_from(buf, p)
            if ilen < _INFO.size:
                break
            rec = buf[p + _INFO.size:p + ilen]
            p += ilen
            if itype in (INFO_FID, INFO_DFID_NAME, INFO_DFID, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME):
                _f0, _f1, hbytes, htype = _FID.unpack_from(rec)
                handle = struct.pack("=i", htype) + rec[_FID.size:_FID.size + hbytes]
                name = b""
                if itype != INFO_FID and itype != INFO_DFID:
                    name = rec[_FID.size + hbytes:].split(b"\0", 1)[0]
                if itype == INFO_FID:
                    ev.fid = handle
                elif itype in (INFO_DFID_NAME, INFO_DFID):
                    ev.dir_fid, ev.name = handle, name
                elif itype == INFO_OLD_DFID_NAME:
                    ev.old_dir_fid, ev.old_name = handle, name
                else:
                    ev.new_dir_fid, ev.new_name = handle, name
        pos += event_len
        yield ev


def init(flags: int, event_flags: int = os.O_RDONLY) -> int:
    return check(_libc.fanotify_init(flags, event_flags), "fanotify_init")


def mark(fd: int, flags: int, mask: int, path: str) -> None:
    check(_libc.fanotify_mark(fd, flags, mask, -100, os.fsencode(path)), "fanotify_mark", path)
