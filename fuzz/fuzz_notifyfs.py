"""Fuzzing notifyfs's protocol decoder and the server's request handling.

Two targets:

``decode``
    Arbitrary bytes through every decoder a peer's bytes reach: ``decode_request`` (with both
    session layouts), ``decode_reply``, ``split_frames`` and the remote-event decoder. Allowed
    outcome: a result or :class:`ProtocolError`; anything else is a bug.

``server``
    A request built from the input (mostly well framed, with nodeids and file handles the server
    really handed out, hostile names, lying lengths, any uid) goes decode -> the real
    :class:`Passthrough` on a temporary export -> reply encoding, exactly as a connection does it.
    Allowed outcome: ProtocolError, or a reply that decodes (an error reply for FuseError/OSError).
    Any other exception, a malformed reply, a change outside the export, or an fd leak after the
    filesystem is closed is a bug. As root the export is a 32 MiB tmpfs in a private mount
    namespace (so FALLOCATE and huge writes cannot fill the host disk, and the mount disappears with
    the process).

Drivers: atheris (coverage guided) when it is installed, else a seeded random generator::

    python fuzz/fuzz_notifyfs.py server -runs=1000000          # atheris, libFuzzer flags
    python fuzz/fuzz_notifyfs.py decode --random 200000 --seed 1  # no atheris needed

It prints ``fuzz: TARGET: N inputs, ...`` every 100000 inputs (and at the end of a --random run;
libFuzzer ends an atheris run with ``Done N runs``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from notifyfs import abi, events  # noqa: E402
from notifyfs.abi import Opcode  # noqa: E402
from notifyfs.protocol import (  # noqa: E402
    KNOWN_OPCODES,
    MAX_FRAME,
    ProtocolError,
    Session,
    decode_reply,
    decode_request,
    reply,
    reply_error,
    split_frames,
)
from notifyfs.server.dispatch import FuseError  # noqa: E402
from notifyfs.server.passthrough import Options, Passthrough  # noqa: E402


class Bytes:
    """Consumes a fuzz input a few bytes at a time; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def pick(self, seq: list | tuple):  # type: ignore[type-arg,no-untyped-def]
        return seq[self.int(1) % len(seq)]

    def rest(self, limit: int = 1 << 16) -> bytes:
        out = self.data[self.pos:self.pos + limit]
        self.pos = len(self.data)
        return out


# --- the decode target ------------------------------------------------------------------------

COMPAT = Session(flags=0)
EXT = Session(flags=abi.SETXATTR_EXT)


def fuzz_decode(data: bytes) -> None:
    for session in (COMPAT, EXT):
        try:
            req = decode_request(data, session)
        except ProtocolError as e:
            assert e.errno > 0, e
        else:
            assert req.opcode in KNOWN_OPCODES and len(data) <= MAX_FRAME
    try:
        r = decode_reply(data)
    except ProtocolError:
        pass
    else:
        assert 0 <= r.error < 4096 or r.unique == 0
    buf = bytearray(data)
    try:
        for frame in split_frames(buf, abi.IN_HEADER.size):
            assert len(frame) >= abi.IN_HEADER.size
    except ProtocolError:
        pass
    try:
        events.decode_event(data)
    except ProtocolError:
        pass


# --- the server target ------------------------------------------------------------------------

SECRET = b"outside the export\n"
NAMES = [b"hello", b"dir", b"file", b"link", b"abs", b"dot", b"new", b"x", b"fifo", b"..", b".",
         b"", b"a/b", b"/etc/passwd", b"../outside", b"x" * 255, b"x" * 256, b"user.a",
         b"trusted.a", b"security.capability", b"system.posix_acl_access"]
#: requests that name a file handle in their first u64 (so that real handles reach the code)
FH_FIRST = {Opcode.READ, Opcode.WRITE, Opcode.RELEASE, Opcode.RELEASEDIR, Opcode.FLUSH,
            Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.GETLK,
            Opcode.SETLK, Opcode.SETLKW, Opcode.LSEEK, Opcode.FALLOCATE, Opcode.COPY_FILE_RANGE,
            Opcode.IOCTL, Opcode.POLL}
OPCODES = sorted(KNOWN_OPCODES) + [0, 99, 5000, 0xFFFFFFFF]
NAMED = {Opcode.LOOKUP, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK, Opcode.LINK, Opcode.CREATE,
         Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.GETXATTR,
         Opcode.SETXATTR, Opcode.REMOVEXATTR}
ENTRY_OPS = {Opcode.LOOKUP, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK, Opcode.LINK, Opcode.CREATE}


def _private_tmpfs(path: Path) -> bool:
    """Mount a small tmpfs on ``path`` in a mount namespace of our own (gone when we exit)."""
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return False
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
        return False
    return libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, b"size=32m") == 0


