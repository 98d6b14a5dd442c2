"""Sans-IO FUSE protocol core: bytes in, typed requests out; replies and notifications to bytes.

Nothing here reads or writes a file descriptor. Decoding any malformed input raises
:class:`ProtocolError` and nothing else; when the header could be read, the error carries the
request's ``unique`` so that the caller can answer it with an error instead of dropping the peer.
"""

from __future__ import annotations

import errno as _errno
import os
import stat as _stat
import struct
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator

from . import abi
from .abi import Opcode

#: largest frame either side accepts: 1 MiB of payload (max_write) plus headers and a name
MAX_WRITE = 1 << 20
MAX_FRAME = MAX_WRITE + 64 * 1024
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
LINK_MAX = 4096  # PATH_MAX, for symlink targets


class ProtocolError(Exception):
    """Malformed input. ``unique`` is set when the request can still be answered."""

    def __init__(self, message: str, unique: int | None = None, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.unique = unique
        self.errno = errno


@dataclass(slots=True)
class Request:
    """One decoded kernel request.

    ``arg`` is the fixed-size argument struct (a named tuple of the abi Layout) or None;
    ``names`` the NUL-terminated strings that follow it (entry name, second name, xattr name);
    ``data`` the trailing payload (WRITE data, xattr value, BATCH_FORGET entries, raw tail).
    """

    opcode: int
    unique: int
    nodeid: int
    uid: int = 0
    gid: int = 0
    pid: int = 0
    arg: Any = None
    names: tuple[bytes, ...] = ()
    data: bytes = b""
    forgets: tuple[tuple[int, int], ...] = ()
    extensions: bytes = b""

    @property
    def name(self) -> bytes:
        return self.names[0]

    @property
    def opname(self) -> str:
        return abi.OPCODE_NAMES.get(self.opcode, str(self.opcode))


# Body shapes
_NONE, _NAME, _NAME2, _WRITE, _XATTR, _FORGETS, _RAW = range(7)


@dataclass(frozen=True, slots=True)
class _Shape:
    layout: abi.Layout | None
    body: int


_SHAPES: dict[int, _Shape] = {
    Opcode.LOOKUP: _Shape(None, _NAME),
    Opcode.FORGET: _Shape(abi.FORGET_IN, _NONE),
    Opcode.GETATTR: _Shape(abi.GETATTR_IN, _NONE),
    Opcode.SETATTR: _Shape(abi.SETATTR_IN, _NONE),
    Opcode.READLINK: _Shape(None, _NONE),
    Opcode.SYMLINK: _Shape(None, _NAME2),
    Opcode.MKNOD: _Shape(abi.MKNOD_IN, _NAME),
    Opcode.MKDIR: _Shape(abi.MKDIR_IN, _NAME),
    Opcode.UNLINK: _Shape(None, _NAME),
    Opcode.RMDIR: _Shape(None, _NAME),
    Opcode.RENAME: _Shape(abi.RENAME_IN, _NAME2),
    Opcode.LINK: _Shape(abi.LINK_IN, _NAME),
    Opcode.OPEN: _Shape(abi.OPEN_IN, _NONE),
    Opcode.READ: _Shape(abi.READ_IN, _NONE),
    Opcode.WRITE: _Shape(abi.WRITE_IN, _WRITE),
    Opcode.STATFS: _Shape(None, _NONE),
    Opcode.RELEASE: _Shape(abi.RELEASE_IN, _NONE),
    Opcode.FSYNC: _Shape(abi.FSYNC_IN, _NONE),
    Opcode.SETXATTR: _Shape(abi.SETXATTR_IN, _XATTR),
    Opcode.GETXATTR: _Shape(abi.GETXATTR_IN, _NAME),
    Opcode.LISTXATTR: _Shape(abi.GETXATTR_IN, _NONE),
    Opcode.REMOVEXATTR: _Shape(None, _NAME),
    Opcode.FLUSH: _Shape(abi.FLUSH_IN, _NONE),
    Opcode.INIT: _Shape(abi.INIT_IN, _NONE),
    Opcode.OPENDIR: _Shape(abi.OPEN_IN, _NONE),
    Opcode.READDIR: _Shape(abi.READ_IN, _NONE),
    Opcode.RELEASEDIR: _Shape(abi.RELEASE_IN, _NONE),
    Opcode.FSYNCDIR: _Shape(abi.FSYNC_IN, _NONE),
    Opcode.GETLK: _Shape(abi.LK_IN, _NONE),
    Opcode.SETLK: _Shape(abi.LK_IN, _NONE),
    Opcode.SETLKW: _Shape(abi.LK_IN, _NONE),
    Opcode.ACCESS: _Shape(abi.ACCESS_IN, _NONE),
    Opcode.CREATE: _Shape(abi.CREATE_IN, _NAME),
    Opcode.INTERRUPT: _Shape(abi.INTERRUPT_IN, _NONE),
    Opcode.BMAP: _Shape(abi.BMAP_IN, _NONE),
    Opcode.DESTROY: _Shape(None, _NONE),
    Opcode.IOCTL: _Shape(abi.IOCTL_IN, _RAW),
    Opcode.POLL: _Shape(abi.POLL_IN, _NONE),
    Opcode.NOTIFY_REPLY: _Shape(abi.NOTIFY_RETRIEVE_IN, _RAW),
    Opcode.BATCH_FORGET: _Shape(abi.BATCH_FORGET_IN, _FORGETS),
    Opcode.FALLOCATE: _Shape(abi.FALLOCATE_IN, _NONE),
    Opcode.READDIRPLUS: _Shape(abi.READ_IN, _NONE),
    Opcode.RENAME2: _Shape(abi.RENAME2_IN, _NAME2),
    Opcode.LSEEK: _Shape(abi.LSEEK_IN, _NONE),
    Opcode.COPY_FILE_RANGE: _Shape(abi.COPY_FILE_RANGE_IN, _NONE),
    Opcode.SETUPMAPPING: _Shape(None, _RAW),
    Opcode.REMOVEMAPPING: _Shape(None, _RAW),
    Opcode.SYNCFS: _Shape(abi.SYNCFS_IN, _NONE),
    Opcode.TMPFILE: _Shape(abi.CREATE_IN, _NAME),
    Opcode.STATX: _Shape(abi.STATX_IN, _NONE),
    Opcode.NOTIFYFS_FSNOTIFY: _Shape(abi.NOTIFY_FSNOTIFY_IN, _NONE),
    Opcode.NOTIFYFS_REVIVE: _Shape(None, _RAW),
}
KNOWN_OPCODES = frozenset(_SHAPES)


@dataclass(slots=True)
class Session:
    """What INIT negotiated: decoding of a few requests depends on it."""

    minor: int = abi.MAX_MINOR
    flags: int = 0

    def layout_for(self, opcode: int) -> abi.Layout | None:
        if opcode == Opcode.SETXATTR and not self.flags & abi.SETXATTR_EXT:
            return abi.SETXATTR_IN_COMPAT
        return _SHAPES[opcode].layout


def _split_name(body: bytes, pos: int, unique: int, limit: int = NAME_MAX) -> tuple[bytes, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("string without terminating NUL", unique)
    name = body[pos:end]
    if len(name) > limit:
        raise ProtocolError("name too long", unique, _errno.ENAMETOOLONG)
    return name, end + 1


def decode_request(frame: bytes, session: Session | None = None) -> Request:
    """Decode one whole request frame (as read from /dev/fuse or the socket)."""
    session = session or Session()
    if len(frame) < abi.IN_HEADER.size:
        raise ProtocolError(f"request shorter than its header ({len(frame)} bytes)")
    h = abi.IN_HEADER.unpack_from(frame)
    unique = h.unique
    if h.len != len(frame):
        raise ProtocolError(f"header length {h.len} != frame length {len(frame)}", unique)
    if len(frame) > MAX_FRAME:
        raise ProtocolError("request too large", unique, _errno.E2BIG)
    shape = _SHAPES.get(h.opcode)
    if shape is None:
        raise ProtocolError(f"unknown opcode {h.opcode}", unique, _errno.ENOSYS)
    body = frame[abi.IN_HEADER.size:]
    ext = b""
    if h.total_extlen:
        extlen = h.total_extlen * 8
        if extlen > len(body):
            raise ProtocolError("extension longer than the request", unique)
        body, ext = body[:-extlen], body[-extlen:]
    layout = session.layout_for(h.opcode)
    arg: Any = None
    pos = 0
    if layout is not None:
        size = layout.size
        if h.opcode == Opcode.INIT and len(body) == abi.INIT_IN_COMPAT.size:
            # kernels before 7.36 send the short fuse_init_in
            body = body + bytes(abi.INIT_IN.size - len(body))
        if len(body) < size:
            raise ProtocolError(f"{abi.OPCODE_NAMES[h.opcode]}: argument truncated", unique)
        arg = layout.unpack_from(body)
        if layout is abi.SETXATTR_IN_COMPAT:
            arg = abi.SETXATTR_IN.tuple(arg.size, arg.flags, 0)
        pos = size
    names: tuple[bytes, ...] = ()
    data = b""
    forgets: tuple[tuple[int, int], ...] = ()
    kind = shape.body
    if kind == _NONE:
        if h.opcode == Opcode.INIT:
            pass  # fuse_init_in may grow; trailing bytes are ignored by definition
        elif len(body) != pos:
            raise ProtocolError(f"{abi.OPCODE_NAMES[h.opcode]}: {len(body) - pos} stray bytes", unique)
    elif kind == _NAME:
        n, pos = _split_name(body, pos, unique, XATTR_NAME_MAX)
        names = (n,)
        if pos != len(body):
            raise ProtocolError("stray bytes after name", unique)
    elif kind == _NAME2:
        limit2 = LINK_MAX if h.opcode == Opcode.SYMLINK else NAME_MAX
        n1, pos = _split_name(body, pos, unique)
        n2, pos = _split_name(body, pos, unique, limit2)
        names = (n1, n2)
        if pos != len(body):
            raise ProtocolError("stray bytes after names", unique)
    elif kind == _WRITE:
        data = body[pos:]
        if len(data) != arg.size:
            raise ProtocolError(f"WRITE size {arg.size} != payload {len(data)}", unique)
        if arg.size > MAX_WRITE:
            raise ProtocolError("WRITE larger than max_write", unique, _errno.E2BIG)
    elif kind == _XATTR:
        n, pos = _split_name(body, pos, unique, XATTR_NAME_MAX)
        names = (n,)
        data = body[pos:]
        if len(data) != arg.size:
            raise ProtocolError(f"SETXATTR size {arg.size} != value {len(data)}", unique)
        if arg.size > XATTR_SIZE_MAX:
            raise ProtocolError("xattr value too large", unique, _errno.E2BIG)
    elif kind == _FORGETS:
        count = arg.count
        if len(body) - pos != count * abi.FORGET_ONE.size:
            raise ProtocolError(f"BATCH_FORGET count {count} does not match its length", unique)
        forgets = tuple(
            (nodeid, nlookup)
            for nodeid, nlookup in struct.iter_unpack("=QQ", body[pos:])
        )
    else:  # _RAW
        data = body[pos:]
    return Request(
        opcode=h.opcode, unique=unique, nodeid=h.nodeid, uid=h.uid, gid=h.gid, pid=h.pid,
        arg=arg, names=names, data=data, forgets=forgets, extensions=ext,
    )


def encode_request(req: Request, session: Session | None = None) -> bytes:
    """Inverse of :func:`decode_request` (for tests, hostile clients and the agent's own requests)."""
    session = session or Session()
    layout = session.layout_for(req.opcode) if req.opcode in _SHAPES else None
    parts: list[bytes] = []
    if layout is not None and req.arg is not None:
        if layout is abi.SETXATTR_IN_COMPAT:
            parts.append(layout.pack(req.arg.size, req.arg.flags))
        else:
            parts.append(layout.pack(*req.arg))
    for n in req.names:
        parts.append(n + b"\0")
    if req.forgets:
        parts.extend(abi.FORGET_ONE.pack(nid, nl) for nid, nl in req.forgets)
    parts.append(req.data)
    parts.append(req.extensions)
    body = b"".join(parts)
    total = abi.IN_HEADER.size + len(body)
    header = abi.IN_HEADER.pack(
        total, req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid,
        len(req.extensions) // 8,
    )
    return header + body


# --- replies and notifications ---------------------------------------------------------------

def reply(unique: int, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), 0, unique) + body


def reply_error(unique: int, err: int) -> bytes:
    if not 0 < err < 4096:
        err = _errno.EIO
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)


