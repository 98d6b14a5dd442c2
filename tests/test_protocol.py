"""The sans-IO protocol core: round trips, malformed input and fuzzing.

The request shapes below are written down here from the kernel's point of view (what
fs/fuse sends for each opcode), not read from protocol.py, so that a wrong shape there fails.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from notifyfs import abi, protocol
from notifyfs.abi import Opcode
from notifyfs.protocol import (
    KNOWN_OPCODES,
    MAX_FRAME,
    MAX_WRITE,
    Attr,
    DirentBuffer,
    ProtocolError,
    Reply,
    Request,
    Session,
    decode_rdev,
    decode_reply,
    decode_request,
    encode_request,
    notification,
    parse_dirents,
    reply,
    reply_error,
    split_frames,
)

HDR = abi.IN_HEADER.size
EXT_SESSION = Session(flags=abi.SETXATTR_EXT)

# body kinds
NONE, NAME, NAME2, WRITE, XATTR, FORGETS, RAW = "none", "name", "name2", "write", "xattr", "forgets", "raw"

#: opcode -> (argument struct, what follows it), as the kernel sends them
SHAPES: dict[int, tuple[abi.Layout | None, str]] = {
    Opcode.LOOKUP: (None, NAME),
    Opcode.FORGET: (abi.FORGET_IN, NONE),
    Opcode.GETATTR: (abi.GETATTR_IN, NONE),
    Opcode.SETATTR: (abi.SETATTR_IN, NONE),
    Opcode.READLINK: (None, NONE),
    Opcode.SYMLINK: (None, NAME2),  # entry name, then link target
    Opcode.MKNOD: (abi.MKNOD_IN, NAME),
    Opcode.MKDIR: (abi.MKDIR_IN, NAME),
    Opcode.UNLINK: (None, NAME),
    Opcode.RMDIR: (None, NAME),
    Opcode.RENAME: (abi.RENAME_IN, NAME2),
    Opcode.LINK: (abi.LINK_IN, NAME),
    Opcode.OPEN: (abi.OPEN_IN, NONE),
    Opcode.READ: (abi.READ_IN, NONE),
    Opcode.WRITE: (abi.WRITE_IN, WRITE),
    Opcode.STATFS: (None, NONE),
    Opcode.RELEASE: (abi.RELEASE_IN, NONE),
    Opcode.FSYNC: (abi.FSYNC_IN, NONE),
    Opcode.SETXATTR: (abi.SETXATTR_IN, XATTR),
    Opcode.GETXATTR: (abi.GETXATTR_IN, NAME),
    Opcode.LISTXATTR: (abi.GETXATTR_IN, NONE),
    Opcode.REMOVEXATTR: (None, NAME),
    Opcode.FLUSH: (abi.FLUSH_IN, NONE),
    Opcode.INIT: (abi.INIT_IN, NONE),
    Opcode.OPENDIR: (abi.OPEN_IN, NONE),
    Opcode.READDIR: (abi.READ_IN, NONE),
    Opcode.RELEASEDIR: (abi.RELEASE_IN, NONE),
    Opcode.FSYNCDIR: (abi.FSYNC_IN, NONE),
    Opcode.GETLK: (abi.LK_IN, NONE),
    Opcode.SETLK: (abi.LK_IN, NONE),
    Opcode.SETLKW: (abi.LK_IN, NONE),
    Opcode.ACCESS: (abi.ACCESS_IN, NONE),
    Opcode.CREATE: (abi.CREATE_IN, NAME),
    Opcode.INTERRUPT: (abi.INTERRUPT_IN, NONE),
    Opcode.BMAP: (abi.BMAP_IN, NONE),
    Opcode.DESTROY: (None, NONE),
    Opcode.IOCTL: (abi.IOCTL_IN, RAW),
    Opcode.POLL: (abi.POLL_IN, NONE),
    Opcode.NOTIFY_REPLY: (abi.NOTIFY_RETRIEVE_IN, RAW),
    Opcode.BATCH_FORGET: (abi.BATCH_FORGET_IN, FORGETS),
    Opcode.FALLOCATE: (abi.FALLOCATE_IN, NONE),
    Opcode.READDIRPLUS: (abi.READ_IN, NONE),
    Opcode.RENAME2: (abi.RENAME2_IN, NAME2),
    Opcode.LSEEK: (abi.LSEEK_IN, NONE),
    Opcode.COPY_FILE_RANGE: (abi.COPY_FILE_RANGE_IN, NONE),
    Opcode.SETUPMAPPING: (None, RAW),
    Opcode.REMOVEMAPPING: (None, RAW),
    Opcode.SYNCFS: (abi.SYNCFS_IN, NONE),
    Opcode.TMPFILE: (abi.CREATE_IN, NAME),
    Opcode.STATX: (abi.STATX_IN, NONE),
    Opcode.NOTIFYFS_FSNOTIFY: (abi.NOTIFY_FSNOTIFY_IN, NONE),
    Opcode.NOTIFYFS_REVIVE: (None, RAW),
}
OPCODES = sorted(SHAPES)
WITH_ARG = [op for op in OPCODES if SHAPES[op][0] is not None]


def test_known_opcodes_are_the_kernel_ones() -> None:
    assert set(SHAPES) == KNOWN_OPCODES
    assert Opcode.CUSE_INIT not in KNOWN_OPCODES


# --- strategies ---------------------------------------------------------------------------------

def ints(fmt: str) -> st.SearchStrategy[int]:
    bits = 8 * struct.calcsize("=" + fmt)
    if fmt.islower():
        return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return st.integers(0, (1 << bits) - 1)


U16, U32, U64 = ints("H"), ints("I"), ints("Q")


def args(layout: abi.Layout, **fixed: Any) -> st.SearchStrategy[Any]:
    fields = {
        f: (st.just(fixed[f]) if f in fixed else ints(fmt))
        for f, fmt in zip(layout.fields, layout.formats, strict=True) if not f.startswith("_")
    }
    assert set(fixed) <= set(fields), fixed
    return st.fixed_dictionaries(fields).map(lambda d: layout.tuple(**d))


def names(max_size: int = protocol.NAME_MAX, min_size: int = 0) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=min_size, max_size=max_size).map(lambda b: b.replace(b"\0", b"@"))


extensions = st.integers(0, 3).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n))


@st.composite
def requests(draw: Any, opcode: int | None = None, ext_session: bool = False) -> Request:
    op = draw(st.sampled_from(OPCODES)) if opcode is None else opcode
    layout, kind = SHAPES[op]
    fixed: dict[str, Any] = {}
    nms: tuple[bytes, ...] = ()
    data = b""
    forgets: tuple[tuple[int, int], ...] = ()
    if kind == NAME:
        nms = (draw(names()),)
    elif kind == NAME2:
        nms = (draw(names()), draw(names(protocol.LINK_MAX if op == Opcode.SYMLINK else protocol.NAME_MAX)))
    elif kind == WRITE:
        data = draw(st.binary(max_size=3000))
        fixed["size"] = len(data)
    elif kind == XATTR:
        nms = (draw(names()),)
        data = draw(st.binary(max_size=600))
        fixed["size"] = len(data)
        if not ext_session:
            fixed["setxattr_flags"] = 0  # the 8-byte compat struct has no room for it
    elif kind == FORGETS:
        forgets = tuple(draw(st.lists(st.tuples(U64, U64), max_size=20)))
        fixed["count"] = len(forgets)
    elif kind == RAW:
        data = draw(st.binary(max_size=300))
    return Request(
        opcode=op, unique=draw(U64), nodeid=draw(U64), uid=draw(U32), gid=draw(U32), pid=draw(U32),
        arg=draw(args(layout, **fixed)) if layout is not None else None,
        names=nms, data=data, forgets=forgets, extensions=draw(extensions),
    )


def frame(opcode: int, body: bytes, unique: int = 77, nodeid: int = 5, extlen: int = 0) -> bytes:
    return abi.IN_HEADER.pack(HDR + len(body), opcode, unique, nodeid, 0, 0, 0, extlen) + body


def raises(fn: Any, *a: Any, unique: int | None = None, err: int | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        fn(*a)
    assert ei.value.unique == unique
    if err is not None:
        assert ei.value.errno == err
    return ei.value


# --- request round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("op", OPCODES, ids=[abi.OPCODE_NAMES[o] for o in OPCODES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_request_round_trip(op: int, data: st.DataObject) -> None:
    req = data.draw(requests(op))
    wire = encode_request(req)
    assert len(wire) == struct.unpack_from("=I", wire)[0]
    assert decode_request(wire) == req
    req2 = data.draw(requests(op, ext_session=True))
    assert decode_request(encode_request(req2, EXT_SESSION), EXT_SESSION) == req2


@settings(max_examples=300, deadline=None)
@given(requests())
def test_request_wire_format(req: Request) -> None:
    """Independently of encode_request: the header, then arg, names with NUL, payload, extensions."""
    wire = encode_request(req)
    h = abi.IN_HEADER.unpack_from(wire)
    assert (h.len, h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid) == (
        len(wire), req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid)
    assert h.total_extlen * 8 == len(req.extensions)
    layout = SHAPES[req.opcode][0]
    pos = HDR
    if req.opcode == Opcode.SETXATTR:
        layout = abi.SETXATTR_IN_COMPAT
    if layout is not None:
        assert wire[pos:pos + layout.size] == layout.pack(*req.arg[:len(layout.tuple._fields)])
        pos += layout.size
    for n in req.names:
        assert wire[pos:pos + len(n) + 1] == n + b"\0"
        pos += len(n) + 1
    for nid, nl in req.forgets:
        assert struct.unpack_from("=QQ", wire, pos) == (nid, nl)
        pos += 16
    assert wire[pos:] == req.data + req.extensions


def test_setxattr_compat_and_ext() -> None:
    body = abi.SETXATTR_IN.pack(3, 1, abi.SETXATTR_ACL_KILL_SGID) + b"user.x\0abc"
    r = decode_request(frame(Opcode.SETXATTR, body), EXT_SESSION)
    assert (r.arg.size, r.arg.flags, r.arg.setxattr_flags, r.name, r.data) == (3, 1, 1, b"user.x", b"abc")
    # without SETXATTR_EXT the kernel sends the 8-byte struct
    compat = abi.SETXATTR_IN_COMPAT.pack(3, 2) + b"user.x\0abc"
    r = decode_request(frame(Opcode.SETXATTR, compat))
    assert (r.arg.size, r.arg.flags, r.arg.setxattr_flags, r.data) == (3, 2, 0, b"abc")
    # the long struct in a compat session is misread (its tail becomes name and value): refused
    raises(decode_request, frame(Opcode.SETXATTR, body), unique=77)


def test_init_compat_and_trailing_bytes() -> None:
    short = abi.INIT_IN_COMPAT.pack(7, 31, 65536, abi.ASYNC_READ)
    r = decode_request(frame(Opcode.INIT, short))
    assert (r.arg.major, r.arg.minor, r.arg.max_readahead, r.arg.flags, r.arg.flags2) == (7, 31, 65536, 1, 0)
    full = abi.INIT_IN.pack(7, 45, 1 << 17, abi.INIT_EXT | abi.ASYNC_READ, 5)
    r = decode_request(frame(Opcode.INIT, full + b"future fields..."))
    assert r.arg.flags2 == 5 and r.data == b""
    assert protocol.init_flags(r.arg) == abi.INIT_EXT | abi.ASYNC_READ | (5 << 32)
    r = decode_request(frame(Opcode.INIT, abi.INIT_IN.pack(7, 45, 0, abi.ASYNC_READ, 5)))
    assert protocol.init_flags(r.arg) == abi.ASYNC_READ  # flags2 only counts with INIT_EXT
    raises(decode_request, frame(Opcode.INIT, short[:12]), unique=77)
    raises(decode_request, frame(Opcode.INIT, full[:20]), unique=77)


def test_request_accessors() -> None:
    r = decode_request(frame(Opcode.LOOKUP, b"hello\0"))
    assert r.name == b"hello" and r.opname == "LOOKUP"
    assert Request(opcode=9999, unique=1, nodeid=1).opname == "9999"


def test_limits() -> None:
    ok = b"a" * 255
    assert decode_request(frame(Opcode.LOOKUP, ok + b"\0")).name == ok
    raises(decode_request, frame(Opcode.LOOKUP, ok + b"a\0"), unique=77, err=errno.ENAMETOOLONG)
    raises(decode_request, frame(Opcode.RENAME, abi.RENAME_IN.pack(1) + b"a\0" + ok + b"b\0"),
           unique=77, err=errno.ENAMETOOLONG)
    target = b"t" * protocol.LINK_MAX
    assert decode_request(frame(Opcode.SYMLINK, b"l\0" + target + b"\0")).names == (b"l", target)
    raises(decode_request, frame(Opcode.SYMLINK, b"l\0" + target + b"t\0"), unique=77,
           err=errno.ENAMETOOLONG)
    raises(decode_request, frame(Opcode.SYMLINK, ok + b"a\0t\0"), unique=77, err=errno.ENAMETOOLONG)
    # the largest WRITE fits in a frame; one byte more is refused as too large, with its unique
    big = bytes(range(256)) * (MAX_WRITE // 256)
    wire = frame(Opcode.WRITE, abi.WRITE_IN.pack(1, 0, len(big)) + big)
    assert len(wire) <= MAX_FRAME and decode_request(wire).data == big
    raises(decode_request, frame(Opcode.WRITE, abi.WRITE_IN.pack(1, 0, len(big) + 1) + big + b"x"),
           unique=77, err=errno.E2BIG)
    value = b"v" * protocol.XATTR_SIZE_MAX
    sx = abi.SETXATTR_IN_COMPAT.pack(len(value), 0) + b"user.a\0"
    assert decode_request(frame(Opcode.SETXATTR, sx + value)).data == value
    sx = abi.SETXATTR_IN_COMPAT.pack(len(value) + 1, 0) + b"user.a\0"
    raises(decode_request, frame(Opcode.SETXATTR, sx + value + b"v"), unique=77, err=errno.E2BIG)


# --- malformed requests -----------------------------------------------------------------------

def test_short_frames() -> None:
    for n in range(HDR):
        raises(decode_request, bytes(n))
    raises(decode_request, frame(Opcode.GETATTR, b"")[:HDR - 1])


def test_oversized_frame() -> None:
    body = abi.WRITE_IN.pack(1, 0, MAX_FRAME) + bytes(MAX_FRAME - HDR - abi.WRITE_IN.size + 1)
    wire = frame(Opcode.WRITE, body, unique=9)
    assert len(wire) == MAX_FRAME + 1
    raises(decode_request, wire, unique=9, err=errno.E2BIG)


def test_header_length_mismatch() -> None:
    good = frame(Opcode.LOOKUP, b"x\0", unique=12)
    raises(decode_request, good + b"\0", unique=12)
    raises(decode_request, good[:-1], unique=12)
    raises(decode_request, struct.pack("=I", 0) + good[4:], unique=12)
    raises(decode_request, struct.pack("=I", 0xFFFFFFFF) + good[4:], unique=12)


@pytest.mark.parametrize("op", [0, 7, 19, 53, 200, Opcode.CUSE_INIT, 4102, 0xFFFFFFFF])
def test_unknown_opcode(op: int) -> None:
    raises(decode_request, frame(op, b"whatever", unique=31), unique=31, err=errno.ENOSYS)


@pytest.mark.parametrize("op", [op for op in OPCODES if SHAPES[op][1] in (NAME, NAME2, XATTR)])
def test_missing_nul(op: int) -> None:
    layout = SHAPES[op][0]
    prefix = layout.pack(size=0) if layout is not None else b""
    raises(decode_request, frame(op, prefix + b"name", unique=3), unique=3)
    if SHAPES[op][1] == NAME2:
        raises(decode_request, frame(op, prefix + b"one\0two", unique=3), unique=3)
    raises(decode_request, frame(op, prefix, unique=3), unique=3)


@pytest.mark.parametrize("op", [op for op in OPCODES if SHAPES[op][1] in (NONE, NAME, NAME2)
                                and op != Opcode.INIT])
def test_stray_bytes(op: int) -> None:
    layout, kind = SHAPES[op]
    body = layout.pack() if layout is not None else b""
    body += {NONE: b"", NAME: b"n\0", NAME2: b"a\0b\0"}[kind]
    decode_request(frame(op, body))
    for extra in (b"\0", b"x", b"\0" * 8):
        raises(decode_request, frame(op, body + extra, unique=4), unique=4)


@pytest.mark.parametrize("op", WITH_ARG, ids=[abi.OPCODE_NAMES[o] for o in WITH_ARG])
def test_truncated_args(op: int) -> None:
    layout = SHAPES[op][0]
    assert layout is not None
    full = layout.pack()
    for n in range(layout.size):
        if op == Opcode.INIT and n == abi.INIT_IN_COMPAT.size:
            continue  # the pre-7.36 fuse_init_in
        for sess in (Session(), EXT_SESSION):
            if op == Opcode.SETXATTR and sess is not EXT_SESSION and n >= abi.SETXATTR_IN_COMPAT.size:
                continue  # a whole compat struct followed by a (malformed) name: tested elsewhere
            raises(decode_request, frame(op, full[:n], unique=8), sess, unique=8)


def test_payload_mismatches() -> None:
    w = abi.WRITE_IN.pack(1, 0, 5)
    raises(decode_request, frame(Opcode.WRITE, w + b"1234"), unique=77)
    raises(decode_request, frame(Opcode.WRITE, w + b"123456"), unique=77)
    sx = abi.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.a\0"
    raises(decode_request, frame(Opcode.SETXATTR, sx + b"ab"), unique=77)
    raises(decode_request, frame(Opcode.SETXATTR, sx + b"abcd"), unique=77)
    one = abi.FORGET_ONE.pack(1, 2)
    assert decode_request(frame(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(2) + one * 2)).forgets == (
        (1, 2), (1, 2))
    raises(decode_request, frame(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(3) + one * 2), unique=77)
    raises(decode_request, frame(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(1) + one * 2), unique=77)
    raises(decode_request, frame(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(1) + one + b"x"), unique=77)
    raises(decode_request, frame(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(0xFFFFFFFF)), unique=77)


def test_extensions() -> None:
    ext = abi.EXT_HEADER.pack(16, 40) + b"12345678"
    r = decode_request(frame(Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0o22) + b"d\0" + ext, extlen=2))
    assert r.name == b"d" and r.extensions == ext and r.arg.mode == 0o755
    raises(decode_request, frame(Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", extlen=2), unique=77)
    raises(decode_request, frame(Opcode.GETATTR, abi.GETATTR_IN.pack(), extlen=0xFFFF), unique=77)


# --- replies and notifications ----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(unique=st.integers(1, (1 << 64) - 1), payload=st.lists(st.binary(max_size=200), max_size=4))
def test_reply_round_trip(unique: int, payload: list[bytes]) -> None:
    wire = reply(unique, *payload)
    r = decode_reply(wire)
    assert r == Reply(unique, 0, b"".join(payload)) and not r.is_notification
    assert abi.OUT_HEADER.unpack_from(wire) == (len(wire), 0, unique)


@settings(max_examples=300, deadline=None)
@given(unique=st.integers(1, (1 << 64) - 1), err=st.integers(-(1 << 40), 1 << 40))
def test_reply_error_round_trip(unique: int, err: int) -> None:
    wire = reply_error(unique, err)
    assert len(wire) == abi.OUT_HEADER.size
    expected = err if 0 < err < 4096 else errno.EIO
    assert decode_reply(wire) == Reply(unique, expected, b"")
    assert abi.OUT_HEADER.unpack_from(wire).error == -expected


@settings(max_examples=300, deadline=None)
@given(code=st.integers(1, (1 << 31) - 1), payload=st.binary(max_size=300))
def test_notification_round_trip(code: int, payload: bytes) -> None:
    r = decode_reply(notification(code, payload))
    assert r == Reply(0, code, payload) and r.is_notification


def test_notification_helpers() -> None:
    r = decode_reply(protocol.inval_entry(9, b"name", abi.EXPIRE_ONLY))
    assert r.error == abi.NotifyCode.INVAL_ENTRY
    assert abi.NOTIFY_INVAL_ENTRY_OUT.unpack_from(r.payload) == (9, 4, abi.EXPIRE_ONLY)
    assert r.payload[abi.NOTIFY_INVAL_ENTRY_OUT.size:] == b"name\0"
    r = decode_reply(protocol.inval_inode(3, -1, 10))
    assert r.error == abi.NotifyCode.INVAL_INODE
    assert abi.NOTIFY_INVAL_INODE_OUT.unpack_from(r.payload) == (3, -1, 10)
    r = decode_reply(protocol.notify_delete(1, 2, b"gone"))
    assert r.error == abi.NotifyCode.DELETE
    assert abi.NOTIFY_DELETE_OUT.unpack_from(r.payload) == (1, 2, 4)
    assert r.payload[abi.NOTIFY_DELETE_OUT.size:] == b"gone\0"


def test_malformed_replies() -> None:
    for n in range(abi.OUT_HEADER.size):
        raises(decode_reply, bytes(n))
    good = reply(5, b"abc")
    raises(decode_reply, good + b"x")
    raises(decode_reply, good[:-1])
    raises(decode_reply, abi.OUT_HEADER.pack(16, 0, 0))  # notification code 0
    raises(decode_reply, abi.OUT_HEADER.pack(16, -3, 0))  # negative notification code
    raises(decode_reply, abi.OUT_HEADER.pack(16, 1, 5))  # positive error in a reply
    raises(decode_reply, abi.OUT_HEADER.pack(16, -4096, 5))  # errno out of range
    raises(decode_reply, abi.OUT_HEADER.pack(20, -2, 5) + b"oops")  # error with payload
    big = abi.OUT_HEADER.pack(MAX_FRAME + 1, 0, 5)
    raises(decode_reply, big + bytes(MAX_FRAME + 1 - len(big)))
    assert decode_reply(abi.OUT_HEADER.pack(16, -4095, 5)).error == 4095


def test_reply_payload_builders() -> None:
    st_ = os.stat_result((stat.S_IFREG | 0o644, 42, 0, 1, 1000, 1000, 123, 0, 0, 0,
                          0.0, 0.0, 0.0, 10**9 + 5, 2 * 10**9 + 6, 3 * 10**9 + 7, 4096, 1, 0))
    attr = Attr.from_stat(st_)
    e = protocol.entry_out(42, 7, attr, 1.5, 0.25)
    assert len(e) == abi.ENTRY_OUT_SIZE
    assert abi.ENTRY_OUT.unpack_from(e) == (42, 7, 1, 0, 500_000_000, 250_000_000)
    assert e[abi.ENTRY_OUT.size:] == attr.pack()
    n = protocol.negative_entry_out(2.0)
    assert abi.ENTRY_OUT.unpack_from(n) == (0, 0, 2, 0, 0, 0) and len(n) == abi.ENTRY_OUT_SIZE
    a = protocol.attr_out(attr, 3.75)
    assert len(a) == abi.ATTR_OUT_SIZE and abi.ATTR_OUT.unpack_from(a) == (3, 750_000_000)
    assert protocol.split_timeout(-1) == (0, 0)
    out = protocol.init_out(45, abi.ASYNC_READ | abi.PASSTHROUGH, 1 << 20, 256, 1 << 17)
    o = abi.INIT_OUT.unpack_from(out)
    assert len(out) == abi.INIT_OUT.size == 64
    assert (o.major, o.minor, o.max_write, o.max_pages, o.max_readahead) == (7, 45, 1 << 20, 256, 1 << 17)
    assert o.flags | o.flags2 << 32 == abi.ASYNC_READ | abi.PASSTHROUGH | abi.INIT_EXT
    o = abi.INIT_OUT.unpack_from(protocol.init_out(31, abi.ASYNC_READ, 4096, 1, 4096))
    assert o.flags == abi.ASYNC_READ and o.flags2 == 0
    sv = os.statvfs("/")
    k = abi.KSTATFS.unpack_from(protocol.statfs_out(sv))
    assert (k.blocks, k.bfree, k.bavail, k.files, k.ffree, k.bsize, k.namelen, k.frsize) == (
        sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize, sv.f_namemax, sv.f_frsize)
    assert protocol.dirent_type(stat.S_IFDIR | 0o755) == 4  # DT_DIR
    assert protocol.dirent_type(stat.S_IFLNK) == 10  # DT_LNK
    assert protocol.dirent_type(stat.S_IFREG) == 8  # DT_REG


# --- dirents -------------------------------------------------------------------------------------

dirent_entries = st.lists(
    st.tuples(U64, U64, st.integers(0, 15), names(min_size=1), st.booleans()), max_size=25
)


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@settings(max_examples=150, deadline=None)
@given(entries=dirent_entries, limit=st.integers(0, 6000), seed=st.binary(min_size=128, max_size=128))
def test_dirent_buffer_round_trip(plus: bool, entries: list[Any], limit: int, seed: bytes) -> None:
    buf = DirentBuffer(limit, plus=plus)
    added = []
    for ino, off, dtype, name, with_entry in entries:
        entry = seed if plus and with_entry else None
        size = (abi.direntplus_size if plus else abi.dirent_size)(len(name))
        fits = buf.fits(name)
        before = buf.used
        ok = buf.add(ino, off, dtype, name, entry)
        assert ok == fits == (before + size <= limit)
        if ok:
            added.append((ino, off, dtype, name, (entry or bytes(abi.ENTRY_OUT_SIZE)) if plus else b""))
            assert buf.used == before + size
        else:
            assert buf.used == before
    payload = buf.payload()
    assert len(payload) == buf.used <= limit
    assert len(payload) % 8 == 0
    assert parse_dirents(payload, plus=plus) == added
    # the record layout, read independently: name right after the header, zero padding
    pos = 0
    for ino, off, dtype, name, _ in added:
        base = pos + (abi.ENTRY_OUT_SIZE if plus else 0)
        assert struct.unpack_from("=QQII", payload, base) == (ino, off, len(name), dtype)
        end = base + 24 + len(name)
        assert payload[base + 24:end] == name
        pos = (end + 7) & ~7
        assert payload[end:pos] == bytes(pos - end)


def test_parse_dirents_rejects_garbage() -> None:
    good = DirentBuffer(4096)
    good.add(1, 1, 8, b"file")
    p = good.payload()
    assert parse_dirents(p) == [(1, 1, 8, b"file", b"")]
    for n in range(1, abi.DIRENT.size + 4):  # cut inside the header or the name
        with pytest.raises(ProtocolError):
            parse_dirents(p[:n])
    with pytest.raises(ProtocolError):
        parse_dirents(abi.DIRENT.pack(1, 1, 0, 8))  # empty name
    with pytest.raises(ProtocolError):
        parse_dirents(abi.DIRENT.pack(1, 1, 300, 8) + bytes(304))  # name too long
    with pytest.raises(ProtocolError):
        parse_dirents(bytes(abi.ENTRY_OUT_SIZE - 1), plus=True)
    assert parse_dirents(b"") == []


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_parse_dirents_fuzz(payload: bytes, plus: bool) -> None:
    try:
        parse_dirents(payload, plus=plus)
    except ProtocolError:
        pass


# --- attributes and device numbers ---------------------------------------------------------------

def _signed64(v: int) -> int:
    return struct.unpack("=q", struct.pack("=Q", v))[0]


def test_attr_from_real_stat(tmp_path: Any) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 5000)
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    for path in (str(f), str(tmp_path), "/dev/null"):
        s = os.lstat(path)
        a = abi.ATTR.unpack_from(Attr.from_stat(s).pack())
        assert (a.ino, a.size, a.blocks, a.mode, a.nlink, a.uid, a.gid, a.blksize, a.flags) == (
            s.st_ino, s.st_size, s.st_blocks, s.st_mode, s.st_nlink, s.st_uid, s.st_gid, s.st_blksize, 0)
        assert a.atime * 10**9 + a.atimensec == s.st_atime_ns
        assert a.mtime * 10**9 + a.mtimensec == s.st_mtime_ns
        assert a.ctime * 10**9 + a.ctimensec == s.st_ctime_ns
        assert decode_rdev(a.rdev) == s.st_rdev
    assert decode_rdev(Attr.from_stat(os.stat("/dev/null")).rdev) == os.makedev(1, 3)


times_ns = st.integers(-(1 << 62), (1 << 62))


@settings(max_examples=300, deadline=None)
@given(at=times_ns, mt=times_ns, ct=times_ns, major=st.integers(0, 4095),
       minor=st.integers(0, (1 << 20) - 1), nlink=st.integers(0, 1 << 40),
       size=st.integers(0, (1 << 63) - 1))
def test_attr_from_stat_values(
    at: int, mt: int, ct: int, major: int, minor: int, nlink: int, size: int
) -> None:
    rdev = os.makedev(major, minor)
    s = os.stat_result((stat.S_IFCHR | 0o600, 99, 0, nlink, 7, 8, size, 0, 0, 0, 0.0, 0.0, 0.0,
                        at, mt, ct, 512, 3, rdev))
    a = abi.ATTR.unpack_from(Attr.from_stat(s).pack())
    for sec, nsec, ns in ((a.atime, a.atimensec, at), (a.mtime, a.mtimensec, mt), (a.ctime, a.ctimensec, ct)):
        assert 0 <= nsec < 10**9
        assert _signed64(sec) * 10**9 + nsec == ns
    assert a.nlink == min(nlink, 0xFFFFFFFF) and a.size == size
    assert a.rdev == (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # new_encode_dev
    assert decode_rdev(a.rdev) == rdev


@settings(max_examples=500, deadline=None)
@given(major=st.integers(0, 4095), minor=st.integers(0, (1 << 20) - 1))
def test_decode_rdev_matches_makedev(major: int, minor: int) -> None:
    encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    assert encoded < 1 << 32
    d = decode_rdev(encoded)
    assert d == os.makedev(major, minor)
    assert (os.major(d), os.minor(d)) == (major, minor)


# --- framing -------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=100), max_size=12),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
)
def test_split_frames_arbitrary_chunking(bodies: list[bytes], cuts: list[int]) -> None:
    frames = [reply(i + 1, b) for i, b in enumerate(bodies)]
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    buf = bytearray()
    got = []
    for a, b in zip(points, points[1:], strict=False):
        buf += stream[a:b]
        got.extend(split_frames(buf, abi.OUT_HEADER.size))
        assert len(buf) < abi.OUT_HEADER.size + 100  # whole frames never linger
    assert got == frames and not buf


def test_split_frames_bounds() -> None:
    buf = bytearray(struct.pack("=I", 15) + bytes(11))
    with pytest.raises(ProtocolError):
        list(split_frames(buf, 16))
    buf = bytearray(struct.pack("=I", 1000) + bytes(20))
    with pytest.raises(ProtocolError):
        list(split_frames(buf, 16, max_len=999))
    buf = bytearray(struct.pack("=I", 1000) + bytes(20))
    assert list(split_frames(buf, 16)) == [] and len(buf) == 24  # incomplete: kept
    buf = bytearray(b"\x20\0")
    assert list(split_frames(buf, 16)) == [] and buf == b"\x20\0"


# --- fuzzing -------------------------------------------------------------------------------------

def _check_request(data: bytes) -> None:
    for sess in (None, EXT_SESSION):
        try:
            r = decode_request(data, sess)
        except ProtocolError as e:
            assert isinstance(e.errno, int) and e.errno > 0
            if len(data) >= HDR:  # the header could be read: the error can be answered
                assert e.unique == abi.IN_HEADER.unpack_from(data).unique
            else:
                assert e.unique is None
        else:
            assert isinstance(r, Request) and r.opcode in KNOWN_OPCODES
            # decoding is a fixed point of encode/decode (padding and INIT's tail aside)
            assert decode_request(encode_request(r, sess), sess) == r


def _check_reply(data: bytes) -> None:
    try:
        r = decode_reply(data)
    except ProtocolError:
        return
    assert isinstance(r, Reply)
    if r.is_notification:
        assert notification(r.error, r.payload) == data
    elif r.error:
        assert reply_error(r.unique, r.error) == data
    else:
        assert reply(r.unique, r.payload) == data


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("len"), st.one_of(st.just(None), U32)),
    st.tuples(st.just("extlen"), U16),
    st.tuples(st.just("opcode"), st.one_of(st.sampled_from(OPCODES), U32)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 16), U32),
)


def mutate(data: bytes, muts: list[Any], fix_len: bool) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind = m[0]
        if kind == "flip" and b:
            b[m[1] % len(b)] ^= 1 << m[2]
        elif kind == "truncate":
            del b[m[1] % (len(b) + 1):]
        elif kind == "extend":
            b += m[1]
        elif kind == "len" and len(b) >= 4:
            struct.pack_into("=I", b, 0, len(b) if m[1] is None else m[1])
        elif kind == "extlen" and len(b) >= HDR:
            struct.pack_into("=H", b, 36, m[1])
        elif kind == "opcode" and len(b) >= 8:
            struct.pack_into("=I", b, 4, m[1])
        elif kind == "u32" and len(b) >= 4:
            struct.pack_into("=I", b, m[1] % (len(b) - 3), m[2])
    if fix_len and len(b) >= 4:
        struct.pack_into("=I", b, 0, len(b))  # most mutations should get past the length check
    return bytes(b)


@pytest.mark.timeout(120)
@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_request(data)
    _check_reply(data)
    if len(data) >= 4:
        fixed = struct.pack("=I", len(data)) + data[4:]
        _check_request(fixed)
        _check_reply(fixed)


@pytest.mark.timeout(120)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests(), muts=st.lists(mutation, min_size=1, max_size=4), fix_len=st.booleans())
def test_fuzz_mutated_requests(req: Request, muts: list[Any], fix_len: bool) -> None:
    _check_request(mutate(encode_request(req), muts, fix_len))


replies = st.one_of(
    st.builds(reply, st.integers(1, (1 << 64) - 1), st.binary(max_size=200)),
    st.builds(reply_error, st.integers(1, (1 << 64) - 1), st.integers(1, 4095)),
    st.builds(notification, st.integers(1, 200), st.binary(max_size=200)),
)


@pytest.mark.timeout(120)
@settings(max_examples=2000, deadline=None)
@given(rep=replies, muts=st.lists(mutation, min_size=1, max_size=4), fix_len=st.booleans())
def test_fuzz_mutated_replies(rep: bytes, muts: list[Any], fix_len: bool) -> None:
    _check_reply(mutate(rep, muts, fix_len))


@settings(max_examples=200, deadline=None)
@given(req=requests(), cut=st.integers(0, 10_000))
def test_every_truncation_of_a_valid_request(req: Request, cut: int) -> None:
    """A valid frame cut short, with its length field fixed up, decodes or raises ProtocolError."""
    wire = encode_request(req)
    assume(len(wire) > HDR)
    n = HDR + cut % (len(wire) - HDR)
    _check_request(struct.pack("=I", n) + wire[4:n])
