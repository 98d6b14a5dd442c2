"""Authentication and privacy: TLS (with client certificates), the token, the unix socket's mode,
and --read-only / --squash enforced by the server whatever a client sends.

The TLS tests use an in-process server on 127.0.0.1 and the hostile client of test_hostile (which
speaks the wire protocol itself), plus one real ``notifyfs serve`` + ``notifyfs mount`` over TLS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import NOTIFYFS, can_mount, force_unmount, is_mounted, snapshot, wait_for
from notifyfs import abi, wire
from notifyfs.abi import Opcode
from notifyfs.server.connection import Server
from notifyfs.server.passthrough import Options, Passthrough
from test_hostile import HELLO, Client, plant

pytestmark = pytest.mark.timeout(60)

TOKEN = b"s3cret-token-for-tests"


# --- a small PKI made with openssl ----------------------------------------------------------------

@dataclass
class PKI:
    dir: Path

    def __getattr__(self, name: str) -> str:
        return str(self.dir / f"{name.replace('_', '.')}")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, ca: str, subject: str, san: str | None) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", str(ext), cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                 "-subj", f"/CN=notifyfs test {ca} CA", cwd=d)
    _issue(d, "server", "ca", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    _issue(d, "client", "ca", "/CN=agent", None)
    _issue(d, "rogueclient", "rogue", "/CN=agent", None)
    _issue(d, "rogueserver", "rogue", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    return PKI(d)


# --- an in-process server on tcp 127.0.0.1 --------------------------------------------------------

@dataclass
class TcpServer:
    server: Server
    listener: socket.socket
    addr: wire.Address
    export: Path
    socks: list[socket.socket]

    def connect(self, tls: ssl.SSLContext | None, token: bytes | None = TOKEN,
                server_name: str | None = None) -> Client:
        s = wire.connect(self.addr, tls=tls, server_name=server_name)
        self.socks.append(s)
        wire.client_handshake(s, token, 0, timeout=10)
        return Client(wire.stream(s))  # type: ignore[arg-type]

    def good(self, tls: ssl.SSLContext | None) -> None:
        """A well-behaved agent is (still) served."""
        c = self.connect(tls)
        c.init()
        c.alive()
        c.close()


@contextlib.contextmanager
def _serve(tmp: Path, tls: ssl.SSLContext | None, options: Options | None = None) -> Iterator[TcpServer]:
    export, _outside = plant(tmp)
    server = Server(lambda: Passthrough(str(export), options or Options(events=False)),
                    token=TOKEN, tls=tls)
    server.handshake_timeout = 5
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    t = threading.Thread(target=server.serve_forever, args=(listener,), daemon=True)
    t.start()
    srv = TcpServer(server, listener, wire.parse_address(f"tcp:127.0.0.1:{port}"), export, [])
    try:
        yield srv
    finally:
        for s in srv.socks:
            s.close()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        t.join(5)
        assert wait_for(lambda: server.active == 0, 15), "a connection did not end"


@pytest.fixture
def tls_server(tmp_path: Path, pki: PKI) -> Iterator[TcpServer]:
    with _serve(tmp_path, wire.server_tls(pki.server_crt, pki.server_key, pki.ca_crt)) as srv:
        yield srv


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[TcpServer]:
    with _serve(tmp_path, None) as srv:
        yield srv


def agent_tls(pki: PKI, ca: str = "ca", cert: str | None = "client") -> ssl.SSLContext:
    return wire.client_tls(getattr(pki, f"{ca}_crt"), cert and getattr(pki, f"{cert}_crt"),
                           cert and getattr(pki, f"{cert}_key"))


# --- TLS ------------------------------------------------------------------------------------------

def test_mutual_tls_serves(tls_server: TcpServer, pki: PKI) -> None:
    c = tls_server.connect(agent_tls(pki))
    c.init()
    for _ in range(20):
        c.alive()
    # a 1 MiB read and write: frames larger than one TLS record
    nodeid, _ = c.lookup(1, b"hello")
    fh = c.open(nodeid, os.O_RDWR)
    blob = os.urandom(1 << 20)
    r = c.call(Opcode.WRITE, nodeid, abi.WRITE_IN, fh=fh, size=len(blob), data=blob)
    assert r.error == 0 and abi.WRITE_OUT.unpack_from(r.payload).size == len(blob)
    r = c.read(nodeid, fh, size=1 << 20)
    assert r.error == 0 and r.payload == blob
    assert (tls_server.export / "hello").read_bytes() == blob


@pytest.mark.parametrize("who", ["rogue-client-cert", "no-client-cert"])
def test_client_certificate_required(tls_server: TcpServer, pki: PKI, who: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    ctx = agent_tls(pki, cert="rogueclient" if who == "rogue-client-cert" else None)
    with pytest.raises(wire.HandshakeError, match="TLS|closed"):
        tls_server.connect(ctx)
    assert wait_for(lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records), 5)
    tls_server.good(agent_tls(pki))


@pytest.mark.parametrize("case", ["untrusted-server", "wrong-name"])
def test_agent_verifies_the_server(tmp_path: Path, pki: PKI, case: str) -> None:
    if case == "untrusted-server":  # a server with a certificate from a CA the agent does not trust
        ctx = wire.server_tls(pki.rogueserver_crt, pki.rogueserver_key, pki.ca_crt)
        name = None
    else:
        ctx = wire.server_tls(pki.server_crt, pki.server_key, pki.ca_crt)
        name = "not-the-server.example"
    with _serve(tmp_path, ctx) as srv, \
            pytest.raises(wire.HandshakeError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        srv.connect(agent_tls(pki), server_name=name)


def test_plaintext_agent_to_tls_server(tls_server: TcpServer, pki: PKI,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(wire.HandshakeError, match="TLS"):
        tls_server.connect(None)
    assert wait_for(lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records), 5)
    tls_server.good(agent_tls(pki))


def test_tls_agent_to_plaintext_server(plain_server: TcpServer, pki: PKI,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(wire.HandshakeError):
        plain_server.connect(agent_tls(pki))
    assert wait_for(lambda: any("speaks TLS" in r.getMessage() for r in caplog.records), 5)
    plain_server.good(None)


def test_wrong_token_over_tls(tls_server: TcpServer, pki: PKI) -> None:
    for bad in (None, b"", b"wrong", TOKEN + b"x", TOKEN[:-1]):
        with pytest.raises(wire.HandshakeError, match="bad token"):
            tls_server.connect(agent_tls(pki), token=bad)
    tls_server.good(agent_tls(pki))


def test_tls_handshake_counts_against_the_time_limit(tls_server: TcpServer) -> None:
    """A peer that opens a TCP connection to a TLS server and says nothing is dropped when the
    handshake time (TLS included) is up."""
    tls_server.server.handshake_timeout = 1.0
    s = socket.create_connection((tls_server.addr.host, tls_server.addr.port))
    tls_server.socks.append(s)
    s.settimeout(10)
    start = time.monotonic()
    assert s.recv(100) == b""
    assert time.monotonic() - start < 5


# --- the real processes ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")
@pytest.mark.timeout(90)
def test_real_mount_over_tls_with_token_file(tmp_path: Path, pki: PKI) -> None:
    export, mnt, badmnt = tmp_path / "export", tmp_path / "mnt", tmp_path / "bad"
    for d in (export, mnt, badmnt):
        d.mkdir()
    (export / "host.txt").write_text("from the host\n")
    tokfile = tmp_path / "token"
    tokfile.write_bytes(TOKEN + b"\n")
    os.chmod(tokfile, 0o600)
    port = _free_port()
    addr = f"tcp:127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYFS_TOKEN"}
    slog = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed in the finally)
    server = subprocess.Popen([*NOTIFYFS, "-v", "serve", str(export), "--listen", addr,
                               "--token-file", str(tokfile), "--tls-cert", pki.server_crt,
                               "--tls-key", pki.server_key, "--tls-ca", pki.ca_crt],
                              stdout=slog, stderr=subprocess.STDOUT, env=env)
    agent = None
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return server.poll() is not None
        assert wait_for(listening, 15) and server.poll() is None
        # the wrong CA, no client certificate, a wrong token: each a clear error, no mount
        bad_runs = [
            (["--tls-ca", pki.rogue_crt, "--tls-cert", pki.client_crt, "--tls-key", pki.client_key],
             TOKEN, "certificate verify failed|CERTIFICATE_VERIFY_FAILED"),
            (["--tls-ca", pki.ca_crt], TOKEN, "TLS|closed"),
            (["--tls-ca", pki.ca_crt, "--tls-cert", pki.client_crt, "--tls-key", pki.client_key],
             b"not-the-token", "bad token"),
            ([], TOKEN, "TLS"),  # plaintext
        ]
        for args, tok, want in bad_runs:
            r = subprocess.run([*NOTIFYFS, "mount", addr, str(badmnt), *args],
                               env={**env, "NOTIFYFS_TOKEN": tok.decode()}, capture_output=True,
                               timeout=30)
            err = r.stderr.decode()
            assert r.returncode != 0 and "notifyfs: error:" in err, err
            assert re.search(want, err), (want, err)
            assert not is_mounted(badmnt)
        # the right everything: a real mount over mutual TLS, token from the environment
        agent = subprocess.Popen([*NOTIFYFS, "mount", addr, str(mnt), "-f", "--tls-ca", pki.ca_crt,
                                  "--tls-cert", pki.client_crt, "--tls-key", pki.client_key],
                                 env={**env, "NOTIFYFS_TOKEN": TOKEN.decode()},
                                 stderr=subprocess.PIPE)
        assert wait_for(lambda: is_mounted(mnt) or agent.poll() is not None, 20), "no mount"
        assert agent.poll() is None
        assert (mnt / "host.txt").read_text() == "from the host\n"
        blob = os.urandom(8 << 20)
        (mnt / "big").write_bytes(blob)
        assert (export / "big").read_bytes() == blob
        assert (mnt / "big").read_bytes() == blob
        (export / "later").write_text("x")
        assert wait_for(lambda: (mnt / "later").exists(), 5)
        assert server.poll() is None
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        force_unmount(mnt)
        force_unmount(badmnt)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        slog.close()
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log
    assert "TLS handshake failed" in log and "bad token" in log


def test_token_never_from_the_command_line(tmp_path: Path) -> None:
    for cmd in (["serve", str(tmp_path), "--listen", f"unix:{tmp_path}/s", "--token", "abc"],
                ["mount", f"unix:{tmp_path}/s", str(tmp_path), "--token", "abc"],
                ["serve", str(tmp_path), "--listen", f"unix:{tmp_path}/s", "--token=abc"]):
        r = subprocess.run([*NOTIFYFS, *cmd], capture_output=True, timeout=30)
        assert r.returncode == 2 and b"never taken from the command line" in r.stderr, r.stderr
        assert b"abc" not in r.stderr  # the secret is not echoed
    for sub in ("serve", "mount"):
        r = subprocess.run([*NOTIFYFS, sub, "--help"], capture_output=True, timeout=30, text=True)
        assert "--token-file" in r.stdout and "--token " not in r.stdout
    # an empty token file is an error, not "no token"
    (tmp_path / "empty").write_bytes(b"\n")
    r = subprocess.run([*NOTIFYFS, "serve", str(tmp_path), "--listen", f"unix:{tmp_path}/s",
                        "--token-file", str(tmp_path / "empty")], capture_output=True, timeout=30)
    assert r.returncode == 1 and b"is empty" in r.stderr


def test_unix_socket_is_private_whatever_the_umask(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    proc = subprocess.Popen([*NOTIFYFS, "serve", str(tmp_path), "--listen", f"unix:{sock}"],
                            preexec_fn=lambda: os.umask(0), stderr=subprocess.DEVNULL)
    try:
        assert wait_for(sock.exists, 10)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(10)


# --- read-only and squash, enforced by the server -------------------------------------------------

@dataclass
class Local:
    server: Server
    export: Path
    threads: list[threading.Thread]

    def connect(self) -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t = threading.Thread(target=self.server.serve_socket, args=(theirs, "test"), daemon=True)
        t.start()
        self.threads.append(t)
        wire.client_handshake(ours, None, 0)
        c = Client(ours)
        c.init()
        return c


@pytest.fixture
def local(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Local]:
    export, _ = plant(tmp_path)
    opts: Options = request.param
    loc = Local(Server(lambda: Passthrough(str(export), opts)), export, [])
    yield loc
    for t in loc.threads:
        t.join(10)


@pytest.mark.parametrize("local", [Options(read_only=True, events=False)], indirect=True)
def test_read_only_is_enforced_by_the_server(local: Local) -> None:
    """A client that ignores the read-only flag (no kernel in between) still changes nothing."""
    before = snapshot(local.export)
    c = local.connect()
    nodeid, _ = c.lookup(1, b"hello")
    dnode, _ = c.lookup(1, b"dir")
    rfh = c.open(nodeid)
    ro = errno.EROFS
    assert c.err(Opcode.OPEN, nodeid, abi.OPEN_IN, flags=os.O_RDWR) == ro
    assert c.err(Opcode.OPEN, nodeid, abi.OPEN_IN, flags=os.O_WRONLY) == ro
    assert c.err(Opcode.OPEN, nodeid, abi.OPEN_IN, flags=os.O_RDONLY | os.O_TRUNC) == ro
    assert c.err(Opcode.WRITE, nodeid, abi.WRITE_IN, fh=rfh, size=3, data=b"abc") == ro
    assert c.err(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"n",), flags=os.O_RDWR, mode=0o100644) == ro
    assert c.err(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(b"n",), mode=stat.S_IFIFO | 0o644) == ro
    assert c.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(b"n",), mode=0o755) == ro
    assert c.err(Opcode.SYMLINK, 1, names=(b"n", b"hello")) == ro
    assert c.err(Opcode.LINK, 1, abi.LINK_IN, names=(b"n",), oldnodeid=nodeid) == ro
    assert c.err(Opcode.UNLINK, 1, names=(b"hello",)) == ro
    assert c.err(Opcode.RMDIR, dnode, names=(b"x",)) == ro
    assert c.err(Opcode.RMDIR, 1, names=(b"dir",)) == ro
    assert c.err(Opcode.RENAME, 1, abi.RENAME_IN, names=(b"hello", b"n"), newdir=1) == ro
    assert c.err(Opcode.RENAME2, 1, abi.RENAME2_IN, names=(b"hello", b"n"), newdir=1) == ro
    assert c.err(Opcode.SETATTR, nodeid, abi.SETATTR_IN, valid=abi.FATTR_SIZE, size=0) == ro
    assert c.err(Opcode.SETATTR, nodeid, abi.SETATTR_IN, valid=abi.FATTR_MODE, mode=0o777) == ro
    assert c.err(Opcode.SETATTR, nodeid, abi.SETATTR_IN, valid=abi.FATTR_MTIME_NOW) == ro
    assert c.err(Opcode.SETXATTR, nodeid, abi.SETXATTR_IN, names=(b"user.x",), data=b"v",
                 size=1) == ro
    assert c.err(Opcode.REMOVEXATTR, nodeid, names=(b"user.x",)) == ro
    assert c.err(Opcode.FALLOCATE, nodeid, abi.FALLOCATE_IN, fh=rfh, length=4096) == ro
    assert c.err(Opcode.COPY_FILE_RANGE, nodeid, abi.COPY_FILE_RANGE_IN, fh_in=rfh,
                 nodeid_out=nodeid, fh_out=rfh, len=10) == ro
    assert c.err(Opcode.ACCESS, nodeid, abi.ACCESS_IN, mask=os.W_OK) == ro
    # reading still works
    assert c.read(nodeid, rfh).payload == HELLO
    assert snapshot(local.export) == before


SQUASH = (4242, 4243)


@pytest.mark.skipif(os.geteuid() != 0, reason="squash needs a root server (it chowns and setfsuid)")
@pytest.mark.parametrize("local", [Options(squash=SQUASH, events=False)], indirect=True)
def test_squash_is_enforced_by_the_server(local: Local, caplog: pytest.LogCaptureFixture) -> None:
    """The client claims to be root in every header; the server acts as the squash owner anyway:
    what it creates belongs to it, chown is refused, and the host's permissions apply to it."""
    caplog.set_level(logging.WARNING)
    e = local.export
    (e / "private").write_bytes(b"root only\n")
    os.chmod(e / "private", 0o600)
    (e / "rootdir").mkdir(mode=0o755)
    os.chown(e, *SQUASH)  # the export itself belongs to the squash owner
    before_private = snapshot(e / "rootdir")
    c = local.connect()
    r = c.call(Opcode.CREATE, 1, abi.CREATE_IN, names=(b"new",), flags=os.O_RDWR, mode=0o104755)
    assert r.error == 0, os.strerror(r.error)
    st = os.stat(e / "new")
    assert (st.st_uid, st.st_gid) == SQUASH
    assert c.err(Opcode.MKDIR, 1, abi.MKDIR_IN, names=(b"d",), mode=0o755) == 0
    assert (os.stat(e / "d").st_uid, os.stat(e / "d").st_gid) == SQUASH
    nodeid, _ = c.lookup(1, b"new")
    assert c.err(Opcode.SETATTR, nodeid, abi.SETATTR_IN, valid=abi.FATTR_UID | abi.FATTR_GID,
                 uid=0, gid=0) == errno.EPERM
    # no device nodes from a squashed guest (the server's threads lack CAP_MKNOD)
    assert c.err(Opcode.MKNOD, 1, abi.MKNOD_IN, names=(b"mem",), mode=stat.S_IFCHR | 0o666,
                 rdev=(1 << 8) | 1) == errno.EPERM
    assert not (e / "mem").exists()
    # the host's permissions: a root-only file cannot be opened, a root-owned dir not written
    pnode, _ = c.lookup(1, b"private")
    assert c.err(Opcode.OPEN, pnode, abi.OPEN_IN, flags=os.O_RDONLY) == errno.EACCES
    rnode, _ = c.lookup(1, b"rootdir")
    assert c.err(Opcode.MKDIR, rnode, abi.MKDIR_IN, names=(b"x",), mode=0o755) == errno.EACCES
    assert c.err(Opcode.CREATE, rnode, abi.CREATE_IN, names=(b"x",), flags=os.O_RDWR,
                 mode=0o100644) == errno.EACCES
    assert c.err(Opcode.SETATTR, rnode, abi.SETATTR_IN, valid=abi.FATTR_MODE, mode=0o777) == errno.EPERM
    assert snapshot(e / "rootdir") == before_private
    assert (e / "private").read_bytes() == b"root only\n"
    c.alive()


