"""``notifyfs serve``: export a directory on a listening address."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading

from .. import wire
from ..fdlimit import inode_room, raise_nofile_limit
from .connection import Server
from .passthrough import Options, Passthrough

log = logging.getLogger(__name__)


class ServeError(Exception):
    """A one-line reason why the export cannot be served."""


def check_export(export: str) -> str:
    if not os.path.isdir(export):
        raise ServeError(f"export {export} is not a directory" if os.path.exists(export)
                         else f"export {export} does not exist")
    return os.path.realpath(export)


def fit_inodes_to_fds(options: Options, nofile: int) -> None:
    """Each inode a guest holds is an fd: a --max-inodes past the open files limit would never
    be reached, lookups would fail with EMFILE first. The default is lowered to what the fds
    allow (so the guest gets the limit's ENFILE and the log says why); an explicit value is
    kept, with a warning."""
    room = inode_room(nofile)
    if options.max_inodes <= room:
        return
    if options.max_inodes == Options.max_inodes:
        log.info("--max-inodes: %d per agent (what the open files limit of %d allows)", room,
                 nofile)
        options.max_inodes = room
    else:
        log.warning("--max-inodes %d is more than the open files limit (%d) allows: past about "
                    "%d inodes, lookups fail with EMFILE", options.max_inodes, nofile, room)


def make_server(export: str, options: Options, token: bytes | None, workers: int = 8,
                tls: ssl.SSLContext | None = None, max_connections: int = 64,
                max_pending: int = 256) -> Server:
    export = check_export(export)
    fit_inodes_to_fds(options, raise_nofile_limit("server"))
    os.umask(0)  # the guest kernel already applied the caller's umask
    if options.squash is not None and os.geteuid() == 0:
        os.setgroups([])  # squashed workers act as UID:GID alone, not with root's groups
    features = wire.SUPPORTED_FEATURES & ~wire.FEATURE_READONLY
    if not options.events:
        features &= ~wire.FEATURE_FSNOTIFY
    if options.read_only:
        features |= wire.FEATURE_READONLY
    if not options.writeback:
        features &= ~wire.FEATURE_WRITEBACK
    return Server(lambda: Passthrough(export, options), token=token, features=features,
                  workers=workers, tls=tls, max_connections=max_connections,
                  max_pending=max_pending)


def serve(export: str, listen: str, options: Options, token: bytes | None, workers: int = 8,
          tls: ssl.SSLContext | None = None, max_connections: int = 64,
          max_pending: int = 256) -> int:
    if min(max_connections, max_pending, options.max_inodes, options.max_handles) < 1:
        raise ServeError("the --max-* limits must be at least 1")
    server = make_server(export, options, token, workers, tls, max_connections, max_pending)
    addr = wire.parse_address(listen)
    if tls is not None and addr.kind == "virtio-serial":
        # the agent speaks through a port device, which carries no TLS (nor needs it)
        raise ServeError("TLS is not available on virtio-serial (the VM's own channel)")
    try:
        listener = wire.listen(addr, token)
    except (OSError, ValueError) as e:
        raise ServeError(f"cannot listen on {listen}: {e}") from None
    if addr.kind == "virtio-serial":
        server.wait_for_hello = True  # QEMU connects at boot; the guest's agent speaks later
    log.info("serving %s on %s", export, addr)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    threading.Thread(target=server.serve_forever, args=(listener,), daemon=True,
                     name="accept").start()
    stop.wait()
    listener.close()
    if addr.kind in ("unix", "virtio-serial"):
        try:
            os.unlink(addr.path)
        except OSError:
            pass
    return 0
