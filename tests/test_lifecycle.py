"""How the processes start and end: signals, external unmount, a dying server, bad arguments."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (NOTIFYFS, ServedPair, force_unmount, is_mounted, requires_mount, start_share,
                      wait_for)

pytestmark = requires_mount


def _run(*args: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOTIFYFS, *args], capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_and_exits_zero(tmp_path: Path, sig: signal.Signals) -> None:
    s = start_share(tmp_path / "src", tmp_path / "mnt")
    try:
        (s.mnt / "f").write_text("x")
        s.proc.send_signal(sig)
        assert s.proc.wait(10) == 0, s.output()
        assert not is_mounted(s.mnt)
        assert (s.src / "f").read_text() == "x"
    finally:
        s.stop()


def test_external_umount_exits_zero(tmp_path: Path) -> None:
    s = start_share(tmp_path / "src", tmp_path / "mnt")
    try:
        subprocess.run(["umount", str(s.mnt)], check=True, timeout=10)
        assert s.proc.wait(10) == 0, s.output()
    finally:
        s.stop()


def test_unmount_while_busy_still_exits(tmp_path: Path) -> None:
    """SIGTERM with a process sitting in the mount: the agent detaches and exits 0, no hang."""
    s = start_share(tmp_path / "src", tmp_path / "mnt")
    holder = subprocess.Popen(["sleep", "30"], cwd=s.mnt)
    try:
        s.proc.terminate()
        assert s.proc.wait(10) == 0, s.output()
        assert not is_mounted(s.mnt)
    finally:
        holder.kill()
        holder.wait()
        s.stop()


def test_serve_and_mount_as_separate_processes(tmp_path: Path) -> None:
    pair = ServedPair(tmp_path)
    try:
        agent = pair.mount()
        assert is_mounted(pair.mnt)
        (pair.export / "a").write_text("host")
        assert (pair.mnt / "a").read_text() == "host"
        (pair.mnt / "b").write_text("guest")
        assert (pair.export / "b").read_text() == "guest"
        assert (pair.export / "b").stat().st_mode & 0o777 == 0o644
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        assert not is_mounted(pair.mnt)
    finally:
        pair.close()


def test_server_killed_during_reads(tmp_path: Path) -> None:
    """SIGKILL the server while a guest process reads: the reader gets an error within a second,
    never hangs, and the agent exits non-zero with a message."""
    pair = ServedPair(tmp_path)
    try:
        (pair.export / "data").write_bytes(os.urandom(1 << 20))
        agent = pair.mount("-o", "sync_read,reconnect=0")
        assert is_mounted(pair.mnt)
        result: dict[str, object] = {}

        def reader() -> None:
            try:
                fd = os.open(pair.mnt / "data", os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                result["error"] = e
                return
            try:
                while True:
                    os.pread(fd, 4096, 0)
                    result["reads"] = int(result.get("reads", 0)) + 1  # type: ignore[call-overload]
            except OSError as e:
                result["error"] = e
                result["at"] = time.monotonic()
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass  # closing a file of a dead connection may report EIO

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert wait_for(lambda: int(result.get("reads", 0)) > 10, 10), result  # type: ignore[call-overload]
        killed = time.monotonic()
        pair.kill_server()
        t.join(5)
        assert not t.is_alive(), "the reader hung after the server died"
        assert isinstance(result.get("error"), OSError)
        assert float(result["at"]) - killed < 1.0  # type: ignore[arg-type]
        assert agent.wait(10) != 0
        assert "lost the server" in pair.agent_output()
        assert wait_for(lambda: not is_mounted(pair.mnt), 5)
        # a new call on the old mountpoint does not hang either
        start = time.monotonic()
        os.listdir(pair.mnt)
        assert time.monotonic() - start < 1.0
    finally:
        pair.close()


def test_bad_token_and_wrong_peer(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    pair = ServedPair(tmp_path, "--token-file", str(token))
    try:
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        r = _run("mount", f"unix:{pair.sock}", str(pair.mnt), "-f", "--token-file", str(wrong))
        assert r.returncode != 0 and "bad token" in r.stderr
        assert not is_mounted(pair.mnt)
        ok = pair.mount("--token-file", str(token))
        assert is_mounted(pair.mnt), ok
    finally:
        pair.close()
    # a peer that is not a notifyfs server
    path = tmp_path / "not-notifyfs.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def garbage() -> None:
        c, _ = srv.accept()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        time.sleep(1)
        c.close()

    threading.Thread(target=garbage, daemon=True).start()
    mnt = tmp_path / "mnt2"
    mnt.mkdir()
    r = _run("mount", f"unix:{path}", str(mnt), "-f")
    srv.close()
    assert r.returncode != 0 and "not notifyfs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_background_mount_returns_when_mounted(tmp_path: Path) -> None:
    pair = ServedPair(tmp_path)
    try:
        r = _run("mount", f"unix:{pair.sock}", str(pair.mnt))
        assert r.returncode == 0, r.stderr
        assert is_mounted(pair.mnt)
        (pair.export / "x").write_text("1")
        assert (pair.mnt / "x").read_text() == "1"
        subprocess.run(["umount", str(pair.mnt)], check=True, timeout=10)
    finally:
        pair.close()


@pytest.mark.parametrize("case", ["missing-src", "src-is-file", "mnt-missing", "mnt-not-empty",
                                  "mnt-is-file", "bad-option"])
def test_share_bad_arguments(tmp_path: Path, case: str) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    extra: list[str] = []
    if case == "missing-src":
        src = tmp_path / "nope"
    elif case == "src-is-file":
        src = tmp_path / "file"
        src.write_text("")
    elif case == "mnt-missing":
        mnt = tmp_path / "nope"
    elif case == "mnt-not-empty":
        (mnt / "x").write_text("")
    elif case == "mnt-is-file":
        mnt = tmp_path / "file2"
        mnt.write_text("")
    elif case == "bad-option":
        extra = ["-o", "frobnicate"]
    try:
        r = _run("share", str(src), str(mnt), *extra)
    finally:
        force_unmount(mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("notifyfs: error:"), r.stderr


def test_no_dev_fuse_is_a_clear_error(tmp_path: Path) -> None:
    """Inside a mount namespace where /dev/fuse is hidden, share refuses with one line."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    cmd = ("mount -t tmpfs none /dev && exec " + " ".join(NOTIFYFS) + f" share {src} {mnt}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "/dev/fuse does not exist" in r.stderr, r.stderr