def notification(code: int, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), code, 0) + body


@dataclass(frozen=True, slots=True)
class Reply:
    unique: int
    error: int  # 0 or a positive errno; for notifications (unique 0) the notify code
    payload: bytes

    @property
    def is_notification(self) -> bool:
        return self.unique == 0


def decode_reply(frame: bytes) -> Reply:
    if len(frame) < abi.OUT_HEADER.size:
        raise ProtocolError(f"reply shorter than its header ({len(frame)} bytes)")
    h = abi.OUT_HEADER.unpack_from(frame)
    if h.len != len(frame):
        raise ProtocolError(f"reply header length {h.len} != frame length {len(frame)}")
    if len(frame) > MAX_FRAME:
        raise ProtocolError("reply too large")
    if h.unique == 0:
        if h.error <= 0:
            raise ProtocolError(f"notification with bad code {h.error}")
        return Reply(0, h.error, frame[abi.OUT_HEADER.size:])
    if h.error > 0 or h.error < -4095:
        raise ProtocolError(f"reply with bad error {h.error}")
    if h.error and len(frame) != abi.OUT_HEADER.size:
        raise ProtocolError("error reply with a payload")
    return Reply(h.unique, -h.error, frame[abi.OUT_HEADER.size:])


def split_frames(buf: bytearray, min_len: int, max_len: int = MAX_FRAME) -> Iterator[bytes]:
    """Pop every whole frame (each starts with a u32 length) off the front of ``buf``."""
    while len(buf) >= 4:
        (n,) = struct.unpack_from("=I", buf)
        if n < min_len or n > max_len:
            raise ProtocolError(f"frame length {n} out of range [{min_len}, {max_len}]")
        if len(buf) < n:
            return
        frame = bytes(buf[:n])
        del buf[:n]
        yield frame


