"""Data safety: fsync reaches the host's disk, a full host disk is reported to the guest without
losing what was written before, and concurrent writers on both sides never leave a mix of blocks.

Each test runs a real ``notifyfs share`` (default mode and ``--writeback``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Share, can_mount, start_share, wait_for

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")

MODES = [pytest.param([], id="default"), pytest.param(["--writeback"], id="writeback")]


def _stats(share: Share, path: Path) -> dict:  # type: ignore[type-arg]
    path.unlink(missing_ok=True)
    share.proc.send_signal(signal.SIGUSR1)
    assert wait_for(path.exists, 5), "no stats written"
    return json.loads(path.read_text())["server"][0]  # type: ignore[no-any-return]


def _traced_by(pid: int, tracer: subprocess.Popen[bytes]) -> bool:
    """Every thread of ``pid`` is traced by ``tracer``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:") and int(line.split()[1]) != tracer.pid:
                    return False
    return True


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a host disk that fills up."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


# --- fsync ----------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_fsync_reaches_the_host_fd(tmp_path: Path, mode: list[str]) -> None:
    """The guest's fsync and fdatasync become fsync(2)/fdatasync(2) on the host fd of that very
    file (strace on the server shows the call and the path behind the fd), answered only after
    they return, and counted; a server that answered FSYNC without calling them fails here."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    stats = tmp_path / "stats.json"
    share = start_share(src, mnt, "--stats-file", str(stats), *mode)
    tracer = None
    try:
        base = _stats(share, stats)["fsyncs"]
        if shutil.which("strace"):
            trace = tmp_path / "strace.out"
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync",
                                       "-o", str(trace), "-p", str(share.proc.pid)],
                                      stderr=subprocess.DEVNULL)
            # strace attaches to the threads one by one: wait until it holds every one
            if not wait_for(lambda: _traced_by(share.proc.pid, tracer) or tracer.poll() is not None,
                            20) or tracer.poll() is not None:
                tracer.kill()
                tracer.wait()
                tracer = None  # ptrace not allowed here (a container): the counter must do
        fd = os.open(mnt / "durable", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"a" * 100000)
            os.fsync(fd)
            os.write(fd, b"b" * 1000)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if tracer is not None:
            time.sleep(0.5)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        # counted by the server (read once strace has let go: it delays signals)
        assert _stats(share, stats)["fsyncs"] >= base + 2
        assert (src / "durable").read_bytes() == b"a" * 100000 + b"b" * 1000
        if tracer is not None:
            out = trace.read_text()
            path = re.escape(str((src / "durable").resolve()))
            assert re.search(rf"\bfsync\(\d+<{path}>\) += 0", out), out
            assert re.search(rf"\bfdatasync\(\d+<{path}>\) += 0", out), out
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        share.stop()


# --- a full disk ----------------------------------------------------------------------------------

def _fill(path: Path, chunk: int) -> tuple[int, OSError | None, str]:
    """Write ``chunk``-byte blocks (block i filled with byte i % 251) until an error or 16 MiB
    (twice the disk: a writeback cache takes it all and fails later); fsync and close. Returns the
    bytes write() accepted, the first error, and which call reported it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    err: OSError | None = None
    where = ""
    try:
        for i in range((16 << 20) // chunk):
            try:
                written += os.write(fd, bytes([i % 251]) * chunk)
            except OSError as e:
                err, where = e, "write"
                break
        try:
            os.fsync(fd)
        except OSError as e:
            err, where = err or e, where or "fsync"
    finally:
        try:
            os.close(fd)
        except OSError as e:
            if err is None:
                err, where = e, "close"
    return written, err, where


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_full_host_disk(tmp_path: Path, tmpfs: Path, mode: list[str]) -> None:
    """The export is an 8 MiB tmpfs. A file written and fsynced before is intact; the write that
    does not fit fails with ENOSPC (in writeback mode at the latest at fsync); every byte the
    guest was told was written is on the host as written; after freeing space all works again."""
    mnt = tmp_path / "mnt"
    share = start_share(tmpfs, mnt, *mode)
    try:
        keep = os.urandom(1 << 20)
        with open(mnt / "keep", "wb") as f:
            f.write(keep)
            f.flush()
            os.fsync(f.fileno())
        written, err, where = _fill(mnt / "big", 64 << 10)
        assert err is not None and err.errno == errno.ENOSPC, (err, where)
        if not mode:
            assert where == "write", "without writeback the failing write itself reports ENOSPC"
        # nothing written before is lost
        assert (tmpfs / "keep").read_bytes() == keep
        assert (mnt / "keep").read_bytes() == keep
        host = (tmpfs / "big").read_bytes()
        if where == "write":
            # what write() accepted is there, block by block, exactly
            assert len(host) >= written
            for i in range(written // (64 << 10)):
                blk = host[i * (64 << 10):(i + 1) * (64 << 10)]
                assert blk == bytes([i % 251]) * (64 << 10), f"block {i} damaged"
        else:
            # writeback: what reached the host is made of whole, correct blocks (a page-aligned
            # prefix of each block at worst), never another block's bytes
            for i in range(0, len(host), 4096):
                page = host[i:i + 4096]
                want = bytes([(i // (64 << 10)) % 251])
                assert page == want * len(page) or page == b"\0" * len(page), f"page at {i}"
        # the disk is full, not broken: free space and write again
        os.unlink(mnt / "big")
        # the host frees the blocks when the server closes its last fd on the file, which is
        # when the guest kernel forgets the inode (FORGET arrives a moment after the unlink)
        def freed() -> bool:
            st = os.statvfs(tmpfs)
            return st.f_bavail * st.f_frsize > 4 << 20
        assert wait_for(freed, 10), "the deleted file's space never came back"
        (mnt / "after").write_bytes(b"ok" * 1000)
        assert (tmpfs / "after").read_bytes() == b"ok" * 1000
        assert share.proc.poll() is None
    finally:
        share.stop()
    assert "Traceback" not in share.output()


# --- concurrent writers ---------------------------------------------------------------------------

SIZE = 256 << 10


def _uniform(data: bytes) -> int | None:
    """The byte a whole version is made of, or None for a mix (or a wrong size)."""
    if len(data) != SIZE or data.count(data[:1]) != SIZE:
        return None
    return data[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_concurrent_whole_file_writes_never_mix(tmp_path: Path, mode: list[str]) -> None:
    """A guest and a host process rewrite the same 256 KiB file at the same moment, each with one
    write of a whole version. Afterwards the host file is one of the two versions, and the guest,
    once the change has been announced, reads that same whole version: never pages of a stale
    cache mixed with new ones."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    (src / "f").write_bytes(b"\0" * SIZE)
    share = start_share(src, mnt, *mode)
    try:
        assert (mnt / "f").read_bytes() == b"\0" * SIZE  # cached in the guest
        outcomes = {"guest": 0, "host": 0}
        prev = 0
        rng = random.Random(7)
        for rnd in range(40):
            g, h = 2 * rnd + 1, 2 * rnd + 2  # this round's versions
            go = threading.Barrier(2)

            def host_writer(h: int = h, go: threading.Barrier = go) -> None:
                fd = os.open(src / "f", os.O_WRONLY)
                try:
                    go.wait()
                    time.sleep(rng.uniform(0, 0.004))
                    os.pwrite(fd, bytes([h]) * SIZE, 0)
                finally:
                    os.close(fd)

            t = threading.Thread(target=host_writer)
            t.start()
            fd = os.open(mnt / "f", os.O_WRONLY)
            try:
                go.wait()
                time.sleep(rng.uniform(0, 0.004))  # either side may go first, or both at once
                assert os.pwrite(fd, bytes([g]) * SIZE, 0) == SIZE
                os.fsync(fd)
            finally:
                os.close(fd)
            t.join(10)
            final = _uniform((src / "f").read_bytes())
            assert final in (g, h), f"round {rnd}: the host file is a mix of versions"
            outcomes["guest" if final == g else "host"] += 1

            # the guest converges on the host's version, and is whole at every read
            def agrees(final: int = final, rnd: int = rnd, ok: tuple[int, ...] = (g, h, prev)) -> bool:
                seen = _uniform((mnt / "f").read_bytes())
                assert seen in ok, f"round {rnd}: the guest read a mix of versions"
                return seen == final

            assert wait_for(agrees, 10), f"round {rnd}: the guest never saw the final version"
            prev = final
        print(f"\nconcurrent writes {mode or 'default'}: final version from {outcomes}")
    finally:
        share.stop()
