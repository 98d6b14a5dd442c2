"""``notifyfs share SRC MOUNTPOINT``: the server and the agent in one process, over a socketpair.

The only module that imports both halves.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

from .agent.relay import MountOptions, check_mountpoint
from .agent.run import relay_over, run_relay
from .server.passthrough import Options
from .server.run import make_server


def share(src: str, mountpoint: str, server_options: Options, mount_options: MountOptions,
          workers: int = 8, stats_file: str | None = None) -> int:
    """Serve ``src`` and mount it at ``mountpoint``; with ``stats_file``, SIGUSR1 writes the
    server's and the agent's counters there as JSON (what the tests check nlookup with)."""
    mountpoint = check_mountpoint(mountpoint)
    server = make_server(src, server_options, token=None, workers=workers)
    if server_options.read_only:
        mount_options.read_only = True
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=server.serve_socket, args=(theirs, "share"), daemon=True,
                     name="server").start()
    relay = relay_over(ours, mountpoint, mount_options, token=None)
    if stats_file:
        def dump(signum: int, frame: object) -> None:
            tmp = stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"server": server.stats(), "agent": relay.stats()}, f)
            os.replace(tmp, stats_file)

        signal.signal(signal.SIGUSR1, dump)
    return run_relay(relay)
