"""The injector: turns each remote event into the ordinary VFS call that makes the guest kernel
generate exactly that event, so every unmodified watcher (inotify, fanotify; dnotify with
``-o inject=all``, since its marks do not show in /proc) sees it.

One injector thread per mount. For each event it first invalidates the names involved
(FUSE_NOTIFY_INVAL_ENTRY, written from this thread, never from the /dev/fuse reader), then makes the
call on the mount: ``mknodat``/``mkdirat``/``symlinkat`` for CREATE, ``unlinkat`` for DELETE,
``renameat`` for a move (through a hidden directory for moves into or out of the export),
``utimensat`` with mtime only / atime only / both for MODIFY / ACCESS / ATTRIB, and a real
``open``/``close`` for OPEN and CLOSE_*. The FUSE requests those calls produce carry this thread's
id in ``fuse_in_header.pid``; the relay hands them to :meth:`Injector.answer`, which answers from
the event itself (the *script*) and never forwards a change to the host. Read-only requests that
are not scripted (a LOOKUP of a name the event does not cover, GETATTR) go to the server.

Directories are addressed by FUSE file handle (type 0x81: nodeid, generation) with
``open_by_handle_at``: a watched inode is pinned in the guest's inode cache by its mark.

Entries the server counted in nlookup and the kernel did not take are FORGOTten, so nlookup stays
exact. Nodes that exist only here (tombstones of inodes the guest never knew, the hidden directory)
have nodeids with top byte 0xFE; they answer the injector only (ESTALE for everyone else).

Lock order: ``Injector.lock`` is a leaf lock.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .. import abi
from ..events import OPENED_FOR_WRITE, Entry, RemoteEvent, decode_event
from ..linux import fs as linux_fs
from ..linux import inotify as ino
from ..linux.mount import mount_id
from ..protocol import Attr, ProtocolError, Request, attr_out, inval_entry, inval_inode, reply, reply_error
from . import watchset

log = logging.getLogger(__name__)

LOCAL_BASE = 0xFE << 56
_LOCAL_TOP = 0xFE
LOOKAHEAD_SECONDS = 0.02
RESCAN_PERIOD = 1.0


def _kernel_queue_limit() -> int:
    """How many events the guest's kernel queues for an inotify instance before it drops them
    all for one IN_Q_OVERFLOW."""
    try:
        with open("/proc/sys/fs/inotify/max_queued_events") as f:
            return max(1000, int(f.read()))
    except (OSError, ValueError):
        return 16384


#: remote events waiting past which the injector coalesces: it has fallen behind a host that
#: changes files faster than it can inject. Up to as many as the guest's own kernel would queue,
#: every event is delivered as it came; past that the kernel would have overflowed and lost
#: them all, while coalescing keeps what a watcher needs to reach the host's state.
BACKLOG_EVENTS = _kernel_queue_limit()


#: fanotify bits (same values as the inotify ones they share) that an injected call also
#: triggers: permission events for an open or a read, FAN_RENAME for a move
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC = 0x00001000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_RENAME = 0x10000000
#: the mark bits that see what injecting an event of each kind does to its directory and file.
#: An injected OPEN is also what later MODIFY, ACCESS and CLOSE events go through (a write or
#: read on the held file): only those carry a path, and fanotify reports nothing else to a mount
#: or filesystem mark, or to any group that does not report file ids.
_SEEN_AS = {
    ino.IN_OPEN: (ino.IN_OPEN | FAN_OPEN_PERM | FAN_OPEN_EXEC | FAN_OPEN_EXEC_PERM | ino.IN_MODIFY
                  | ino.IN_ACCESS | ino.IN_CLOSE_WRITE | ino.IN_CLOSE_NOWRITE | FAN_ACCESS_PERM),
    ino.IN_ACCESS: ino.IN_ACCESS | FAN_ACCESS_PERM,
}
_MOVE_BITS = ino.IN_MOVED_FROM | ino.IN_MOVED_TO | FAN_RENAME


def is_local(nodeid: int) -> bool:
    return nodeid >> 56 == _LOCAL_TOP


@dataclass
class _Held:
    fd: int
    writable: bool


class Injector:
    def __init__(self, mountpoint: str, write_dev: Callable[[bytes], None],
                 forget: Callable[[int, int], None],
                 publish_masks: Callable[[dict[int, int], dict[int, int]], None] | None = None,
                 inject_all: bool = False,
                 path_of: Callable[[int], list[bytes] | None] | None = None) -> None:
        #: the path under which the guest knows a nodeid (KernelView.path_of)
        self.path_of = path_of
        #: dnotify marks do not show in /proc/*/fdinfo: with inject_all every event is injected
        self.inject_all = inject_all
        self.mountpoint = mountpoint
        self.write_dev = write_dev
        self.forget = forget
        self.publish_masks = publish_masks
        self.queue: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        self.pending: collections.deque[tuple[float, RemoteEvent]] = collections.deque()
        self.tid = -1
        self.lock = threading.Lock()
        self.script: dict[tuple[int, int, bytes], bytes | int] = {}
        self.consumed: set[int] = set()  # nodeids of counted entries the kernel took
        self.fake_fhs: set[int] = set()
        self._next_fh = 1 << 62
        self.local: dict[int, Attr] = {}
        self._next_local = LOCAL_BASE + 3
        self.hidden_name = b".notifyfs-inject-" + secrets.token_hex(8).encode()
        self.hidden_nodeid = LOCAL_BASE + 1
        self.local[self.hidden_nodeid] = _local_attr(self.hidden_nodeid, stat.S_IFDIR | 0o700)
        self.held: dict[tuple[int, bytes], list[_Held]] = {}
        #: O_PATH fds of the directories events happened in, kept for a burst of events (let go
        #: when the queue runs dry, like the anchor): (nodeid, generation) -> fd
        self.dirs: dict[tuple[int, int], int] = {}
        self.ws = watchset.WatchSet()
        self.sdev = -1
        self.mnt_id = -1
        self.root_fd = -1  # O_PATH fd of the mount's root, open only while events are handled
        # open_by_handle_at wants a real (not O_PATH) fd on the mount, and opening anything makes
        # an IN_OPEN event: so it is a file that exists only here, in the hidden directory, which
        # no inotify watch can see (opened per burst of events, so umount is not kept busy)
        self.anchor_fd = -1
        self.anchor_nodeid = LOCAL_BASE + 2
        self.local[self.anchor_nodeid] = _local_attr(self.anchor_nodeid, stat.S_IFREG | 0o400)
        self.stats = collections.Counter[str]()
        self.thread: threading.Thread | None = None

    # --- called by the relay --------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="injector", daemon=True)
        self.thread.start()

    def submit(self, frame: bytes) -> None:
        self.queue.put((time.monotonic(), frame))

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the event at hand, let go of every fd on the mount, and end the thread.

        Must happen while the /dev/fuse reader still runs: a process that exits while one of
        its threads waits for an answer from the mount it serves itself can never finish."""
        self.queue.put(None)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def owns(self, req: Request) -> bool:
        """Is this request the injector's to answer (or refuse)?"""
        if req.pid == self.tid and self.tid > 0:
            return True
        if req.opcode in (abi.Opcode.RELEASE, abi.Opcode.RELEASEDIR, abi.Opcode.FLUSH):
            return req.arg.fh in self.fake_fhs
        return is_local(req.nodeid)

    def answer(self, req: Request) -> bytes | None:
        """The reply to one of the injector's requests, or None to forward it to the server."""
        op = req.opcode
        O = abi.Opcode  # noqa: E741
        if req.pid != self.tid:
            if op in (O.RELEASE, O.RELEASEDIR):
                with self.lock:
                    self.fake_fhs.discard(req.arg.fh)
                return reply(req.unique)
            if op == O.FLUSH:
                return reply(req.unique)
            return reply_error(req.unique, errno.ESTALE)  # a local node, asked by someone else
        name = req.names[0] if req.names else b""
        if op == O.LOOKUP:
            if req.nodeid == abi.ROOT_ID and name == self.hidden_name:
                return reply(req.unique, self._local_entry(self.hidden_nodeid))
            if req.nodeid == self.hidden_nodeid and name == b"anchor":
                return reply(req.unique, self._local_entry(self.anchor_nodeid))
            with self.lock:
                scripted = self.script.get((op, req.nodeid, name))
            if scripted is None:
                if req.nodeid == self.hidden_nodeid:
                    return reply_error(req.unique, errno.ENOENT)
                log.debug("injector: LOOKUP %r in %d goes to the server", name, req.nodeid)
                return None
            return self._scripted(req, scripted)
        if op in (O.GETATTR, O.GETXATTR, O.LISTXATTR, O.READLINK, O.ACCESS, O.STATFS):
            if is_local(req.nodeid):
                if op == O.GETATTR:
                    return reply(req.unique, attr_out(self.local[req.nodeid], 0.0))
                return reply_error(req.unique, errno.ENODATA if op == O.GETXATTR else errno.ENOSYS)
            return None
        if op in (O.OPEN, O.OPENDIR):
            with self.lock:
                fh = self._next_fh
                self._next_fh += 1
                self.fake_fhs.add(fh)
            flags = abi.FOPEN_DIRECT_IO if op == O.OPEN else 0
            return reply(req.unique, abi.OPEN_OUT.pack(fh, flags, 0))
        if op in (O.RELEASE, O.RELEASEDIR, O.FLUSH):
            if req.arg.fh in self.fake_fhs:
                if op != O.FLUSH:
                    with self.lock:
                        self.fake_fhs.discard(req.arg.fh)
                return reply(req.unique)
            return None
        if op == O.WRITE and req.arg.fh in self.fake_fhs:
            return reply(req.unique, abi.WRITE_OUT.pack(len(req.data)))
        if op == O.READ and req.arg.fh in self.fake_fhs:
            return reply(req.unique, bytes(min(req.arg.size, 1)))
        if op in (O.READDIR, O.READDIRPLUS) and req.arg.fh in self.fake_fhs:
            return reply(req.unique)  # an empty listing: getdents still reports IN_ACCESS
        if op == O.SETATTR and is_local(req.nodeid):
            # a tombstone: the host name was gone before the server could describe it
            return reply(req.unique, attr_out(self.local[req.nodeid], 0.0))
        key_nodeid = 0 if op == O.SETATTR else req.nodeid
        with self.lock:
            scripted = self.script.get((op, key_nodeid, name))
        if scripted is None:
            log.warning("injector: unexpected %s on %d %r; refused", req.opname, req.nodeid, name)
            return reply_error(req.unique, errno.EIO)
        return self._scripted(req, scripted)

    def _scripted(self, req: Request, scripted: bytes | int) -> bytes:
        if isinstance(scripted, int):
            # scripted errors are negative errnos, 0 is success
            return reply_error(req.unique, -scripted) if scripted else reply(req.unique)
        if req.opcode in (abi.Opcode.LOOKUP, abi.Opcode.MKNOD, abi.Opcode.MKDIR, abi.Opcode.SYMLINK,
                          abi.Opcode.LINK, abi.Opcode.CREATE):
            with self.lock:
                self.consumed.add(abi.ENTRY_OUT.unpack_from(scripted).nodeid)
        return reply(req.unique, scripted)

    # --- helpers ------------------------------------------------------------------------------
    def _local_entry(self, nodeid: int) -> bytes:
        return abi.ENTRY_OUT.pack(nodeid, 0, 0, 0, 0, 0) + self.local[nodeid].pack()

    def _tombstone(self, file_type: int, isdir: bool) -> Entry:
        with self.lock:
            nodeid = self._next_local
            self._next_local += 1
        fmt = file_type or (stat.S_IFDIR if isdir else stat.S_IFREG)
        attr = _local_attr(nodeid, fmt | (0o755 if fmt == stat.S_IFDIR else 0o644))
        self.local[nodeid] = attr
        return Entry(nodeid, 0, attr, abi.ENTRY_OUT.pack(nodeid, 0, 0, 0, 0, 0) + attr.pack())

    def _inval(self, parent: int, name: bytes) -> None:
        self.write_dev(inval_entry(parent, name))

    def _dir_fd(self, nodeid: int, generation: int) -> int | None:
        """An O_PATH fd of the guest's directory ``nodeid``, kept until the queue runs dry
        (the caller must not close it); None if the guest does not have it."""
        if nodeid == abi.ROOT_ID:
            fd: int | None = self._root()
        else:
            key = (nodeid, generation & 0xFFFFFFFF)
            fd = self.dirs.get(key)
            if fd is None:
                fd = self._open_dir(nodeid, generation)
                if fd is None:
                    return None
                self.dirs[key] = fd
        return fd

    def _let_go_of_dir(self, nodeid: int) -> None:
        """Close the kept fd of a directory about to be removed: while an fd holds its dentry,
        the guest kernel reports its DELETE_SELF (and IN_IGNORED) only when that fd is closed,
        not at the rmdir."""
        for key in [k for k in self.dirs if k[0] == nodeid]:
            os.close(self.dirs.pop(key))

    def _open_dir(self, nodeid: int, generation: int) -> int | None:
        try:
            return linux_fs.open_fuse_inode(self._anchor(), nodeid, generation, os.O_PATH)
        except OSError as e:
            if e.errno != errno.ESTALE:
                return None
        # Either the guest does not have the directory (nothing there to notify or invalidate)
        # or it has it with no dentry: an invalidation (ours, or the server's after a queue
        # overflow) dropped the dentry while an inotify mark kept the inode. A directory is
        # opened by handle only if its dentry connects to the root, which FUSE without export
        # support cannot rebuild (ESTALE). A lookup by the path the guest knew it under does.
        return self._reconnect(nodeid, generation)

    def _reconnect(self, nodeid: int, generation: int) -> int | None:
        parts = self.path_of(nodeid) if self.path_of is not None else None
        if not parts:
            return None
        try:
            fd = os.open(b"/".join(parts), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=self._root())
        except OSError:
            return None
        try:
            handle_type, handle, _mnt = linux_fs.name_to_handle(fd)
            if handle_type == linux_fs.FUSE_HANDLE_TYPE and \
                    linux_fs.parse_fuse_handle(handle.hex()) == (nodeid, generation & 0xFFFFFFFF):
                self.stats["reconnected"] += 1
                return fd
        except OSError:
            pass
        os.close(fd)  # the name leads elsewhere now: the guest's old view of it is stale
        return None

    def _root(self) -> int:
        """An O_PATH fd of the mount's root, opened on first use while an event is handled."""
        if self.root_fd < 0:
            self.root_fd = os.open(self.mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return self.root_fd

    def _anchor(self) -> int:
        if self.anchor_fd < 0:
            path = os.path.join(self.mountpoint, os.fsdecode(self.hidden_name), "anchor")
            self.anchor_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return self.anchor_fd

    def _release_all(self) -> None:
        for held in self.held.values():
            for h in held:
                try:
                    os.close(h.fd)
                except OSError:
                    pass
        self.held.clear()
        self._idle()

    def _idle(self) -> None:
        """No event waiting: let go of everything that keeps the mount busy."""
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1
        if self.anchor_fd >= 0:
            os.close(self.anchor_fd)
            self.anchor_fd = -1
            self._inval(self.hidden_nodeid, b"anchor")
            self._inval(abi.ROOT_ID, self.hidden_name)

    def _existing(self, entry: Entry) -> int | None:
        """An O_PATH fd of the guest's inode for ``entry``, if the guest has it cached."""
        if is_local(entry.nodeid) or not entry.nodeid:
            return None
        try:
            return linux_fs.open_fuse_inode(self._anchor(), entry.nodeid, entry.generation)
        except OSError:
            return None

    def _with_script(self, script: dict[tuple[int, int, bytes], bytes | int],
                     call: Callable[[], object]) -> OSError | None:
        with self.lock:
            self.script = script
        try:
            call()
            return None
        except OSError as e:
            return e
        finally:
            with self.lock:
                self.script = {}

    def _settle(self, *entries: tuple[Entry | None, bool]) -> None:
        """FORGET every counted entry the kernel did not take."""
        with self.lock:
            consumed, self.consumed = self.consumed, set()
        for entry, counted in entries:
            if entry is not None and counted and not is_local(entry.nodeid) \
                    and entry.nodeid not in consumed:
                self.forget(entry.nodeid, 1)

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            st = os.stat(self.mountpoint)
            self.sdev = watchset.kernel_dev(st.st_dev)
            self.mnt_id = mount_id(self.mountpoint)
            self._rescan()
        except OSError as e:
            log.error("injector cannot start: %s", e)
            return
        last_scan = time.monotonic()
        while True:
            item = self._next(timeout=RESCAN_PERIOD)
            if item is None:
                if not self.queue_alive:
                    self._release_all()
                    return
                if time.monotonic() - last_scan >= RESCAN_PERIOD:
                    self._rescan()
                    last_scan = time.monotonic()
                continue
            arrived, ev = item
            try:
                self._handle(arrived, ev)
            except Exception:
                log.exception("injector: event %s failed", ino.mask_names(ev.mask))
            finally:
                # fds on the mount only while working: a held one would make umount EBUSY
                if not self.pending and self.queue.empty():
                    self._idle()

    queue_alive = True

    def _pull(self, timeout: float | None) -> bool:
        """Move one frame from the queue to ``pending``; False on timeout or stop."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            self.queue_alive = False
            return False
        arrived, frame = item
        code = int.from_bytes(frame[4:8], "little", signed=True)
        if code == abi.NotifyCode.NOTIFYFS_OVERFLOW:
            self.stats["overflow"] += 1
            log.warning("the server's event queue overflowed; it rescans and sends the difference")
            return True
        if code != abi.NotifyCode.NOTIFYFS_EVENT:
            self.write_dev(frame)  # an ordinary FUSE notification from the server
            return True
        try:
            ev = decode_event(frame[abi.OUT_HEADER.size:])
        except ProtocolError as e:
            log.error("bad remote event from the server: %s", e)
            return True
        self.pending.append((arrived, ev))
        return True

    def _next(self, timeout: float) -> tuple[float, RemoteEvent] | None:
        if self.queue.qsize() >= BACKLOG_EVENTS:
            self._catch_up()
        while not self.pending:
            if not self._pull(timeout) and not self.pending:
                return None
        return self.pending.popleft()

    def _catch_up(self) -> None:
        """Fallen behind: take every queued event and drop the ones whose effect a later
        event undoes or repeats (see :func:`redundant`), so that the guest's watchers reach
        the host's current state sooner and the backlog stays bounded by the number of names
        in flux. What is left is still in order and exact as a final state; the intermediate
        states dropped are what an inotify queue overflow would have lost wholesale."""
        while self.queue_alive and self._pull(timeout=0.0):
            pass
        events = [ev for _arrived, ev in self.pending]
        drop = redundant(events, held=self.held.keys())
        if not drop:
            return
        kept = collections.deque(p for p, d in zip(self.pending, drop, strict=True) if not d)
        for ev, d in zip(events, drop, strict=True):
            if d:
                self._discard(ev)
        self.stats["coalesced"] += len(self.pending) - len(kept)
        log.warning("injector %d events behind the host: %d dropped as undone or repeated by "
                    "later ones", len(self.pending), len(self.pending) - len(kept))
        self.pending = kept

    def _discard(self, ev: RemoteEvent) -> None:
        """What an event nobody watches gets: the guest forgets the names and attributes it
        changed, and counted entries go back to the server."""
        kind = ev.mask & ino.IN_ALL_EVENTS
        if kind == ino.IN_CREATE:
            self._inval(ev.inode, ev.name)
            self._settle((ev.entry, ev.counted))
        elif kind == ino.IN_DELETE:
            self._inval(ev.inode, ev.name)
            self._settle((ev.old, True))
        elif ev.entry is not None:
            self.write_dev(inval_inode(ev.entry.nodeid))

    def _peek_for(self, match: Callable[[RemoteEvent], bool], wait: float) -> RemoteEvent | None:
        """The first queued event that ``match``es, waiting up to ``wait`` for more to arrive."""
        deadline = time.monotonic() + wait
        seen = 0
        while True:
            for _arrived, ev in list(self.pending)[seen:]:
                if match(ev):
                    return ev
            seen = len(self.pending)
            left = deadline - time.monotonic()
            if left <= 0 or not self._pull(left):
                return None

    def _rescan(self) -> None:
        previous = self.ws
        old = previous.masks
        try:
            self.ws = previous.followed_by(watchset.scan(self.sdev, self.mnt_id))
        except Exception:  # never let a surprise in /proc stop event delivery
            log.exception("reading the guest's watches failed")
            self.ws = watchset.WatchSet(masks=old, everything=-1, started=time.monotonic(),
                                        added_after=previous.added_after)
            return
        self.stats["scans"] += 1
        if self.publish_masks is not None and old != self.ws.masks:
            self.publish_masks(old, self.ws.masks)

    def _wanted(self, arrived: float, *targets: tuple[int, int]) -> bool:
        """Would any mark see what injecting this event does to ``targets`` ((nodeid, event
        bits) pairs)? Only marks that existed when the event arrived count, and only for the
        kinds of event they ask for: an event nobody would be told of is not injected."""
        if self.inject_all or self.ws.wants(arrived, *targets):
            return True
        if arrived >= self.ws.started:  # the view may predate the watch: look again first
            self._rescan()
            return self.ws.wants(arrived, *targets)
        return False

    # --- one event ----------------------------------------------------------------------------
    def _handle(self, arrived: float, ev: RemoteEvent) -> None:
        kind = ev.mask & ino.IN_ALL_EVENTS
        self.stats["events"] += 1
        log.debug("inject %s %r in %d", ino.mask_names(ev.mask), ev.name, ev.inode)
        if kind == ino.IN_MOVED_FROM:
            to = None
            if ev.paired:
                to = self._peek_for(lambda e: e.cookie == ev.cookie
                                    and e.mask & ino.IN_MOVED_TO != 0, 1.0)
                if to is not None:
                    self.pending.remove(next(p for p in self.pending if p[1] is to))
            self._move(arrived, ev, to)
        elif kind == ino.IN_MOVED_TO:
            self._move(arrived, None, ev)
        elif kind == ino.IN_CREATE:
            self._create(arrived, ev)
        elif kind == ino.IN_DELETE:
            self._delete(arrived, ev)
        elif kind in (ino.IN_MODIFY, ino.IN_ATTRIB, ino.IN_ACCESS):
            self._touch(arrived, ev, kind)
        elif kind == ino.IN_OPEN:
            self._open(arrived, ev)
        elif kind in (ino.IN_CLOSE_WRITE, ino.IN_CLOSE_NOWRITE):
            self._close(arrived, ev, kind)
        else:
            log.debug("injector: ignoring %s", ino.mask_names(ev.mask))

    def _create(self, arrived: float, ev: RemoteEvent) -> None:
        # a new name for a file the guest has is a link: ATTRIB on that file, too
        child = ev.entry.nodeid if ev.entry and not ev.mask & ino.IN_ISDIR else 0
        if not self._wanted(arrived, (ev.inode, ino.IN_CREATE), (child, ino.IN_ATTRIB)):
            self._inval(ev.inode, ev.name)
            self._settle((ev.entry, ev.counted))
            return
        dfd = self._dir_fd(ev.inode, ev.generation)
        if dfd is None:
            self._settle((ev.entry, ev.counted))
            return
        isdir = bool(ev.mask & ino.IN_ISDIR)
        entry = ev.entry if ev.entry is not None else self._tombstone(ev.file_type, isdir)
        fmt = stat.S_IFMT(entry.attr.mode)
        try:
            self._inval(ev.inode, ev.name)
            op = {stat.S_IFDIR: abi.Opcode.MKDIR, stat.S_IFLNK: abi.Opcode.SYMLINK}.get(
                fmt, abi.Opcode.MKNOD)
            script: dict[tuple[int, int, bytes], bytes | int] = {
                (abi.Opcode.LOOKUP, ev.inode, ev.name): -errno.ENOENT,
                (op, ev.inode, ev.name): entry.raw,
            }
            # the guest already has this inode: the name is a new link to it (its nlink may be
            # back to 1 by now, if the host already removed the other name)
            linked = self._existing(entry) if fmt != stat.S_IFDIR else None
            if linked is not None:
                # a new name for an inode the guest has: a link (ATTRIB on it, then CREATE)
                script[(abi.Opcode.LINK, ev.inode, ev.name)] = entry.raw
                try:
                    err = self._with_script(script, lambda: linux_fs.link_empty(linked, dfd, ev.name))
                finally:
                    os.close(linked)
            elif fmt == stat.S_IFDIR:
                err = self._with_script(script, lambda: os.mkdir(ev.name, 0o755, dir_fd=dfd))
            elif fmt == stat.S_IFLNK:
                err = self._with_script(script, lambda: os.symlink(b"?", ev.name, dir_fd=dfd))
            elif (opening := self._open_follows(ev) if fmt == stat.S_IFREG else None) is not None:
                err = self._create_open(ev, entry, dfd, script, opening)
            else:
                mode = fmt | 0o644
                err = self._with_script(script, lambda: os.mknod(ev.name, mode, 0, dir_fd=dfd))
            if err is not None:
                log.warning("injecting CREATE %r failed: %s", ev.name, err)
            self.stats["created"] += 1
        finally:
            self._settle((ev.entry, ev.counted))

    def _open_follows(self, ev: RemoteEvent) -> tuple[float, RemoteEvent, bool] | None:
        """The OPEN of the regular file that ``ev`` creates, taken off the queue, and whether
        to open it for writing, if that OPEN is the very next event and a mark wants it: then
        one open(O_CREAT) makes both events, with one FUSE round trip less (LOOKUP, CREATE
        where mknod then open make LOOKUP, MKNOD, OPEN; the GETATTR of the directory the
        path walk asks the server for stays). Watchers see what a local open(O_CREAT) gives:
        IN_CREATE, then IN_OPEN, as the host's own did."""
        if not self.pending:
            self._pull(0.0)
        if not self.pending:
            return None
        arrived, nxt = self.pending[0]
        if nxt.mask & (ino.IN_ALL_EVENTS | ino.IN_ISDIR) != ino.IN_OPEN \
                or self._held_key(nxt) != self._held_key(ev):
            return None
        if nxt.entry is not None and (nxt.entry.nodeid != (ev.entry.nodeid if ev.entry else 0)
                                      or not stat.S_ISREG(nxt.entry.attr.mode)):
            return None
        child = nxt.entry.nodeid if nxt.entry else 0
        bits = _SEEN_AS[ino.IN_OPEN]
        if not self._wanted(arrived, (nxt.inode, bits), (child, bits)):
            return None
        self.pending.popleft()
        self.stats["events"] += 1
        return arrived, nxt, self._writable(nxt)

    def _create_open(self, ev: RemoteEvent, entry: Entry, dfd: int,
                     script: dict[tuple[int, int, bytes], bytes | int],
                     opening: tuple[float, RemoteEvent, bool]) -> OSError | None:
        """CREATE and the OPEN that follows it as one open(O_CREAT | O_EXCL); the file stays
        held open for the MODIFY and CLOSE events to come, as an injected OPEN is. If that
        fails, the OPEN is injected on its own."""
        open_arrived, open_ev, writable = opening
        with self.lock:
            fh = self._next_fh
            self._next_fh += 1
            self.fake_fhs.add(fh)
        script[(abi.Opcode.CREATE, ev.inode, ev.name)] = entry.raw + abi.OPEN_OUT.pack(
            fh, abi.FOPEN_DIRECT_IO, 0)
        flags = (os.O_WRONLY if writable else os.O_RDONLY) | os.O_CREAT | os.O_EXCL \
            | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        opened: list[int] = []
        err = self._with_script(script, lambda: opened.append(
            os.open(ev.name, flags, stat.S_IMODE(entry.attr.mode), dir_fd=dfd)))
        if opened:
            self.held.setdefault(self._held_key(ev), []).append(_Held(opened[0], writable))
            self.stats["opened"] += 1
        else:
            with self.lock:
                self.fake_fhs.discard(fh)  # the kernel did not take it (it may not even ask)
            self._open(open_arrived, open_ev)
        return err

    def _writable(self, ev: RemoteEvent) -> bool:
        """Is the file of this OPEN event opened for writing on the host?"""
        if ev.opened_for:  # the server saw what came next on the host
            return ev.opened_for == OPENED_FOR_WRITE
        same = self._held_key(ev)

        def later(e: RemoteEvent) -> bool:
            return self._held_key(e) == same and e.mask & (
                ino.IN_MODIFY | ino.IN_CLOSE_WRITE | ino.IN_CLOSE_NOWRITE | ino.IN_ACCESS) != 0

        nxt = self._peek_for(later, LOOKAHEAD_SECONDS)
        return nxt is not None and nxt.mask & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE) != 0

    def _delete(self, arrived: float, ev: RemoteEvent) -> None:
        child = ev.old.nodeid if ev.old else 0
        if not self._wanted(arrived, (ev.inode, ino.IN_DELETE),
                            (child, ino.IN_ATTRIB | ino.IN_DELETE_SELF)):
            self._inval(ev.inode, ev.name)
            self._settle((ev.old, True))
            return
        dfd = self._dir_fd(ev.inode, ev.generation)
        if dfd is None:
            self._settle((ev.old, True))
            return
        isdir = bool(ev.mask & ino.IN_ISDIR)
        old = ev.old if ev.old is not None else self._tombstone(ev.file_type, isdir)
        try:
            self._inval(ev.inode, ev.name)
            op = abi.Opcode.RMDIR if isdir else abi.Opcode.UNLINK
            script: dict[tuple[int, int, bytes], bytes | int] = {
                (abi.Opcode.LOOKUP, ev.inode, ev.name): old.raw,
                (op, ev.inode, ev.name): 0,
            }
            if isdir:
                self._let_go_of_dir(old.nodeid)
                err = self._with_script(script, lambda: os.rmdir(ev.name, dir_fd=dfd))
            else:
                err = self._with_script(script, lambda: os.unlink(ev.name, dir_fd=dfd))
            if err is not None:
                log.warning("injecting DELETE %r failed: %s", ev.name, err)
            self.stats["deleted"] += 1
        finally:
            self._settle((ev.old, True))

    def _move(self, arrived: float, src: RemoteEvent | None, dst: RemoteEvent | None) -> None:
        moved = (src.entry if src is not None else None) or (dst.entry if dst is not None else None)
        counted = [(src.entry, src.counted)] if src is not None else []
        if dst is not None:
            counted += [(dst.entry, dst.counted), (dst.old, True)]
        targets = [(e.inode, _MOVE_BITS) for e in (src, dst) if e is not None]
        targets += [(moved.nodeid, ino.IN_MOVE_SELF)] if moved else []
        if dst is not None and dst.old is not None:  # the file a move replaces is unlinked
            targets.append((dst.old.nodeid, ino.IN_ATTRIB | ino.IN_DELETE_SELF))
        if not self._wanted(arrived, *targets):
            for e in (src, dst):
                if e is not None:
                    self._inval(e.inode, e.name)
            self._settle(*counted)
            return
        sfd = self._dir_fd(src.inode, src.generation) if src is not None else None
        dfd = self._dir_fd(dst.inode, dst.generation) if dst is not None else None
        hidden = None
        try:
            if sfd is None and dfd is None:
                return
            isdir = bool((src or dst).mask & ino.IN_ISDIR)  # type: ignore[union-attr]
            if moved is None:
                moved = self._tombstone((src or dst).file_type, isdir)  # type: ignore[union-attr]
            script: dict[tuple[int, int, bytes], bytes | int] = {}
            if sfd is not None and src is not None:
                self._inval(src.inode, src.name)
                s_parent, s_name, s_fd = src.inode, src.name, sfd
            else:
                hidden = os.open(os.path.join(self.mountpoint, os.fsdecode(self.hidden_name)),
                                 os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                s_parent, s_name, s_fd = self.hidden_nodeid, (dst or src).name, hidden  # type: ignore[union-attr]
            if dfd is not None and dst is not None:
                self._inval(dst.inode, dst.name)
                d_parent, d_name, d_fd = dst.inode, dst.name, dfd
            else:
                if hidden is None:
                    hidden = os.open(os.path.join(self.mountpoint, os.fsdecode(self.hidden_name)),
                                     os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                d_parent, d_name, d_fd = self.hidden_nodeid, src.name, hidden  # type: ignore[union-attr]
            script[(abi.Opcode.LOOKUP, s_parent, s_name)] = moved.raw
            over = dst.old if dst is not None and dfd is not None else None
            if over is not None and stat.S_ISDIR(over.attr.mode):
                self._let_go_of_dir(over.nodeid)  # an empty directory the move replaces
            script[(abi.Opcode.LOOKUP, d_parent, d_name)] = over.raw if over else -errno.ENOENT
            script[(abi.Opcode.RENAME, s_parent, s_name)] = 0
            script[(abi.Opcode.RENAME2, s_parent, s_name)] = 0
            err = self._with_script(script, lambda: os.rename(s_name, d_name, src_dir_fd=s_fd,
                                                             dst_dir_fd=d_fd))
            if err is not None:
                log.warning("injecting a move of %r failed: %s", s_name, err)
            self.stats["moved"] += 1
        finally:
            if hidden is not None:
                os.close(hidden)
                # forget what went through the hidden directory, and the directory itself
                self._inval(self.hidden_nodeid, (src or dst).name)  # type: ignore[union-attr]
                self._inval(abi.ROOT_ID, self.hidden_name)
            self._settle(*counted)

    def _child_fd(self, ev: RemoteEvent) -> int | None:
        if not ev.name:
            return os.dup(self._root()) if ev.inode == abi.ROOT_ID else None
        dfd = self._dir_fd(ev.inode, ev.generation)
        if dfd is None:
            return None
        try:
            return os.open(ev.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None

    def _held_key(self, ev: RemoteEvent) -> tuple[int, bytes]:
        # by name: whether the server could attach an entry differs from event to event
        return (ev.inode, ev.name)

    def _touch(self, arrived: float, ev: RemoteEvent, kind: int) -> None:
        child = ev.entry.nodeid if ev.entry else 0
        bits = _SEEN_AS.get(kind, kind)
        if not self._wanted(arrived, (ev.inode, bits), (child, bits)):
            if child:
                self.write_dev(inval_inode(child))
            return
        if child and kind == ino.IN_MODIFY:
            self.write_dev(inval_inode(child))  # drop cached pages before anyone reacts
        held = self.held.get(self._held_key(ev))
        if held and kind == ino.IN_MODIFY and any(h.writable for h in held):
            wfd = next(h.fd for h in held if h.writable)
            self._with_script({}, lambda: os.pwrite(wfd, b"\0", 0))
            if child:
                self.write_dev(inval_inode(child))
            return
        if held and kind == ino.IN_ACCESS and any(not h.writable for h in held):
            rfd = next(h.fd for h in held if not h.writable)
            if ev.mask & ino.IN_ISDIR:
                self._with_script({}, lambda: _getdents(rfd))
            else:
                self._with_script({}, lambda: os.pread(rfd, 1, 0))
            return
        child_fd = self._child_fd(ev)
        if child_fd is None:
            return
        fd: int = child_fd
        try:
            a = ev.entry.attr if ev.entry is not None else None
            omit = (0, linux_fs.UTIME_OMIT)
            atime = (a.atime, a.atimensec) if a else (0, linux_fs.UTIME_NOW)
            mtime = (a.mtime, a.mtimensec) if a else (0, linux_fs.UTIME_NOW)
            times = {ino.IN_MODIFY: (omit, mtime), ino.IN_ACCESS: (atime, omit),
                     ino.IN_ATTRIB: (atime, mtime)}[kind]
            answer: bytes | int = attr_out(a, 0.0) if a is not None else -errno.EIO
            script: dict[tuple[int, int, bytes], bytes | int] = {(abi.Opcode.SETATTR, 0, b""): answer}
            err = self._with_script(script, lambda: linux_fs.utimens_empty(fd, *times))
            if err is not None:
                log.debug("injecting %s on %r failed: %s", ino.mask_names(kind), ev.name, err)
            self.stats["touched"] += 1
        finally:
            os.close(fd)

    def _open(self, arrived: float, ev: RemoteEvent) -> None:
        child = ev.entry.nodeid if ev.entry else 0
        fmt = stat.S_IFMT(ev.entry.attr.mode) if ev.entry else ev.file_type
        if not fmt and ev.name:
            fmt = self._guest_type(ev)  # gone on the host already; the guest may still have it
        bits = _SEEN_AS[ino.IN_OPEN]
        if fmt not in (stat.S_IFREG, stat.S_IFDIR) or not self._wanted(
                arrived, (ev.inode, bits), (child, bits)):
            log.debug("OPEN of %r not injected (type %o)", ev.name, fmt)
            return
        same = self._held_key(ev)
        writable = self._writable(ev)
        dfd = self._dir_fd(ev.inode, ev.generation) if ev.name else None
        if ev.name and dfd is None:
            return
        flags = os.O_RDONLY | os.O_DIRECTORY if fmt == stat.S_IFDIR else (
            os.O_WRONLY if writable else os.O_RDONLY)
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        opened: list[int] = []

        def do_open() -> None:
            if ev.name:
                opened.append(os.open(ev.name, flags, dir_fd=dfd))
            else:
                opened.append(os.open(self.mountpoint, flags))

        err = self._with_script({}, do_open)
        if err is not None or not opened:
            log.warning("injecting OPEN on %r failed: %s", ev.name, err)
            return
        self.held.setdefault(same, []).append(_Held(opened[0], writable))
        log.debug("injected OPEN of %r (%s), fd %d", ev.name, "w" if writable else "r", opened[0])
        self.stats["opened"] += 1

    def _guest_type(self, ev: RemoteEvent) -> int:
        fd = self._child_fd(ev)
        if fd is None:
            return 0
        try:
            return stat.S_IFMT(os.fstat(fd).st_mode)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def _close(self, arrived: float, ev: RemoteEvent, kind: int) -> None:
        key = self._held_key(ev)
        held = self.held.get(key)
        writable = kind == ino.IN_CLOSE_WRITE
        if held:
            pick = next((h for h in held if h.writable == writable), held[0])
            held.remove(pick)
            if not held:
                del self.held[key]
            self._with_script({}, lambda: os.close(pick.fd))
            self.stats["closed"] += 1
            return
        child = ev.entry.nodeid if ev.entry else 0
        fmt = stat.S_IFMT(ev.entry.attr.mode) if ev.entry else ev.file_type
        if not fmt and ev.name:
            fmt = self._guest_type(ev)
        if fmt not in (stat.S_IFREG, stat.S_IFDIR) or not self._wanted(
                arrived, (ev.inode, kind), (child, kind)):
            return
        # the OPEN was not injected (the watch is newer than the open): open and close now, so
        # that the close, the event watchers wait for, is not lost
        dfd = self._dir_fd(ev.inode, ev.generation) if ev.name else None
        if ev.name and dfd is None:
            return
        flags = (os.O_RDONLY | os.O_DIRECTORY if fmt == stat.S_IFDIR
                 else os.O_WRONLY if writable else os.O_RDONLY)
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

        def open_close() -> None:
            fd = (os.open(ev.name, flags, dir_fd=dfd) if ev.name
                  else os.open(self.mountpoint, flags))
            os.close(fd)

        self._with_script({}, open_close)
        self.stats["closed"] += 1


_TOUCHES = (ino.IN_MODIFY | ino.IN_ATTRIB | ino.IN_ACCESS | ino.IN_OPEN | ino.IN_CLOSE_WRITE
            | ino.IN_CLOSE_NOWRITE)
_CLOSES = ino.IN_CLOSE_WRITE | ino.IN_CLOSE_NOWRITE


def redundant(events: list[RemoteEvent], held: Collection[tuple[int, bytes]] = ()) -> list[bool]:
    """Which of ``events`` (in order) a backlogged injector may drop without changing what a
    watcher knows once the rest is delivered (no I/O; one pass from the end):

    * a touch (MODIFY, ATTRIB, ACCESS, OPEN, CLOSE_*) of a name that a later event removes
      (DELETE, MOVED_FROM) or replaces (MOVED_TO);
    * a touch of a name repeated by a later touch of the same kind, with no CREATE, DELETE or
      move of the name in between;
    * a CREATE of a file and the DELETE that removes it again, when only touches lie between.

    Moves are never dropped (their two halves are paired by cookie), nor is the CLOSE of a
    name the injector holds open (``held``: its OPEN was injected, and only that close ends
    it). Directories are never dropped from a CREATE/DELETE pair: what happened inside them
    is addressed by their node id."""
    drop = [False] * len(events)
    removed_later: set[tuple[int, bytes]] = set()
    touched_later: dict[tuple[int, bytes], int] = {}
    deleted_at: dict[tuple[int, bytes], int] = {}  # a later DELETE with only touches between
    for i in range(len(events) - 1, -1, -1):
        ev = events[i]
        kind = ev.mask & ino.IN_ALL_EVENTS
        key = (ev.inode, ev.name)
        if kind & _TOUCHES and not kind & ~_TOUCHES:
            if kind & _CLOSES and key in held:
                touched_later.pop(key, None)
                deleted_at.pop(key, None)
                continue
            if key in removed_later or touched_later.get(key, 0) & kind:
                drop[i] = True
            else:
                touched_later[key] = touched_later.get(key, 0) | kind
            continue
        touched_later.pop(key, None)
        if kind == ino.IN_DELETE:
            removed_later.add(key)
            deleted_at[key] = i
        elif kind in (ino.IN_MOVED_FROM, ino.IN_MOVED_TO):
            removed_later.add(key)
            deleted_at.pop(key, None)
        elif kind == ino.IN_CREATE:
            j = deleted_at.pop(key, None)
            if j is not None and not ev.mask & ino.IN_ISDIR:
                drop[i] = drop[j] = True
            removed_later.discard(key)
        else:
            deleted_at.pop(key, None)
    return drop


def _local_attr(nodeid: int, mode: int) -> Attr:
    now = int(time.time())
    return Attr(ino=nodeid & 0xFFFFFFFFFFFF, size=0, blocks=0, atime=now, mtime=now, ctime=now,
                atimensec=0, mtimensec=0, ctimensec=0, mode=mode,
                nlink=2 if stat.S_ISDIR(mode) else 1, uid=0, gid=0, rdev=0, blksize=4096)


def _getdents(fd: int) -> None:
    """One getdents on a directory fd (what makes the kernel report IN_ACCESS for a listing)."""
    with os.scandir(fd) as it:
        for _ in it:
            pass