def _snapshot(root: Path) -> list[tuple[str, int, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = p.lstat()
            body = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out.append((str(p), st.st_mode, st.st_size, body))
    return sorted(out)


def _fd_targets() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory listing's own fd
    return out


class ServerHarness:
    RESET_EVERY = 5000

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="notifyfs-fuzz-"))
        self.bounded = _private_tmpfs(self.base)
        self.export = self.base / "export"
        self.outside = self.base / "outside"
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(SECRET)
        (self.outside / "dir").mkdir()
        self.outside_before = _snapshot(self.outside)
        self.fds_before = _fd_targets()
        self.count = 0
        self.errors: dict[int, int] = {}
        self.protocol_errors = 0
        self.unique = 0
        self._start()

    def _start(self) -> None:
        if self.export.exists():
            shutil.rmtree(self.export)
        e = self.export
        e.mkdir()
        (e / "hello").write_bytes(b"hello\n")
        (e / "dir").mkdir()
        (e / "dir" / "file").write_bytes(b"file\n" * 100)
        os.symlink(self.outside / "secret", e / "abs")
        os.symlink("../outside/dir", e / "link")
        os.mkfifo(e / "fifo")
        self.fs = Passthrough(str(e), Options(events=False))
        self.fs.closing = True  # a blocking SETLKW answers EINTR at once instead of waiting
        self.nodeids: list[int] = [1]
        self.fhs: list[int] = [0]
        init = abi.INIT_IN.pack(major=7, minor=45, max_readahead=1 << 17,
                                flags=abi.INIT_EXT | abi.ASYNC_READ | abi.BIG_WRITES)
        self._call(self._frame(Opcode.INIT, 0, init))

    def close(self) -> None:
        self.fs.close()
        leaked = {fd: t for fd, t in _fd_targets().items() if self.fds_before.get(fd) != t}
        assert not leaked, f"fds leaked after the filesystem was closed: {leaked}"
        assert _snapshot(self.outside) == self.outside_before, "something outside the export changed"

    def _frame(self, opcode: int, nodeid: int, body: bytes, length: int | None = None,
               uid: int = 0, gid: int = 0, extlen: int = 0) -> bytes:
        self.unique += 1
        n = abi.IN_HEADER.size + len(body) if length is None else length
        return abi.IN_HEADER.pack(n & 0xFFFFFFFF, opcode & 0xFFFFFFFF, self.unique, nodeid, uid, gid,
                                  4242, extlen) + body

    def _call(self, frame: bytes) -> None:
        """What :class:`Connection` does with one frame, with every outcome checked."""
        try:
            req = decode_request(frame, self.fs.session)
        except ProtocolError as e:
            self.protocol_errors += 1
            assert e.errno > 0
            if e.unique:
                decode_reply(reply_error(e.unique, e.errno))
            return
        try:
            payload = self.fs.handle(req)
        except FuseError as e:
            out = reply_error(req.unique, e.errno)
        except OSError as e:
            out = reply_error(req.unique, e.errno or errno.EIO)
        except OverflowError:
            out = reply_error(req.unique, errno.EINVAL)
        else:
            if payload is None:
                assert req.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET), req.opname
                return
            out = reply(req.unique, payload)
            assert len(out) <= MAX_FRAME, f"{req.opname}: reply of {len(out)} bytes"
        r = decode_reply(out)
        assert r.unique == req.unique
        self.errors[r.error] = self.errors.get(r.error, 0) + 1
        if r.error == 0:
            self._learn(req.opcode, r.payload)

    def _learn(self, opcode: int, payload: bytes) -> None:
        if opcode in ENTRY_OPS and len(payload) >= abi.ENTRY_OUT.size:
            self.nodeids.append(abi.ENTRY_OUT.unpack_from(payload).nodeid)
            del self.nodeids[1:-32]
        off = abi.ENTRY_OUT.size if opcode == Opcode.CREATE else 0
        if opcode in (Opcode.OPEN, Opcode.OPENDIR, Opcode.CREATE) and len(payload) >= off + 16:
            self.fhs.append(abi.OPEN_OUT.unpack_from(payload, off).fh)
            del self.fhs[1:-32]

    def one(self, data: bytes) -> None:
        self.count += 1
        if self.count % self.RESET_EVERY == 0:
            self.close()
            self._start()
        b = Bytes(data)
        opcode = b.pick(OPCODES)
        mode = b.int(1)
        nodeid = b.pick(self.nodeids) if mode & 3 else b.pick([0, 2, 1 << 63, (1 << 64) - 1, b.int(8)])
        uid, gid = b.pick([(0, 0), (1000, 1000), (b.int(4), b.int(4))])
        layout = _layout(opcode, self.fs.session)
        if mode & 0x22 == 0x22 or opcode not in KNOWN_OPCODES:
            body = b.rest()  # raw bytes, whatever the opcode wants
        else:
            arg = bytearray(b.take(layout.size if layout is not None else 0))
            if opcode in FH_FIRST and mode & 0x0C and len(arg) >= 8:
                struct.pack_into("=Q", arg, 0, b.pick(self.fhs))
            if opcode == Opcode.COPY_FILE_RANGE and len(arg) >= 32:
                struct.pack_into("=Q", arg, 16, b.pick(self.nodeids))  # nodeid_out
                struct.pack_into("=Q", arg, 24, b.pick(self.fhs))  # fh_out
            if opcode in (Opcode.RENAME, Opcode.RENAME2, Opcode.LINK) and len(arg) >= 8:
                struct.pack_into("=Q", arg, 0, b.pick(self.nodeids))
            if opcode in (Opcode.READ, Opcode.WRITE, Opcode.GETXATTR, Opcode.LISTXATTR,
                          Opcode.READDIR, Opcode.READDIRPLUS) and not mode & 8:
                _small_sizes(opcode, arg)
            count = 2 if opcode in (Opcode.SYMLINK, Opcode.RENAME, Opcode.RENAME2) else int(opcode in NAMED)
            if mode & 0x30 == 0x30:
                count = b.int(1) % 3  # the wrong number of names, now and then
            names = b"".join(b.pick(NAMES) + b"\0" for _ in range(count))
            tail = b.rest(4096) if opcode in (Opcode.WRITE, Opcode.SETXATTR) or mode & 0x18 == 0x18 else b""
            if opcode == Opcode.WRITE and not mode & 0x20 and len(arg) >= 20:
                struct.pack_into("=I", arg, 16, len(tail))  # honest size
            if opcode == Opcode.SETXATTR and not mode & 0x20 and len(arg) >= 4:
                struct.pack_into("=I", arg, 0, len(tail))
            body = bytes(arg) + names + tail
        length = None
        extlen = 0
        if mode & 0xC0 == 0xC0:  # the header lies about its length or its extensions
            length = len(body) + abi.IN_HEADER.size + b.pick([-1, 1, -40, 4096, 1 << 31])
            extlen = b.int(2) & 0xFFFF
        self._call(self._frame(opcode, nodeid, body, length, uid, gid, extlen))
        if len(self.fs.handles) > 64:  # keep the run's fds bounded: release what piled up
            for fh in list(self.fs.handles)[:32]:
                self._call(self._frame(Opcode.RELEASE, 1, abi.RELEASE_IN.pack(fh=fh)))


