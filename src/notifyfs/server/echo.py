"""The echo filter: host events caused by serving a client are not sent back to that client.

With an inotify host watcher the cause of an event is not reported, so the server records, before
each operation it performs for the client, the events that operation will cause: (directory
nodeid, name) keys and a mask of event kinds. The watcher consumes matching events. An expectation
lives until the watcher has read a batch that began after the operation finished (every event the
operation caused was queued before it returned, so that batch holds the last of them).

Not exact: a change made on the host to the same name, of the same kind, in that short window is
taken for the echo. The fanotify watcher attributes events by thread id instead and is exact.

Lock order: ``EchoFilter.lock`` is a leaf lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

Key = tuple[int, bytes]  # (directory nodeid, name); name b"" means the directory itself
#: kinds one request causes at most once (the others, MODIFY, ACCESS, ATTRIB, may repeat or be
#: coalesced by the kernel, so they match until the expectation expires)
ONE_SHOT = 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200  # CLOSE_*, OPEN, MOVED_*, CREATE, DELETE


@dataclass(eq=False)
class Expectation:
    keys: frozenset[Key]
    mask: int
    times: int = 1  # how often the request causes each ONE_SHOT kind
    done_at: float | None = None
    seen: dict[int, int] = field(default_factory=dict)


class EchoFilter:
    def __init__(self, consume: bool = True) -> None:
        self.consume = consume  # False: many watchers match the same expectations
        self.lock = threading.Lock()
        self._live: dict[int, Expectation] = {}
        self._ids = itertools.count(1)
        self.suppressed = 0

    def expect(self, keys: list[Key], mask: int, times: int = 1) -> int:
        exp = Expectation(frozenset(keys), mask, times)
        token = next(self._ids)
        with self.lock:
            self._live[token] = exp
        return token

    def done(self, token: int) -> None:
        with self.lock:
            exp = self._live.get(token)
            if exp is not None:
                exp.done_at = time.monotonic()

    def match(self, key: Key, kind: int) -> bool:
        with self.lock:
            for exp in self._live.values():
                if kind & exp.mask and key in exp.keys:
                    self.suppressed += 1
                    if kind & ONE_SHOT and self.consume:  # `times` of these per request, no more
                        exp.seen[kind] = exp.seen.get(kind, 0) + 1
                        if exp.seen[kind] >= exp.times:
                            exp.mask &= ~kind
                    return True
        return False

    def expire(self, batch_started: float) -> None:
        """The watcher read everything queued before ``batch_started``: drop what ended before."""
        with self.lock:
            dead = [t for t, e in self._live.items()
                    if e.done_at is not None and e.done_at < batch_started]
            for t in dead:
                del self._live[t]

    def __len__(self) -> int:
        return len(self._live)


#: reads the server makes on its own account (directory snapshots): every client's watcher drops
#: the events they cause, not only the client on whose behalf they were made
INTERNAL = EchoFilter(consume=False)
