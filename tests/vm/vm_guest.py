"""The test driver inside the VM: the image's init runs it (as PID 1's child) from the 9p share.

It mounts one host directory three ways — notifyfs (agent over virtio-serial), virtiofs and 9p —
and, over the control port, asks the host test to make each oracle scenario's changes in that
directory while a watcher in the guest records what each mount delivers. The same scenario run
on a local directory of this guest kernel is the oracle. Then: the guest's own changes through
the notifyfs mount (local events once, no echo, the host sees the result), the real watcher
clients (inotifywait, watchdog), a second agent on the same port, and vsock when the VM has it.
Every phase's results go to the host as soon as they exist, so a crash loses only its own phase.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path[:0] = ["/src/src", "/src/tests", "/src/tests/vm"]

import oracle  # noqa: E402
from test_events_oracle import SCENARIOS  # noqa: E402
from vm_shared import (  # noqa: E402
    AGENT_PORT,
    CONTROL_PORT,
    MOUNTS,
    VSOCK_PORT,
    Channel,
    client_script,
    same,
    tree,
)

from notifyfs import wire  # noqa: E402

#: under TCG the guest runs several times slower than the host: a remote event takes longer to
#: arrive, so "quiet" (no new event for this long means done) is stretched by this factor
QUIET_FACTOR = 3.0
LIVE_SETUP_SETTLE = 1.0  # seconds (software-emulated guest: slower than the host's 0.3 s)
AGENT_LOG = Path("/tmp/agent.log")
#: local directories for the oracle: the root disk (ext4), since the guest's /tmp (tmpfs) has no
#: user xattrs on this kernel
LOCAL = "/var/tmp"


def log(msg: str) -> None:
    up = float(Path("/proc/uptime").read_text().split()[0])
    print(f"[guest {up:8.2f}] {msg}", flush=True)


def port_channel(name: str) -> Channel:
    fd = os.open(wire.find_virtio_port(name), os.O_RDWR | os.O_CLOEXEC)

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return Channel(lambda n: os.read(fd, n), send)


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}: {AGENT_LOG.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout} s: {AGENT_LOG.read_text()[-2000:]}")
        time.sleep(0.1)


def start_agent(address: str, mnt: str, token: str | None = None) -> subprocess.Popen[bytes]:
    os.makedirs(mnt, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": "/src/src"}
    if token:
        env["NOTIFYFS_TOKEN"] = token
    with open(AGENT_LOG, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "notifyfs", "mount", address, mnt, "-f"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_mounted(mnt, proc)
    log(f"agent for {address} mounted {mnt}")
    return proc


def stop_agent(mnt: str, proc: subprocess.Popen[bytes]) -> int:
    subprocess.run(["umount", mnt], check=False)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        subprocess.run(["umount", "-l", mnt], check=False)
        proc.kill()
        return proc.wait()


def mount_others() -> None:
    for fs, src, opts in (("virtiofs", "vfs", None), ("9p", "p9", "trans=virtio,version=9p2000.L")):
        os.makedirs(MOUNTS[fs], exist_ok=True)
        cmd = ["mount", "-t", fs] + (["-o", opts] if opts else []) + [src, MOUNTS[fs]]
        subprocess.run(cmd, check=True)
        log(f"mounted {fs} at {MOUNTS[fs]}")


def remote_events(ch: Channel, mnt: str, scn: oracle.Scenario, d: str,
                  live_setup: bool = False) -> list[oracle.Event]:
    """The host runs the scenario in ``d``; what a watcher on ``mnt/d`` gets.

    As in tests/test_events_oracle.py, the host made the scenario's setup in ``d`` before the
    agent mounted; ``live_setup`` makes it now, while mounted (see run_live_setup)."""
    if live_setup:
        ch.call("setup", scn=scn.name, dir=d)
        # a watch added within the time a host change takes to arrive may or may not be told
        # of it (README, Limits): add it later, as tests/test_events_live_setup.py does
        time.sleep(LIVE_SETUP_SETTLE)
    rec = oracle.Recorder(Path(mnt) / d, scn.watches, oracle.ALL)
    try:
        ch.call("script", scn=scn.name, dir=d)
        rec.drain(scn.quiet * QUIET_FACTOR, timeout=60)
        return rec.events()
    finally:
        rec.close()


def run_oracle(ch: Channel, locals_: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scn in SCENARIOS:
        base = Path(tempfile.mkdtemp(prefix=f"{scn.name}-", dir=LOCAL))
        try:
            local = oracle.run_local(scn, base, oracle.ALL)
        except Exception as e:
            out[scn.name] = {"local": None, "local_error": f"{type(e).__name__}: {e}",
                             **dict.fromkeys(MOUNTS)}
            log(f"oracle {scn.name}: the local run failed: {e}")
            continue
        locals_[scn.name] = base / "local"
        row: dict[str, Any] = {"local": local}
        for fs, mnt in MOUNTS.items():
            try:
                row[fs] = remote_events(ch, mnt, scn, f"{fs}-{scn.name}")
            except Exception as e:  # a failing mount is a result of the comparison, not the end
                row[fs] = None
                row[f"{fs}_error"] = f"{type(e).__name__}: {e}"
        if not same(local, row["notifyfs"]):
            # once more on a fresh directory: a difference that comes and goes is timing (the
            # host is shared and the guest emulated), and the results keep both tries
            row["notifyfs_first"] = row["notifyfs"]
            try:
                row["notifyfs"] = remote_events(ch, MOUNTS["notifyfs"], scn, f"retry-{scn.name}")
            except Exception as e:
                row["notifyfs"] = None
                row["notifyfs_error"] = f"{type(e).__name__}: {e}"
        log(f"oracle {scn.name}: local {len(local)}, " + ", ".join(
            f"{fs} {'error' if row[fs] is None else len(row[fs])}" for fs in MOUNTS)
            + ("" if same(local, row["notifyfs"]) else "  NOTIFYFS DIFFERS")
            + (" (after a retry)" if "notifyfs_first" in row else ""))
        for first_or_last in (row.get("notifyfs_first"), row["notifyfs"]):
            if same(local, first_or_last) or first_or_last is None and "notifyfs_first" not in row:
                continue
            remote = first_or_last or []
            for i in range(max(len(local), len(remote))):
                a = local[i] if i < len(local) else None
                b = remote[i] if i < len(remote) else None
                log(f"   {'  ' if a == b else '!='} {a!s:50} | {b!s}")
        out[scn.name] = row
    return out


def run_echo(ch: Channel, locals_: dict[str, Path]) -> dict[str, Any]:
    """The guest changes the mount itself: its watcher gets the local events once (no echo from
    the host watcher), and the host directory ends up as the local one did."""
    out: dict[str, Any] = {}
    for scn in SCENARIOS:
        if scn.outside or scn.name not in locals_:
            continue  # the guest cannot reach outside the export; or no oracle to compare with
        d = f"echo-{scn.name}"
        mnt = Path(MOUNTS["notifyfs"]) / d
        rec = oracle.Recorder(mnt, scn.watches, oracle.ALL)
        try:
            scn.script(mnt)
            rec.drain(scn.quiet * QUIET_FACTOR, timeout=60)
            events = rec.events()
        finally:
            rec.close()
        host_tree = ch.call("tree", dir=d)["tree"]
        out[scn.name] = {"events": events, "host_tree": host_tree,
                         "local_tree": tree(locals_[scn.name])}
        log(f"echo {scn.name}: {len(events)} events")
    return out


#: the changes inotifywait is asked for: reads (OPEN/ACCESS/CLOSE_NOWRITE) are left out because
#: ``-r`` lists each new directory itself, at a moment that depends on timing, not on the share
IW_EVENTS = ("create", "modify", "attrib", "close_write", "moved_from", "moved_to", "delete",
             "delete_self", "move_self")


def watch_inotifywait(root: Path, change: Any) -> list[str]:
    cmd = ["inotifywait", "-m", "-r", "--format", "%e %w%f"]
    for e in IW_EVENTS:
        cmd += ["-e", e]
    iw = subprocess.Popen([*cmd, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    assert iw.stderr is not None
    for line in iw.stderr:
        if "Watches established" in line:
            break
    try:
        change()
        time.sleep(1.0 * QUIET_FACTOR)
    finally:
        iw.terminate()
        text, _ = iw.communicate(timeout=10)
    return [line.replace(str(root), ".", 1) for line in text.splitlines()]


def watch_watchdog(root: Path, change: Any) -> list[list[Any]]:
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers.inotify import InotifyObserver

    got: list[list[Any]] = []

    class Handler(FileSystemEventHandler):  # type: ignore[misc]
        def on_any_event(self, event: Any) -> None:
            rel = os.path.relpath(event.src_path, root)
            dest = getattr(event, "dest_path", "")
            got.append([event.event_type, rel, os.path.relpath(dest, root) if dest else "",
                        event.is_directory])

    obs = InotifyObserver()
    obs.schedule(Handler(), str(root), recursive=True)
    obs.start()
    time.sleep(0.5)
    try:
        change()
        time.sleep(1.0 * QUIET_FACTOR)
    finally:
        obs.stop()
        obs.join(timeout=10)
    return got


def run_clients(ch: Channel) -> dict[str, Any]:
    """Each client alone (one client's directory reads would be the other's events)."""
    out: dict[str, Any] = {"local": {}, **{fs: {} for fs in MOUNTS}}
    for client, watch in (("inotifywait", watch_inotifywait), ("watchdog", watch_watchdog)):
        local_root = Path(tempfile.mkdtemp(prefix=f"{client}-", dir=LOCAL))
        out["local"][client] = watch(local_root, lambda r=local_root: client_script(r))
        for fs, mnt in MOUNTS.items():
            d = f"{client}-{fs}"
            out[fs][client] = watch(Path(mnt) / d, lambda d=d: ch.call("clients", dir=d))
    for fs in MOUNTS:
        log(f"clients on {fs}: inotifywait {len(out[fs]['inotifywait'])} lines, "
            f"watchdog {len(out[fs]['watchdog'])} events")
    return out


def one_scenario(ch: Channel, mnt: str, prefix: str, names: tuple[str, ...],
                 live_setup: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scn in SCENARIOS:
        if scn.name in names:
            local = oracle.run_local(scn, Path(tempfile.mkdtemp(dir=LOCAL)), oracle.ALL)
            out[scn.name] = {"local": local, "remote": remote_events(
                ch, mnt, scn, f"{prefix}-{scn.name}", live_setup)}
    return out


#: scenarios whose directory the host creates and fills while the guest is mounted, just before
#: the guest starts watching it
LIVE_SETUP = ("write-existing", "append", "truncate-down", "chmod", "chown", "setxattr", "unlink",
              "mkdir", "rename-same-dir", "hardlink")


def run_live_setup(ch: Channel) -> dict[str, Any]:
    out = one_scenario(ch, MOUNTS["notifyfs"], "live", LIVE_SETUP, live_setup=True)
    for name, row in out.items():
        log(f"live setup {name}: {'same' if same(row['local'], row['remote']) else 'DIFFERS'}")
    return out


def run_phase(ch: Channel, name: str, phase: Any) -> None:
    """Run one phase and send its results (or the traceback that ended it) to the host."""
    t0 = time.monotonic()
    try:
        data, error = phase(), None
    except Exception:
        data, error = None, traceback.format_exc()
        log(f"phase {name} failed:\n{error}")
    ch.call("result", phase=name, data=data, error=error, seconds=time.monotonic() - t0)


def main() -> int:
    log("driver started")
    ch = port_channel(CONTROL_PORT)
    plan = ch.call("hello", uptime=float(Path("/proc/uptime").read_text().split()[0]),
                   kernel=os.uname().release)
    agent = start_agent(f"virtio-serial:{AGENT_PORT}", MOUNTS["notifyfs"])
    locals_: dict[str, Path] = {}
    try:
        mount_others()
        phases = [("oracle", lambda: run_oracle(ch, locals_)),
                  ("echo", lambda: run_echo(ch, locals_)),
                  ("clients", lambda: run_clients(ch)),
                  ("live_setup", lambda: run_live_setup(ch))]
        for name, phase in phases:
            run_phase(ch, name, phase)
    finally:
        code = stop_agent(MOUNTS["notifyfs"], agent)
    log(f"first agent exited with {code}")

    def again() -> dict[str, Any]:
        # a second agent on the same port, after the first one ended (the server still holds
        # the first session until the new hello tells it otherwise: see agent.run._connect)
        proc = start_agent(f"virtio-serial:{AGENT_PORT}", MOUNTS["notifyfs"])
        try:
            return one_scenario(ch, MOUNTS["notifyfs"], "again", ("create-file", "rename-same-dir"))
        finally:
            stop_agent(MOUNTS["notifyfs"], proc)

    def vsock() -> dict[str, Any]:
        mnt = "/mnt/vsock"
        proc = start_agent(f"vsock:host:{VSOCK_PORT}", mnt, token=plan["vsock_token"])
        try:
            return one_scenario(ch, mnt, "vsock", ("create-file", "rename-same-dir", "append"))
        finally:
            stop_agent(mnt, proc)

    later = [("second_agent", again)]
    if plan.get("vsock_token"):
        later.append(("vsock", vsock))
    for name, phase in later:
        run_phase(ch, name, phase)
    if AGENT_LOG.exists():
        ch.call("agent_log", text=AGENT_LOG.read_text()[-20000:])
    for fs in ("virtiofs", "9p"):
        subprocess.run(["umount", MOUNTS[fs]], check=False)
    ch.call("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        log(f"driver failed:\n{traceback.format_exc()}")
        sys.exit(1)  # the image's init powers the VM off after us either way