def _layout(opcode: int, session: Session) -> abi.Layout | None:
    if opcode not in KNOWN_OPCODES:
        return None
    return session.layout_for(opcode)


def _small_sizes(opcode: int, arg: bytearray) -> None:
    """Mostly small sizes and offsets, so that the run does real I/O instead of EINVAL/EFBIG."""
    if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS) and len(arg) >= 20:
        off = struct.unpack_from("=Q", arg, 8)[0] % 8192
        size = struct.unpack_from("=I", arg, 16)[0] % 65536
        struct.pack_into("=QI", arg, 8, off, size)
    elif opcode == Opcode.WRITE and len(arg) >= 16:
        struct.pack_into("=Q", arg, 8, struct.unpack_from("=Q", arg, 8)[0] % (1 << 20))
    elif opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) and len(arg) >= 4:
        struct.pack_into("=I", arg, 0, struct.unpack_from("=I", arg, 0)[0] % 512)


# --- drivers ----------------------------------------------------------------------------------

def _report(target: str, count: int, started: float, extra: str = "") -> None:
    rate = count / max(time.monotonic() - started, 1e-9)
    print(f"fuzz: {target}: {count} inputs, {rate:.0f}/s{extra}", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("decode", "server"):
        print(__doc__)
        return 2
    target, rest = argv[0], argv[1:]
    logging.disable(logging.ERROR)  # hostile input makes the server warn on purpose; faults raise
    harness = ServerHarness() if target == "server" else None
    run: Callable[[bytes], None] = harness.one if harness is not None else fuzz_decode
    started = time.monotonic()
    count = [0]

    def summary() -> str:
        if harness is None:
            return ""
        top = sorted(harness.errors.items(), key=lambda kv: -kv[1])[:8]
        errs = ", ".join(f"{errno.errorcode.get(e, 'OK') if e else 'OK'}={n}" for e, n in top)
        return (f" ({harness.protocol_errors} ProtocolError; replies {errs};"
                f" tmpfs={'yes' if harness.bounded else 'no'})")

    def one(data: bytes) -> None:
        run(data)
        count[0] += 1
        if count[0] % 100000 == 0:
            _report(target, count[0], started, summary())

    if "--random" in rest:
        import random

        n = int(rest[rest.index("--random") + 1])
        seed = int(rest[rest.index("--seed") + 1]) if "--seed" in rest else 1
        rnd = random.Random(seed)
        for _ in range(n):
            size = rnd.choice([0, 8, 40, 41, 48, 64, 80, 100, 200, 1000])
            one(rnd.randbytes(size))
        _finish(harness)
        _report(target, count[0], started, summary())
        return 0
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *rest], one)
    atheris.Fuzz()
    return 0


def _finish(harness: ServerHarness | None) -> None:
    if harness is not None:
        harness.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
