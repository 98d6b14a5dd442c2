"""``notifyfs demo``: share a temporary directory and show the share working, both ways.

It starts ``notifyfs share`` as a child process (exactly what a user would run), changes files on
the host side and in the mount, prints what each side sees, and unmounts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _show(label: str, root: str) -> None:
    names = sorted(os.listdir(root))
    print(f"  {label:<28} {' '.join(names) if names else '(empty)'}")


def demo() -> int:
    base = tempfile.mkdtemp(prefix="notifyfs-demo-")
    src, mnt = os.path.join(base, "host"), os.path.join(base, "guest")
    os.mkdir(src)
    os.mkdir(mnt)
    print(f"notifyfs demo: sharing {src} at {mnt}")
    proc = subprocess.Popen([sys.executable, "-m", "notifyfs", "share", src, mnt])
    try:
        deadline = time.monotonic() + 20
        while not _mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                print("notifyfs demo: the share did not come up", file=sys.stderr)
                return 1
            time.sleep(0.05)
        steps = [
            ("host writes hello.txt", lambda: _write(os.path.join(src, "hello.txt"), "hi from the host\n")),
            ("guest reads hello.txt", lambda: _print_file(os.path.join(mnt, "hello.txt"))),
            ("guest creates notes/todo.md", lambda: _mkdir_write(os.path.join(mnt, "notes"), "todo.md",
                                                                 "- ship it\n")),
            ("host reads notes/todo.md", lambda: _print_file(os.path.join(src, "notes", "todo.md"))),
            ("guest renames hello.txt",
             lambda: os.rename(os.path.join(mnt, "hello.txt"), os.path.join(mnt, "welcome.txt"))),
        ]
        for what, action in steps:
            print(f"- {what}")
            action()
        _show("host directory:", src)
        _show("guest mount:", mnt)
        ok = sorted(os.listdir(src)) == sorted(os.listdir(mnt)) == ["notes", "welcome.txt"]
        print("notifyfs demo:", "both sides agree" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)
        subprocess.run(["rm", "-rf", base], check=False)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mkdir_write(directory: str, name: str, text: str) -> None:
    os.mkdir(directory)
    _write(os.path.join(directory, name), text)


def _print_file(path: str) -> None:
    with open(path) as f:
        print("   ", f.read().strip())
