"""Remote events: host changes give guest watchers exactly the events of a local disk.

Each scenario runs three ways: locally (the oracle), on the host side of a share while the mount is
watched (remote events), and through the mount itself (echo: the guest's own changes must give
their local events once, nothing more).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import can_mount, start_share
from oracle import ALL, COMMON, Scenario, run_local, run_remote

from notifyfs.linux import fs as linux_fs

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")


def _w(p: Path, data: str = "x", mode: str = "w") -> None:
    with open(p, mode) as f:
        f.write(data)


def _none(root: Path) -> None:
    pass


def _files(*names: str, dirs: tuple[str, ...] = ()) -> object:
    def setup(root: Path) -> None:
        for d in dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        for n in names:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            _w(root / n, "old contents\n")
    return setup


def _outside(root: Path) -> Path:
    out = root.parent / f"outside-{root.name}"
    out.mkdir(exist_ok=True)
    return out


def _exchange(a: Path, b: Path) -> None:
    linux_fs.renameat2(-100, str(a), -100, str(b), linux_fs.RENAME_EXCHANGE)


def _burst_create(n: int):  # type: ignore[no-untyped-def]
    def script(root: Path) -> None:
        for i in range(n):
            _w(root / f"f{i:04d}", "burst")
    return script


def _burst_modify(n: int):  # type: ignore[no-untyped-def]
    def script(root: Path) -> None:
        for i in range(n):
            _w(root / f"f{i:04d}", "more", "a")
    return script


def _deep_setup(root: Path) -> None:
    p = root
    for i in range(8):
        p = p / f"level{i}"
        p.mkdir()
        _w(p / "file", "deep")


DEEP = [str(Path(*[f"level{j}" for j in range(i + 1)])) for i in range(8)]


def _deep_script(root: Path) -> None:
    p = root
    for i in range(8):
        p = p / f"level{i}"
        _w(p / "file", "changed", "a")
        _w(p / "new", "new")


def _chown(p: Path) -> None:
    os.chown(p, 1234, 1234)


SCENARIOS = [
    Scenario("create-file", _none, [""], lambda r: _w(r / "a")),
    Scenario("create-empty-touch", _none, [""], lambda r: (r / "a").touch()),
    Scenario("write-existing", _files("a"), [""], lambda r: _w(r / "a", "new contents")),
    Scenario("append", _files("a"), [""], lambda r: _w(r / "a", "more", "a")),
    Scenario("truncate-down", _files("a"), [""], lambda r: os.truncate(r / "a", 3)),
    Scenario("truncate-up", _files("a"), [""], lambda r: os.truncate(r / "a", 10000)),
    Scenario("chmod", _files("a"), [""], lambda r: os.chmod(r / "a", 0o600)),
    Scenario("chown", _files("a"), [""], lambda r: _chown(r / "a")),
    Scenario("utime", _files("a"), [""], lambda r: os.utime(r / "a", (1000, 2000))),
    Scenario("setxattr", _files("a"), [""], lambda r: os.setxattr(r / "a", "user.k", b"v")),
    Scenario("unlink", _files("a"), [""], lambda r: os.unlink(r / "a")),
    Scenario("mkdir", _none, [""], lambda r: os.mkdir(r / "d")),
    Scenario("rmdir", _files(dirs=("d",)), [""], lambda r: os.rmdir(r / "d")),
    Scenario("rmdir-watched", _files(dirs=("d",)), ["", "d"], lambda r: os.rmdir(r / "d")),
    # events inside the directory just before (the injector keeps its fd for a burst), and after
    Scenario("empty-then-rmdir-watched", _files("d/a", "d/b"), ["", "d"],
             lambda r: (os.unlink(r / "d/a"), os.unlink(r / "d/b"), os.rmdir(r / "d"),
                        _w(r / "x"))),
    Scenario("rename-same-dir", _files("a"), [""], lambda r: os.rename(r / "a", r / "b")),
    Scenario("rename-across-dirs", _files("x/a", dirs=("y",)), ["x", "y"],
             lambda r: os.rename(r / "x/a", r / "y/b")),
    Scenario("rename-overwrite", _files("a", "b"), [""], lambda r: os.rename(r / "a", r / "b")),
    Scenario("rename-overwrite-watched-target", _files("a", "b"), ["", "b"],
             lambda r: os.rename(r / "a", r / "b")),
    Scenario("rename-dir", _files("d/f"), ["", "d"], lambda r: os.rename(r / "d", r / "e")),
    Scenario("move-to-unwatched-dir", _files("x/a", dirs=("y",)), ["x"],
             lambda r: os.rename(r / "x/a", r / "y/a")),
    Scenario("move-from-unwatched-dir", _files("x/a", dirs=("y",)), ["y"],
             lambda r: os.rename(r / "x/a", r / "y/a")),
    Scenario("move-out-of-export", _files("a"), ["", "a"],
             lambda r: os.rename(r / "a", _outside(r) / "a"), outside=True),
    Scenario("move-into-export", _none, [""],
             lambda r: (_w(_outside(r) / "in"), os.rename(_outside(r) / "in", r / "in")),
             outside=True),
    Scenario("exchange", _files("a", "b"), [""], lambda r: _exchange(r / "a", r / "b")),
    Scenario("hardlink", _files("a"), ["", "a"], lambda r: os.link(r / "a", r / "b")),
    Scenario("unlink-one-of-two-links", _files("a"), ["", "a"],
             lambda r: (os.link(r / "a", r / "b"), os.unlink(r / "a"))),
    Scenario("unlink-watched-file", _files("a"), ["", "a"], lambda r: os.unlink(r / "a")),
    Scenario("symlink", _none, [""], lambda r: os.symlink("target", r / "l")),
    Scenario("mkfifo", _none, [""], lambda r: os.mkfifo(r / "p")),
    Scenario("read-file", _files("a"), [""], lambda r: (r / "a").read_bytes()),
    Scenario("list-dir", _files("d/f"), ["", "d"], lambda r: os.listdir(r / "d")),
    Scenario("file-watched-modify", _files("a"), ["a"], lambda r: _w(r / "a", "more", "a")),
    Scenario("file-watched-chmod", _files("a"), ["a"], lambda r: os.chmod(r / "a", 0o640)),
    Scenario("atomic-save", _files("a"), ["", "a"],
             lambda r: (_w(r / ".a.tmp", "saved"), os.rename(r / ".a.tmp", r / "a"))),
    Scenario("burst-300-creates", _none, [""], _burst_create(300), quiet=1.0),
    Scenario("burst-200-modifies", _burst_create(200), [""], _burst_modify(200), quiet=1.0),
    Scenario("deep-tree", _deep_setup, ["", *DEEP], _deep_script, quiet=1.0),
    Scenario("rm-r-tree", _files("t/a/1", "t/a/2", "t/b/3"), ["", "t", "t/a", "t/b"],
             lambda r: shutil.rmtree(r / "t")),
]
IDS = [s.name for s in SCENARIOS]
MASKS = {"common": COMMON, "all": ALL}


def _compare(local: list, remote: list) -> None:  # type: ignore[type-arg]
    assert remote == local, "\n".join(
        ["events differ (local | remote):"]
        + [f"  {a!s:60} | {b!s}" for a, b in zip(local + [None] * len(remote),
                                                   remote + [None] * len(local), strict=False)
           if a is not None or b is not None])


def _check_against_local(base: Path, scn: Scenario, mask: int, watcher: str,
                         via_mount: bool) -> None:
    """Run ``scn`` locally, then on a fresh share (setup made on the host before mounting),
    changing the host side or, ``via_mount``, the mount itself; the events must be equal."""
    local = run_local(scn, base, mask)
    (base / "src").mkdir()
    scn.setup(base / "src")
    share = start_share(base / "src", base / "mnt", "--watcher", watcher)
    try:
        remote = run_remote(scn, share.src, share.mnt, mask, via_mount=via_mount)
    finally:
        share.stop()
    _compare(local, remote)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path


WATCHERS = ["inotify", "fanotify"]
#: fanotify merges events on one object while they are queued: two getdents of one listing give
#: one ACCESS, and a file's OPEN/ACCESS/CLOSE can be grouped ahead of later changes. Measured
#: differences, kept visible (xfail, not skipped) so that a fix shows up as XPASS.
FANOTIFY_MERGES = {"list-dir", "atomic-save", "rm-r-tree"}


#: seen in some runs (more often under load): a directory removed by the injector is still
#: referenced in the guest at that moment, so the guest kernel reports its DELETE_SELF and
#: IGNORED after the parent's DELETE instead of before. Not yet explained.
UNDER_LOAD = {"rm-r-tree"}


def _known_fanotify_difference(request: pytest.FixtureRequest, watcher: str, scn: Scenario) -> None:
    if scn.name in UNDER_LOAD:
        request.applymarker(pytest.mark.xfail(
            reason="DELETE_SELF of a removed directory can come after its parent's DELETE "
                   "(see UNDER_LOAD)", strict=False))
    if watcher == "fanotify" and scn.name in FANOTIFY_MERGES:
        request.applymarker(pytest.mark.xfail(
            reason="fanotify merges queued events on one object (see README, Limits)",
            strict=False))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("scn", SCENARIOS, ids=IDS)
def test_remote_events_match_local(base: Path, scn: Scenario, mask_name: str,
                                   watcher: str, request: pytest.FixtureRequest) -> None:
    _known_fanotify_difference(request, watcher, scn)
    _check_against_local(base, scn, MASKS[mask_name], watcher, via_mount=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("scn", [s for s in SCENARIOS if not s.outside],
                         ids=[s.name for s in SCENARIOS if not s.outside])
def test_changes_through_the_mount_have_no_echo(base: Path, scn: Scenario, mask_name: str,
                                                watcher: str) -> None:
    _check_against_local(base, scn, MASKS[mask_name], watcher, via_mount=True)
