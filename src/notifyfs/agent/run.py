"""``notifyfs mount``: connect to a server and mount its export."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys

from .. import wire
from ..fdlimit import raise_nofile_limit
from .relay import Connector, MountError, MountOptions, Relay, check_mountpoint

log = logging.getLogger(__name__)

AGENT_FEATURES = wire.SUPPORTED_FEATURES


def agent_features(options: MountOptions) -> int:
    if options.events == "local" or os.geteuid() != 0:
        if options.events == "both" and os.geteuid() != 0:
            log.warning("remote events need a root agent; this mount gets local events only")
        return AGENT_FEATURES & ~wire.FEATURE_FSNOTIFY
    return AGENT_FEATURES


def run_relay(relay: Relay) -> int:
    """Start the relay's threads and block until it ends; SIGINT/SIGTERM unmount."""

    def on_signal(signum: int, frame: object) -> None:
        relay.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    relay.start()
    code = relay.wait()
    if relay.exit_message:
        print(relay.exit_message, file=sys.stderr)
    return code


#: a virtio-serial port outlives agents: see _connect
PORT_ATTEMPTS = 3


def _connect(addr: wire.Address, token: bytes | None, features: int,
             tls: ssl.SSLContext | None = None, server_name: str | None = None,
             session: bytes = b"") -> tuple[wire.Stream, int]:
    """Connect and handshake (with this mount's ``session`` id); returns the stream and the
    agreed features.

    A virtio-serial port is one byte stream for the VM's lifetime, and the server cannot tell
    that an earlier agent on it has gone: it takes our hello for that agent's garbage and closes
    the connection. QEMU reconnects (``reconnect=1``), so over a port a failed handshake is
    retried on a freshly opened port (opening it drops whatever the old session left unread).
    """
    attempts = PORT_ATTEMPTS if addr.kind == "virtio-serial" else 1
    for attempt in range(1, attempts + 1):
        try:
            sock = wire.connect(addr, tls=tls, server_name=server_name)
        except (OSError, ValueError) as e:
            raise MountError(f"cannot connect to {addr}: {getattr(e, 'strerror', None) or e}") \
                from None
        wire.tune(sock)
        try:
            agreed = wire.client_handshake(sock, token, features, session=session)
            return wire.stream(sock), agreed
        except (wire.HandshakeError, OSError) as e:
            sock.close()
            if attempt == attempts or "refused" in str(e):
                raise MountError(f"{addr}: {e}") from None
            log.info("%s: handshake failed (%s); trying again", addr, e)
    raise AssertionError("unreachable")


def connector(addr: wire.Address, token: bytes | None, options: MountOptions,
              tls: ssl.SSLContext | None = None, server_name: str | None = None,
              session: bytes = b"") -> Connector:
    """A function that connects to ``addr`` and does the handshake again, after a loss, with the
    same ``session`` id as the first connection (so the server can fence that one)."""

    def connect() -> tuple[wire.Stream, int]:
        try:
            return _connect(addr, token, agent_features(options), tls, server_name, session)
        except MountError as e:
            raise OSError(str(e)) from None

    return connect


def mount(address: str, mountpoint: str, options: MountOptions, token: bytes | None,
          foreground: bool, tls: ssl.SSLContext | None = None, server_name: str | None = None) -> int:
    mountpoint = check_mountpoint(mountpoint)
    raise_nofile_limit("agent")
    try:
        addr = wire.parse_address(address)
    except ValueError as e:
        raise MountError(str(e)) from None
    # one id for the mount's lifetime, kept across reconnects (wire.py, feature "session")
    session = os.urandom(wire.SESSION_ID_SIZE)
    log.info("session %s", session.hex()[:8])
    sock, features = _connect(addr, token, agent_features(options), tls, server_name, session)
    relay = Relay(sock, mountpoint, options, features,
                  connector=connector(addr, token, options, tls, server_name, session))
    relay.mount()
    if not foreground and os.fork() > 0:
        os._exit(0)  # the parent returns once the mount exists; the child serves it
    if not foreground:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # let the caller's pipes close: it waits for them, not for us
            os.dup2(null, fd)
        os.close(null)
    return run_relay(relay)


def relay_over(sock: wire.Stream, mountpoint: str, options: MountOptions,
               token: bytes | None) -> Relay:
    """Handshake on an already connected socket and mount (used by ``share``)."""
    features = wire.client_handshake(sock, token, agent_features(options))
    relay = Relay(sock, mountpoint, options, features)
    relay.mount()
    return relay
