"""Sans-IO encoding of the remote-event extension (feature ``fsnotify``).

Agent -> server, a normal request (opcode ``NOTIFYFS_FSNOTIFY`` = 4100, the proposal's
FUSE_FSNOTIFY): ``nodeid`` is the watched inode, the body is ``fuse_notify_fsnotify_in`` with the
guest's aggregated inotify-style mask for it (action 1 = set, 0 = removed; group unused).

Server -> agent, a notification (unique 0, error = ``NOTIFYFS_EVENT`` = 100, the proposal's
FUSE_NOTIFY_FSNOTIFY)::

    fuse_notify_fsnotify_out { u64 inode; u64 mask; u32 namelen; u32 cookie; }
    name, NUL                                   (namelen bytes + 1; namelen 0: the inode itself)
    notifyfs_event_ext { u64 generation; u32 file_type; u32 flags; }
    fuse_entry_out + fuse_attr                  if flags & ENTRY  (counted in nlookup if COUNTED)
    fuse_entry_out + fuse_attr                  if flags & OLD    (always counted in nlookup)

``inode`` is the directory that holds ``name`` (its ``generation`` follows), or the inode itself
when ``namelen`` is 0. ``ENTRY`` describes the object the event is about: for CREATE and the
moves, an entry the server already counted in its nlookup (so the agent can hand it to the guest
kernel as a LOOKUP/MKNOD answer, and must FORGET it if it does not); for content events
(MODIFY, ATTRIB, ...) its current attributes only. ``OLD`` is the inode a DELETE removed or a
MOVED_TO overwrote, with its attributes from *before* the change (nlink + 1). A rename is a
MOVED_FROM with ``PAIRED`` set followed immediately by the MOVED_TO with the same cookie.

``NOTIFYFS_OVERFLOW`` (101) has no body: the server lost events and rescanned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import abi
from .protocol import Attr, ProtocolError, inval_inode, notification

EXT = struct.Struct("=QII")
ENTRY = 1 << 0  # an entry follows
COUNTED = 1 << 1  # ... and the server counted it in nlookup
OLD = 1 << 2  # an entry of the removed / overwritten inode follows (counted)
PAIRED = 1 << 3  # MOVED_FROM: the MOVED_TO with the same cookie comes next
OPENED_FOR_READ = 1 << 4  # OPEN: the host's next event on it says it was opened to read ...
OPENED_FOR_WRITE = 1 << 5  # ... or to write (neither: not known yet)

FSNOTIFY_SET = 1
FSNOTIFY_REMOVE = 0


@dataclass(frozen=True, slots=True)
class Entry:
    nodeid: int
    generation: int
    attr: Attr
    raw: bytes  # fuse_entry_out + fuse_attr, as the kernel takes it


@dataclass(frozen=True, slots=True)
class RemoteEvent:
    inode: int
    generation: int
    mask: int
    cookie: int
    name: bytes
    file_type: int  # stat.S_IFMT bits of the object, 0 if unknown
    entry: Entry | None = None
    counted: bool = False
    old: Entry | None = None
    paired: bool = False
    opened_for: int = 0  # OPEN: OPENED_FOR_READ, OPENED_FOR_WRITE or 0


def _entry(raw: bytes) -> Entry:
    e = abi.ENTRY_OUT.unpack_from(raw)
    a = abi.ATTR.unpack_from(raw, abi.ENTRY_OUT.size)
    return Entry(e.nodeid, e.generation, Attr(*a), bytes(raw))


def encode_event(ev: RemoteEvent) -> bytes:
    flags = 0
    parts = [abi.NOTIFY_FSNOTIFY_OUT.pack(ev.inode, ev.mask, len(ev.name), ev.cookie),
             ev.name + b"\0"]
    tail = []
    if ev.entry is not None:
        flags |= ENTRY | (COUNTED if ev.counted else 0)
        tail.append(ev.entry.raw)
    if ev.old is not None:
        flags |= OLD
        tail.append(ev.old.raw)
    if ev.paired:
        flags |= PAIRED
    flags |= ev.opened_for & (OPENED_FOR_READ | OPENED_FOR_WRITE)
    parts.append(EXT.pack(ev.generation, ev.file_type, flags))
    parts.extend(tail)
    return notification(abi.NotifyCode.NOTIFYFS_EVENT, *parts)


def decode_event(payload: bytes) -> RemoteEvent:
    """Decode the payload of a NOTIFYFS_EVENT notification (after fuse_out_header)."""
    n = abi.NOTIFY_FSNOTIFY_OUT.size
    if len(payload) < n:
        raise ProtocolError("remote event truncated")
    head = abi.NOTIFY_FSNOTIFY_OUT.unpack_from(payload)
    if head.namelen > 255:
        raise ProtocolError("remote event name too long")
    pos = n + head.namelen
    if len(payload) < pos + 1 + EXT.size or payload[pos] != 0:
        raise ProtocolError("remote event name not terminated")
    name = payload[n:pos]
    if b"\0" in name or b"/" in name:
        raise ProtocolError("bad name in remote event")
    pos += 1
    generation, file_type, flags = EXT.unpack_from(payload, pos)
    pos += EXT.size
    size = abi.ENTRY_OUT_SIZE
    entry = old = None
    if flags & ENTRY:
        if len(payload) < pos + size:
            raise ProtocolError("remote event entry truncated")
        entry = _entry(payload[pos:pos + size])
        pos += size
    if flags & OLD:
        if len(payload) < pos + size:
            raise ProtocolError("remote event old entry truncated")
        old = _entry(payload[pos:pos + size])
        pos += size
    if pos != len(payload):
        raise ProtocolError("stray bytes after remote event")
    return RemoteEvent(head.inode, generation, head.mask, head.cookie, name, file_type, entry,
                       bool(flags & COUNTED), old, bool(flags & PAIRED),
                       flags & (OPENED_FOR_READ | OPENED_FOR_WRITE))


def overflow() -> bytes:
    return notification(abi.NotifyCode.NOTIFYFS_OVERFLOW)


def fsnotify_request(unique: int, nodeid: int, mask: int, action: int) -> bytes:
    body = abi.NOTIFY_FSNOTIFY_IN.pack(mask, 0, action)
    total = abi.IN_HEADER.size + len(body)
    return abi.IN_HEADER.pack(total, abi.Opcode.NOTIFYFS_FSNOTIFY, unique, nodeid, 0, 0, 0, 0) + body


def make_entry(nodeid: int, generation: int, attr: Attr, entry_timeout: float,
               attr_timeout: float) -> Entry:
    from .protocol import entry_out

    return Entry(nodeid, generation, attr,
                 entry_out(nodeid, generation, attr, entry_timeout, attr_timeout))


#: remote events that change a file's content or attributes (IN_MODIFY, IN_ATTRIB,
#: IN_CLOSE_WRITE, as in linux/inotify.py, which this module does not import)
_INODE_CHANGES = 0x2 | 0x4 | 0x8


def invalidations(ev: RemoteEvent) -> list[bytes]:
    """The FUSE invalidations that make the guest's cache of a file's content and attributes
    agree with the host after ``ev``.

    The agent writes these as soon as the event arrives, ahead of injecting it: a guest read
    must not depend on how far behind the injector is (it may be seconds behind a host that
    changes files fast), only on how fast the event travelled. Names are not invalidated early:
    injecting the events before this one may have made the very dentries that injecting this
    one goes through (the CREATE of a file a later MODIFY writes), and the injector invalidates
    each name itself right before the call that changes it."""
    if ev.mask & _INODE_CHANGES and ev.entry is not None:
        return [inval_inode(ev.entry.nodeid)]
    return []
