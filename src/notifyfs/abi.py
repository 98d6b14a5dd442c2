"""The kernel's FUSE ABI (``linux/fuse.h``) and nothing else.

Every structure the protocol uses is a :class:`Layout`: a ``struct.Struct`` in native byte order
plus its field names, so that a test can compile a C program against ``/usr/include/linux/fuse.h``
and compare every size and offset with the ones here. Covers protocol 7.31 up to 7.45 (the minor
version Linux 6.18 announces). No I/O and no imports from the rest of notifyfs.

The notifyfs extension (remote events) lives at the end, under numbers of our own; the table that
maps them to the never-merged kernel proposal is in README.md.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from typing import Any, NamedTuple

KERNEL_VERSION = 7
#: oldest minor version we accept from a kernel
MIN_MINOR = 31
#: newest minor version whose layouts this module knows; we answer min(kernel's, this)
MAX_MINOR = 45
ROOT_ID = 1
MIN_READ_BUFFER = 8192
COMPAT_ENTRY_OUT_SIZE = 120
COMPAT_ATTR_OUT_SIZE = 96
COMPAT_MKNOD_IN_SIZE = 8
COMPAT_WRITE_IN_SIZE = 24
COMPAT_STATFS_SIZE = 48
COMPAT_SETXATTR_IN_SIZE = 8
COMPAT_INIT_OUT_SIZE = 8
COMPAT_22_INIT_OUT_SIZE = 24


class Layout:
    """One C structure: field names, a ``struct.Struct`` and a named-tuple type for its values."""

    def __init__(self, c_name: str, fields: list[tuple[str, str]]) -> None:
        self.c_name = c_name
        self.fields = [f for f, _ in fields]
        self.formats = [fmt for _, fmt in fields]
        self.struct = struct.Struct("=" + "".join(self.formats))
        self.size = self.struct.size
        self.tuple: Any = namedtuple(c_name, [f for f in self.fields if not f.startswith("_")])  # type: ignore[misc]
        self._keep = [not f.startswith("_") for f in self.fields]
        offsets: dict[str, int] = {}
        off = 0
        for name, fmt in fields:
            offsets[name] = off
            off += struct.calcsize("=" + fmt)
        self.offsets = offsets
        # for pack()'s fast path: where the given values go, and the padding's zeros
        self._slots = [i for i, f in enumerate(self.fields) if not f.startswith("_")]
        self._template: list[Any] = [
            (bytes(struct.calcsize("=" + fmt)) if fmt.endswith("s") else 0) if f.startswith("_")
            else None for f, fmt in fields]

    def unpack_from(self, buf: bytes | memoryview, offset: int = 0) -> Any:
        values = self.struct.unpack_from(buf, offset)
        if all(self._keep):
            return self.tuple._make(values)
        return self.tuple._make(v for v, k in zip(values, self._keep, strict=True) if k)

    def pack(self, *values: Any, **kw: Any) -> bytes:
        """Pack by position or keyword; fields starting with ``_`` (padding) are zero-filled."""
        if not kw and len(values) == len(self._slots):
            # every field given by position (every reply header and attr): no dict, no parsing
            if len(self._slots) == len(self.fields):
                return self.struct.pack(*values)
            out_fast = list(self._template)
            for i, v in zip(self._slots, values, strict=True):
                out_fast[i] = v
            return self.struct.pack(*out_fast)
        names = [f for f in self.fields if not f.startswith("_")]
        vals = dict(zip(names, values, strict=False))
        vals.update(kw)
        out = []
        for f, fmt in zip(self.fields, self.formats, strict=True):
            if f.startswith("_"):
                out.append(bytes(struct.calcsize("=" + fmt)) if fmt.endswith("s") else 0)
            else:
                out.append(vals.get(f, 0))
        return self.struct.pack(*out)


def _L(c_name: str, spec: str) -> Layout:
    """Build a Layout from ``"name:fmt name:fmt ..."``; a name starting with ``_`` is padding."""
    return Layout(c_name, [tuple(item.split(":")) for item in spec.split()])  # type: ignore[misc]


# --- basic structures -------------------------------------------------------------------------
ATTR = _L(
    "fuse_attr",
    "ino:Q size:Q blocks:Q atime:Q mtime:Q ctime:Q atimensec:I mtimensec:I ctimensec:I "
    "mode:I nlink:I uid:I gid:I rdev:I blksize:I flags:I",
)
KSTATFS = _L(
    "fuse_kstatfs",
    "blocks:Q bfree:Q bavail:Q files:Q ffree:Q bsize:I namelen:I frsize:I _padding:I _spare:24s",
)
FILE_LOCK = _L("fuse_file_lock", "start:Q end:Q type:I pid:I")

IN_HEADER = _L(
    "fuse_in_header",
    "len:I opcode:I unique:Q nodeid:Q uid:I gid:I pid:I total_extlen:H _padding:H",
)
OUT_HEADER = _L("fuse_out_header", "len:I error:i unique:Q")

ENTRY_OUT = Layout(
    "fuse_entry_out",
    [("nodeid", "Q"), ("generation", "Q"), ("entry_valid", "Q"), ("attr_valid", "Q"),
     ("entry_valid_nsec", "I"), ("attr_valid_nsec", "I")],
)
ENTRY_OUT_SIZE = ENTRY_OUT.size + ATTR.size  # fuse_entry_out embeds fuse_attr
ATTR_OUT = _L("fuse_attr_out", "attr_valid:Q attr_valid_nsec:I _dummy:I")
ATTR_OUT_SIZE = ATTR_OUT.size + ATTR.size

FORGET_IN = _L("fuse_forget_in", "nlookup:Q")
FORGET_ONE = _L("fuse_forget_one", "nodeid:Q nlookup:Q")
BATCH_FORGET_IN = _L("fuse_batch_forget_in", "count:I _dummy:I")
GETATTR_IN = _L("fuse_getattr_in", "getattr_flags:I _dummy:I fh:Q")
MKNOD_IN = _L("fuse_mknod_in", "mode:I rdev:I umask:I _padding:I")
MKDIR_IN = _L("fuse_mkdir_in", "mode:I umask:I")
RENAME_IN = _L("fuse_rename_in", "newdir:Q")
RENAME2_IN = _L("fuse_rename2_in", "newdir:Q flags:I _padding:I")
LINK_IN = _L("fuse_link_in", "oldnodeid:Q")
SETATTR_IN = _L(
    "fuse_setattr_in",
    "valid:I _padding:I fh:Q size:Q lock_owner:Q atime:Q mtime:Q ctime:Q atimensec:I "
    "mtimensec:I ctimensec:I mode:I _unused4:I uid:I gid:I _unused5:I",
)
OPEN_IN = _L("fuse_open_in", "flags:I open_flags:I")
CREATE_IN = _L("fuse_create_in", "flags:I mode:I umask:I open_flags:I")
OPEN_OUT = _L("fuse_open_out", "fh:Q open_flags:I backing_id:i")
RELEASE_IN = _L("fuse_release_in", "fh:Q flags:I release_flags:I lock_owner:Q")
FLUSH_IN = _L("fuse_flush_in", "fh:Q _unused:I _padding:I lock_owner:Q")
READ_IN = _L("fuse_read_in", "fh:Q offset:Q size:I read_flags:I lock_owner:Q flags:I _padding:I")
WRITE_IN = _L("fuse_write_in", "fh:Q offset:Q size:I write_flags:I lock_owner:Q flags:I _padding:I")
WRITE_OUT = _L("fuse_write_out", "size:I _padding:I")
STATFS_OUT_SIZE = KSTATFS.size
FSYNC_IN = _L("fuse_fsync_in", "fh:Q fsync_flags:I _padding:I")
SETXATTR_IN = _L("fuse_setxattr_in", "size:I flags:I setxattr_flags:I _padding:I")
SETXATTR_IN_COMPAT = _L("fuse_setxattr_in_compat", "size:I flags:I")
GETXATTR_IN = _L("fuse_getxattr_in", "size:I _padding:I")
GETXATTR_OUT = _L("fuse_getxattr_out", "size:I _padding:I")
LK_IN = Layout(
    "fuse_lk_in",
    [("fh", "Q"), ("owner", "Q"), ("start", "Q"), ("end", "Q"), ("type", "I"), ("pid", "I"),
     ("lk_flags", "I"), ("_padding", "I")],
)
LK_OUT = FILE_LOCK
ACCESS_IN = _L("fuse_access_in", "mask:I _padding:I")
INIT_IN = _L("fuse_init_in", "major:I minor:I max_readahead:I flags:I flags2:I _unused:44s")
INIT_IN_COMPAT = _L("fuse_init_in_compat", "major:I minor:I max_readahead:I flags:I")
INIT_OUT = _L(
    "fuse_init_out",
    "major:I minor:I max_readahead:I flags:I max_background:H congestion_threshold:H "
    "max_write:I time_gran:I max_pages:H map_alignment:H flags2:I max_stack_depth:I "
    "request_timeout:H _unused:22s",
)
INTERRUPT_IN = _L("fuse_interrupt_in", "unique:Q")
BMAP_IN = _L("fuse_bmap_in", "block:Q blocksize:I _padding:I")
BMAP_OUT = _L("fuse_bmap_out", "block:Q")
IOCTL_IN = _L("fuse_ioctl_in", "fh:Q flags:I cmd:I arg:Q in_size:I out_size:I")
IOCTL_OUT = _L("fuse_ioctl_out", "result:i flags:I in_iovs:I out_iovs:I")
POLL_IN = _L("fuse_poll_in", "fh:Q kh:Q flags:I events:I")
POLL_OUT = _L("fuse_poll_out", "revents:I _padding:I")
FALLOCATE_IN = _L("fuse_fallocate_in", "fh:Q offset:Q length:Q mode:I _padding:I")
DIRENT = _L("fuse_dirent", "ino:Q off:Q namelen:I type:I")
LSEEK_IN = _L("fuse_lseek_in", "fh:Q offset:Q whence:I _padding:I")
LSEEK_OUT = _L("fuse_lseek_out", "offset:Q")
COPY_FILE_RANGE_IN = _L(
    "fuse_copy_file_range_in", "fh_in:Q off_in:Q nodeid_out:Q fh_out:Q off_out:Q len:Q flags:Q"
)
SYNCFS_IN = _L("fuse_syncfs_in", "_padding:Q")
EXT_HEADER = _L("fuse_ext_header", "size:I type:I")
SECCTX = _L("fuse_secctx", "size:I _padding:I")
SECCTX_HEADER = _L("fuse_secctx_header", "size:I nr_secctx:I")
# 7.39: statx
SX_TIME = _L("fuse_sx_time", "tv_sec:q tv_nsec:I _reserved:i")
STATX_IN = _L("fuse_statx_in", "getattr_flags:I _reserved:I fh:Q sx_flags:I sx_mask:I")

# notifications (server -> kernel, unique = 0, error = code)
NOTIFY_POLL_WAKEUP_OUT = _L("fuse_notify_poll_wakeup_out", "kh:Q")
NOTIFY_INVAL_INODE_OUT = _L("fuse_notify_inval_inode_out", "ino:Q off:q len:q")
NOTIFY_INVAL_ENTRY_OUT = _L("fuse_notify_inval_entry_out", "parent:Q namelen:I flags:I")
NOTIFY_DELETE_OUT = _L("fuse_notify_delete_out", "parent:Q child:Q namelen:I _padding:I")
NOTIFY_STORE_OUT = _L("fuse_notify_store_out", "nodeid:Q offset:Q size:I _padding:I")
NOTIFY_RETRIEVE_OUT = _L(
    "fuse_notify_retrieve_out", "notify_unique:Q nodeid:Q offset:Q size:I _padding:I"
)
NOTIFY_RETRIEVE_IN = _L(
    "fuse_notify_retrieve_in", "_dummy1:Q offset:Q size:I _dummy2:I _dummy3:Q _dummy4:Q"
)

#: every layout that corresponds 1:1 to a struct in linux/fuse.h (for the ABI test)
HEADER_LAYOUTS: list[Layout] = [
    ATTR, KSTATFS, FILE_LOCK, IN_HEADER, OUT_HEADER, ATTR_OUT, FORGET_IN, FORGET_ONE,
    BATCH_FORGET_IN, GETATTR_IN, MKNOD_IN, MKDIR_IN, RENAME_IN, RENAME2_IN, LINK_IN, SETATTR_IN,
    OPEN_IN, CREATE_IN, OPEN_OUT, RELEASE_IN, FLUSH_IN, READ_IN, WRITE_IN, WRITE_OUT, FSYNC_IN,
    SETXATTR_IN, GETXATTR_IN, GETXATTR_OUT, LK_IN, ACCESS_IN, INIT_IN, INIT_OUT, INTERRUPT_IN, BMAP_IN,
    BMAP_OUT, IOCTL_IN, IOCTL_OUT, POLL_IN, POLL_OUT, FALLOCATE_IN, DIRENT, LSEEK_IN, LSEEK_OUT,
    COPY_FILE_RANGE_IN, SYNCFS_IN, EXT_HEADER, SECCTX, SECCTX_HEADER, SX_TIME, STATX_IN,
    NOTIFY_POLL_WAKEUP_OUT, NOTIFY_INVAL_INODE_OUT, NOTIFY_INVAL_ENTRY_OUT, NOTIFY_DELETE_OUT,
    NOTIFY_STORE_OUT, NOTIFY_RETRIEVE_OUT, NOTIFY_RETRIEVE_IN,
]
#: fields whose C name differs from ours: (struct, our field) -> C member expression
C_FIELD_NAMES: dict[tuple[str, str], str] = {
    ("fuse_lk_in", "start"): "lk.start", ("fuse_lk_in", "end"): "lk.end",
    ("fuse_lk_in", "type"): "lk.type", ("fuse_lk_in", "pid"): "lk.pid",
    ("fuse_kstatfs", "_spare"): "spare", ("fuse_init_in", "_unused"): "unused",
    ("fuse_init_out", "_unused"): "unused",
    ("fuse_open_out", "backing_id"): "padding",  # named backing_id from 7.40 on
    ("fuse_sx_time", "_reserved"): "__reserved",
}


class Opcode:
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52  # 7.39
    CUSE_INIT = 4096
    # notifyfs extension (the proposal's FUSE_FSNOTIFY was 51, now FUSE_TMPFILE)
    NOTIFYFS_FSNOTIFY = 4100
    NOTIFYFS_REVIVE = 4101  # after a reconnect: the guest's inodes and open files (revive.py)


OPCODE_NAMES: dict[int, str] = {
    v: k for k, v in vars(Opcode).items() if not k.startswith("_") and isinstance(v, int)
}


class NotifyCode:
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7  # 7.40
    INC_EPOCH = 8  # 7.44 (the proposal's FUSE_NOTIFY_FSNOTIFY was 8)
    PRUNE = 9  # 7.45
    # notifyfs extension
    NOTIFYFS_EVENT = 100
    NOTIFYFS_OVERFLOW = 101
    NOTIFYFS_HANDLE = 102  # the host file handle of a nodeid, for a later NOTIFYFS_REVIVE


# --- INIT flags (64 bits: flags | flags2 << 32) ---------------------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
GETATTR_FH = 1 << 0
LK_FLOCK = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1
FSYNC_FDATASYNC = 1 << 0
ATTR_SUBMOUNT = 1 << 0
ATTR_DAX = 1 << 1
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0
EXPIRE_ONLY = 1 << 0

FUSE_DEV_IOC_MAGIC = 229
# _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (FUSE_DEV_IOC_MAGIC << 8) | 0


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE: header plus name, rounded up to 8 bytes."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """FUSE_DIRENTPLUS_SIZE."""
    return (ENTRY_OUT_SIZE + DIRENT.size + namelen + 7) & ~7


# --- notifyfs extension: remote events (our numbers; README maps them to the proposal) ----------
NOTIFY_FSNOTIFY_IN = _L("fuse_notify_fsnotify_in", "mask:Q group:Q action:I _padding:I")
NOTIFY_FSNOTIFY_OUT = _L("fuse_notify_fsnotify_out", "inode:Q mask:Q namelen:I cookie:I")


class Version(NamedTuple):
    major: int
    minor: int
