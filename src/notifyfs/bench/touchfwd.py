""""Touch forwarding", the way Lima, Colima and notify-forwarder bring host changes to a guest:
a host process watches the host directory and sends each changed path over a socket; the guest
process touches that path on its mount, so guest watchers see an ATTRIB (a deletion cannot be
touched and is never seen). ``python -m notifyfs.bench.touchfwd HOSTDIR GUESTDIR`` runs both ends,
in two processes joined by a socket, until stdin closes."""

from __future__ import annotations

import os
import select
import socket
import sys

from ..linux import inotify as ino

_MASK = ino.IN_CREATE | ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_DELETE | ino.IN_ATTRIB


def host(hostdir: str, sock: socket.socket) -> None:
    notify = ino.Inotify(ino.IN_CLOEXEC)
    notify.add_watch(hostdir, _MASK)
    while True:
        r, _, _ = select.select([notify.fd, 0], [], [])
        if 0 in r and not os.read(0, 4096):
            return
        if notify.fd in r:
            names = [ev.name for ev in notify.read(1 << 20) if ev.name]
            if names:
                sock.sendall(b"".join(n + b"\n" for n in names))


def guest(guestdir: str, sock: socket.socket) -> None:
    buf = b""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
        *names, buf = buf.split(b"\n")
        for name in names:
            try:
                os.utime(os.path.join(os.fsencode(guestdir), name))
            except OSError:
                pass  # gone (a deletion): nothing to touch


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    hostdir, guestdir = args
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        guest(guestdir, b)
        os._exit(0)
    b.close()
    host(hostdir, a)
    a.close()
    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