# --- attribute helpers -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Attr:
        return cls(
            ino=st.st_ino, size=st.st_size, blocks=st.st_blocks,
            atime=st.st_atime_ns // 10**9 & 0xFFFFFFFFFFFFFFFF,
            mtime=st.st_mtime_ns // 10**9 & 0xFFFFFFFFFFFFFFFF,
            ctime=st.st_ctime_ns // 10**9 & 0xFFFFFFFFFFFFFFFF,
            atimensec=st.st_atime_ns % 10**9, mtimensec=st.st_mtime_ns % 10**9,
            ctimensec=st.st_ctime_ns % 10**9, mode=st.st_mode, nlink=min(st.st_nlink, 0xFFFFFFFF),
            uid=st.st_uid, gid=st.st_gid, rdev=_encode_dev(st.st_rdev), blksize=st.st_blksize,
        )

    def pack(self) -> bytes:
        return abi.ATTR.pack(
            self.ino, self.size, self.blocks, self.atime, self.mtime, self.ctime, self.atimensec,
            self.mtimensec, self.ctimensec, self.mode, self.nlink, self.uid, self.gid, self.rdev,
            self.blksize, self.flags,
        )


def _encode_dev(dev: int) -> int:
    """Userspace dev_t to the kernel's new_encode_dev (what fuse_attr.rdev carries)."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(rdev: int) -> int:
    """fuse_mknod_in.rdev (new_encode_dev) to a userspace dev_t."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def split_timeout(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(nodeid: int, generation: int, attr: Attr, entry_timeout: float,
              attr_timeout: float) -> bytes:
    es, ens = split_timeout(entry_timeout)
    as_, ans = split_timeout(attr_timeout)
    return abi.ENTRY_OUT.pack(nodeid, generation, es, as_, ens, ans) + attr.pack()


