"""What the guest kernel holds of the export, kept by the agent so that a new server can take over
from one that died (the reconnect half of revive.py).

The relay shows this class every request it forwards together with its reply (and every request
the injector answers itself), and every NOTIFYFS_HANDLE notification; from them it keeps:

* the host file handle of every nodeid the kernel holds (to find the inode again),
* the names under which the kernel knows each nodeid, with the attributes it last saw (to tell
  what changed on the host while no server watched),
* the open file handles (fh -> nodeid, open flags),
* the newest host ctime seen (``high_ctime``).

The kernel's lookup counts themselves stay in ``Relay.kernel_lookups``; the relay calls
:meth:`forgotten` when one drops to zero. Only replies the kernel is given are shown here, so
nothing is learnt from a request the kernel never saw answered.

Lock order: ``KernelView.lock`` is a leaf lock.
"""

from __future__ import annotations

import os
import stat
import struct
import threading

from .. import abi, revive
from ..protocol import ProtocolError, Request, decode_request, parse_dirents

O = abi.Opcode  # noqa: E741
_ATTR = struct.Struct("=QQQQQQIIII")  # fuse_attr up to mode
_ENTRY_AT = abi.OUT_HEADER.size
_ENTRY_ATTR_AT = abi.OUT_HEADER.size + abi.ENTRY_OUT.size
_ATTR_AT = abi.OUT_HEADER.size + abi.ATTR_OUT.size
_NAME_OPS = frozenset((O.LOOKUP, O.MKNOD, O.MKDIR, O.SYMLINK, O.CREATE, O.LINK))
#: requests whose replies tell the view something
WATCHED_OPS = frozenset((*_NAME_OPS, O.READDIRPLUS, O.GETATTR, O.SETATTR, O.OPEN, O.OPENDIR,
                         O.UNLINK, O.RMDIR, O.RENAME, O.RENAME2))
Attr4 = tuple[int, int, int, int]  # file type, size, mtime ns, ctime ns


def _attr_at(frame: bytes, pos: int) -> Attr4:
    _ino, size, _blocks, _atime, mtime, ctime, _an, mtime_ns, ctime_ns, mode = \
        _ATTR.unpack_from(frame, pos)
    return (stat.S_IFMT(mode), size, mtime * 1_000_000_000 + mtime_ns,
            ctime * 1_000_000_000 + ctime_ns)


