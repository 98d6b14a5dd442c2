"""The C library for the thin wrappers, and the one way they turn a failed call into OSError."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(res: int, what: str, path: str | bytes | None = None) -> int:
    """``res`` if the call succeeded; otherwise OSError with errno, like the os module raises."""
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return int(res)
