"""What the host test and the guest driver share: the control channel and the client script.

Standard library only: the guest runs it with Debian's python3.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

#: the virtio-serial port names QEMU gives the agent's channel and the control channel
AGENT_PORT = "notifyfs.0"
CONTROL_PORT = "notifyfs.ctl"
#: where the guest mounts each shared folder of the same host directory
MOUNTS = {"notifyfs": "/mnt/notifyfs", "virtiofs": "/mnt/virtiofs", "9p": "/mnt/9p"}
VSOCK_PORT = 7031
#: between the client script's steps: a person editing, not a burst. A burst can outrun the
#: server (see the README's Limits: a change to a name removed right after may arrive as the
#: removal alone); the oracle scenarios cover bursts.
PACE = 0.3
#: the watcher clients the guest runs, each in its own directory
CLIENTS = ("inotifywait", "watchdog")


class Channel:
    """JSON messages, one a line, over a byte stream (a socket on the host, a port in the guest)."""

    def __init__(self, recv: Any, send: Any) -> None:
        self._recv = recv
        self._send = send
        self.buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        self._send(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            chunk = self._recv(1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Ask the other side to do ``op`` and wait for its answer."""
        self.send({"op": op, **args})
        answer = self.recv()
        if answer is None:
            raise ConnectionError(f"{op}: the other side closed the channel")
        if answer.get("error"):
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer


def client_script(root: Path) -> None:
    """The host-side changes the watcher clients (inotifywait, watchdog) are shown."""
    with open(root / "new.txt", "w") as f:
        f.write("one\n")
    time.sleep(PACE)
    with open(root / "new.txt", "a") as f:
        f.write("two\n")
    time.sleep(PACE)
    os.chmod(root / "new.txt", 0o600)
    time.sleep(PACE)
    os.rename(root / "new.txt", root / "renamed.txt")
    time.sleep(PACE)
    # nothing inside the new directory: whether a recursive watcher has its watch there in time
    # depends on timing, locally as much as on a share
    os.mkdir(root / "sub")
    time.sleep(PACE)
    os.unlink(root / "renamed.txt")


def tree(root: Path) -> dict[str, list[Any]]:
    """Everything about a tree a change can set: types, modes, owners, sizes, contents, targets."""
    out: dict[str, list[Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            entry: list[Any] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                entry += [st.st_size, hashlib.sha256(p.read_bytes()).hexdigest()[:16], st.st_nlink]
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            out[str(p.relative_to(root))] = entry
    return out


def canonical(events: list[Any] | None) -> list[Any] | None:
    """Events with each run of consecutive DELETEs in one directory sorted by name.

    ``rm -r`` (shutil.rmtree) removes a directory's entries in readdir order, and two ext4
    file systems (the host's export, the guest's local disk) hash names differently: the
    order of those deletions says nothing about the share.
    """
    if events is None:
        return None
    out: list[Any] = []
    run: list[Any] = []
    for ev in [*events, None]:
        if ev is not None and ev[1] == "DELETE" and (not run or run[0][0] == ev[0]):
            run.append(ev)
            continue
        out.extend(sorted(run, key=lambda e: e[2]))
        run = []
        if ev is not None:
            if ev[1] == "DELETE":
                run.append(ev)
            else:
                out.append(ev)
    return out


def same(local: list[Any] | None, remote: list[Any] | None) -> bool:
    return local is not None and canonical(local) == canonical(remote)