def test_tls_option_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "notpem").write_text("not a certificate\n")
    cases = [
        (["serve", str(tmp_path), "--listen", "tcp:127.0.0.1:1", "--tls-cert", str(tmp_path / "no"),
          "--tls-key", str(tmp_path / "no")], "cannot load the TLS files"),
        (["serve", str(tmp_path), "--listen", "tcp:127.0.0.1:1", "--tls-ca", str(tmp_path / "notpem")],
         "needs both --tls-cert and --tls-key"),
        (["mount", "tcp:127.0.0.1:1", str(tmp_path), "--tls-ca", str(tmp_path / "notpem")],
         "cannot load the TLS files"),
        (["mount", "tcp:127.0.0.1:1", str(tmp_path), "--tls-cert", str(tmp_path / "notpem")],
         "needs both --tls-cert and --tls-key"),
        (["serve", str(tmp_path), "--listen", "tcp:127.0.0.1:1", "--max-pending", "0"],
         "at least 1"),
    ]

    for cmd, want in cases:
        r = subprocess.run([*NOTIFYFS, *cmd], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_tls_refused_on_virtio_serial(tmp_path: Path, pki: PKI) -> None:
    r = subprocess.run([*NOTIFYFS, "serve", str(tmp_path), "--listen",
                        f"virtio-serial:{tmp_path}/port.sock", "--tls-cert", pki.server_crt,
                        "--tls-key", pki.server_key], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "TLS is not available on virtio-serial" in r.stderr, r.stderr
