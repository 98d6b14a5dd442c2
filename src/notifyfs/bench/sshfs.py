"""sshfs over loopback as the data-path baseline: installs openssh-server and sshfs with apt if
they are missing, starts a private sshd on 127.0.0.1 with a throwaway key, mounts with sshfs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from .common import fuse_mounted, stop, unmount, wait_until

SSHD = "/usr/sbin/sshd"


class SshfsUnavailable(Exception):
    """Why the sshfs column is left out."""


def ensure_installed(timeout: float) -> None:
    if shutil.which("sshfs") and os.path.exists(SSHD):
        return
    if not shutil.which("apt-get"):
        raise SshfsUnavailable("sshfs or sshd missing and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "openssh-server", "sshfs"]):
            subprocess.run(cmd, env=env, check=True, timeout=timeout, capture_output=True)
    except subprocess.TimeoutExpired:
        raise SshfsUnavailable(f"installing openssh-server and sshfs took over {timeout:.0f} s") from None
    except subprocess.CalledProcessError as e:
        tail = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if e.stderr else []
        raise SshfsUnavailable(f"apt-get failed: {' '.join(tail)}") from None
    if not (shutil.which("sshfs") and os.path.exists(SSHD)):
        raise SshfsUnavailable("sshfs or sshd still missing after apt-get install")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshfs:
    def __init__(self, backing: Path, mnt: Path, work: Path) -> None:
        self.backing, self.mnt, self.work = backing, mnt, work
        self.sshd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sshfs:
        w = self.work
        w.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        for name in ("key", "hostkey"):
            if not (w / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(w / name)],
                               check=True, capture_output=True)
        (w / "authorized_keys").write_bytes((w / "key.pub").read_bytes())
        port = _free_port()
        (w / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {w / 'hostkey'}\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile {w / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(w / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(w / "sshd.log", "wb"))

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return True
            except OSError:
                return False

        if not wait_until(listening, 10, 0.1):
            self.__exit__()
            raise SshfsUnavailable(f"sshd did not start: {(w / 'sshd.log').read_text()[-300:]}")
        r = subprocess.run(
            ["sshfs", f"root@127.0.0.1:{self.backing}", str(self.mnt), "-o",
             f"port={port},IdentityFile={w / 'key'},StrictHostKeyChecking=no,"
             "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR"],
            capture_output=True, timeout=30)
        if r.returncode != 0 or not wait_until(lambda: fuse_mounted(self.mnt), 10):
            self.__exit__()
            raise SshfsUnavailable(f"sshfs failed: {r.stderr.decode(errors='replace').strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        unmount(self.mnt)
        stop(self.sshd)
