"""The guest side: mount /dev/fuse and relay FUSE frames between the kernel and the server.

Threads (and what each may do):

* ``kernel-reader`` reads /dev/fuse and forwards requests to the server. It never writes a
  notification and never makes a call on the mount: the kernel may hold a directory lock while it
  waits for the answer to a request this thread must read.
* ``server-reader`` reads the socket and writes replies to /dev/fuse; notifications (unique 0) are
  queued for the ``notifier`` thread, because writing FUSE_NOTIFY_INVAL_* can block on a
  directory lock that a request in flight holds.
* ``notifier`` writes notifications (and, with remote events, is where injection happens).

If the server goes away and both sides speak ``revive`` (revive.py), the ``reconnect`` thread
connects again with backoff for up to ``-o reconnect=SECONDS`` while requests wait: it hands the
new server what the kernel holds (kernel_view.py), then retries the requests that were in flight
if they are idempotent (the others get EIO: they may or may not have happened) and sends the ones
that waited. Otherwise, or when the time is up, every request in flight is answered EIO, the mount
is detached and the agent exits non-zero; closing /dev/fuse then makes every later call fail
with ENOTCONN.

Lock order: ``Relay.lock`` (in-flight set) is a leaf lock; the socket writer's lock is a leaf lock.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import abi, events, wire
from ..linux import mount as linux_mount
from ..protocol import (
    MAX_WRITE,
    ProtocolError,
    Request,
    decode_request,
    encode_request,
    parse_dirents,
    reply_error,
)
from .. import revive
from .injector import Injector, is_local
from .kernel_view import KernelView

log = logging.getLogger(__name__)

READ_BUFFER = MAX_WRITE + 64 * 1024
_NO_REPLY = (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT)
_FH_OPS = (abi.Opcode.RELEASE, abi.Opcode.RELEASEDIR, abi.Opcode.FLUSH)
_ENTRY_OPS = (abi.Opcode.LOOKUP, abi.Opcode.MKNOD, abi.Opcode.MKDIR, abi.Opcode.SYMLINK,
              abi.Opcode.LINK, abi.Opcode.CREATE, abi.Opcode.READDIRPLUS)
#: uniques of requests the agent itself sends to the server (the kernel's stay far below)
AGENT_UNIQUE = 1 << 63
_O = abi.Opcode
#: requests that may be sent again after a reconnect when their fate is unknown: doing them twice
#: is the same as doing them once (WRITE only when its file is not O_APPEND)
_IDEMPOTENT = frozenset((
    _O.LOOKUP, _O.GETATTR, _O.SETATTR, _O.READLINK, _O.OPEN, _O.READ, _O.WRITE, _O.STATFS,
    _O.RELEASE, _O.FSYNC, _O.GETXATTR, _O.LISTXATTR, _O.FLUSH, _O.OPENDIR, _O.READDIR,
    _O.RELEASEDIR, _O.FSYNCDIR, _O.ACCESS, _O.BMAP, _O.FALLOCATE, _O.READDIRPLUS, _O.LSEEK,
    _O.COPY_FILE_RANGE, _O.STATX, _O.GETLK, _O.NOTIFYFS_FSNOTIFY))
#: how long to wait for the answer to a NOTIFYFS_REVIVE chunk
REVIVE_TIMEOUT = 60.0
_INIT_FLAGS_OFFSET = abi.IN_HEADER.size + abi.INIT_IN.offsets["flags"]
_INIT_FLAGS2_OFFSET = abi.IN_HEADER.size + abi.INIT_IN.offsets["flags2"]


class MountError(Exception):
    """The mount cannot be made: a one-line reason for the user."""


@dataclass
class MountOptions:
    """``-o`` options in the usual FUSE style."""

    allow_other: bool | None = None  # None: yes when root (a shared folder is for every user)
    read_only: bool = False
    nosuid: bool = True
    nodev: bool = True
    noexec: bool = False
    noatime: bool = False
    fsname: str = "notifyfs"
    subtype: str = "notifyfs"
    readdirplus: str = "auto"  # yes | no | auto
    writeback: bool = True  # ask for it; used only when the server allows it
    async_read: bool = True
    parallel_dirops: bool = True
    max_write: int = MAX_WRITE
    events: str = "both"  # both: local and remote events; local: local events only
    inject: str = "watched"  # watched: only what /proc shows watched; all: every remote event
    reconnect: float = 60.0  # seconds to try to reach a new server after losing one; 0: never
    extra: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> MountOptions:
        o = cls()
        if not text:
            return o
        for item in text.split(","):
            key, _, value = item.strip().partition("=")
            if not key:
                continue
            flag = {"allow_other": ("allow_other", True), "ro": ("read_only", True),
                    "rw": ("read_only", False), "suid": ("nosuid", False),
                    "nosuid": ("nosuid", True), "dev": ("nodev", False), "nodev": ("nodev", True),
                    "exec": ("noexec", False), "noexec": ("noexec", True),
                    "noatime": ("noatime", True), "atime": ("noatime", False),
                    "writeback": ("writeback", True), "no_writeback": ("writeback", False),
                    "async_read": ("async_read", True), "sync_read": ("async_read", False),
                    "parallel_dirops": ("parallel_dirops", True),
                    "no_parallel_dirops": ("parallel_dirops", False),
                    "no_allow_other": ("allow_other", False)}.get(key)
            if flag is not None and not value:
                setattr(o, flag[0], flag[1])
            elif key in ("fsname", "subtype") and value:
                setattr(o, key, value)
            elif key == "readdirplus" and value in ("yes", "no", "auto"):
                o.readdirplus = value
            elif key == "events" and value in ("both", "local"):
                o.events = value
            elif key == "inject" and value in ("watched", "all"):
                o.inject = value
            elif key == "reconnect" and value.replace(".", "", 1).isdigit():
                o.reconnect = float(value)
            elif key == "max_write" and value.isdigit() and 4096 <= int(value) <= MAX_WRITE:
                o.max_write = int(value)
            elif key in ("default_permissions", "rootmode", "user_id", "group_id", "fd"):
                continue  # always set by notifyfs itself
            else:
                raise ValueError(f"unknown or malformed mount option {item!r}")
        return o

    def init_mask(self) -> int:
        """INIT flags the agent takes away from the kernel's offer."""
        mask = 0
        if self.readdirplus == "no":
            mask |= abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO
        elif self.readdirplus == "yes":
            mask |= abi.READDIRPLUS_AUTO
        if not self.writeback:
            mask |= abi.WRITEBACK_CACHE
        if not self.async_read:
            mask |= abi.ASYNC_READ
        if not self.parallel_dirops:
            mask |= abi.PARALLEL_DIROPS
        return mask

    def mount_flags(self) -> int:
        f = 0
        f |= linux_mount.MS_RDONLY if self.read_only else 0
        f |= linux_mount.MS_NOSUID if self.nosuid else 0
        f |= linux_mount.MS_NODEV if self.nodev else 0
        f |= linux_mount.MS_NOEXEC if self.noexec else 0
        f |= linux_mount.MS_NOATIME if self.noatime else 0
        return f


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.stat(path)  # a dead mount may still answer a stat of its root from the cache ...
        if os.path.isdir(path):
            os.listdir(path)  # ... but not this
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {path}: {e.strerror}") from None
        # the agent of an earlier mount here died: its mount is dead (every call ENOTCONN)
        # and can only be detached; do that cleanup for the user, then mount afresh
        log.warning("%s is a dead notifyfs mount (its agent is gone): detaching it", path)
        _detach_dead_mount(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        raise MountError(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    if os.listdir(path):
        raise MountError(f"mountpoint {path} is not empty")
    return path


def _detach_dead_mount(path: str) -> None:
    import subprocess
    try:
        if os.geteuid() == 0:
            linux_mount.umount(path, linux_mount.MNT_DETACH)
        else:
            subprocess.run(["fusermount3", "-u", "-z", path], check=True,
                           stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:
        raise MountError(f"mountpoint {path} is a dead mount that cannot be detached ({e}); "
                         f"run: umount -l {path}") from None


def open_fuse_device() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError("/dev/fuse does not exist (load the fuse module, or pass the device "
                         "into the container)") from None
    except PermissionError:
        raise MountError("/dev/fuse: permission denied") from None


#: connects to the server again: a connected socket and the features agreed in the handshake
Connector = Callable[[], tuple[wire.Stream, int]]


class Relay:
    def __init__(self, sock: wire.Stream, mountpoint: str, options: MountOptions,
                 features: int = 0, connector: Connector | None = None) -> None:
        self.sock = sock
        self.mountpoint = mountpoint
        self.options = options
        self.features = features
        self.devfd = -1
        self.used_fusermount = False
        self.writer = wire.FrameWriter(sock)
        self.lock = threading.Lock()
        self.inflight: dict[int, bytes] = {}  # unique -> the request frame
        #: the kernel's lookup count per nodeid, as the entries it was given minus its FORGETs
        self.kernel_lookups: collections.Counter[int] = collections.Counter()
        self.server_dead = False
        self.notifications: queue.Queue[bytes | None] = queue.Queue()
        self.injector: Injector | None = None
        self._next_unique = AGENT_UNIQUE
        self.done = threading.Event()
        self.exit_code = 0
        self.exit_message = ""
        self._stopping = False
        self._fatal: tuple[int, str] | None = None
        # --- reconnect (guarded by self.lock) ---
        self.connector = connector
        self.view = KernelView()
        self.connected = True
        self.reviving = False
        self.held: list[bytes] = []  # requests that came while there was no server
        self.held_forgets: list[bytes] = []  # FORGETs after the revive snapshot was taken
        self.retry: list[bytes] = []  # idempotent requests in flight when the server was lost
        self.masks: dict[int, int] = {}  # what the guest watches, as last published
        self.reconnects = 0
        self.init_frame = b""  # the kernel's INIT (as sent): a new server must see it first
        self._conn_gen = 0  # which connection the current server-reader serves
        self._waiters: dict[int, tuple[threading.Event, list[bytes]]] = {}

    # --- mounting ----------------------------------------------------------------------------
    @property
    def remote_events(self) -> bool:
        # the injector opens inodes by handle and sets times and owners on any file: root only
        return (bool(self.features & wire.FEATURE_FSNOTIFY) and self.options.events == "both"
                and os.geteuid() == 0)

    def mount(self) -> None:
        o = self.options
        if self.features & wire.FEATURE_READONLY and not self.remote_events:
            # with remote events the VFS mount stays writable so that the injector's calls work;
            # the server refuses every change from the guest with EROFS all the same
            o.read_only = True
        if os.geteuid() == 0:
            self.devfd = open_fuse_device()
            data = (f"fd={self.devfd},rootmode=40000,user_id=0,group_id=0,default_permissions"
                    f",max_read={o.max_write}" + ("" if o.allow_other is False else ",allow_other"))
            try:
                linux_mount.mount(o.fsname, self.mountpoint, "fuse." + o.subtype,
                                  o.mount_flags(), data)
            except OSError as e:
                os.close(self.devfd)
                raise MountError(f"cannot mount {self.mountpoint}: {e.strerror}") from None
        else:
            opts = ["default_permissions", f"fsname={o.fsname}", f"subtype={o.subtype}"]
            opts += ["ro"] if o.read_only else []
            opts += ["allow_other"] if o.allow_other else []
            opts += ["nosuid"] if o.nosuid else []
            opts += ["nodev"] if o.nodev else []
            opts += ["noexec"] if o.noexec else []
            opts += ["noatime"] if o.noatime else []
            try:
                self.devfd = linux_mount.fusermount(self.mountpoint, ",".join(opts))
            except OSError as e:
                raise MountError(f"cannot mount {self.mountpoint}: {e.strerror or e}") from None
            self.used_fusermount = True
        log.info("mounted %s", self.mountpoint)

    def unmount(self, lazy: bool = False) -> None:
        if self.used_fusermount:
            import subprocess
            prog = "fusermount3"
            r = subprocess.run([prog, "-u"] + (["-z"] if lazy else []) + [self.mountpoint],
                               stderr=subprocess.DEVNULL, check=False)
            if r.returncode != 0 and not lazy:
                subprocess.run([prog, "-u", "-z", self.mountpoint], stderr=subprocess.DEVNULL,
                               check=False)
            return
        try:
            linux_mount.umount(self.mountpoint, linux_mount.MNT_DETACH if lazy else 0)
        except OSError as e:
            if e.errno == errno.EBUSY and not lazy:
                linux_mount.umount(self.mountpoint, linux_mount.MNT_DETACH)
            elif e.errno not in (errno.EINVAL, errno.ENOENT):
                raise

    # --- running -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.remote_events:
            self.injector = Injector(self.mountpoint, self._write_dev, self.send_forget,
                                     self.publish_masks, inject_all=self.options.inject == "all",
                                     path_of=self.view.path_of)
        for target, name in ((self._kernel_reader, "kernel-reader"),
                             (self._server_reader, "server-reader"),
                             (self._notifier, "notifier")):
            threading.Thread(target=target, name=name, daemon=True).start()
        if self.injector is not None:
            self.injector.start()

    # --- requests of the agent's own ---------------------------------------------------------
    def _unique(self) -> int:
        with self.lock:
            self._next_unique += 1
            return self._next_unique

    def _send(self, frame: bytes) -> None:
        try:
            self.writer.write(frame)
        except OSError:
            pass

    def send_forget(self, nodeid: int, nlookup: int) -> None:
        """Give back an entry the server counted for an event the kernel did not take."""
        req = Request(abi.Opcode.FORGET, self._unique(), nodeid, arg=abi.FORGET_IN.tuple(nlookup))
        self._send(encode_request(req))

    def publish_masks(self, old: dict[int, int], new: dict[int, int]) -> None:
        """Tell the server what the guest watches (NOTIFYFS_FSNOTIFY), as changes."""
        with self.lock:
            self.masks = dict(new)
        for nodeid, mask in new.items():
            if old.get(nodeid) != mask:
                self._send(events.fsnotify_request(self._unique(), nodeid, mask, events.FSNOTIFY_SET))
        for nodeid in old.keys() - new.keys():
            self._send(events.fsnotify_request(self._unique(), nodeid, 0, events.FSNOTIFY_REMOVE))

    def _injector_request(self, data: bytes, opcode: int, unique: int) -> bytes | None:
        """Let the injector answer its own requests; returns the (possibly rewritten) frame to
        forward, or None if it was answered or swallowed here."""
        inj = self.injector
        assert inj is not None
        if opcode == abi.Opcode.FORGET:
            (nodeid,) = struct.unpack_from("=Q", data, 16)
            return None if is_local(nodeid) else data
        if opcode == abi.Opcode.BATCH_FORGET:
            try:
                req = decode_request(data)
            except ProtocolError:
                return data
            keep = tuple(f for f in req.forgets if not is_local(f[0]))
            if len(keep) == len(req.forgets):
                return data
            if not keep:
                return None
            req.forgets = keep
            req.arg = abi.BATCH_FORGET_IN.tuple(len(keep))
            return encode_request(req)
        (nodeid, _uid, _gid, pid) = struct.unpack_from("=QIII", data, 16)
        if pid != inj.tid and opcode not in _FH_OPS and not is_local(nodeid):
            return data
        try:
            req = decode_request(data)
        except ProtocolError:
            return data
        if not inj.owns(req):
            return data
        answer = inj.answer(req)
        if answer is None:
            return data
        if opcode in _ENTRY_OPS:
            self._count_entries(opcode, answer)
        self.view.observe(data, answer)
        self._write_dev(answer)
        return None

    def wait(self) -> int:
        self.done.wait()
        return self.exit_code

    def finish(self, code: int, message: str = "") -> None:
        if self.done.is_set():
            return
        if self._fatal is not None:  # the server died: that decides, whoever notices the end
            code, message = self._fatal
        self.exit_code = code
        self.exit_message = message
        self.done.set()

    def stop(self) -> None:
        """SIGINT/SIGTERM: unmount and exit 0."""
        if self._stopping:
            return
        self._stopping = True
        with self.lock:  # requests waiting for a new server: there will be none
            waiting = [struct.unpack_from("=Q", f, 8)[0] for f in self.retry + self.held]
            self.retry, self.held = [], []
            self.server_dead = not self.connected or self.server_dead
        for unique in waiting:
            self._write_dev(reply_error(unique, errno.EIO))
        if self.injector is not None:
            self.injector.stop()  # before unmounting: it must not be inside a call on the mount
        try:
            self.unmount()
        except OSError as e:
            log.warning("unmount failed: %s", e)
        self.finish(0)

    def _count_entries(self, opcode: int, frame: bytes) -> None:
        """Count the nodeids a reply hands the kernel (each is one lookup it will FORGET)."""
        if len(frame) < abi.OUT_HEADER.size + abi.ENTRY_OUT.size:
            return  # an error reply
        try:
            if opcode == abi.Opcode.READDIRPLUS:
                ids = [abi.ENTRY_OUT.unpack_from(e).nodeid
                       for *_rest, e in parse_dirents(frame[abi.OUT_HEADER.size:], plus=True)]
            else:
                ids = [abi.ENTRY_OUT.unpack_from(frame, abi.OUT_HEADER.size).nodeid]
        except ProtocolError:
            return
        with self.lock:
            for nodeid in ids:
                if nodeid:
                    self.kernel_lookups[nodeid] += 1

    def _count_forgets(self, forgets: list[tuple[int, int]]) -> None:
        gone = []
        with self.lock:
            for nodeid, n in forgets:
                left = self.kernel_lookups[nodeid] - n
                if left > 0:
                    self.kernel_lookups[nodeid] = left
                else:
                    del self.kernel_lookups[nodeid]
                    gone.append(nodeid)
        for nodeid in gone:
            self.view.forgotten(nodeid)

    def stats(self) -> dict[str, object]:
        with self.lock:
            kl = dict(self.kernel_lookups)
        out: dict[str, object] = {"kernel_inodes": len(kl), "kernel_nlookup": sum(kl.values()),
                                  "in_flight": len(self.inflight), "reconnects": self.reconnects,
                                  "connected": self.connected}
        if self.injector is not None:
            out["injector"] = dict(self.injector.stats)
        return out

    def _write_dev(self, frame: bytes) -> None:
        try:
            os.write(self.devfd, frame)
        except OSError as e:
            # ENOENT: the request was interrupted or aborted meanwhile; nothing to answer
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("write to /dev/fuse failed: %s", e)

    def _kernel_reader(self) -> None:
        mask = self.options.init_mask()
        while True:
            try:
                data = os.read(self.devfd, READ_BUFFER)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                if e.errno == errno.ENODEV:
                    log.info("%s was unmounted", self.mountpoint)
                    self.finish(0)
                else:
                    self.finish(1, f"reading /dev/fuse failed: {e.strerror}")
                return
            if len(data) < abi.IN_HEADER.size:
                continue
            opcode, unique = struct.unpack_from("=IIQ", data)[1:]
            if opcode == abi.Opcode.INIT and mask:
                buf = bytearray(data)
                (flags,) = struct.unpack_from("=I", buf, _INIT_FLAGS_OFFSET)
                struct.pack_into("=I", buf, _INIT_FLAGS_OFFSET, flags & ~mask & 0xFFFFFFFF)
                if len(buf) >= _INIT_FLAGS2_OFFSET + 4:
                    (flags2,) = struct.unpack_from("=I", buf, _INIT_FLAGS2_OFFSET)
                    struct.pack_into("=I", buf, _INIT_FLAGS2_OFFSET, flags2 & ~(mask >> 32))
                data = bytes(buf)
            if opcode == abi.Opcode.INIT:
                self.init_frame = data
            if opcode == abi.Opcode.FORGET and len(data) >= abi.IN_HEADER.size + 8:
                self._count_forgets([struct.unpack_from("=Q", data, 16) + struct.unpack_from(
                    "=Q", data, abi.IN_HEADER.size)])
            elif opcode == abi.Opcode.BATCH_FORGET:
                try:
                    self._count_forgets(list(decode_request(data).forgets))
                except ProtocolError:
                    pass
            elif opcode in (abi.Opcode.RELEASE, abi.Opcode.RELEASEDIR) and len(data) >= 48:
                self.view.released(struct.unpack_from("=Q", data, abi.IN_HEADER.size)[0])
            if self.injector is not None:
                fwd = self._injector_request(data, opcode, unique)
                if fwd is None:
                    continue
                data = fwd
            needs_reply = opcode not in _NO_REPLY
            with self.lock:
                dead = self.server_dead
                connected = self.connected
                writer = self.writer
                if not dead and connected and needs_reply:
                    self.inflight[unique] = data
                elif not dead and not connected:
                    if opcode == abi.Opcode.FLUSH:
                        # a close(2) in any process (a fork closing what it inherited, too)
                        # must not wait for a new server: the dirty pages stay in the guest
                        # and are written (and their errors reported) by WRITE and FSYNC
                        pass
                    elif needs_reply:
                        self.held.append(data)  # sent once a new server has taken over
                    elif self.reviving and opcode != abi.Opcode.INTERRUPT:
                        self.held_forgets.append(data)  # after the counts the revive carries
            if dead:
                if needs_reply:
                    self._write_dev(reply_error(unique, errno.EIO))
                continue
            if not connected:
                if opcode == abi.Opcode.FLUSH:
                    self._write_dev(abi.OUT_HEADER.pack(abi.OUT_HEADER.size, 0, unique))
                continue
            try:
                writer.write(data)
            except OSError:
                pass  # the server reader notices the dead connection and deals with in-flight

    def _server_reader(self) -> None:
        with self.lock:
            sock, gen = self.sock, self._conn_gen
        reader = wire.FrameReader(sock, wire.REPLY_MIN)
        reason = "the server closed the connection"
        while True:
            try:
                frame = reader.read()
            except ProtocolError as e:
                reason = f"the server sent garbage ({e})"
                frame = None
            if frame is None:
                break
            (unique,) = struct.unpack_from("=Q", frame, 8)
            if unique == 0:
                if struct.unpack_from("=i", frame, 4)[0] == abi.NotifyCode.NOTIFYFS_HANDLE:
                    self.view.handle_notification(frame[abi.OUT_HEADER.size:])
                elif self.injector is not None:
                    self._invalidate_early(frame)
                    self.injector.submit(frame)
                else:
                    self.notifications.put(frame)
                continue
            if unique & AGENT_UNIQUE:
                with self.lock:  # the answer to one of the agent's own requests
                    waiter = self._waiters.pop(unique, None)
                if waiter is not None:
                    waiter[1].append(frame)
                    waiter[0].set()
                continue
            with self.lock:
                request = self.inflight.pop(unique, b"")
            opcode = struct.unpack_from("=I", request, 4)[0] if request else 0
            if opcode in _ENTRY_OPS:
                self._count_entries(opcode, frame)
            if request:
                self.view.observe(request, frame)
            self._write_dev(frame)
        try:
            sock.close()
        except OSError:
            pass
        with self.lock:
            current = gen == self._conn_gen
        if current:
            self._server_lost(reason)

    def _invalidate_early(self, frame: bytes) -> None:
        """Have the notifier drop what the guest caches of a file a remote event changed, now,
        not when the injector (which may be far behind) gets to the event."""
        if struct.unpack_from("=i", frame, 4)[0] != abi.NotifyCode.NOTIFYFS_EVENT:
            return
        try:
            ev = events.decode_event(frame[abi.OUT_HEADER.size:])
        except ProtocolError:
            return  # the injector reports it
        for inval in events.invalidations(ev):
            self.notifications.put(inval)

    def _server_lost(self, reason: str) -> None:
        can_revive = (self.connector is not None and self.options.reconnect > 0
                      and bool(self.features & wire.FEATURE_REVIVE))
        with self.lock:
            pending = sorted(self.inflight.items())
            self.inflight.clear()
            for waiter in self._waiters.values():
                waiter[0].set()
            retry: list[bytes] = []
            uncertain: list[int] = []
            if can_revive and not (self.done.is_set() or self._stopping):
                self.connected = False
                for unique, frame in pending:
                    if self._retryable(frame):
                        retry.append(frame)
                    else:
                        uncertain.append(unique)
                self.retry.extend(retry)
            else:
                self.server_dead = True
        if self.done.is_set() or self._stopping:
            return
        if can_revive:
            log.warning("%s: reconnecting (for up to %gs); %d request(s) in flight will be "
                        "retried, %d fail with EIO", reason, self.options.reconnect, len(retry),
                        len(uncertain))
            for unique in uncertain:
                self._write_dev(reply_error(unique, errno.EIO))
            threading.Thread(target=self._reconnect, args=(reason,), name="reconnect",
                             daemon=True).start()
            return
        self._give_up(reason, [u for u, _f in pending])

    def _retryable(self, frame: bytes) -> bool:
        opcode = struct.unpack_from("=I", frame, 4)[0]
        if opcode not in _IDEMPOTENT:
            return False
        if opcode == abi.Opcode.WRITE:
            fh = struct.unpack_from("=Q", frame, abi.IN_HEADER.size)[0]
            return not self.view.appends(fh)
        return True

    def _reconnect(self, reason: str) -> None:
        """Reach a server again, hand it what the kernel holds, then let the requests go."""
        assert self.connector is not None
        deadline = time.monotonic() + self.options.reconnect
        delay = 0.05
        while not (self._stopping or self.done.is_set()):
            try:
                sock, features = self.connector()
            except (OSError, wire.HandshakeError) as e:
                if time.monotonic() + delay > deadline:
                    self._give_up(f"{reason}; no server within {self.options.reconnect:g}s "
                                  f"(last: {e})")
                    return
                log.info("reconnect failed (%s); next try in %.2fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if not features & wire.FEATURE_REVIVE:
                sock.close()
                self._give_up(f"{reason}; the new server cannot take over (no revive)")
                return
            try:
                self._revive(sock, features)
            except (OSError, ProtocolError, TimeoutError) as e:
                log.warning("handing over to the new server failed: %s", e)
                try:
                    sock.close()
                except OSError:
                    pass
                with self.lock:
                    self.reviving = False
                    self.held_forgets.clear()
                if time.monotonic() > deadline:
                    self._give_up(f"{reason}; handing over failed: {e}")
                    return
                time.sleep(delay)
                continue
            return

    def _revive(self, sock: wire.Stream, features: int) -> None:
        writer = wire.FrameWriter(sock)
        with self.lock:
            self._conn_gen += 1
            self.sock = sock
            self.features = features
            self.reviving = True
            lookups = dict(self.kernel_lookups)
            masks = dict(self.masks)
        threading.Thread(target=self._server_reader, name="server-reader", daemon=True).start()
        if self.init_frame:  # the same session as before: flags, minor, max_write
            init = bytearray(self.init_frame)
            struct.pack_into("=Q", init, 8, self._unique())
            writer.write(bytes(init))
        request = self.view.revive_request(lookups, masks)
        stale = stale_files = 0
        for chunk in revive.split(request):
            unique = self._unique()
            done = threading.Event()
            answer: list[bytes] = []
            with self.lock:
                self._waiters[unique] = (done, answer)
            writer.write(revive.encode_revive(unique, chunk))
            if not done.wait(REVIVE_TIMEOUT) or not answer:
                raise TimeoutError("no answer to NOTIFYFS_REVIVE")
            (err,) = struct.unpack_from("=i", answer[0], 4)
            if err:
                raise ProtocolError(f"NOTIFYFS_REVIVE failed: {errno.errorcode.get(-err, err)}")
            result = revive.decode_result(answer[0][abi.OUT_HEADER.size:])
            stale += len(result.stale)
            stale_files += len(result.stale_files)
        with self.lock:
            self.writer = writer
            self.connected = True
            self.reviving = False
            self.reconnects += 1
            forgets, self.held_forgets = self.held_forgets, []
            resend = self.retry + self.held
            self.retry, self.held = [], []
            for frame in resend:
                self.inflight[struct.unpack_from("=Q", frame, 8)[0]] = frame
        for frame in forgets + resend:
            try:
                writer.write(frame)
            except OSError:
                break  # lost again: the new server-reader deals with it
        log.warning("reconnected: %d inode(s), %d open file(s) handed over (%d and %d stale); "
                    "%d request(s) sent again", len(lookups), len(request.files), stale,
                    stale_files, len(resend))

    def _give_up(self, reason: str, pending: list[int] | None = None) -> None:
        with self.lock:
            self.server_dead = True
            self.connected = True  # nothing is held any more: the kernel-reader answers EIO
            waiting = [struct.unpack_from("=Q", f, 8)[0] for f in self.retry + self.held]
            self.retry, self.held = [], []
            pending = sorted((pending or []) + waiting + list(self.inflight))
            self.inflight.clear()
        if self.done.is_set() or self._stopping:
            return
        self._fatal = (1, f"notifyfs: lost the server: {reason}")
        log.error("%s: failing %d request(s) in flight and unmounting", reason, len(pending))
        for unique in pending:
            self._write_dev(reply_error(unique, errno.EIO))
        if self.injector is not None:
            self.injector.stop(timeout=2.0)  # out of the mount before this process ends
        try:
            self.unmount(lazy=True)
        except OSError as e:
            log.warning("unmount failed: %s", e)
        self.finish(1, f"notifyfs: lost the server: {reason}")

    def _notifier(self) -> None:
        while True:
            frame = self.notifications.get()
            if frame is None:
                return
            self._write_dev(frame)
