"""Host watchers: see every change under the export that a client's guest knows about, turn it
into remote events (:mod:`notifyfs.events`) and send them to that client.

One watcher per connection, so that each client's echo filter and nlookup accounting stay its own.

``InotifyWatcher`` watches every directory the guest holds a lookup reference to; the watch is
added before the LOOKUP reply leaves, so a watch the guest sets up afterwards cannot miss a change.
Its events arrive in exactly the order a local inotify watcher sees them, which is the order the
guest's watchers get. Echoes of the client's own operations are removed by :class:`EchoFilter`.

Threads: the watcher thread reads the inotify fd; workers call :meth:`watch` before replying and
the inode table calls :meth:`forgotten` when a directory's last lookup goes.
Lock order: ``InotifyWatcher.lock`` may be held while taking ``InodeTable.lock``, never the reverse.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable

from .. import events
from ..events import Entry, RemoteEvent
from ..linux import fanotify as fan
from ..linux import fs as linux_fs
from ..linux import inotify as ino
from ..protocol import Attr, inval_entry, inval_inode
from .echo import INTERNAL, EchoFilter
from .inodes import ROOT_ID, Inode, InodeTable

log = logging.getLogger(__name__)

WATCH_MASK = ino.IN_ALL_EVENTS | ino.IN_ONLYDIR
#: events the guest kernel makes itself from the injected calls: never forwarded
_SELF_ONLY = ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
#: what follows an OPEN and tells how the file was opened
_USE = ino.IN_MODIFY | ino.IN_ACCESS | ino.IN_CLOSE_WRITE | ino.IN_CLOSE_NOWRITE
_CONTENT = (ino.IN_MODIFY | ino.IN_ATTRIB | ino.IN_ACCESS | ino.IN_OPEN | ino.IN_CLOSE_WRITE
            | ino.IN_CLOSE_NOWRITE)
READ_SIZE = 1 << 20
#: events after which the snapshot of a watched directory is brought up to date
_CHANGES = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVE | ino.IN_MODIFY | ino.IN_ATTRIB
            | ino.IN_CLOSE_WRITE)


class InotifyWatcher:
    def __init__(self, table: InodeTable, send: Callable[[bytes], None], echo: EchoFilter,
                 lookup: Callable[[Inode, bytes], int], timeouts: tuple[float, float],
                 max_watches: int = 1 << 20) -> None:
        self.table = table
        self.send = send
        self.echo = echo
        self.lookup = lookup  # (parent inode, name) -> O_PATH fd, confined to the export
        self.entry_timeout, self.attr_timeout = timeouts
        self.max_watches = max_watches
        self.inotify = ino.Inotify(ino.IN_CLOEXEC | ino.IN_NONBLOCK)
        # reused: os.read(READ_SIZE) would allocate 1 MiB per call, twice per batch
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self.lock = threading.Lock()
        self.wds: dict[int, int] = {}  # wd -> nodeid
        self.by_node: dict[int, int] = {}  # nodeid -> wd
        self.masks: dict[int, int] = {}  # what the guest says it watches (NOTIFYFS_FSNOTIFY)
        self.running = True
        self.sent = 0
        self.overflows = 0
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name="inotify-watcher", daemon=True)
        self.snapshots: dict[int, dict[bytes, tuple[int, ...]]] = {}
        self._rescanning = False
        self._cookies = itertools.count(1)
        self._batch: list[ino.Event] = []
        self._later: dict[tuple[int, bytes], list[int]] = {}
        self._uses: dict[tuple[int, bytes], list[int]] = {}
        self._pos = 0
        self._jobs: list[Callable[[], None]] = []

    def start(self) -> None:
        self.watch(self.table.root)
        self.thread.start()

    def close(self) -> None:
        self.running = False
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=5)
        self.inotify.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    # --- watch set ---------------------------------------------------------------------------
    def watch(self, inode: Inode) -> None:
        if not inode.is_dir:
            return
        with self.lock:
            if inode.nodeid in self.by_node:
                return
            if len(self.by_node) >= self.max_watches:
                log.warning("watch cap (%d) reached: changes in new directories go unseen",
                            self.max_watches)
                return
            try:
                wd = self.inotify.add_watch(linux_fs.proc_path(inode.fd), WATCH_MASK)
            except OSError as e:
                log.warning("cannot watch a directory: %s", e)
                return
            self.wds[wd] = inode.nodeid
            self.by_node[inode.nodeid] = wd

    def forgotten(self, inode: Inode) -> None:
        with self.lock:
            wd = self.by_node.pop(inode.nodeid, None)
            if wd is None:
                return
            self.wds.pop(wd, None)
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass  # already gone with its directory

    def set_mask(self, inode: Inode, mask: int) -> None:
        """What the guest watches on ``inode``. A watched directory gets a snapshot of its
        listing, kept current from the events, to diff against after a queue overflow."""
        with self.lock:
            if mask:
                self.masks[inode.nodeid] = mask
            else:
                self.masks.pop(inode.nodeid, None)
                self.snapshots.pop(inode.nodeid, None)
                return
            if not inode.is_dir or inode.nodeid in self.snapshots:
                return
        listing = self._listing(inode)
        if listing is not None:
            with self.lock:
                self.snapshots[inode.nodeid] = listing

    def _listing(self, inode: Inode) -> dict[bytes, tuple[int, ...]] | None:
        """name -> (ino, type, size, mtime, ctime) of a directory, read without echoing the
        reading itself (it opens the directory on the host) back to the guest."""
        keys = [(inode.nodeid, b""), *self.table.names_of(inode.nodeid)]
        token = INTERNAL.expect(keys, ino.IN_OPEN | ino.IN_ACCESS | ino.IN_CLOSE_NOWRITE)
        try:
            out: dict[bytes, tuple[int, ...]] = {}
            with os.scandir(linux_fs.proc_path(inode.fd)) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out[os.fsencode(e.name)] = _summary(st)
            return out
        except OSError as e:
            # a directory that cannot be read cannot be diffed: say so, or what an overflow
            # lost stays lost without a trace (EMFILE, when the inode fds use up the limit)
            log.warning("cannot read a watched directory for its snapshot: %s", e)
            return None
        finally:
            INTERNAL.done(token)

    def _snap_update(self, nodeid: int, name: bytes, mask: int = 0) -> None:
        """Bring the snapshot's entry for ``name`` up to date after an event on it (``mask``;
        0 when the kind is not known). The snapshot must say what the guest has been told: a
        later event on the same name may be lost in an overflow, and the rescan sends only the
        difference between the snapshot and the host."""
        with self.lock:
            snap = self.snapshots.get(nodeid)
        if snap is None or not name:
            return
        if mask & (ino.IN_DELETE | ino.IN_MOVED_FROM):
            # the guest is told the name is gone, even if the host has it again by now (the
            # new one's CREATE may be lost)
            snap.pop(name, None)
            return
        parent = self._parent(nodeid)
        if parent is None:
            return
        try:
            snap[name] = _summary(os.stat(name, dir_fd=parent.fd, follow_symlinks=False))
        except OSError:
            if mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
                # the guest is told the name exists, though the host removed it already: an
                # unknown inode, so that the rescan sends the DELETE if that event is lost
                snap[name] = (-1, stat.S_IFDIR if mask & ino.IN_ISDIR else 0, -1, -1, -1)
            elif not mask:
                snap.pop(name, None)
            # else a change to a name whose removal is still to come: the guest still has it
        finally:
            self.table.release(parent)

    def rescan_after_restart(self, known: dict[int, dict[bytes, tuple[int, ...]]],
                             high_ctime: int) -> None:
        """A new server took over from one that died: diff what the guest knew of each watched
        directory (``known``: name -> (ino, type, size, mtime, ctime), -1 where the guest never
        saw it) against the host now, and send the difference as events."""
        self._rescan(known, high_ctime)

    def _rescan(self, given: dict[int, dict[bytes, tuple[int, ...]]] | None = None,
                high_ctime: int = 0) -> None:
        """After an overflow (or a restart, with ``given``): diff every snapshotted directory
        against the host and send the difference as events; invalidate everything else the
        guest may have cached."""
        self._rescanning = True
        try:
            if given is None:
                self._prune_watches()
                with self.lock:
                    snaps = list(self.snapshots.items())
            else:
                snaps = list(given.items())
            unchanged: set[tuple[int, bytes]] = set()
            for nodeid, old in snaps:
                parent = self._parent(nodeid)
                if parent is None:
                    continue
                try:
                    new = self._listing(parent)
                finally:
                    self.table.release(parent)
                if new is None:
                    continue
                with self.lock:
                    if given is None or nodeid in self.masks:
                        self.snapshots[nodeid] = new
                if given is not None:
                    old = _complete(old, new, high_ctime)
                else:
                    unchanged.update((nodeid, n) for n, b in new.items() if old.get(n) == b)
                # after an overflow as after a restart: the CLOSE_WRITE of a write whose events
                # were lost was lost with them
                self._diff(nodeid, old, new, close_write=True)
            self._invalidate(unchanged)
        finally:
            self._rescanning = False

    def _prune_watches(self) -> None:
        """Forget the watches of directories removed while events were lost: their IN_IGNORED
        may have been lost too, and a stale entry would keep a new directory that gets the same
        nodeid (the same inode number) from being watched."""
        with self.lock:
            watched = list(self.by_node.items())
        for nodeid, wd in watched:
            inode = self._parent(nodeid)
            if inode is None:
                gone = True
            else:
                try:
                    gone = os.fstat(inode.fd).st_nlink == 0
                except OSError:
                    gone = True
                finally:
                    self.table.release(inode)
            if not gone:
                continue
            with self.lock:
                if self.by_node.get(nodeid) == wd:
                    del self.by_node[nodeid]
                    self.wds.pop(wd, None)
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass  # already gone with its directory

    def _invalidate(self, unchanged: set[tuple[int, bytes]]) -> None:
        """Invalidate the names and attributes the guest may cache, except the entries of
        diffed directories that did not change (same inode, size, times): everything else in
        those directories got an event. With every name invalidated, each overflow of a watched
        directory of 100,000 files sent 200,000 notifications, which the agent writes one by one
        to /dev/fuse ahead of the events that follow: the guest heard nothing for tens of
        seconds, and the next overflow came before it had caught up."""
        with self.table.lock:
            names = [k for k in self.table.names if k not in unchanged]
            inodes = [n for n, i in self.table.by_id.items()
                      if not i.names or not i.names <= unchanged]
        for parent_id, name in names:
            self.send(inval_entry(parent_id, name))
        for nodeid in inodes:
            self.send(inval_inode(nodeid))

    def _diff(self, nodeid: int, old: dict[bytes, tuple[int, ...]],
              new: dict[bytes, tuple[int, ...]], close_write: bool) -> None:
        for name in sorted(old.keys() - new.keys()):
            isdir = ino.IN_ISDIR if old[name][1] == stat.S_IFDIR else 0
            self._delete(nodeid, ino.Event(0, ino.IN_DELETE | isdir, 0, name))
        for name in sorted(new.keys() - old.keys()):
            isdir = ino.IN_ISDIR if new[name][1] == stat.S_IFDIR else 0
            self._create(nodeid, ino.Event(0, ino.IN_CREATE | isdir, 0, name))
        for name in sorted(new.keys() & old.keys()):
            a, b = old[name], new[name]
            isdir = ino.IN_ISDIR if b[1] == stat.S_IFDIR else 0
            if a[0] != b[0] or a[1] != b[1]:  # replaced by another inode
                self._delete(nodeid, ino.Event(0, ino.IN_DELETE | isdir, 0, name))
                self._create(nodeid, ino.Event(0, ino.IN_CREATE | isdir, 0, name))
            elif isdir:
                # a directory's size and mtime change with its entries, which a local watcher
                # hears of from that directory's own watch, not as a MODIFY on its name; a new
                # ctime alone is a change of its attributes (chmod, chown)
                if a[3] == b[3] and a[4] != b[4]:
                    self._content(nodeid, name, ino.Event(0, ino.IN_ATTRIB | isdir, 0, name))
            elif a[2:4] != b[2:4]:
                self._content(nodeid, name, ino.Event(0, ino.IN_MODIFY, 0, name))
                if close_write and b[1] == stat.S_IFREG:
                    # a host program wrote it while its events were lost (or no server watched):
                    # it has closed it since (or the guest learns of the rest later); watchers
                    # that wait for CLOSE_WRITE to reload must hear of it
                    self._content(nodeid, name, ino.Event(0, ino.IN_CLOSE_WRITE, 0, name), 0)
            elif a[4] != b[4]:
                self._content(nodeid, name, ino.Event(0, ino.IN_ATTRIB, 0, name))

    @property
    def watch_count(self) -> int:
        return len(self.by_node)

    # --- reading -----------------------------------------------------------------------------
    def _read_batch(self) -> tuple[float, list[ino.Event]]:
        """Everything queued now; the time returned is when the draining began."""
        started = time.monotonic()
        out: list[ino.Event] = []
        while True:
            try:
                buf = bytes(self._view[:os.readv(self.inotify.fd, (self._buf,))])
            except BlockingIOError:
                return started, out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            out.extend(ino.parse_events(buf))

    def _loop(self, fd: int, on_ready: Callable[[], None]) -> None:
        """The watcher thread: call ``on_ready`` whenever ``fd`` is readable, until closed."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while self.running:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if not self.running:
                return
            try:
                if any(f == fd for f, _ in ready):
                    on_ready()
                if any(f == self._stop_r for f, _ in ready):
                    os.read(self._stop_r, 4096)
                    with self.lock:
                        jobs, self._jobs = self._jobs, []
                    for job in jobs:
                        job()
            except Exception:
                log.exception("host watcher failed on a batch of events")

    def call_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the watcher thread (the only thread that emits remote events, so a
        job's events keep their order with the host's)."""
        with self.lock:
            self._jobs.append(job)
        os.write(self._stop_w, b"j")

    def _run(self) -> None:
        self._loop(self.inotify.fd, self._inotify_batch)

    def _inotify_batch(self) -> None:
        started, batch = self._read_batch()
        if batch and batch[-1].mask & ino.IN_MOVED_FROM:
            # a rename queues MOVED_FROM and MOVED_TO together: give the second a moment
            time.sleep(0.001)
            batch.extend(self._read_batch()[1])
        self._process(batch)
        self.echo.expire(started)
        # other connections' watchers need the server's own reads too: keep them a while
        INTERNAL.expire(started - 2.0)

    # --- turning host events into remote events -------------------------------------------
    def _process(self, batch: list[ino.Event]) -> None:
        # Where each name goes later in this batch: by the time an event is read, its name may
        # already have been renamed or removed on the host (the inode is found where it is now)
        self._batch = batch
        self._later = {}
        self._uses = {}
        self._index(0)
        i = 0
        while i < len(batch):
            ev = batch[i]
            self._pos = i
            i += 1
            if ev.mask & ino.IN_Q_OVERFLOW:
                self.overflows += 1
                log.warning("host inotify queue overflowed: rescanning what the guest watches")
                self.send(events.overflow())
                self._rescan()
                continue
            if ev.mask & ino.IN_IGNORED:
                with self.lock:
                    nodeid = self.wds.pop(ev.wd, None)
                    if nodeid is not None and self.by_node.get(nodeid) == ev.wd:
                        del self.by_node[nodeid]
                continue
            with self.lock:
                nodeid = self.wds.get(ev.wd)
            if nodeid is None:
                continue
            kind = ev.mask & ino.IN_ALL_EVENTS
            log.debug("host event %s %r on %d", ino.mask_names(ev.mask), ev.name, nodeid)
            if kind & _SELF_ONLY:
                continue
            if ev.name and kind & _CHANGES:
                # not OPEN, ACCESS or CLOSE_NOWRITE: the stat is of the file now, and may show a
                # write whose MODIFY and CLOSE_WRITE were lost in an overflow; recording it for
                # an event that changes nothing would hide that write from the rescan
                self._snap_update(nodeid, ev.name, ev.mask)
            if not ev.name:
                # events on a watched directory itself also arrive, with its name, on its parent's
                # watch; only the export root has no parent here
                if nodeid == 1 and kind & _CONTENT and not self._echo((1, b""), kind):
                    self._content(nodeid, b"", ev)
                continue
            if kind == ino.IN_MOVED_FROM:
                to = None
                if i < len(batch) and batch[i].mask & ino.IN_MOVED_TO and batch[i].cookie == ev.cookie:
                    to = batch[i]
                    i += 1
                    with self.lock:
                        to_node = self.wds.get(to.wd)
                    if to_node is not None:  # the new name, in its directory's snapshot too
                        self._snap_update(to_node, to.name, to.mask)
                self._move(nodeid, ev, to)
                continue
            if self._echo((nodeid, ev.name), kind):
                continue
            if kind == ino.IN_MOVED_TO:
                self._move(None, None, ev)
            elif kind == ino.IN_CREATE:
                self._create(nodeid, ev)
            elif kind == ino.IN_DELETE:
                self._delete(nodeid, ev)
            elif kind & _CONTENT:
                self._content(nodeid, ev.name, ev)

    def _echo(self, key: tuple[int, bytes], kind: int) -> bool:
        return self.echo.match(key, kind) or INTERNAL.match(key, kind)

    def _parent(self, nodeid: int) -> Inode | None:
        try:
            inode = self.table.acquire(nodeid)
        except Exception:
            return None
        return inode

    def _index(self, start: int) -> None:
        for j in range(start, len(self._batch)):
            e = self._batch[j]
            if e.mask & (ino.IN_MOVED_FROM | ino.IN_DELETE):
                self._later.setdefault((e.wd, e.name), []).append(j)
            if e.mask & _USE:
                self._uses.setdefault((e.wd, e.name), []).append(j)

    def _opened_for(self, wd: int, name: bytes) -> int:
        """For the OPEN being processed: what the host's next event on the same file says about
        how it was opened (the agent must open it the same way: the close depends on it)."""
        for attempt in range(2):
            for j in self._uses.get((wd, name), ()):
                if j > self._pos:
                    mask = self._batch[j].mask
                    return (events.OPENED_FOR_WRITE if mask & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE)
                            else events.OPENED_FOR_READ)
            if attempt or self._rescanning or not self._read_more():
                break
        return 0

    def _read_more(self) -> bool:
        """Append what the host queued since this batch was read (the rename or removal that
        made a name vanish is queued by then: the kernel queues events inside the syscall)."""
        start = len(self._batch)
        self._batch.extend(self._read_batch()[1])
        self._index(start)
        return len(self._batch) > start

    def _where_now(self, nodeid: int, name: bytes) -> tuple[int, bytes] | None:
        """Where the object that the current event calls ``name`` in ``nodeid`` is now, following
        the renames later in the batch; None if it was removed or moved away."""
        with self.lock:
            wd = self.by_node.get(nodeid)
        if wd is None:
            return nodeid, name
        pos = self._pos
        batch = self._batch
        while True:
            nxt = next((j for j in self._later.get((wd, name), ()) if j > pos), None)
            if nxt is None:
                break
            ev = batch[nxt]
            if ev.mask & ino.IN_DELETE:
                return None
            to = batch[nxt + 1] if nxt + 1 < len(batch) else None
            if to is None or not to.mask & ino.IN_MOVED_TO or to.cookie != ev.cookie:
                return None
            wd, name, pos = to.wd, to.name, nxt + 1
        with self.lock:
            now = self.wds.get(wd)
        return (now, name) if now is not None else None

    def _open_now(self, parent: Inode, name: bytes) -> int:
        """An O_PATH fd of what the current event calls ``name`` in ``parent``."""
        if self._rescanning:
            return self.lookup(parent, name)
        try:
            return self._open_where(parent, name)
        except FileNotFoundError:
            if not self._read_more():
                raise
            return self._open_where(parent, name)

    def _open_where(self, parent: Inode, name: bytes) -> int:
        where = self._where_now(parent.nodeid, name)
        if where is None:
            raise FileNotFoundError(name)
        if where[0] == parent.nodeid:
            return self.lookup(parent, where[1])
        other = self._parent(where[0])
        if other is None:
            raise FileNotFoundError(name)
        try:
            return self.lookup(other, where[1])
        finally:
            self.table.release(other)

    def _counted_lookup(self, parent: Inode, name: bytes) -> Entry | None:
        """Look ``name`` up now and count it, as a LOOKUP would; None if it is gone."""
        try:
            fd = self._open_now(parent, name)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        inode = self.table.add_lookup(fd, st)
        self.table.remember(parent.nodeid, name, inode)
        self.watch(inode)
        return events.make_entry(inode.nodeid, inode.generation, Attr.from_stat(st),
                                 self.entry_timeout, self.attr_timeout)

    def _known_entry(self, inode: Inode, extra_links: int = 0) -> Entry | None:
        """An entry for an inode the guest knows, counted (its attributes from before a removal
        when ``extra_links`` is 1)."""
        try:
            st = os.fstat(inode.fd)
        except OSError:
            return None
        if not self.table.add_ref(inode):
            return None
        attr = Attr.from_stat(st)
        if extra_links:
            nlink = 2 if stat.S_ISDIR(st.st_mode) else attr.nlink + extra_links
            attr = Attr(**{**_asdict(attr), "nlink": nlink})
        return events.make_entry(inode.nodeid, inode.generation, attr, self.entry_timeout,
                                 self.attr_timeout)

    def _emit(self, ev: RemoteEvent) -> None:
        log.debug("remote event %s %r in %d", ino.mask_names(ev.mask), ev.name, ev.inode)
        self.sent += 1
        self.send(events.encode_event(ev))

    def _file_type(self, entry: Entry | None, mask: int) -> int:
        if entry is not None:
            return stat.S_IFMT(entry.attr.mode)
        return stat.S_IFDIR if mask & ino.IN_ISDIR else 0

    def _create(self, nodeid: int, ev: ino.Event) -> None:
        parent = self._parent(nodeid)
        if parent is None:
            return
        try:
            entry = self._counted_lookup(parent, ev.name)
            self._emit(RemoteEvent(nodeid, parent.generation, ev.mask, 0, ev.name,
                                   self._file_type(entry, ev.mask), entry, entry is not None))
        finally:
            self.table.release(parent)

    def _delete(self, nodeid: int, ev: ino.Event) -> None:
        parent = self._parent(nodeid)
        if parent is None:
            return
        try:
            gone = self.table.child(nodeid, ev.name, drop=True)
            old = None
            if gone is not None:
                old = self._known_entry(gone, extra_links=1)
                self.table.release(gone)
            self._emit(RemoteEvent(nodeid, parent.generation, ev.mask, 0, ev.name,
                                   self._file_type(old, ev.mask), old=old))
        finally:
            self.table.release(parent)

    def _move(self, src_node: int | None, src: ino.Event | None, dst: ino.Event | None) -> None:
        """A rename, a move out of what the guest knows (``dst`` None) or into it (``src`` None).
        Echo: a rename the client made itself matches its expectation on the source name."""
        if src is not None and self._echo((src_node or 0, src.name), ino.IN_MOVED_FROM):
            if dst is not None:
                with self.lock:
                    dnode = self.wds.get(dst.wd)
                if dnode is not None:
                    self._echo((dnode, dst.name), ino.IN_MOVED_TO)
            return
        sparent = self._parent(src_node) if src_node is not None else None
        dnode = None
        if dst is not None:
            with self.lock:
                dnode = self.wds.get(dst.wd)
        dparent = self._parent(dnode) if dnode is not None else None
        try:
            moved = None
            if sparent is not None and src is not None:
                known = self.table.child(sparent.nodeid, src.name)
                if known is not None:
                    moved = self._known_entry(known)
                    self.table.release(known)
            over = None
            if dparent is not None and dst is not None:
                victim = self.table.child(dparent.nodeid, dst.name)
                if victim is not None:
                    if moved is None or victim.nodeid != moved.nodeid:
                        over = self._known_entry(victim, extra_links=1)
                    self.table.release(victim)
                if moved is None:
                    moved = self._counted_lookup(dparent, dst.name)
                elif src is not None and sparent is not None:
                    self.table.move_name(sparent.nodeid, src.name, dparent.nodeid, dst.name)
            elif sparent is not None and src is not None:
                self.table.drop_name(sparent.nodeid, src.name)
            mask = (src or dst).mask  # type: ignore[union-attr]
            ftype = self._file_type(moved, mask)
            if sparent is not None and src is not None:
                self._emit(RemoteEvent(sparent.nodeid, sparent.generation, src.mask, src.cookie,
                                       src.name, ftype, moved, moved is not None,
                                       paired=dparent is not None))
                moved_sent = True
            else:
                moved_sent = False
            if dparent is not None and dst is not None:
                self._emit(RemoteEvent(dparent.nodeid, dparent.generation, dst.mask, dst.cookie,
                                       dst.name, ftype, None if moved_sent else moved,
                                       not moved_sent and moved is not None, old=over))
        finally:
            for p in (sparent, dparent):
                if p is not None:
                    self.table.release(p)

    def _content(self, nodeid: int, name: bytes, ev: ino.Event, opened_for: int = -1) -> None:
        parent = self._parent(nodeid)
        if parent is None:
            return
        try:
            entry = None
            if not name:
                st = os.fstat(parent.fd)
                entry = events.make_entry(parent.nodeid, parent.generation, Attr.from_stat(st),
                                          self.entry_timeout, self.attr_timeout)
            else:
                known = self.table.child(nodeid, name)
                try:
                    if known is not None:
                        try:
                            st = os.fstat(known.fd)
                        finally:
                            self.table.release(known)
                        child_id, gen = known.nodeid, known.generation
                    else:
                        fd = self._open_now(parent, name)
                        try:
                            st = os.fstat(fd)
                        finally:
                            os.close(fd)
                        # the guest may know the inode under another name (a hard link)
                        with self.table.lock:
                            alias = self.table.by_key.get((st.st_dev, st.st_ino))
                        child_id, gen = (alias.nodeid, alias.generation) if alias else (0, 0)
                    entry = events.make_entry(child_id, gen, Attr.from_stat(st),
                                              self.entry_timeout, self.attr_timeout)
                except OSError as e:
                    log.debug("no attributes for %r: %s", name, e)
                    entry = None
            if opened_for < 0:
                opened_for = self._opened_for(ev.wd, ev.name) if ev.mask & ino.IN_OPEN else 0
            self._emit(RemoteEvent(nodeid, parent.generation, ev.mask, 0, name,
                                   self._file_type(entry, ev.mask), entry, False,
                                   opened_for=opened_for))
        finally:
            self.table.release(parent)


def _asdict(attr: Attr) -> dict[str, int]:
    return {f: getattr(attr, f) for f in Attr.__slots__}  # type: ignore[attr-defined]


def _complete(old: dict[bytes, tuple[int, ...]], new: dict[bytes, tuple[int, ...]],
              high_ctime: int) -> dict[bytes, tuple[int, ...]]:
    """What the guest knew of a directory, completed with what it can be taken to have known:
    a name it never looked up that has not changed since the newest ctime it saw
    (``high_ctime``) was there before; where it never saw the attributes, a newer mtime means
    the content changed and a newer ctime the attributes."""
    out = dict(old)
    for name, b in new.items():
        a = out.get(name)
        if a is None:
            if b[4] <= high_ctime:
                out[name] = b
        elif a[0] == b[0] and a[2] < 0:  # same inode, attributes never seen
            if b[3] > high_ctime:
                out[name] = (a[0], b[1], -1, -1, b[4])  # content changed
            elif b[4] > high_ctime:
                out[name] = (*b[:4], -1)  # attributes changed
            else:
                out[name] = b
    return out


def _summary(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FanotifyWatcher(InotifyWatcher):
    """One filesystem mark on the export's filesystem, reporting file handles and thread ids.

    Exact attribution: an event whose thread is one of this connection's workers is the echo of
    the client's own request and is dropped; events of other clients' workers are delivered.
    Objects are found by handle, so a name that was renamed since still finds its inode. The
    kernel merges events on the same object that are still queued (OPEN, MODIFY and CLOSE_WRITE of
    one write become one event); they are sent in the order the syscalls make them.
    Covers the export's own filesystem (submounts inside the export are not seen).
    """

    MASK = (fan.FAN_ACCESS | fan.FAN_MODIFY | fan.FAN_ATTRIB | fan.FAN_CLOSE_WRITE
            | fan.FAN_CLOSE_NOWRITE | fan.FAN_OPEN | fan.FAN_CREATE | fan.FAN_DELETE
            | fan.FAN_RENAME | fan.FAN_ONDIR)
    #: the order in which one syscall sequence produces the kinds a merged event may carry
    ORDER = (ino.IN_CREATE, ino.IN_OPEN, ino.IN_ACCESS, ino.IN_MODIFY, ino.IN_ATTRIB,
             ino.IN_CLOSE_WRITE, ino.IN_CLOSE_NOWRITE, ino.IN_DELETE)

    def __init__(self, *args: object, workers: Callable[[], set[int]], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.workers = workers  # the thread ids serving this client, for the echo filter
        self.fan = fan.init(fan.FAN_CLASS_NOTIF | fan.FAN_REPORT_DFID_NAME | fan.FAN_REPORT_FID
                            | fan.FAN_REPORT_TID | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK)
        root = self.table.root
        self.mount_fd = os.open(linux_fs.proc_path(root.fd), os.O_RDONLY | os.O_DIRECTORY
                                | os.O_CLOEXEC)
        try:
            fan.mark(self.fan, fan.FAN_MARK_ADD | fan.FAN_MARK_FILESYSTEM, self.MASK,
                     linux_fs.proc_path(root.fd))
        except OSError:
            os.close(self.fan)
            os.close(self.mount_fd)
            raise
        self._fid = b""
        self._mine = 0
        self.thread = threading.Thread(target=self._run_fan, name="fanotify-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.running = False
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=5)
        for fd in (self.fan, self.mount_fd, self._stop_r, self._stop_w):
            os.close(fd)
        self.inotify.close()

    def watch(self, inode: Inode) -> None:
        return  # the filesystem mark sees everything

    def forgotten(self, inode: Inode) -> None:
        return

    @property
    def watch_count(self) -> int:
        return 1

    def _echo(self, key: tuple[int, bytes], kind: int) -> bool:
        return INTERNAL.match(key, kind)  # the client's own echoes are dropped by thread id

    def _wd(self, nodeid: int) -> int:
        # the shared event code speaks in inotify watch descriptors: here a nodeid is its own
        with self.lock:
            self.wds[nodeid] = nodeid
            self.by_node[nodeid] = nodeid
        return nodeid

    def _open_now(self, parent: Inode, name: bytes) -> int:
        if self._fid:
            try:
                (htype,) = struct.unpack_from("=i", self._fid)
                return linux_fs.open_by_handle(self.mount_fd, htype, self._fid[4:])
            except OSError:
                pass
        return self.lookup(parent, name)

    def _run_fan(self) -> None:
        self._mine = threading.get_native_id()
        self._loop(self.fan, self._fan_batch)

    def _fan_batch(self) -> None:
        started = time.monotonic()
        batch: list[fan.Event] = []
        while True:
            try:
                batch.extend(fan.parse_events(bytes(self._view[:os.readv(self.fan, (self._buf,))])))
            except BlockingIOError:
                break
        workers = self.workers()
        for ev in batch:
            if ev.tid == self._mine or ev.tid in workers:
                continue  # our own reads, or the echo of this client's requests
            self._fan_event(ev)
        INTERNAL.expire(started - 2.0)

    def _known(self, handle: bytes) -> int | None:
        inode = self.table.acquire_handle(handle) if handle else None
        if inode is None:
            return None
        self.table.release(inode)
        return inode.nodeid

    def _fan_event(self, ev: fan.Event) -> None:
        if ev.mask & fan.FAN_Q_OVERFLOW:
            self.overflows += 1
            log.warning("host fanotify queue overflowed: rescanning what the guest watches")
            self.send(events.overflow())
            self._rescan()
            return
        isdir = ev.mask & fan.FAN_ONDIR
        isdir_bit = ino.IN_ISDIR if isdir else 0
        self._fid = ev.fid
        try:
            if ev.mask & fan.FAN_RENAME:
                src = self._known(ev.old_dir_fid)
                dst = self._known(ev.new_dir_fid)
                if src is None and dst is None:
                    return
                cookie = next(self._cookies)
                s_ev = (ino.Event(self._wd(src), ino.IN_MOVED_FROM | isdir_bit, cookie, ev.old_name)
                        if src is not None else None)
                d_ev = (ino.Event(self._wd(dst), ino.IN_MOVED_TO | isdir_bit, cookie, ev.new_name)
                        if dst is not None else None)
                for node, name in ((src, ev.old_name), (dst, ev.new_name)):
                    if node is not None:
                        self._snap_update(node, name)
                self._move(src, s_ev, d_ev)
                return
            parent = self._known(ev.dir_fid)
            if parent is not None and ev.name == b".":
                # an event on a directory itself: fanotify names it "." in itself; the guest
                # makes it from its parent's entry (and the export root has no parent here)
                if any(self._echo((parent, b""), k) for k in self.ORDER if ev.mask & k):
                    return
                if parent == ROOT_ID:
                    parent = None
                else:
                    names = self.table.names_of(parent)
                    if not names:
                        return
                    parent, ev.name = names[0]
                    ev.fid = ev.dir_fid
            if parent is None:
                if ev.fid and ev.fid == self.table.root.handle or ev.dir_fid == self.table.root.handle:
                    for kind in self.ORDER:
                        if ev.mask & kind & _CONTENT and not self._echo((1, b""), kind):
                            self._content(1, b"", ino.Event(self._wd(1), kind | isdir_bit, 0, b""))
                return
            self._snap_update(parent, ev.name)
            wd = self._wd(parent)
            for kind in self.ORDER:
                if not ev.mask & kind or self._echo((parent, ev.name), kind):
                    continue
                one = ino.Event(wd, kind | isdir_bit, 0, ev.name)
                if kind == ino.IN_CREATE:
                    self._create(parent, one)
                elif kind == ino.IN_DELETE:
                    self._delete(parent, one)
                else:  # a merged event says how the file was opened, if it says anything
                    hint = (events.OPENED_FOR_WRITE if ev.mask & (fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE)
                            else events.OPENED_FOR_READ
                            if ev.mask & (fan.FAN_ACCESS | fan.FAN_CLOSE_NOWRITE) else 0)
                    self._content(parent, ev.name, one, hint)
        finally:
            self._fid = b""


def make_watcher(kind: str, *args: object, workers: Callable[[], set[int]], **kw: object
                 ) -> InotifyWatcher:
    """``auto`` is inotify: its events come in exactly the order a local watcher sees them, which
    the differential oracle confirms; fanotify merges queued events on one object (see
    :class:`FanotifyWatcher`) and is chosen only when asked for."""
    if kind == "fanotify":
        w = FanotifyWatcher(*args, workers=workers, **kw)
        log.info("remote events: watching the host with fanotify (filesystem mark)")
        return w
    log.info("remote events: watching the host with inotify")
    return InotifyWatcher(*args, **kw)  # type: ignore[arg-type]
