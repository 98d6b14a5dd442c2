"""Sans-IO encoding of the reconnect extension (feature ``revive``).

A server that dies takes its inode table with it, but the guest kernel still holds nodeids, open
file handles and watches. With this feature the agent can hand all of that to a new server:

Server -> agent, a notification (unique 0, error = ``NOTIFYFS_HANDLE`` = 102), sent before the
reply or event that first hands a nodeid out::

    u64 nodeid; handle bytes (u32 handle type, then the host's file handle)

Agent -> server, after a reconnect and before anything else, one or more requests (opcode
``NOTIFYFS_REVIVE`` = 4101, nodeid 1) whose body is a UTF-8 JSON object (bytes as hex)::

    {"nodes":  [[nodeid, nlookup, handle, parent, name, attr], ...],
     "files":  [[fh, nodeid, open flags, is_dir], ...],
     "watches":[[nodeid, mask], ...],
     "names":  [[parent, name, nodeid], ...],
     "high_ctime": ns, "last": true|false}

``attr`` is ``[file type, size, mtime ns, ctime ns]`` as the guest last saw it, or null.
``high_ctime`` is the newest host ctime the agent has seen: an entry of a watched directory that
the guest never looked up and whose ctime is newer was made while the server was away. The
server answers each chunk with a JSON object ``{"revived": n, "stale": [nodeids],
"stale_files": [fh]}``; a nodeid it cannot find again (deleted, moved out of the export, replaced)
is stale, and the guest gets ESTALE for it. After the chunk with ``last`` the server diffs the
watched directories against what the guest knew and sends the difference as remote events.

When the handshake agreed on feature ``session`` (wire.py), the first NOTIFYFS_REVIVE also fences:
if the server still holds another connection of the same session id (the agent's old connection,
half-open), it shuts that connection down and releases what it held before it answers, so that
nothing still travelling on it runs after the agent's retries (server/connection.py).

JSON because the message is rare and must be easy to check field by field; every value is
validated here, so the server's handler sees only well-typed records.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from . import abi
from .protocol import ProtocolError, notification

#: nodes per NOTIFYFS_REVIVE request (keeps every frame well under MAX_FRAME)
CHUNK = 2000
MAX_HANDLE = 128 + 4
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class NodeRecord:
    nodeid: int
    nlookup: int
    handle: bytes
    parent: int
    name: bytes
    attr: tuple[int, int, int, int] | None  # file type, size, mtime ns, ctime ns


@dataclass(frozen=True, slots=True)
class FileRecord:
    fh: int
    nodeid: int
    flags: int
    is_dir: bool


@dataclass(slots=True)
class Revive:
    nodes: list[NodeRecord] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    watches: list[tuple[int, int]] = field(default_factory=list)
    names: list[tuple[int, bytes, int]] = field(default_factory=list)
    high_ctime: int = 0
    last: bool = True


@dataclass(frozen=True, slots=True)
class ReviveResult:
    revived: int
    stale: list[int]
    stale_files: list[int]


def handle_notification(nodeid: int, handle: bytes) -> bytes:
    return notification(abi.NotifyCode.NOTIFYFS_HANDLE, struct.pack("=Q", nodeid), handle)


def decode_handle(payload: bytes) -> tuple[int, bytes]:
    """The payload of a NOTIFYFS_HANDLE notification (after fuse_out_header)."""
    if len(payload) < 8 + 5 or len(payload) > 8 + MAX_HANDLE:
        raise ProtocolError("bad NOTIFYFS_HANDLE length")
    (nodeid,) = struct.unpack_from("=Q", payload)
    return nodeid, bytes(payload[8:])


def encode_revive(unique: int, r: Revive) -> bytes:
    body = json.dumps({
        "nodes": [[n.nodeid, n.nlookup, n.handle.hex(), n.parent, n.name.hex(),
                   list(n.attr) if n.attr is not None else None] for n in r.nodes],
        "files": [[f.fh, f.nodeid, f.flags, f.is_dir] for f in r.files],
        "watches": [list(w) for w in r.watches],
        "names": [[p, name.hex(), n] for p, name, n in r.names],
        "high_ctime": r.high_ctime, "last": r.last,
    }, separators=(",", ":")).encode()
    total = abi.IN_HEADER.size + len(body)
    return abi.IN_HEADER.pack(total, abi.Opcode.NOTIFYFS_REVIVE, unique, 1, 0, 0, 0, 0) + body


def split(r: Revive, chunk: int = CHUNK) -> list[Revive]:
    """One Revive as several requests of at most ``chunk`` records of each kind."""
    n = max(1, -(-max(len(r.nodes), len(r.files), len(r.names), len(r.watches)) // chunk))
    out = []
    for i in range(n):
        s = slice(i * chunk, (i + 1) * chunk)
        out.append(Revive(r.nodes[s], r.files[s], r.watches[s], r.names[s], r.high_ctime,
                          i == n - 1))
    return out


def _int(v: object, what: str, hi: int = _U64) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise ProtocolError(f"NOTIFYFS_REVIVE: bad {what}")
    return v


def _hex(v: object, what: str, limit: int) -> bytes:
    if not isinstance(v, str) or len(v) > 2 * limit:
        raise ProtocolError(f"NOTIFYFS_REVIVE: bad {what}")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ProtocolError(f"NOTIFYFS_REVIVE: bad {what}") from None


def _list(obj: dict[str, object], key: str, width: int) -> list[list[object]]:
    v = obj.get(key, [])
    if not isinstance(v, list) or len(v) > CHUNK:
        raise ProtocolError(f"NOTIFYFS_REVIVE: bad {key}")
    for item in v:
        if not isinstance(item, list) or len(item) != width:
            raise ProtocolError(f"NOTIFYFS_REVIVE: bad record in {key}")
    return v


def decode_revive(body: bytes) -> Revive:
    """Decode and check the body of a NOTIFYFS_REVIVE request."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("NOTIFYFS_REVIVE: not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("NOTIFYFS_REVIVE: not an object")
    r = Revive()
    for nodeid, nlookup, handle, parent, name, attr in _list(obj, "nodes", 6):
        a = None
        if attr is not None:
            if not isinstance(attr, list) or len(attr) != 4:
                raise ProtocolError("NOTIFYFS_REVIVE: bad attr")
            a = (_int(attr[0], "type", 0xF000), _int(attr[1], "size"), _int(attr[2], "mtime"),
                 _int(attr[3], "ctime"))
        r.nodes.append(NodeRecord(_int(nodeid, "nodeid"), _int(nlookup, "nlookup", 1 << 32),
                                  _hex(handle, "handle", MAX_HANDLE), _int(parent, "parent"),
                                  _hex(name, "name", 255), a))
    for fh, nodeid, flags, is_dir in _list(obj, "files", 4):
        if not isinstance(is_dir, bool):
            raise ProtocolError("NOTIFYFS_REVIVE: bad is_dir")
        r.files.append(FileRecord(_int(fh, "fh"), _int(nodeid, "nodeid"),
                                  _int(flags, "flags", 0xFFFFFFFF), is_dir))
    for nodeid, mask in _list(obj, "watches", 2):
        r.watches.append((_int(nodeid, "nodeid"), _int(mask, "mask")))
    for parent, name, nodeid in _list(obj, "names", 3):
        r.names.append((_int(parent, "parent"), _hex(name, "name", 255), _int(nodeid, "nodeid")))
    r.high_ctime = _int(obj.get("high_ctime", 0), "high_ctime")
    last = obj.get("last", True)
    if not isinstance(last, bool):
        raise ProtocolError("NOTIFYFS_REVIVE: bad last")
    r.last = last
    return r


def encode_result(res: ReviveResult) -> bytes:
    return json.dumps({"revived": res.revived, "stale": res.stale,
                       "stale_files": res.stale_files}, separators=(",", ":")).encode()


def decode_result(payload: bytes) -> ReviveResult:
    try:
        obj = json.loads(payload)
        return ReviveResult(int(obj["revived"]), [int(x) for x in obj["stale"]],
                            [int(x) for x in obj["stale_files"]])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ProtocolError("bad NOTIFYFS_REVIVE reply") from None