def negative_entry_out(entry_timeout: float) -> bytes:
    """A LOOKUP answer of nodeid 0: 'does not exist', cached for ``entry_timeout``."""
    es, ens = split_timeout(entry_timeout)
    return abi.ENTRY_OUT.pack(0, 0, es, 0, ens, 0) + bytes(abi.ATTR.size)


def attr_out(attr: Attr, attr_timeout: float) -> bytes:
    s, ns = split_timeout(attr_timeout)
    return abi.ATTR_OUT.pack(s, ns) + attr.pack()


def statfs_out(st: os.statvfs_result) -> bytes:
    return abi.KSTATFS.pack(
        st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize,
        st.f_namemax, st.f_frsize,
    )


def dirent_type(mode: int) -> int:
    """The DT_* value for a st_mode (S_IFMT >> 12)."""
    return _stat.S_IFMT(mode) >> 12


@dataclass(slots=True)
class DirentBuffer:
    """Fills a READDIR / READDIRPLUS reply up to the size the kernel asked for."""

    limit: int
    plus: bool = False
    parts: list[bytes] = field(default_factory=list)
    used: int = 0

    def add(self, ino: int, off: int, dtype: int, name: bytes, entry: bytes | None = None) -> bool:
        """Append one entry; returns False (and appends nothing) if it would not fit."""
        n = len(name)
        size = abi.direntplus_size(n) if self.plus else abi.dirent_size(n)
        if self.used + size > self.limit:
            return False
        rec = abi.DIRENT.pack(ino, off, n, dtype) + name
        if self.plus:
            rec = (entry if entry is not None else bytes(abi.ENTRY_OUT_SIZE)) + rec
        rec += bytes(size - len(rec))
        self.parts.append(rec)
        self.used += size
        return True

    def fits(self, name: bytes) -> bool:
        n = len(name)
        size = abi.direntplus_size(n) if self.plus else abi.dirent_size(n)
        return self.used + size <= self.limit

    def payload(self) -> bytes:
        return b"".join(self.parts)


