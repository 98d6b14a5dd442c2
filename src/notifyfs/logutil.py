"""Logging that a hostile peer cannot turn into a flood: every message template (logger name and
format string) may be logged ``burst`` times per ``period`` seconds; past that its records are
counted and dropped, and the next one let through says how many were dropped."""

from __future__ import annotations

import logging
import threading
import time


class RateLimit(logging.Filter):
    def __init__(self, burst: int = 20, period: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.lock = threading.Lock()
        # (logger, template) -> [window start, logged in window, dropped since last logged]
        self.seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self.lock:
            state = self.seen.get(key)
            if state is None:
                if len(self.seen) > 10000:  # templates are few; this only bounds a pathology
                    self.seen.clear()
                state = self.seen[key] = [now, 0, 0]
            if now - state[0] >= self.period:
                state[0], state[1] = now, 0
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            dropped, state[2] = int(state[2]), 0
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this not logged]"
        return True


def install(burst: int = 20, period: float = 10.0) -> None:
    """Rate-limit what every handler of the root logger writes."""
    limiter = RateLimit(burst, period)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limiter)
