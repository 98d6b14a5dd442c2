"""Command-line parsing only: every command's work lives in its own module."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys

from . import __version__, wire


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError(f"expected UID:GID, got {text!r}")
    return int(uid), int(gid)


def _token(path: str | None) -> bytes | None:
    """The shared secret: from --token-file, else $NOTIFYFS_TOKEN (never the command line)."""
    if path:
        with open(path, "rb") as f:
            tok = f.read().strip()
        if not tok:
            raise ValueError(f"token file {path} is empty")
        return tok
    env = os.environ.get("NOTIFYFS_TOKEN")
    return env.encode() if env else None


class _RefuseToken(argparse.Action):
    """``--token VALUE`` would show the secret to every user (ps, /proc/PID/cmdline): refused,
    without repeating the value."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.error("the token is never taken from the command line (other users can read it "
                     "there): use --token-file PATH or the NOTIFYFS_TOKEN environment variable")


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    p.add_argument("--squash", type=_owner, metavar="UID:GID",
                   help="files the guest creates belong to UID:GID; chown is refused")
    p.add_argument("--entry-timeout", type=float, default=1.0, metavar="SEC",
                   help="how long the guest kernel caches names (default 1.0)")
    p.add_argument("--attr-timeout", type=float, default=1.0, metavar="SEC",
                   help="how long the guest kernel caches attributes (default 1.0)")
    p.add_argument("--writeback", action="store_true",
                   help="allow the guest kernel's writeback cache (faster small writes)")
    p.add_argument("--workers", type=int, default=8, help="worker threads per connection")
    p.add_argument("--watcher", choices=["auto", "fanotify", "inotify"], default="auto",
                   help="how the server watches the host for remote events (auto: inotify, "
                        "exact order; fanotify: exact echo attribution, needs CAP_SYS_ADMIN)")
    p.add_argument("--no-events", action="store_true",
                   help="do not watch the host: agents get no remote events")
    p.add_argument("--max-inodes", type=int, metavar="N",
                   help="inodes one agent may hold looked up; more get ENFILE (default 262144)")
    p.add_argument("--max-handles", type=int, metavar="N",
                   help="files and directories one agent may hold open; more get EMFILE "
                        "(default 16384)")


def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    if server:
        p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
        p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
        p.add_argument("--tls-ca", metavar="PEM",
                       help="require agents to present a certificate signed by this CA")
    else:
        p.add_argument("--tls", action="store_true",
                       help="speak TLS, verifying the server against the system's CAs")
        p.add_argument("--tls-ca", metavar="PEM",
                       help="speak TLS, verifying the server's certificate against this CA")
        p.add_argument("--tls-cert", metavar="PEM", help="this agent's certificate (mutual TLS)")
        p.add_argument("--tls-key", metavar="PEM", help="this agent's private key")
        p.add_argument("--tls-server-name", metavar="NAME",
                       help="the name the server's certificate must carry (default: the host)")


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_key or args.tls_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    try:
        return wire.server_tls(args.tls_cert, args.tls_key, args.tls_ca)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS files ({args.tls_cert}, {args.tls_key}"
                         f"{', ' + args.tls_ca if args.tls_ca else ''}): {e.strerror or e}") from None


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    try:
        return wire.client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:
        files = ", ".join(f for f in (args.tls_ca, args.tls_cert, args.tls_key) if f)
        raise ValueError(f"cannot load the TLS files ({files}): {e.strerror or e}") from None


def _events_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", choices=["both", "local"], default=None,
                   help="both (default): local and remote events; local: only the guest's own")


def _mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", dest="options", metavar="OPT[,OPT...]",
                   help="mount options: ro, allow_other, noexec, noatime, fsname=, subtype=, "
                        "readdirplus=yes|no|auto, no_writeback, sync_read, no_parallel_dirops, "
                        "max_write=N")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: "--token SECRET" must not be taken for "--token-file SECRET"
    parser = argparse.ArgumentParser(prog="notifyfs", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"notifyfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="export a directory to agents (the host side)",
                       allow_abbrev=False)
    p.add_argument("export")
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="unix:PATH, tcp:HOST:PORT, vsock:any:PORT, or virtio-serial:PATH (the unix "
                        "socket a QEMU virtio-serial chardev connects to)")
    p.add_argument("--token-file", metavar="PATH", help="shared secret (else $NOTIFYFS_TOKEN)")
    p.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="agents served (or handshaking) at once; more are refused (default 64)")
    p.add_argument("--max-pending", type=int, default=256, metavar="N",
                   help="requests read from one agent and not yet answered; past it the server "
                        "stops reading that agent until it reads its replies (default 256)")
    _tls_args(p, server=True)
    _server_args(p)

    p = sub.add_parser("mount", help="mount a served export (the guest side)",
                       allow_abbrev=False)
    p.add_argument("address", help="unix:PATH, tcp:HOST:PORT, vsock:CID:PORT (vsock:host:PORT), "
                                   "or virtio-serial:NAME (a VM's port)")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--token-file", metavar="PATH", help="shared secret (else $NOTIFYFS_TOKEN)")
    p.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    _tls_args(p, server=False)
    _mount_args(p)
    _events_arg(p)

    p = sub.add_parser("share", help="serve and mount on one machine (foreground)",
                       allow_abbrev=False)
    p.add_argument("src")
    p.add_argument("mountpoint")
    _server_args(p)
    _mount_args(p)
    _events_arg(p)
    p.add_argument("--stats-file", metavar="PATH",
                   help="on SIGUSR1, write the server's and agent's counters there as JSON")

    sub.add_parser("demo", help="share a temporary directory and show it working")

    from .bench.run import add_arguments
    p = sub.add_parser("bench", help="measure event latency, throughput, watch scale and the data "
                                     "path against local disk, polling, touch forwarding and sshfs")
    add_arguments(p)
    return parser


def _mopts(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .agent.relay import MountOptions

    opts = MountOptions.parse(args.options)
    if args.events:
        opts.events = args.events
    return opts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="notifyfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:  # -vv logs everything; else a peer cannot flood the log
        from .logutil import install
        install()
    # imported here so that `notifyfs --help` stays fast
    from .agent.relay import MountError
    from .server.passthrough import Options
    from .server.run import ServeError

    try:
        if args.command == "bench":
            from .bench.run import run
            return run(args)
        if args.command == "demo":
            from .demo import demo
            return demo()
        if args.command == "mount":
            from .agent.run import mount
            return mount(args.address, args.mountpoint, _mopts(args),
                         _token(args.token_file), args.foreground, _client_tls(args),
                         args.tls_server_name)
        sopts = Options(read_only=args.read_only, squash=args.squash,
                        entry_timeout=args.entry_timeout, attr_timeout=args.attr_timeout,
                        writeback=args.writeback, events=not args.no_events,
                        watcher=args.watcher)
        if args.max_inodes is not None:
            sopts.max_inodes = args.max_inodes
        if args.max_handles is not None:
            sopts.max_handles = args.max_handles
        if args.command == "serve":
            from .server.run import serve
            return serve(args.export, args.listen, sopts, _token(args.token_file), args.workers,
                         _server_tls(args), args.max_connections, args.max_pending)
        from .share import share
        return share(args.src, args.mountpoint, sopts, _mopts(args), args.workers,
                     args.stats_file)
    except (MountError, ServeError, ValueError, wire.HandshakeError, OSError, ssl.SSLError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"notifyfs: error: {msg}", file=sys.stderr)
        return 1
