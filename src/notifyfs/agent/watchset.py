"""What the guest watches on our mount, read from /proc/*/fdinfo (inotify and fanotify marks).

The parsing (:func:`parse_fdinfo`) does no I/O; :func:`scan` walks /proc. A FUSE inode's mark line
carries its file handle (type 0x81: nodeid and generation), so no inode-number map is needed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..linux.fs import FUSE_HANDLE_TYPE, parse_fuse_handle


@dataclass
class WatchSet:
    masks: dict[int, int] = field(default_factory=dict)  # nodeid -> OR of the marks' masks
    everything: int = 0  # fanotify filesystem/mount marks on our mount: they see every inode
    started: float = 0.0  # time.monotonic() when the scan that produced this began
    #: nodeid -> a time before which its mark did not exist: the start of the last scan that
    #: did not see it (0.0 for marks seen by the first scan). An event that reached the agent
    #: before then happened before the watch, and the kernel would not have reported it to it.
    added_after: dict[int, float] = field(default_factory=dict)
    everything_after: float = 0.0

    def wants(self, arrived: float, *targets: tuple[int, int]) -> bool:
        """Would a mark that existed when an event ``arrived`` see any of ``targets``, each a
        (nodeid, event bits) pair: the events the injected call makes on that inode?"""
        bits_any = 0
        for nodeid, bits in targets:
            bits_any |= bits
            mask = self.masks.get(nodeid)
            if mask is not None and mask & bits and arrived >= self.added_after.get(nodeid, 0.0):
                return True
        return bool(self.everything & bits_any) and arrived >= self.everything_after

    def followed_by(self, new: WatchSet) -> WatchSet:
        """``new`` (a later scan), told when each of its marks appeared at the latest."""
        for nodeid in new.masks:
            new.added_after[nodeid] = (self.added_after.get(nodeid, 0.0) if nodeid in self.masks
                                       else self.started)
        new.everything_after = self.everything_after if self.everything else self.started
        return new


def _fields(line: str) -> dict[str, str]:
    out = {}
    for item in line.split()[1:]:
        key, sep, value = item.partition(":")
        if sep:
            out[key] = value
    return out


def parse_fdinfo(text: str, sdev: int, mnt_id: int) -> tuple[dict[int, int], int]:
    """Marks on our mount in one fdinfo file: ({nodeid: mask}, mask of whole-mount marks)."""
    masks: dict[int, int] = {}
    everything = 0
    for line in text.splitlines():
        if not line.startswith(("inotify ", "fanotify ")) or line.startswith("fanotify flags:"):
            continue
        f = _fields(line)
        if "mask" not in f:
            continue
        mask = int(f["mask"], 16)
        if "ino" in f:
            if int(f.get("sdev", "-1"), 16) != sdev:
                continue
            if int(f.get("fhandle-type", "0"), 16) != FUSE_HANDLE_TYPE or "f_handle" not in f:
                continue
            nodeid, _gen = parse_fuse_handle(f["f_handle"])
            masks[nodeid] = masks.get(nodeid, 0) | mask
        elif "mnt_id" in f:
            everything |= mask if int(f["mnt_id"], 16) == mnt_id else 0  # hex, unlike mountinfo
        elif "sdev" in f:
            everything |= mask if int(f["sdev"], 16) == sdev else 0
    return masks, everything


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal dev_t (what fdinfo prints as sdev) for a userspace st_dev."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def scan(sdev: int, mnt_id: int, skip_pid: int | None = None) -> WatchSet:
    ws = WatchSet(started=time.monotonic())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return ws
    for pid in pids:
        if skip_pid is not None and int(pid) == skip_pid:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target not in ("anon_inode:inotify", "anon_inode:[fanotify]"):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    text = f.read()
            except OSError:
                continue
            try:
                masks, everything = parse_fdinfo(text, sdev, mnt_id)
            except ValueError:
                continue  # a line format this kernel version prints differently: not ours
            for nodeid, mask in masks.items():
                ws.masks[nodeid] = ws.masks.get(nodeid, 0) | mask
            ws.everything |= everything
    return ws
