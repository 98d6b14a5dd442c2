"""Request -> filesystem -> reply.

A filesystem is a class with one method per operation it implements, named ``op_<opname>`` in
lower case (``op_lookup``, ``op_read``, ...). Each takes the decoded :class:`Request` and returns the
reply payload (bytes), or None for requests that get no reply (FORGET). Raising
:class:`FuseError` or ``OSError`` answers with that errno. Every operation a filesystem does not
implement is answered ENOSYS by :class:`Filesystem` itself. Remote events (the next layer) are
emitted through :meth:`Filesystem.attach`'s ``notify`` callback, so another filesystem can emit
them too.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from ..protocol import Request

log = logging.getLogger(__name__)


class FuseError(Exception):
    """Answer the current request with ``errno``."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


Notify = Callable[[bytes], None]


class Filesystem:
    """Base class: answers ENOSYS for every operation a subclass does not define."""

    def attach(self, notify: Notify, remote_events: bool, revive: bool = False) -> None:
        """Called once per connection with a function that sends a notification to the agent;
        ``remote_events`` says whether the agent asked for remote events, ``revive`` whether it
        keeps what it needs to carry on with another server (revive.py)."""

    def close(self) -> None:
        """The connection is gone: release every resource held for it."""

    def handle(self, req: Request) -> bytes | None:
        method = getattr(self, "op_" + req.opname.lower(), None)
        if method is None:
            raise FuseError(errno.ENOSYS)
        result: bytes | None = method(req)
        return result
