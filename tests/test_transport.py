"""Transports other than unix/tcp: virtio-serial ports (a character device) and vsock.

The end-to-end run over a real virtio-serial port (and over vsock where the host has
/dev/vhost-vsock) is tests/vm/; these tests check what can be checked without a VM: address
parsing, finding a port through sysfs, the handshake and FUSE frames over a character device
bridged to the server the way QEMU bridges a port to its chardev socket, and vsock where the
kernel offers its loopback transport.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest

from notifyfs import abi, wire
from notifyfs.abi import Opcode
from test_hostile import Client, wait


def test_parse_addresses() -> None:
    p = wire.parse_address
    assert p("virtio-serial:notifyfs.0") == wire.Address("virtio-serial", path="notifyfs.0")
    assert p("virtio-serial:/run/vm/notifyfs.sock").path == "/run/vm/notifyfs.sock"
    assert p("vsock:3:7000") == wire.Address("vsock", host="3", port=7000)
    assert p("vsock:host:7000").host == str(wire.VSOCK_CID_HOST)
    assert p("vsock:any:7000").host == str(wire.VSOCK_CID_ANY)
    assert p("vsock:4294967295:1").host == str(wire.VSOCK_CID_ANY)
    assert p("vsock:3:4294967295").port == 4294967295
    assert str(p("vsock:3:7000")) == "vsock:3:7000"
    assert str(p("virtio-serial:x")) == "virtio-serial:x"
    assert p("tcp:[::1]:7000") == wire.Address("tcp", host="::1", port=7000)
    for bad in ("vsock:7000", "vsock:three:7000", "vsock:3:", "vsock:3:0", "vsock:-1:7000",
                "vsock:4294967296:1", "vsock:3:4294967296", "virtio-serial:", "serial:x",
                "tcp:host:65536", "unix"):
        with pytest.raises(ValueError, match="bad address"):
            p(bad)


def test_find_virtio_port(tmp_path: Path) -> None:
    """Ports are found by the name QEMU gave them (``virtserialport,name=``), not by number."""
    for dev, name in (("vport1p1", "org.qemu.guest_agent.0"), ("vport2p1", "notifyfs.0"),
                      ("vport2p2", "notifyfs.1")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "name").write_text(name + "\n")
    (tmp_path / "vport3p1").mkdir()  # a port without a name file: skipped, not an error
    assert wire.find_virtio_port("notifyfs.0", str(tmp_path)) == "/dev/vport2p1"
    assert wire.find_virtio_port("notifyfs.1", str(tmp_path)) == "/dev/vport2p2"
    with pytest.raises(FileNotFoundError, match="no virtio-serial port named 'notifyfs.2'"):
        wire.find_virtio_port("notifyfs.2", str(tmp_path))


def _pump(src_read, dst_write) -> None:  # type: ignore[no-untyped-def]
    while True:
        try:
            data = src_read()
        except OSError:
            return
        if not data:
            return
        try:
            dst_write(data)
        except OSError:
            return


@pytest.mark.timeout(60)
def test_virtio_serial_over_a_character_device(tmp_path: Path) -> None:
    """``serve --listen virtio-serial:SOCK`` and a :class:`wire.PortStream` on a raw pty.

    A thread plays QEMU: it connects to the server's socket when the "VM starts" and copies
    bytes between it and the pty master. The agent's hello comes later than the ordinary
    handshake timeout (a VM boots before its agent speaks) and must still be accepted.
    """
    export = tmp_path / "export"
    export.mkdir()
    (export / "hello").write_bytes(b"hello\n")
    sock_path = tmp_path / "vm.sock"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed in the finally)
    proc = subprocess.Popen([sys.executable, "-m", "notifyfs", "serve", str(export),
                             "--listen", f"virtio-serial:{sock_path}"],
                            stdout=log, stderr=subprocess.STDOUT)
    master, slave = os.openpty()
    tty.setraw(slave)  # no line discipline: a byte stream like a virtio port
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = wire.PortStream(slave, "test")
    try:
        def up() -> bool:
            try:
                qemu.connect(str(sock_path))
                return True
            except OSError:
                return proc.poll() is not None
        assert wait(up) and proc.poll() is None
        threading.Thread(target=_pump, args=(lambda: os.read(master, 65536), qemu.sendall),
                         daemon=True).start()
        threading.Thread(target=_pump, args=(lambda: qemu.recv(65536), lambda d: os.write(master, d)),
                         daemon=True).start()
        time.sleep(wire.HANDSHAKE_TIMEOUT + 1)
        assert proc.poll() is None
        features = wire.client_handshake(stream, None, wire.SUPPORTED_FEATURES)
        assert features & wire.FEATURE_FSNOTIFY
        client = Client(stream)  # type: ignore[arg-type]
        client.init()
        nodeid, _ = client.lookup(1, b"hello")
        assert nodeid > 1
        r = client.call(Opcode.OPENDIR, 1, abi.OPEN_IN, flags=os.O_RDONLY)
        assert r.error == 0
    finally:
        stream.close()
        qemu.close()
        os.close(master)
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    assert not sock_path.exists(), "serve left its socket behind"


def test_port_stream_timeout() -> None:
    """A port that never answers times out within the handshake timeout instead of hanging."""
    master, slave = os.openpty()
    tty.setraw(slave)
    stream = wire.PortStream(slave, "silent")
    try:
        stream.settimeout(0.3)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv(10)
        assert time.monotonic() - t0 < 3
    finally:
        stream.close()
        os.close(master)


def test_vsock_listen_needs_token() -> None:
    """Every VM on a host reaches its vsock ports: listening there without a token is refused."""
    for token in (None, b""):
        with pytest.raises(ValueError, match="token"):
            wire.listen(wire.parse_address("vsock:any:7000"), token)


def _vsock_loopback_reason() -> str | None:
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        return f"no vsock in this kernel ({e.strerror})"
    s.close()
    return None


@pytest.mark.timeout(60)
def test_vsock_loopback() -> None:
    """The handshake and a FUSE INIT over AF_VSOCK, through the kernel's loopback transport (CID 1).

    Needs vsock_loopback; hosts that only have a guest-side transport (no /dev/vhost-vsock, as in
    a VM) cannot connect to themselves and the test says so.
    """
    reason = _vsock_loopback_reason()
    if reason:
        pytest.skip(reason)
    from notifyfs.server.connection import Server
    from notifyfs.server.passthrough import Passthrough

    token = b"vsock-token"
    try:
        any_port = wire.Address("vsock", host=str(wire.VSOCK_CID_ANY), port=0xFFFFFFFF)
        listener = wire.listen(any_port, token)
    except OSError as e:
        pytest.skip(f"cannot listen on vsock here ({e.strerror})")
    port = listener.getsockname()[1]
    export = Path("/tmp") / f"notifyfs-vsock-{os.getpid()}"
    export.mkdir()
    server = Server(lambda: Passthrough(str(export)), token=token)
    t = threading.Thread(target=server.serve_forever, args=(listener,), daemon=True)
    t.start()
    try:
        try:
            stream = wire.connect(wire.parse_address(f"vsock:1:{port}"), timeout=3)
        except OSError as e:
            vhost = "present" if os.path.exists("/dev/vhost-vsock") else "absent"
            pytest.skip(f"no vsock loopback transport on this host (connect to CID 1: "
                        f"{e.strerror or e}; /dev/vhost-vsock {vhost}): tested in the VM run instead")
        try:
            with pytest.raises(wire.HandshakeError, match="bad token"):
                wire.client_handshake(stream, b"wrong", wire.SUPPORTED_FEATURES)
        finally:
            stream.close()
        stream = wire.connect(wire.parse_address(f"vsock:1:{port}"), timeout=3)
        try:
            wire.client_handshake(stream, token, wire.SUPPORTED_FEATURES)
            Client(stream).init()  # type: ignore[arg-type]
        finally:
            stream.close()
    finally:
        listener.close()
        t.join(timeout=5)
        os.rmdir(export)


def test_tcp_detects_a_vanished_peer() -> None:
    """Over TCP both ends turn on keepalive and TCP_USER_TIMEOUT, so a connection whose peer
    vanished without FIN or RST (a network drop) ends instead of staying half-open for ever;
    a unix socket is left alone."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
        with client, server:
            for s in (client, server):
                wire.tune(s)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == wire.KEEPALIVE_IDLE
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == \
                    wire.KEEPALIVE_INTERVAL
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == wire.KEEPALIVE_PROBES
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == \
                    wire.DEAD_PEER_TIMEOUT * 1000
    finally:
        lsock.close()
    a, b = socket.socketpair()
    with a, b:
        wire.tune(a)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