def parse_dirents(payload: bytes, plus: bool = False) -> list[tuple[int, int, int, bytes, bytes]]:
    """Decode a READDIR(PLUS) payload into (ino, off, type, name, entry_out) tuples."""
    out = []
    pos = 0
    while pos < len(payload):
        entry = b""
        if plus:
            if pos + abi.ENTRY_OUT_SIZE > len(payload):
                raise ProtocolError("truncated direntplus")
            entry = payload[pos:pos + abi.ENTRY_OUT_SIZE]
            base = pos + abi.ENTRY_OUT_SIZE
        else:
            base = pos
        if base + abi.DIRENT.size > len(payload):
            raise ProtocolError("truncated dirent")
        d = abi.DIRENT.unpack_from(payload, base)
        name_at = base + abi.DIRENT.size
        if name_at + d.namelen > len(payload) or d.namelen == 0 or d.namelen > NAME_MAX:
            raise ProtocolError("bad dirent name length")
        name = payload[name_at:name_at + d.namelen]
        out.append((d.ino, d.off, d.type, name, entry))
        pos += abi.direntplus_size(d.namelen) if plus else abi.dirent_size(d.namelen)
    return out


def init_out(minor: int, flags: int, max_write: int, max_pages: int, max_readahead: int,
             time_gran: int = 1, max_background: int = 64, congestion_threshold: int = 48) -> bytes:
    flags |= abi.INIT_EXT if minor >= 36 else 0
    return abi.INIT_OUT.pack(
        major=abi.KERNEL_VERSION, minor=minor, max_readahead=max_readahead,
        flags=flags & 0xFFFFFFFF, max_background=max_background,
        congestion_threshold=congestion_threshold, max_write=max_write, time_gran=time_gran,
        max_pages=max_pages, flags2=(flags >> 32) & 0xFFFFFFFF,
    )


def init_flags(arg: Any) -> int:
    """The kernel's 64-bit INIT flag word (flags2 counts only with FUSE_INIT_EXT)."""
    flags = int(arg.flags)
    if flags & abi.INIT_EXT:
        flags |= int(arg.flags2) << 32
    return flags


def inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    return notification(
        abi.NotifyCode.INVAL_ENTRY, abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags),
        name + b"\0",
    )


def inval_inode(nodeid: int, off: int = 0, length: int = 0) -> bytes:
    return notification(abi.NotifyCode.INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(nodeid, off, length))


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    return notification(
        abi.NotifyCode.DELETE, abi.NOTIFY_DELETE_OUT.pack(parent, child, len(name)), name + b"\0"
    )
