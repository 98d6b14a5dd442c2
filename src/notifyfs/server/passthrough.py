"""The passthrough filesystem: serves a host directory (the export) to one agent.

Confinement: every inode is held as an ``O_PATH | O_NOFOLLOW`` fd that was reached from the export
root one validated name at a time (no ``/``, no ``.`` or ``..``) with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``; every call that takes a
name is an ``*at`` call on a parent fd with ``AT_SYMLINK_NOFOLLOW`` or ``O_NOFOLLOW``. Operations
on the inode itself use the fd (``AT_EMPTY_PATH``) or ``/proc/self/fd/N``, which reopens exactly that
inode and is never used on a symlink. So no request can reach outside the export, whatever symlinks
are planted inside it and whatever is renamed while a request runs.

Permissions: the agent mounts with ``default_permissions``, so the guest kernel checks access
against the attributes we report; files a guest user creates are chowned to that user (or to the
``squash`` owner) right after creation.

Lock order: ``Passthrough.lock`` (handle tables) may be taken before ``InodeTable.lock``, never
after it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import abi
from .. import revive as revive_wire
from ..linux import fs as linux_fs
from ..protocol import (
    MAX_WRITE,
    Attr,
    DirentBuffer,
    ProtocolError,
    Request,
    Session,
    attr_out,
    decode_rdev,
    dirent_type,
    entry_out,
    init_flags,
    init_out,
    statfs_out,
)
from ..linux import inotify as ino
from .dispatch import Filesystem, FuseError, Notify
from .echo import EchoFilter
from .inodes import ROOT_ID, Inode, InodeTable
from .watch import InotifyWatcher, make_watcher

log = logging.getLogger(__name__)

LOOKUP_RESOLVE = (linux_fs.RESOLVE_BENEATH | linux_fs.RESOLVE_NO_SYMLINKS
                  | linux_fs.RESOLVE_NO_MAGICLINKS)
_WRITE_ACCESS = (os.O_WRONLY, os.O_RDWR)
#: open(2) flags the server never passes on: creation is done by CREATE, O_DIRECT needs aligned
#: buffers that Python does not give, and the guest's controlling-terminal wish is not ours;
#: O_NOFOLLOW was applied by the guest kernel and would make reopening /proc/self/fd/N fail (ELOOP)
_STRIP_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
                     | getattr(os, "O_PATH", 0))


@dataclass
class Options:
    read_only: bool = False
    squash: tuple[int, int] | None = None  # every new file gets this owner; chown is refused
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    writeback: bool = False
    events: bool = True  # watch the host and send remote events to agents that want them
    watcher: str = "auto"  # auto | fanotify | inotify
    max_watches: int = 1 << 20
    #: per agent: inodes it may hold looked up (each is an open O_PATH fd on the host) and files
    #: or directories it may hold open; past them LOOKUP & co. get ENFILE and OPEN & co. EMFILE.
    #: Checked without a lock, so concurrent workers may overshoot by one each.
    max_inodes: int = 1 << 18
    max_handles: int = 1 << 14


@dataclass(eq=False)
class Handle:
    fd: int
    inode: Inode
    flags: int
    refs: int = 0
    closed: bool = False
    entries: list[tuple[bytes, int, int]] | None = None  # directory snapshot: (name, ino, dtype)


_O = abi.Opcode
#: host events each request causes on the names it takes (echo filter, inotify watcher)
_NAME_EVENTS = {
    _O.MKNOD: ino.IN_CREATE | ino.IN_ATTRIB, _O.MKDIR: ino.IN_CREATE | ino.IN_ATTRIB,
    _O.SYMLINK: ino.IN_CREATE | ino.IN_ATTRIB, _O.LINK: ino.IN_CREATE | ino.IN_ATTRIB,
    _O.CREATE: ino.IN_CREATE | ino.IN_OPEN | ino.IN_ATTRIB | ino.IN_MODIFY,  # MODIFY: O_TRUNC
    _O.UNLINK: ino.IN_DELETE, _O.RMDIR: ino.IN_DELETE,
    _O.RENAME: ino.IN_MOVE, _O.RENAME2: ino.IN_MOVE,
}
#: ... and on the inode a request works on (every name the guest knows it by, and itself)
_INODE_EVENTS = {
    _O.READ: ino.IN_ACCESS, _O.WRITE: ino.IN_MODIFY, _O.OPEN: ino.IN_OPEN | ino.IN_MODIFY,
    _O.RELEASE: ino.IN_CLOSE, _O.SETATTR: ino.IN_ATTRIB | ino.IN_MODIFY | ino.IN_ACCESS,
    _O.SETXATTR: ino.IN_ATTRIB, _O.REMOVEXATTR: ino.IN_ATTRIB, _O.FALLOCATE: ino.IN_MODIFY,
    _O.COPY_FILE_RANGE: ino.IN_ACCESS | ino.IN_MODIFY, _O.OPENDIR: ino.IN_OPEN,
    _O.READDIR: ino.IN_ACCESS, _O.READDIRPLUS: ino.IN_ACCESS, _O.RELEASEDIR: ino.IN_CLOSE_NOWRITE,
}


def check_name(name: bytes) -> bytes:
    if not name or name in (b".", b".."):
        raise FuseError(errno.EINVAL, f"bad name {name!r}")
    if b"/" in name or b"\0" in name:
        raise FuseError(errno.EINVAL, f"bad name {name!r}")
    if len(name) > 255:
        raise FuseError(errno.ENAMETOOLONG)
    return name


@dataclass
class _Uses:
    """Inodes and handles a request acquired; released when it ends."""

    inodes: list[Inode] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)


class Passthrough(Filesystem):
    def __init__(self, export: str, options: Options | None = None) -> None:
        self.options = options or Options()
        self.export = os.path.realpath(export)
        root_fd = os.open(self.export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(root_fd)
        self.session = Session()
        self.lock = threading.Lock()
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.interrupted: set[int] = set()
        self.closing = False  # the connection is going away: waiting requests give up (EINTR)
        self.is_root = os.geteuid() == 0
        self._local = threading.local()
        self.echo = EchoFilter()
        #: the threads that serve this client (the connection fills it in): with fanotify, host
        #: events caused by these threads are this client's own and never echoed to it
        self.worker_tids: set[int] = set()
        self.watcher: InotifyWatcher | None = None
        self.refusals: dict[str, int] = {}  # requests refused by a per-agent limit, by limit
        self.out_of_fds = 0  # requests that failed because the process ran out of fds
        self.fsyncs = 0  # fsync/fdatasync calls made on host fds (data safety tests count them)
        self._handle_mount_fd = -1
        #: what the guest knew of its watched directories, gathered over NOTIFYFS_REVIVE chunks
        self._known: dict[int, dict[bytes, tuple[int, ...]]] = {}

    def attach(self, notify: Notify, remote_events: bool, revive: bool = False) -> None:
        if revive:
            def on_new(inode: Inode) -> None:
                if inode.handle:
                    notify(revive_wire.handle_notification(inode.nodeid, inode.handle))
            self.inodes.on_new = on_new
        if not (self.options.events and remote_events):
            return
        o = self.options
        self.watcher = make_watcher(o.watcher, self.inodes, notify, self.echo, self._lookup_fd,
                                    (o.entry_timeout, o.attr_timeout), o.max_watches,
                                    workers=lambda: self.worker_tids)
        self.inodes.on_dead = self.watcher.forgotten
        self.watcher.start()

    # --- bookkeeping -----------------------------------------------------------------------
    def handle(self, req: Request) -> bytes | None:
        uses = _Uses()
        self._local.uses = uses
        token = self._expect(req) if self.watcher is not None else 0
        try:
            return super().handle(req)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self._fds_exhausted(req, e.errno)
            raise
        finally:
            if token:
                self.echo.done(token)
            for h in uses.handles:
                self._put_handle(h)
            for i in uses.inodes:
                self.inodes.release(i)
            self._local.uses = None

    def _inode(self, nodeid: int) -> Inode:
        inode = self.inodes.acquire(nodeid)
        self._local.uses.inodes.append(inode)
        return inode

    def _dir(self, nodeid: int) -> Inode:
        inode = self._inode(nodeid)
        if not inode.is_dir:
            raise FuseError(errno.ENOTDIR)
        return inode

    def _refused(self, what: str, err: int, limit: int) -> FuseError:
        """Count (and now and then log) a request refused by a per-agent limit."""
        n = self.refusals[what] = self.refusals.get(what, 0) + 1
        if n == 1 or n % 1000 == 0:
            log.warning("agent holds %d %s (the limit, --max-%s): %s (%d refused so far)", limit,
                        what, what, errno.errorcode[err], n)
        return FuseError(err, f"too many {what}")

    def _fds_exhausted(self, req: Request, err: int) -> None:
        """The process (EMFILE) or the system (ENFILE) has no fd left: the guest gets that error
        for this request; now and then the log says so (a guest that keeps looking up would
        otherwise fill it)."""
        self.out_of_fds += 1
        n = self.out_of_fds
        if n == 1 or n % 1000 == 0:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning("out of file descriptors (%s; open files limit %d, one per inode the "
                        "agent holds and per open file): %s gets %s (%d so far); raise the hard "
                        "RLIMIT_NOFILE or lower --max-inodes", os.strerror(err), soft,
                        req.opname, errno.errorcode[err], n)

    def _room_for_inode(self) -> None:
        """Refuse a request that would create a file when the agent holds its limit of inodes,
        before the file exists (else the host would have a file the guest was told failed)."""
        if len(self.inodes) > self.options.max_inodes:
            raise self._refused("inodes", errno.ENFILE, self.options.max_inodes)

    def _new_handle(self, fd: int, inode: Inode, flags: int) -> int:
        if len(self.handles) >= self.options.max_handles:
            os.close(fd)
            raise self._refused("handles", errno.EMFILE, self.options.max_handles)
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(fd, inode, flags)
            with self.inodes.lock:
                inode.refs += 1  # a handle keeps its inode's fd alive
        return fh

    def _handle(self, fh: int, nodeid: int | None = None) -> Handle:
        with self.lock:
            h = self.handles.get(fh)
            if h is None or h.closed:
                raise FuseError(errno.EBADF, f"unknown file handle {fh}")
            if nodeid is not None and h.inode.nodeid != nodeid:
                raise FuseError(errno.EBADF, "file handle of another inode")
            h.refs += 1
        self._local.uses.handles.append(h)
        return h

    def _put_handle(self, h: Handle) -> None:
        with self.lock:
            h.refs -= 1
            close = h.closed and h.refs == 0
        if close:
            self._close_handle(h)

    def _close_handle(self, h: Handle) -> None:
        os.close(h.fd)
        self.inodes.release(h.inode)

    def _release(self, fh: int) -> None:
        with self.lock:
            h = self.handles.pop(fh, None)
            if h is None:
                raise FuseError(errno.EBADF)
            h.closed = True
            close = h.refs == 0
        if close:
            self._close_handle(h)

    def _expect(self, req: Request) -> int:
        """Record the host events this request will cause, so they are not echoed back."""
        op = req.opcode
        O = abi.Opcode  # noqa: E741
        kinds = _NAME_EVENTS.get(op)
        if kinds is not None:
            keys = [(req.nodeid, req.names[0])]
            times = 1
            if op in (O.RENAME, O.RENAME2):
                keys.append((req.arg.newdir, req.names[1]))
                if op == O.RENAME2 and req.arg.flags & linux_fs.RENAME_EXCHANGE:
                    times = 2  # two moves, one each way
            return self.echo.expect(keys, kinds, times)
        kinds = _INODE_EVENTS.get(op)
        if kinds is None:
            return 0
        if op == O.RELEASE:  # which close the host sees depends on how the file was opened
            with self.lock:
                h = self.handles.get(req.arg.fh)
            if h is not None:
                kinds = (ino.IN_CLOSE_NOWRITE if h.flags & os.O_ACCMODE == os.O_RDONLY
                         else ino.IN_CLOSE_WRITE)
        nodes = [req.nodeid]
        if op == O.COPY_FILE_RANGE:
            nodes.append(req.arg.nodeid_out)
        keys = []
        for n in nodes:
            keys.append((n, b""))
            keys.extend(self.inodes.names_of(n))
        return self.echo.expect(keys, kinds)

    def _writable(self) -> None:
        if self.options.read_only:
            raise FuseError(errno.EROFS)

    def _entry(self, fd: int, parent: Inode | None = None, name: bytes = b"") -> bytes:
        """Count a lookup of the inode behind ``fd`` (O_PATH, now owned by the table), known to
        the guest as ``name`` in ``parent``. A directory is watched before the reply leaves."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if len(self.inodes) > self.options.max_inodes and \
                (st.st_dev, st.st_ino) not in self.inodes.by_key:
            os.close(fd)
            raise self._refused("inodes", errno.ENFILE, self.options.max_inodes)
        inode = self.inodes.add_lookup(fd, st)
        if parent is not None:
            self.inodes.remember(parent.nodeid, name, inode)
        if self.watcher is not None and inode.is_dir:
            self.watcher.watch(inode)
        o = self.options
        return entry_out(inode.nodeid, inode.generation, Attr.from_stat(st), o.entry_timeout,
                         o.attr_timeout)

    def _lookup_fd(self, parent: Inode, name: bytes) -> int:
        return linux_fs.openat2(parent.fd, name, os.O_PATH | os.O_NOFOLLOW, resolve=LOOKUP_RESOLVE)

    def enter_thread(self) -> None:
        """Called by each thread that serves this agent's requests (the connection's reader and
        workers). With ``squash``, a root server's threads act on the host as the squash owner:
        the host's permissions, not the agent's word, decide what the agent may do."""
        self.worker_tids.add(threading.get_native_id())
        if self.options.squash is not None and self.is_root:
            linux_fs.act_as(*self.options.squash)
            self._local.squashed = True

    def _owner(self, req: Request, parent: Inode) -> tuple[int, int] | None:
        """Who should own a file this request creates, or None to keep what the host gave it."""
        if self.options.squash is not None:
            if getattr(self._local, "squashed", False):
                return None  # created by the squash owner's fsuid/fsgid already
            return self.options.squash
        if not self.is_root:
            return None
        gid = req.gid
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return req.uid, gid

    def _set_owner(self, req: Request, parent: Inode, name: bytes, mode: int) -> None:
        owner = self._owner(req, parent)
        if owner is None:
            return
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        if (st.st_uid, st.st_gid) == owner:
            return
        os.chown(name, owner[0], owner[1], dir_fd=parent.fd, follow_symlinks=False)
        if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
            # chown clears set-id bits, even for root; the guest asked for them
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=parent.fd)

    def _after_create(self, req: Request, parent: Inode, name: bytes, mode: int) -> bytes:
        try:
            self._set_owner(req, parent, name, mode)
        except OSError:
            log.exception("cannot set the owner of a new file")
        return self._entry(self._lookup_fd(parent, name), parent, name)

    # --- session -----------------------------------------------------------------------------
    WANTED_FLAGS = (abi.ASYNC_READ | abi.ATOMIC_O_TRUNC | abi.BIG_WRITES | abi.FLOCK_LOCKS
                    | abi.AUTO_INVAL_DATA | abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
                    | abi.ASYNC_DIO | abi.PARALLEL_DIROPS | abi.MAX_PAGES | abi.CACHE_SYMLINKS
                    | abi.INIT_EXT)

    def op_init(self, req: Request) -> bytes:
        a = req.arg
        if a.major != abi.KERNEL_VERSION or a.minor < abi.MIN_MINOR:
            raise FuseError(errno.EPROTO, f"kernel FUSE {a.major}.{a.minor} is too old (need 7.31)")
        minor = min(a.minor, abi.MAX_MINOR)
        wanted = self.WANTED_FLAGS
        if self.options.writeback and not self.options.read_only:
            wanted |= abi.WRITEBACK_CACHE
        flags = init_flags(a) & wanted
        self.session.minor = minor
        self.session.flags = flags
        log.info("INIT: kernel FUSE 7.%d, answering 7.%d, flags %#x", a.minor, minor, flags)
        return init_out(minor, flags, max_write=MAX_WRITE, max_pages=MAX_WRITE // 4096,
                        max_readahead=a.max_readahead)

    def op_destroy(self, req: Request) -> bytes:
        return b""

    # --- names -------------------------------------------------------------------------------
    def op_lookup(self, req: Request) -> bytes:
        parent = self._dir(req.nodeid)
        name = check_name(req.name)
        return self._entry(self._lookup_fd(parent, name), parent, name)

    def op_forget(self, req: Request) -> None:
        self.inodes.forget(req.nodeid, req.arg.nlookup)
        return None

    def op_batch_forget(self, req: Request) -> None:
        for nodeid, nlookup in req.forgets:
            self.inodes.forget(nodeid, nlookup)
        return None

    def op_getattr(self, req: Request) -> bytes:
        inode = self._inode(req.nodeid)
        if req.arg.getattr_flags & abi.GETATTR_FH:
            st = os.fstat(self._handle(req.arg.fh, req.nodeid).fd)
        else:
            st = os.fstat(inode.fd)
        return attr_out(Attr.from_stat(st), self.options.attr_timeout)

    def op_setattr(self, req: Request) -> bytes:
        self._writable()
        a = req.arg
        inode = self._inode(req.nodeid)
        valid = a.valid
        h = self._handle(a.fh, req.nodeid) if valid & abi.FATTR_FH else None
        path = linux_fs.proc_path(inode.fd)
        if valid & abi.FATTR_MODE:
            if inode.is_symlink:
                raise FuseError(errno.EOPNOTSUPP)
            if h is not None:
                os.fchmod(h.fd, stat.S_IMODE(a.mode))
            else:
                os.chmod(path, stat.S_IMODE(a.mode))
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            if self.options.squash is not None:
                raise FuseError(errno.EPERM, "chown refused: the export squashes owners")
            uid = a.uid if valid & abi.FATTR_UID else -1
            gid = a.gid if valid & abi.FATTR_GID else -1
            linux_fs.fchown_empty(inode.fd, uid, gid)
        if valid & abi.FATTR_SIZE:
            if not inode.fmt == stat.S_IFREG:
                raise FuseError(errno.EISDIR if inode.is_dir else errno.EINVAL)
            if h is not None:
                os.ftruncate(h.fd, a.size)
            else:
                os.truncate(path, a.size)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            def when(set_bit: int, now_bit: int, sec: int, nsec: int) -> tuple[int, int]:
                if valid & now_bit:
                    return 0, linux_fs.UTIME_NOW
                if valid & set_bit:
                    if nsec >= 10**9:
                        raise FuseError(errno.EINVAL)
                    return sec if sec < 1 << 63 else sec - (1 << 64), nsec
                return 0, linux_fs.UTIME_OMIT
            linux_fs.utimens_empty(
                inode.fd,
                when(abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, a.atime, a.atimensec),
                when(abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, a.mtime, a.mtimensec),
            )
        return attr_out(Attr.from_stat(os.fstat(inode.fd)), self.options.attr_timeout)

    def op_readlink(self, req: Request) -> bytes:
        inode = self._inode(req.nodeid)
        if not inode.is_symlink:
            raise FuseError(errno.EINVAL)
        return os.readlink(b"", dir_fd=inode.fd)

    def op_symlink(self, req: Request) -> bytes:
        self._writable()
        self._room_for_inode()
        parent = self._dir(req.nodeid)
        name, target = check_name(req.names[0]), req.names[1]
        if not target:
            raise FuseError(errno.ENOENT)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._after_create(req, parent, name, 0)

    def op_mknod(self, req: Request) -> bytes:
        self._writable()
        self._room_for_inode()
        parent = self._dir(req.nodeid)
        name = check_name(req.name)
        mode = req.arg.mode
        fmt = stat.S_IFMT(mode)
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FuseError(errno.EINVAL)
        os.mknod(name, mode, decode_rdev(req.arg.rdev), dir_fd=parent.fd)
        return self._after_create(req, parent, name, mode)

    def op_mkdir(self, req: Request) -> bytes:
        self._writable()
        self._room_for_inode()
        parent = self._dir(req.nodeid)
        name = check_name(req.name)
        os.mkdir(name, req.arg.mode & 0o7777, dir_fd=parent.fd)
        return self._after_create(req, parent, name, req.arg.mode)

    def op_unlink(self, req: Request) -> bytes:
        self._writable()
        parent = self._dir(req.nodeid)
        os.unlink(check_name(req.name), dir_fd=parent.fd)
        self.inodes.drop_name(parent.nodeid, req.name)
        return b""

    def op_rmdir(self, req: Request) -> bytes:
        self._writable()
        parent = self._dir(req.nodeid)
        os.rmdir(check_name(req.name), dir_fd=parent.fd)
        self.inodes.drop_name(parent.nodeid, req.name)
        return b""

    def _rename(self, req: Request, newdir: int, flags: int) -> bytes:
        self._writable()
        if flags & ~(linux_fs.RENAME_NOREPLACE | linux_fs.RENAME_EXCHANGE | linux_fs.RENAME_WHITEOUT):
            raise FuseError(errno.EINVAL)
        old_parent = self._dir(req.nodeid)
        new_parent = self._dir(newdir)
        linux_fs.renameat2(old_parent.fd, check_name(req.names[0]), new_parent.fd,
                           check_name(req.names[1]), flags)
        if flags & linux_fs.RENAME_EXCHANGE:
            self.inodes.exchange_names(old_parent.nodeid, req.names[0], new_parent.nodeid,
                                       req.names[1])
        else:
            self.inodes.move_name(old_parent.nodeid, req.names[0], new_parent.nodeid, req.names[1])
        return b""

    def op_rename(self, req: Request) -> bytes:
        return self._rename(req, req.arg.newdir, 0)

    def op_rename2(self, req: Request) -> bytes:
        return self._rename(req, req.arg.newdir, req.arg.flags)

    def op_link(self, req: Request) -> bytes:
        self._writable()
        self._room_for_inode()
        inode = self._inode(req.arg.oldnodeid)
        parent = self._dir(req.nodeid)
        name = check_name(req.name)
        if inode.is_dir:
            raise FuseError(errno.EPERM)
        try:
            linux_fs.link_empty(inode.fd, parent.fd, name)
        except (PermissionError, FileNotFoundError):
            # linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH (gone for a squashed thread)
            if inode.is_symlink:
                raise
            os.link(linux_fs.proc_path(inode.fd), name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(self._lookup_fd(parent, name), parent, name)

    # --- files -------------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        if flags & os.O_ACCMODE in _WRITE_ACCESS or flags & os.O_TRUNC:
            self._writable()
        flags &= ~_STRIP_OPEN_FLAGS
        if self.session.flags & abi.WRITEBACK_CACHE:
            # the kernel may read to fill pages of a write-only file, and does O_APPEND itself
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags | os.O_CLOEXEC

    def op_open(self, req: Request) -> bytes:
        inode = self._inode(req.nodeid)
        if inode.fmt != stat.S_IFREG:
            raise FuseError(errno.EISDIR if inode.is_dir else errno.ELOOP if inode.is_symlink
                            else errno.EINVAL)
        flags = self._open_flags(req.arg.flags)
        fd = os.open(linux_fs.proc_path(inode.fd), flags)
        fh = self._new_handle(fd, inode, flags)
        return abi.OPEN_OUT.pack(fh, 0, 0)

    def op_create(self, req: Request) -> bytes:
        self._writable()
        if len(self.handles) >= self.options.max_handles:
            # before anything is created or counted: the kernel never sees this entry
            raise self._refused("handles", errno.EMFILE, self.options.max_handles)
        self._room_for_inode()
        parent = self._dir(req.nodeid)
        name = check_name(req.name)
        a = req.arg
        flags = self._open_flags(a.flags) | os.O_CREAT | os.O_NOFOLLOW
        if a.flags & os.O_EXCL:
            flags |= os.O_EXCL
        # Create exclusively; a name that already exists is opened only if it is a regular file
        # (never a FIFO, which would block this worker, nor a device a hostile agent mknod'ed),
        # and keeps its owner.
        for _attempt in range(3):
            try:
                fd = os.open(name, flags | os.O_EXCL, a.mode & 0o7777, dir_fd=parent.fd)
                created = True
                break
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            try:
                fd = self._open_existing(parent, name, flags & ~(os.O_CREAT | os.O_NOFOLLOW))
                created = False
                break
            except FileNotFoundError:
                continue  # removed since: try to create it again
        else:
            raise FuseError(errno.EAGAIN)
        try:
            if created:
                self._set_owner(req, parent, name, a.mode)
            path_fd = os.open(linux_fs.proc_path(fd), os.O_PATH | os.O_CLOEXEC)
            entry = self._entry(path_fd, parent, name)
        except BaseException:
            os.close(fd)
            raise
        with self.inodes.lock:
            inode = self.inodes.by_id[abi.ENTRY_OUT.unpack_from(entry).nodeid]
            inode.refs += 1
        self._local.uses.inodes.append(inode)
        fh = self._new_handle(fd, inode, flags)
        return entry + abi.OPEN_OUT.pack(fh, 0, 0)

    def _open_existing(self, parent: Inode, name: bytes, flags: int) -> int:
        """open(2) an existing ``name`` for CREATE without O_EXCL: regular files only."""
        path_fd = self._lookup_fd(parent, name)
        try:
            fmt = stat.S_IFMT(os.fstat(path_fd).st_mode)
            if fmt != stat.S_IFREG:
                raise FuseError(errno.EISDIR if fmt == stat.S_IFDIR else
                                errno.ELOOP if fmt == stat.S_IFLNK else errno.EINVAL)
            return os.open(linux_fs.proc_path(path_fd), flags)
        finally:
            os.close(path_fd)

    def op_read(self, req: Request) -> bytes:
        a = req.arg
        h = self._handle(a.fh, req.nodeid)
        if a.size > MAX_WRITE:
            raise FuseError(errno.EINVAL)
        return os.pread(h.fd, a.size, a.offset)

    def op_write(self, req: Request) -> bytes:
        self._writable()
        a = req.arg
        h = self._handle(a.fh, req.nodeid)
        n = os.pwrite(h.fd, req.data, a.offset)
        return abi.WRITE_OUT.pack(n)

    def op_statfs(self, req: Request) -> bytes:
        inode = self._inode(req.nodeid)
        return statfs_out(os.fstatvfs(inode.fd))

    def op_flush(self, req: Request) -> bytes:
        self._handle(req.arg.fh, req.nodeid)
        return b""

    def op_release(self, req: Request) -> bytes:
        self._release(req.arg.fh)
        return b""

    def op_fsync(self, req: Request) -> bytes:
        h = self._handle(req.arg.fh, req.nodeid)
        if req.arg.fsync_flags & abi.FSYNC_FDATASYNC:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)
        self.fsyncs += 1
        return b""

    def op_fallocate(self, req: Request) -> bytes:
        self._writable()
        a = req.arg
        h = self._handle(a.fh, req.nodeid)
        linux_fs.fallocate(h.fd, a.mode, a.offset, a.length)
        return b""

    def op_lseek(self, req: Request) -> bytes:
        a = req.arg
        h = self._handle(a.fh, req.nodeid)
        if a.whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        return abi.LSEEK_OUT.pack(os.lseek(h.fd, a.offset, a.whence))

    def op_copy_file_range(self, req: Request) -> bytes:
        self._writable()
        a = req.arg
        src = self._handle(a.fh_in, req.nodeid)
        dst = self._handle(a.fh_out, a.nodeid_out)
        n = os.copy_file_range(src.fd, dst.fd, min(a.len, 1 << 30), a.off_in, a.off_out)
        return abi.WRITE_OUT.pack(n)

    # --- locks (flock semantics; POSIX locks stay local in the guest kernel) ----------------
    def op_getlk(self, req: Request) -> bytes:
        raise FuseError(errno.ENOSYS)

    def _flock(self, req: Request, wait: bool) -> bytes:
        a = req.arg
        if not a.lk_flags & abi.LK_FLOCK:
            raise FuseError(errno.ENOSYS)
        h = self._handle(a.fh, req.nodeid)
        op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX,
              fcntl.F_UNLCK: fcntl.LOCK_UN}.get(a.type)
        if op is None:
            raise FuseError(errno.EINVAL)
        if op == fcntl.LOCK_UN:
            fcntl.flock(h.fd, op)
            return b""
        delay = 0.001
        while True:
            try:
                fcntl.flock(h.fd, op | fcntl.LOCK_NB)
                return b""
            except BlockingIOError:
                if not wait:
                    raise FuseError(errno.EAGAIN) from None
            # a blocking flock in a worker could not be interrupted: poll, and honour INTERRUPT
            if self.closing or req.unique in self.interrupted:
                self.interrupted.discard(req.unique)
                raise FuseError(errno.EINTR)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def op_setlk(self, req: Request) -> bytes:
        return self._flock(req, wait=False)

    def op_setlkw(self, req: Request) -> bytes:
        return self._flock(req, wait=True)

    def interrupt(self, unique: int) -> None:
        self.interrupted.add(unique)
        if len(self.interrupted) > 4096:  # interrupts of requests already answered
            self.interrupted.clear()

    def shutdown(self) -> None:
        """The connection is closing: end every wait now, before the handles are closed."""
        self.closing = True

    # --- directories -------------------------------------------------------------------------
    def op_opendir(self, req: Request) -> bytes:
        inode = self._dir(req.nodeid)
        fd = os.open(linux_fs.proc_path(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._new_handle(fd, inode, os.O_RDONLY)
        with self.lock:
            self.handles[fh].entries = []
        return abi.OPEN_OUT.pack(fh, 0, 0)

    def _snapshot(self, h: Handle) -> list[tuple[bytes, int, int]]:
        st = os.fstat(h.fd)
        entries: list[tuple[bytes, int, int]] = [(b".", st.st_ino, stat.S_IFDIR >> 12)]
        if h.inode.nodeid == self.inodes.root.nodeid:
            entries.append((b"..", st.st_ino, stat.S_IFDIR >> 12))
        else:
            try:
                pst = os.stat(b"..", dir_fd=h.fd)
                entries.append((b"..", pst.st_ino, stat.S_IFDIR >> 12))
            except OSError:
                entries.append((b"..", 0, stat.S_IFDIR >> 12))
        # scandir(fd) reads through a duplicate of its own and never closes the fd it is given
        # (its entries' stat() uses that fd: closed only once the listing is done)
        dup = os.dup(h.fd)
        try:
            os.lseek(dup, 0, os.SEEK_SET)
            entries.extend(self._scan(dup))
        finally:
            os.close(dup)
        return entries

    @staticmethod
    def _scan(dirfd: int) -> list[tuple[bytes, int, int]]:
        entries: list[tuple[bytes, int, int]] = []
        with os.scandir(dirfd) as it:
            for e in it:
                name = os.fsencode(e.name)
                if e.is_symlink():
                    dt = stat.S_IFLNK >> 12
                elif e.is_dir(follow_symlinks=False):
                    dt = stat.S_IFDIR >> 12
                elif e.is_file(follow_symlinks=False):
                    dt = stat.S_IFREG >> 12
                else:
                    try:
                        dt = dirent_type(e.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        dt = 0
                entries.append((name, e.inode(), dt))
        return entries

    def _readdir(self, req: Request, plus: bool) -> bytes:
        a = req.arg
        h = self._handle(a.fh, req.nodeid)
        if h.entries is None:
            raise FuseError(errno.EBADF)
        if a.offset == 0 or not h.entries:
            h.entries = self._snapshot(h)
        buf = DirentBuffer(min(a.size, MAX_WRITE), plus=plus)
        parent = h.inode
        for index in range(a.offset, len(h.entries)):
            name, ino, dt = h.entries[index]
            if not buf.fits(name):
                break
            entry = None
            if plus and name not in (b".", b".."):
                try:
                    entry = self._entry(self._lookup_fd(parent, name), parent, name)
                except OSError:
                    entry = None  # gone since the snapshot: the kernel just skips it
                except FuseError:
                    if buf.parts:
                        break  # the inode limit: the kernel asks again from this entry
                    raise
            buf.add(ino, index + 1, dt, name, entry)
        return buf.payload()

    def op_readdir(self, req: Request) -> bytes:
        return self._readdir(req, plus=False)

    def op_readdirplus(self, req: Request) -> bytes:
        return self._readdir(req, plus=True)

    def op_releasedir(self, req: Request) -> bytes:
        self._release(req.arg.fh)
        return b""

    def op_fsyncdir(self, req: Request) -> bytes:
        h = self._handle(req.arg.fh, req.nodeid)
        os.fsync(h.fd)
        return b""

    # --- extended attributes -----------------------------------------------------------------
    def _xattr_target(self, req: Request) -> tuple[Inode, str]:
        inode = self._inode(req.nodeid)
        return inode, linux_fs.proc_path(inode.fd)

    def op_getxattr(self, req: Request) -> bytes:
        inode, path = self._xattr_target(req)
        if inode.is_symlink:
            raise FuseError(errno.ENODATA)
        value = os.getxattr(path, req.name)
        return self._sized(value, req.arg.size)

    def op_listxattr(self, req: Request) -> bytes:
        inode, path = self._xattr_target(req)
        names = [] if inode.is_symlink else os.listxattr(path)
        value = b"".join(os.fsencode(n) + b"\0" for n in names)
        return self._sized(value, req.arg.size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(value))
        if len(value) > size:
            raise FuseError(errno.ERANGE)
        return value

    def op_setxattr(self, req: Request) -> bytes:
        self._writable()
        inode, path = self._xattr_target(req)
        if inode.is_symlink:
            raise FuseError(errno.EPERM)
        os.setxattr(path, req.name, req.data, req.arg.flags)
        return b""

    def op_removexattr(self, req: Request) -> bytes:
        self._writable()
        inode, path = self._xattr_target(req)
        if inode.is_symlink:
            raise FuseError(errno.ENODATA)
        os.removexattr(path, req.name)
        return b""

    def op_access(self, req: Request) -> bytes:
        inode = self._inode(req.nodeid)
        mask = req.arg.mask
        if mask & os.W_OK and self.options.read_only:
            raise FuseError(errno.EROFS)
        if inode.is_symlink or mask == os.F_OK:
            return b""
        if not os.access(linux_fs.proc_path(inode.fd), mask):
            raise FuseError(errno.EACCES)
        return b""

    # --- remote events -------------------------------------------------------------------------
    def op_notifyfs_fsnotify(self, req: Request) -> bytes:
        """The guest's aggregated watch mask for one inode (the proposal's FUSE_FSNOTIFY)."""
        inode = self._inode(req.nodeid)
        if self.watcher is None:
            raise FuseError(errno.ENOSYS)
        self.watcher.set_mask(inode, req.arg.mask if req.arg.action else 0)
        return b""

    # --- reconnect -----------------------------------------------------------------------------
    def op_notifyfs_revive(self, req: Request) -> bytes:
        """An agent that lost its server hands this one the inodes, open files and watches its
        guest kernel still holds (revive.py). Each inode is found again by its host file handle
        (or, without one, by its name in a revived parent) and must still be inside the export
        and be the same inode; everything else is reported stale."""
        try:
            r = revive_wire.decode_revive(req.data)
        except ProtocolError as e:
            raise FuseError(errno.EINVAL, str(e)) from None
        stale: list[int] = []
        revived = 0
        for n in r.nodes:
            if n.nodeid == ROOT_ID or n.nlookup == 0:
                continue
            inode = self._revive_node(n.nodeid, n.nlookup, n.handle, n.parent, n.name)
            if inode is None:
                stale.append(n.nodeid)
                continue
            revived += 1
            if inode.is_dir and self.watcher is not None:
                self.watcher.watch(inode)
        for parent, name, nodeid in r.names:
            inode = self.inodes.acquire_if_live(nodeid)
            if inode is not None:
                self.inodes.remember(parent, name, inode)
                self.inodes.release(inode)
        with self.inodes.lock:
            self.inodes.retired.update(stale)
        with self.lock:  # no new handle may take the number of one the guest still holds
            self._next_fh = max([self._next_fh, *(f.fh + 1 for f in r.files if f.fh < 1 << 62)])
        stale_files = [f.fh for f in r.files if not self._revive_file(f.fh, f.nodeid, f.flags,
                                                                      f.is_dir)]
        if self.watcher is not None:
            for nodeid, mask in r.watches:
                inode = self.inodes.acquire_if_live(nodeid)
                if inode is not None:
                    try:
                        self.watcher.set_mask(inode, mask)
                    finally:
                        self.inodes.release(inode)
            self._known.update(self._known_listing(r))
            if r.last:
                known, self._known = self._known, {}
                watcher = self.watcher
                watcher.call_soon(lambda: watcher.rescan_after_restart(known, r.high_ctime))
        log.info("revived %d inode(s) and %d open file(s) for a reconnected agent; %d stale",
                 revived, len(r.files) - len(stale_files), len(stale) + len(stale_files))
        return revive_wire.encode_result(revive_wire.ReviveResult(revived, stale, stale_files))

    def _known_listing(self, r: revive_wire.Revive) -> dict[int, dict[bytes, tuple[int, ...]]]:
        """What the guest knew of each directory it watches: name -> (ino, type, size, mtime,
        ctime), -1 where it never saw a value."""
        watched = {nodeid for nodeid, mask in r.watches if mask}
        attrs = {n.nodeid: n.attr for n in r.nodes}
        out: dict[int, dict[bytes, tuple[int, ...]]] = {d: {} for d in watched}
        for parent, name, nodeid in r.names:
            if parent not in watched:
                continue
            ino = nodeid & ((1 << 56) - 1) if nodeid >> 56 < 0xF0 else -1
            a = attrs.get(nodeid)
            out[parent][name] = (ino, *a) if a is not None else (ino, -1, -1, -1, -1)
        return out

    def _revive_node(self, nodeid: int, nlookup: int, handle: bytes, parent: int,
                     name: bytes) -> Inode | None:
        fd = -1
        if handle and self.is_root:
            try:
                htype = int.from_bytes(handle[:4], "little", signed=True)
                fd = linux_fs.open_by_handle(self._mount_fd(), htype, handle[4:])
            except (OSError, ValueError):
                fd = -1
            if fd >= 0 and not self._inside_export(fd):
                os.close(fd)
                fd = -1
        if fd < 0 and name:
            try:
                check_name(name)
                p = self.inodes.acquire(parent)
            except FuseError:
                return None
            try:
                fd = self._lookup_fd(p, name)
            except OSError:
                return None
            finally:
                self.inodes.release(p)
        if fd < 0:
            return None
        try:
            st = os.fstat(fd)
            inode = self.inodes.revive(nodeid, fd, st, nlookup)
        except OSError:
            inode = None
        if inode is None:
            os.close(fd)
        return inode

    def _mount_fd(self) -> int:
        """A real (not O_PATH) fd on the export's filesystem, for open_by_handle_at."""
        with self.lock:
            if self._handle_mount_fd < 0:
                self._handle_mount_fd = os.open(self.export, os.O_RDONLY | os.O_DIRECTORY
                                                | os.O_CLOEXEC)
            return self._handle_mount_fd

    def _inside_export(self, fd: int) -> bool:
        """Whether the inode behind ``fd`` (opened by handle: it may be anywhere on the host's
        filesystem) is reachable inside the export: its path, resolved again beneath the export
        root without symlinks, must lead to the same inode."""
        try:
            path = os.readlink(linux_fs.proc_path(fd))
            st = os.fstat(fd)
        except OSError:
            return False
        if path == self.export:
            return True
        if not path.startswith(self.export.rstrip("/") + "/"):
            return False
        rel = path[len(self.export.rstrip("/")) + 1:]
        try:
            again = linux_fs.openat2(self.inodes.root.fd, rel, os.O_PATH | os.O_NOFOLLOW,
                                     resolve=LOOKUP_RESOLVE)
        except OSError:
            return False
        try:
            st2 = os.fstat(again)
        finally:
            os.close(again)
        return (st.st_dev, st.st_ino) == (st2.st_dev, st2.st_ino)

    def _revive_file(self, fh: int, nodeid: int, flags: int, is_dir: bool) -> bool:
        inode = self.inodes.acquire_if_live(nodeid)
        if inode is None:
            return False
        try:
            if is_dir != inode.is_dir or (not is_dir and inode.fmt != stat.S_IFREG):
                return False
            with self.lock:
                if fh in self.handles or fh == 0 or fh >= 1 << 62:
                    return False
            try:
                if is_dir:
                    flags = os.O_RDONLY
                    fd = os.open(linux_fs.proc_path(inode.fd),
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                else:
                    # never truncate again what the guest already wrote
                    flags = self._open_flags(flags & ~os.O_TRUNC)
                    fd = os.open(linux_fs.proc_path(inode.fd), flags)
            except (OSError, FuseError):
                return False
            with self.lock:
                self.handles[fh] = Handle(fd, inode, flags, entries=[] if is_dir else None)
                self._next_fh = max(self._next_fh, fh + 1)
                with self.inodes.lock:
                    inode.refs += 1
            return True
        finally:
            self.inodes.release(inode)

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        with self.lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for h in handles:
            try:
                os.close(h.fd)
            except OSError:
                pass
            self.inodes.release(h.inode)  # else close_all keeps the inode's fd open for ever
        if self._handle_mount_fd >= 0:
            os.close(self._handle_mount_fd)
            self._handle_mount_fd = -1
        self.inodes.close_all()
        try:  # the table keeps the root for ever; the connection's end is its end
            os.close(self.inodes.root.fd)
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        with self.lock:
            nh = len(self.handles)
        counts = self.inodes.lookup_counts()
        counts.pop(1, None)  # the root is never forgotten
        out: dict[str, Any] = {"inodes": len(counts), "nlookup": sum(counts.values()),
                               "handles": nh, "echo_suppressed": self.echo.suppressed,
                               "fsyncs": self.fsyncs, "refused": dict(self.refusals),
                               "out_of_fds": self.out_of_fds}
        if self.watcher is not None:
            out.update(watches=self.watcher.watch_count, events_sent=self.watcher.sent,
                       overflows=self.watcher.overflows, snapshots=len(self.watcher.snapshots),
                       guest_watches=len(self.watcher.masks))
        return out