class KernelView:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handles: dict[int, bytes] = {}
        self.attrs: dict[int, Attr4] = {}
        self.names: dict[tuple[int, bytes], int] = {}
        self.names_of: dict[int, set[tuple[int, bytes]]] = {}
        self.files: dict[int, tuple[int, int, bool]] = {}  # fh -> (nodeid, flags, is_dir)
        self.high_ctime = 0

    # --- what the relay shows it -----------------------------------------------------------------
    def handle_notification(self, payload: bytes) -> None:
        try:
            nodeid, handle = revive.decode_handle(payload)
        except ProtocolError:
            return
        with self.lock:
            self.handles[nodeid] = handle

    def released(self, fh: int) -> None:
        with self.lock:
            self.files.pop(fh, None)

    def forgotten(self, nodeid: int) -> None:
        """The kernel's last lookup of ``nodeid`` is gone."""
        with self.lock:
            self.handles.pop(nodeid, None)
            self.attrs.pop(nodeid, None)
            for key in self.names_of.pop(nodeid, ()):
                if self.names.get(key) == nodeid:
                    del self.names[key]

    def observe(self, request: bytes, reply: bytes) -> None:
        """A request and the reply the kernel was given for it."""
        if len(reply) < abi.OUT_HEADER.size or len(request) < abi.IN_HEADER.size:
            return
        opcode = struct.unpack_from("=I", request, 4)[0]
        if opcode not in WATCHED_OPS or struct.unpack_from("=i", reply, 4)[0] != 0:
            return
        try:
            req = decode_request(request)
            self._observe(req.opcode, req, reply)
        except (ProtocolError, struct.error):
            return

    def _observe(self, op: int, r: Request, reply: bytes) -> None:
        nodeid = r.nodeid
        if op in _NAME_OPS:
            child = abi.ENTRY_OUT.unpack_from(reply, _ENTRY_AT).nodeid
            parent, name = nodeid, r.names[0]  # LINK too: its nodeid is the new parent
            if child:
                with self.lock:
                    self._remember(parent, name, child)
                    self._set_attr(child, _attr_at(reply, _ENTRY_ATTR_AT))
            if op == O.CREATE:
                fh = abi.OPEN_OUT.unpack_from(reply, abi.OUT_HEADER.size + abi.ENTRY_OUT_SIZE).fh
                with self.lock:
                    self.files[fh] = (child, r.arg.flags, False)
        elif op == O.READDIRPLUS:
            got = parse_dirents(reply[abi.OUT_HEADER.size:], plus=True)
            with self.lock:
                for _ino, _off, _type, name, entry in got:
                    child = abi.ENTRY_OUT.unpack_from(entry).nodeid
                    if child and name not in (b".", b".."):
                        self._remember(nodeid, name, child)
                        self._set_attr(child, _attr_at(entry, abi.ENTRY_OUT.size))
        elif op in (O.GETATTR, O.SETATTR):
            with self.lock:
                self._set_attr(nodeid, _attr_at(reply, _ATTR_AT))
        elif op in (O.OPEN, O.OPENDIR):
            fh = abi.OPEN_OUT.unpack_from(reply, abi.OUT_HEADER.size).fh
            with self.lock:
                self.files[fh] = (nodeid, r.arg.flags, op == O.OPENDIR)
        elif op in (O.UNLINK, O.RMDIR):
            with self.lock:
                self._drop(nodeid, r.names[0])
        elif op in (O.RENAME, O.RENAME2):
            newdir = r.arg.newdir
            old, new = r.names[0], r.names[1]
            flags = r.arg.flags if op == O.RENAME2 else 0
            with self.lock:
                a = self.names.get((nodeid, old))
                b = self.names.get((newdir, new))
                self._drop(nodeid, old)
                self._drop(newdir, new)
                if a is not None:
                    self._remember(newdir, new, a)
                if b is not None and flags & 2:  # RENAME_EXCHANGE
                    self._remember(nodeid, old, b)

    def path_of(self, nodeid: int) -> list[bytes] | None:
        """A path (names from the root) under which the guest last knew ``nodeid``, or None."""
        parts: list[bytes] = []
        with self.lock:
            while nodeid != abi.ROOT_ID:
                names = self.names_of.get(nodeid)
                if not names or len(parts) > 4096:  # unknown, or a cycle of stale names
                    return None
                nodeid, name = min(names)
                parts.append(name)
        parts.reverse()
        return parts

    def _remember(self, parent: int, name: bytes, nodeid: int) -> None:
        self._drop(parent, name)
        self.names[(parent, name)] = nodeid
        self.names_of.setdefault(nodeid, set()).add((parent, name))

    def _drop(self, parent: int, name: bytes) -> None:
        old = self.names.pop((parent, name), None)
        if old is not None:
            s = self.names_of.get(old)
            if s is not None:
                s.discard((parent, name))

    def _set_attr(self, nodeid: int, attr: Attr4) -> None:
        self.attrs[nodeid] = attr
        if attr[3] > self.high_ctime:
            self.high_ctime = attr[3]

    # --- what a new server gets --------------------------------------------------------------------
    def revive_request(self, lookups: dict[int, int], watches: dict[int, int]) -> revive.Revive:
        """Everything a new server needs, for the kernel's lookup counts ``lookups``."""
        with self.lock:
            nodes = []
            for nodeid, n in lookups.items():
                parent, name = next(iter(sorted(self.names_of.get(nodeid, ()))), (0, b""))
                nodes.append(revive.NodeRecord(nodeid, n, self.handles.get(nodeid, b""), parent,
                                               name, self.attrs.get(nodeid)))
            # parents before children, for the servers that must find inodes by name
            depth: dict[int, int] = {}

            def level(nodeid: int, seen: int = 0) -> int:
                if nodeid in depth:
                    return depth[nodeid]
                keys = self.names_of.get(nodeid)
                d = 0 if not keys or seen > 64 else level(min(keys)[0], seen + 1) + 1
                depth[nodeid] = d
                return d

            nodes.sort(key=lambda rec: level(rec.nodeid))
            files = [revive.FileRecord(fh, nodeid, flags, is_dir)
                     for fh, (nodeid, flags, is_dir) in self.files.items()]
            names = [(p, name, nodeid) for (p, name), nodeid in self.names.items()
                     if nodeid in lookups]
            return revive.Revive(nodes, files, sorted(watches.items()), names, self.high_ctime)

    def file_flags(self, fh: int) -> int | None:
        with self.lock:
            f = self.files.get(fh)
        return f[1] if f is not None else None

    def appends(self, fh: int) -> bool:
        flags = self.file_flags(fh)
        return flags is not None and bool(flags & os.O_APPEND)
