"""mount(2)/umount2(2) and the fusermount3 fd-passing protocol."""

from __future__ import annotations

import array
import ctypes
import os
import shutil
import socket
import subprocess

from .libc import check
from .libc import libc as _libc

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MNT_FORCE = 1
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    check(_libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()),
          f"mount {target}", target)


def umount(target: str, flags: int = 0) -> None:
    check(_libc.umount2(os.fsencode(target), flags), f"umount {target}", target)


def fusermount(target: str, options: str) -> int:
    """Mount through fusermount3 (unprivileged): returns the /dev/fuse fd it passes back."""
    prog = shutil.which("fusermount3") or shutil.which("fusermount")
    if prog is None:
        raise OSError(2, "fusermount3 not found (install the fuse3 package)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([prog, "-o", options, "--", target], env=env,
                                pass_fds=[theirs.fileno()], stderr=subprocess.PIPE)
        theirs.close()
        fds = array.array("i")
        _msg, anc, _flags, _addr = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        err = proc.communicate(timeout=30)[1].decode(errors="replace").strip()
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise OSError(1, f"fusermount3 failed: {err or 'no file descriptor received'}")
        return fds[0]
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()



def mount_id(path: str) -> int:
    """The mount id (first field of /proc/self/mountinfo) of the topmost mount at ``path``;
    -1 if nothing is mounted there."""
    real = os.path.realpath(path)
    found = -1
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                found = int(fields[0])
    return found