def test_unprivileged_mount_through_fusermount3(tmp_path: Path) -> None:
    """A non-root user mounts through fusermount3's fd passing."""
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is not installed (Debian package fuse3)")
    nobody = pwd.getpwnam("nobody")

    def demote() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    # the test's own interpreter may live under /root; the agent needs only the standard library,
    # so an unprivileged user runs it with the system Python and the checkout's src/
    src_dir = str(Path(__file__).resolve().parent.parent / "src")
    user_cmd = ["/usr/bin/python3", "-m", "notifyfs"]
    user_env = dict(os.environ, PYTHONPATH=src_dir)
    try:
        probe = subprocess.run([*user_cmd, "--version"], preexec_fn=demote, capture_output=True,
                               timeout=30, env=user_env)
    except (PermissionError, FileNotFoundError):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("/usr/bin/python3 or this checkout is not usable by an unprivileged user, "
                    "so an unprivileged agent cannot run here")
    base = Path(tempfile.mkdtemp(prefix="notifyfs-user-"))
    os.chmod(base, 0o755)
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    for p in (base, src, mnt):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    env = dict(user_env, HOME=str(base))

    # Debian's udev makes /dev/fuse 0666 (fusermount3 opens it as the user); this machine's is
    # 0600, so open it up for the test and put it back afterwards
    dev_mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    proc = subprocess.Popen([*user_cmd, "share", str(src), str(mnt)], preexec_fn=demote,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, 15)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        subprocess.run(["sh", "-c", f"echo hi > {mnt}/f"], preexec_fn=demote, check=True,
                       timeout=10)
        st = (src / "f").stat()
        assert (st.st_uid, (src / "f").read_text()) == (nobody.pw_uid, "hi\n")
        proc.terminate()
        assert proc.wait(10) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.chmod("/dev/fuse", dev_mode)
        force_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)
