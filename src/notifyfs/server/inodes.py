"""The inode table: nodeid -> host inode (an O_PATH fd), with exact nlookup accounting.

A nodeid is derived from the host inode, not from a counter, so that a restarted server hands out
the same nodeids (the reliability issue): nodeid = (device index << 56) | st_ino, the export's root
is always FUSE_ROOT_ID, and a collision (an inode number >= 2**56, or 1) falls back to a counter in
the reserved index 0xff. The generation is a hash of the host's file handle, so that an inode number
the host reuses for a new file does not look like the old inode to the guest kernel.

Lifetime: an entry lives while the kernel holds lookups on it (``nlookup``) or a request is using it
(``refs``). FORGET that drops nlookup to zero closes the fd, but only after the last request that
acquired the entry has released it, so a hostile FORGET can never make a worker use a reused fd.

Lock order: ``InodeTable.lock`` is a leaf lock; nothing else is acquired while holding it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..linux import fs as linux_fs
from .dispatch import FuseError

log = logging.getLogger(__name__)

ROOT_ID = 1
_RESERVED_INDEX = 0xFF
#: device indexes stop here; nodeids with a top byte of 0xF0..0xFE belong to the agent (local nodes)
_MAX_INDEX = 0xF0
_INO_BITS = 56


@dataclass(eq=False)
class Inode:
    nodeid: int
    fd: int
    key: tuple[int, int]
    generation: int
    fmt: int  # stat.S_IFMT of the host inode
    nlookup: int = 0
    refs: int = 0
    dead: bool = False
    handle: bytes = b""  # the host's file handle: how fanotify names this inode
    names: set[tuple[int, bytes]] = field(default_factory=set)  # (parent nodeid, name) seen

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    @property
    def is_symlink(self) -> bool:
        return self.fmt == stat.S_IFLNK


def _handle(fd: int) -> bytes:
    """The host's file handle (type, then bytes) of the inode behind ``fd``; b"" if none."""
    try:
        htype, handle, _mnt = linux_fs.name_to_handle(fd)
    except OSError:
        return b""
    return htype.to_bytes(4, "little", signed=True) + handle


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError("export root is not a directory")
        self.lock = threading.Lock()
        self._devs: dict[int, int] = {st.st_dev: 0}
        self._next_reserved = 2
        root = Inode(ROOT_ID, root_fd, (st.st_dev, st.st_ino), 0, stat.S_IFDIR, nlookup=1)
        self.root = root
        self.by_id: dict[int, Inode] = {ROOT_ID: root}
        self.by_key: dict[tuple[int, int], Inode] = {root.key: root}
        root.handle = _handle(root_fd)
        self.by_handle: dict[bytes, Inode] = {root.handle: root} if root.handle else {}
        #: the names under which the guest knows each inode: (parent nodeid, name) -> nodeid.
        #: Remote events need it: a host DELETE or MOVED_FROM names an inode that is gone.
        self.names: dict[tuple[int, bytes], int] = {}
        #: called (outside the lock) with each inode whose last lookup was forgotten
        self.on_dead: Callable[[Inode], None] | None = None
        #: nodeids an earlier server handed out that could not be revived: the guest kernel
        #: may still use them, so they never denote another inode until it forgets them
        self.retired: set[int] = set()
        #: called (outside the lock, before the nodeid leaves) with each new inode
        self.on_new: Callable[[Inode], None] | None = None

    def __len__(self) -> int:
        return len(self.by_id)

    def _derive_nodeid(self, dev: int, ino: int) -> int:
        idx = self._devs.get(dev)
        if idx is None:
            idx = len(self._devs)
            if idx >= _MAX_INDEX:
                idx = _RESERVED_INDEX
            else:
                self._devs[dev] = idx
        nodeid = (idx << _INO_BITS) | ino
        if (idx == _RESERVED_INDEX or ino >> _INO_BITS or nodeid in (0, ROOT_ID)
                or nodeid in self.by_id or nodeid in self.retired):
            while True:
                nodeid = (_RESERVED_INDEX << _INO_BITS) | self._next_reserved
                self._next_reserved += 1
                if nodeid not in self.by_id:
                    break
        return nodeid

    def acquire_handle(self, handle: bytes) -> Inode | None:
        """The live inode with this host file handle, acquired; None if the guest lacks it."""
        with self.lock:
            inode = self.by_handle.get(handle)
            if inode is None or inode.dead:
                return None
            inode.refs += 1
            return inode

    def acquire(self, nodeid: int) -> Inode:
        """The live inode for ``nodeid`` with one more in-flight reference; ESTALE if unknown."""
        with self.lock:
            inode = self.by_id.get(nodeid)
            if inode is None or inode.dead:
                raise FuseError(errno.ESTALE, f"unknown nodeid {nodeid}")
            inode.refs += 1
            return inode

    def acquire_if_live(self, nodeid: int) -> Inode | None:
        try:
            return self.acquire(nodeid)
        except FuseError:
            return None

    def release(self, inode: Inode) -> None:
        close = False
        with self.lock:
            inode.refs -= 1
            if inode.dead and inode.refs == 0:
                close = True
        if close:
            os.close(inode.fd)

    def add_lookup(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the host inode behind ``fd`` (an O_PATH fd the table now owns)."""
        key = (st.st_dev, st.st_ino)
        with self.lock:
            known = self.by_key.get(key)
            hit = known is not None and not known.dead
            if hit and known is not None:
                known.nlookup += 1
        if hit:
            assert known is not None
            os.close(fd)
            return known
        handle = _handle(fd)
        gen = zlib.crc32(handle[4:]) if handle else 0
        new = False
        with self.lock:
            inode = self.by_key.get(key)
            if inode is not None and not inode.dead:  # another worker won the race
                inode.nlookup += 1
            else:
                nodeid = self._derive_nodeid(st.st_dev, st.st_ino)
                inode = Inode(nodeid, fd, key, gen, stat.S_IFMT(st.st_mode), nlookup=1,
                              handle=handle)
                self.by_id[nodeid] = inode
                self.by_key[key] = inode
                if handle:
                    self.by_handle[handle] = inode
                new = True
        if new:
            if self.on_new is not None:
                self.on_new(inode)
            return inode
        os.close(fd)
        return inode

    def revive(self, nodeid: int, fd: int, st: os.stat_result, nlookup: int) -> Inode | None:
        """Take back ``nodeid`` that an earlier server handed out, for the host inode behind
        ``fd`` (O_PATH, owned by the table on success), with the guest's lookup count. None if
        the nodeid cannot denote this inode (then the caller closes ``fd``)."""
        handle = _handle(fd)
        gen = zlib.crc32(handle[4:]) if handle else 0
        key = (st.st_dev, st.st_ino)
        idx = nodeid >> _INO_BITS
        with self.lock:
            if nodeid in self.by_id or nodeid in (0, ROOT_ID):
                known = self.by_id.get(nodeid)
                if known is not None and known.key == key and not known.dead:
                    known.nlookup += nlookup
                    os.close(fd)
                    return known
                return None
            if key in self.by_key and not self.by_key[key].dead:
                return None  # the inode is known under another nodeid
            if idx != _RESERVED_INDEX:
                if nodeid & ((1 << _INO_BITS) - 1) != st.st_ino:
                    return None
                have = self._devs.get(st.st_dev)
                if have is None:
                    if idx in self._devs.values() or idx >= _MAX_INDEX:
                        return None
                    self._devs[st.st_dev] = idx
                elif have != idx:
                    return None
            inode = Inode(nodeid, fd, key, gen, stat.S_IFMT(st.st_mode), nlookup=nlookup,
                          handle=handle)
            self.by_id[nodeid] = inode
            self.by_key[key] = inode
            if handle:
                self.by_handle[handle] = inode
            if idx == _RESERVED_INDEX:
                self._next_reserved = max(self._next_reserved,
                                          (nodeid & ((1 << _INO_BITS) - 1)) + 1)
            return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        close = False
        with self.lock:
            inode = self.by_id.get(nodeid)
            if inode is None or nodeid == ROOT_ID:
                self.retired.discard(nodeid)
                if nodeid != ROOT_ID:
                    log.debug("FORGET of unknown nodeid %d", nodeid)
                return
            if nlookup > inode.nlookup:
                log.warning("FORGET %d of nodeid %d with only %d lookups", nlookup, nodeid,
                            inode.nlookup)
                nlookup = inode.nlookup
            inode.nlookup -= nlookup
            if inode.nlookup > 0:
                return
            del self.by_id[nodeid]
            if self.by_key.get(inode.key) is inode:
                del self.by_key[inode.key]
            if inode.handle and self.by_handle.get(inode.handle) is inode:
                del self.by_handle[inode.handle]
            for key in inode.names:
                if self.names.get(key) == nodeid:
                    del self.names[key]
            inode.names.clear()
            inode.dead = True
            close = inode.refs == 0
        if self.on_dead is not None:
            self.on_dead(inode)
        if close:
            os.close(inode.fd)

    def add_ref(self, inode: Inode) -> bool:
        """One more lookup of a live inode (an entry handed out in a remote event)."""
        with self.lock:
            if inode.dead:
                return False
            inode.nlookup += 1
            return True

    # --- names ---------------------------------------------------------------------------
    def remember(self, parent: int, name: bytes, inode: Inode) -> None:
        with self.lock:
            if inode.dead:
                return
            old = self.names.get((parent, name))
            if old is not None and old != inode.nodeid and old in self.by_id:
                self.by_id[old].names.discard((parent, name))
            self.names[(parent, name)] = inode.nodeid
            inode.names.add((parent, name))

    def child(self, parent: int, name: bytes, drop: bool = False) -> Inode | None:
        """The live inode the guest knows as ``name`` in ``parent``, acquired (release it);
        with ``drop`` the name is forgotten too."""
        with self.lock:
            key = (parent, name)
            nodeid = self.names.pop(key, None) if drop else self.names.get(key)
            inode = self.by_id.get(nodeid) if nodeid is not None else None
            if inode is None or inode.dead:
                return None
            if drop:
                inode.names.discard(key)
            inode.refs += 1
            return inode

    def drop_name(self, parent: int, name: bytes) -> None:
        inode = self.child(parent, name, drop=True)
        if inode is not None:
            self.release(inode)

    def move_name(self, parent: int, name: bytes, newparent: int, newname: bytes) -> None:
        inode = self.child(parent, name, drop=True)
        self.drop_name(newparent, newname)
        if inode is not None:
            self.remember(newparent, newname, inode)
            self.release(inode)

    def exchange_names(self, parent: int, name: bytes, newparent: int, newname: bytes) -> None:
        a = self.child(parent, name, drop=True)
        b = self.child(newparent, newname, drop=True)
        if a is not None:
            self.remember(newparent, newname, a)
            self.release(a)
        if b is not None:
            self.remember(parent, name, b)
            self.release(b)

    def names_of(self, nodeid: int) -> list[tuple[int, bytes]]:
        with self.lock:
            inode = self.by_id.get(nodeid)
            return list(inode.names) if inode is not None else []

    def lookup_counts(self) -> dict[int, int]:
        with self.lock:
            return {n: i.nlookup for n, i in self.by_id.items()}

    def close_all(self) -> None:
        with self.lock:
            inodes = [i for i in self.by_id.values() if i.nodeid != ROOT_ID]
            self.by_id = {ROOT_ID: self.root}
            self.by_key = {self.root.key: self.root}
            self.by_handle = {self.root.handle: self.root} if self.root.handle else {}
            self.names = {}
            for i in inodes:
                i.dead = True
        for i in inodes:
            if i.refs == 0:
                os.close(i.fd)
