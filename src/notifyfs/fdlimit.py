"""The open-files limit (RLIMIT_NOFILE): the server holds one O_PATH fd per inode a guest knows
and one fd per file it has open, so the soft limit (often 1024) is what caps an export's size.
Every notifyfs process raises its soft limit to the hard limit at start."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

#: fds the server keeps for everything but inodes: listening and agent sockets, inotify and
#: fanotify fds, the export root, files open for the guest (a quarter of a small limit)
RESERVE = 256


def raise_nofile_limit(who: str) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (an unlimited hard limit: to the kernel's
    fs.nr_open); log the result at INFO and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("%s: open files limit (RLIMIT_NOFILE) raised from %d to %d", who, soft,
                     target)
            return target
        except (ValueError, OSError) as e:
            log.warning("%s: cannot raise the open files limit from %d to %d: %s", who, soft,
                        target, e)
            return soft
    log.info("%s: open files limit (RLIMIT_NOFILE) is %d", who, soft)
    return soft


def inode_room(limit: int) -> int:
    """How many inodes (one fd each) fit under an open files limit of ``limit``."""
    return max(1, limit - min(RESERVE, limit // 4))
