"""Remote events under random change sequences, checked by the differential oracle.

hypothesis generates a small tree (directories, files, hard links, a symlink or a fifo), a few
watches (maybe the root, some directories, some files directly) and 1-15 operations on it. The
operations are generated against a model of the tree so that they mostly hit existing paths; one
that fails anyway (ENOTEMPTY, EEXIST, EINVAL...) is harmless: it is done identically in both runs
and must fail with the same errno in both. The sequence is run locally (the oracle) and on the host
side of a fresh share while the mount is watched; the two event lists must be identical.

Runs are deterministic (``derandomize=True``); ``NOTIFYFS_RANDOM_EXAMPLES=N`` runs N examples per
mask instead of the default 25 (each costs about a second: one share per example).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import can_mount, is_mounted, start_share
from oracle import ALL, COMMON, Event, Scenario, run_local, run_remote
from test_events_oracle import _compare

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")

EXAMPLES = int(os.environ.get("NOTIFYFS_RANDOM_EXAMPLES", "25"))
MASKS = {"common": COMMON, "all": ALL}
NAMES = ["a", "b", "c", "d", "e"]
DATA = {"empty": "", "x": "x", "line": "new contents\n", "5000y": "y" * 5000}  # by short name
MODES = [0o600, 0o640, 0o644, 0o755]
TIMES = [(1000, 2000), (3000, 3000), (5_000_000, 6_000_000)]
SYMLINK_TARGETS = ["a", "b", "../a", "nowhere"]


# ---------------------------------------------------------------- model of the tree


def _parent(p: str) -> str:
    return p.rsplit("/", 1)[0] if "/" in p else ""


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


@dataclass
class Model:
    """What the tree holds: path -> 'f' (file), 'd' (dir), 'l' (symlink), 'p' (fifo).

    Files carry an inode number so that hard links and renames onto another link of the same
    inode (a successful no-op) are modelled."""

    kinds: dict[str, str] = field(default_factory=lambda: {"": "d"})
    inodes: dict[str, int] = field(default_factory=dict)
    next_inode: int = 0
    #: the watched paths, where they are now (see ``allowed``)
    watched: set[str] = field(default_factory=set)
    #: the inodes of the files watched directly
    protected: set[int] = field(default_factory=set)
    last: Op | None = None  # the previous operation (see ``_gap3``)

    def of(self, *kinds: str) -> list[str]:
        return sorted(p for p, k in self.kinds.items() if k in kinds)

    def dirs(self) -> list[str]:
        return self.of("d")

    def children(self, d: str) -> list[str]:
        return [p for p in self.kinds if p and _parent(p) == d]

    def add_file(self, p: str) -> None:
        self.kinds[p] = "f"
        self.inodes[p] = self.next_inode
        self.next_inode += 1

    def remove(self, p: str) -> None:
        del self.kinds[p]
        self.inodes.pop(p, None)
        self.watched.discard(p)

    def move(self, src: str, dst: str) -> None:
        """Move ``src`` (and, for a directory, everything below it) to ``dst``."""
        if self.kinds.get(dst) is not None:
            self.remove(dst)
        for p in sorted(self.kinds):
            if p == src or p.startswith(src + "/"):
                q = dst + p[len(src):]
                self.kinds[q] = self.kinds.pop(p)
                if p in self.inodes:
                    self.inodes[q] = self.inodes.pop(p)
                if p in self.watched:
                    self.watched.remove(p)
                    self.watched.add(q)

    def visible(self, p: str) -> bool:
        """The guest knows ``p`` by name: it is watched or in a watched directory."""
        return p in self.watched or (self.kinds.get(_parent(p)) == "d" and _parent(p) in self.watched)

    def allowed(self, op: Op) -> bool:
        """False for the operations that hit the known gap of notifyfs (KNOWN GAP 2 below): a
        change to a directly watched file made through a name the guest does not know."""
        def hidden_file(p: str) -> bool:
            return self.inodes.get(p) in self.protected and not self.visible(p)

        def dest_ok(src: str, dst: str) -> bool:
            d = _parent(dst)
            return d in self.watched or (d == _parent(src) and src in self.watched)

        if op.kind in ("create", "write", "append", "truncate", "chmod", "utime", "setxattr",
                       "read", "unlink"):
            return not hidden_file(op.path)
        if op.kind in ("rename", "link"):
            if hidden_file(op.path) or (op.kind == "rename" and hidden_file(op.arg)):
                return False
            return self.inodes.get(op.path) not in self.protected or dest_ok(op.path, op.arg)
        if op.kind == "rename_dir" and op.path in self.watched:
            return dest_ok(op.path, op.arg)
        return True


# ---------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op:
    kind: str
    path: str
    arg: Any = None

    def __repr__(self) -> str:
        return f"Op({self.kind!r}, {self.path!r}" + ("" if self.arg is None else f", {self.arg!r}") + ")"


def _write(p: Path, data: str, mode: str) -> None:
    # never open a fifo (it would block): refuse it the same way in both runs
    try:
        if stat.S_ISFIFO(os.stat(p).st_mode):
            raise OSError(errno.ENXIO, "fifo")
    except FileNotFoundError:
        pass
    with open(p, mode) as f:
        f.write(data)


def _read(p: Path) -> None:
    if stat.S_ISFIFO(os.stat(p).st_mode):
        raise OSError(errno.ENXIO, "fifo")
    p.read_bytes()


APPLY: dict[str, Callable[[Path, Op], object]] = {
    "create": lambda r, op: _write(r / op.path, DATA[op.arg], "w"),
    "write": lambda r, op: _write(r / op.path, DATA[op.arg], "w"),
    "append": lambda r, op: _write(r / op.path, DATA[op.arg], "a"),
    "truncate": lambda r, op: os.truncate(r / op.path, op.arg),
    "chmod": lambda r, op: os.chmod(r / op.path, op.arg),
    "utime": lambda r, op: os.utime(r / op.path, op.arg),
    "setxattr": lambda r, op: os.setxattr(r / op.path, op.arg[0], op.arg[1].encode()),
    "unlink": lambda r, op: os.unlink(r / op.path),
    "mkdir": lambda r, op: os.mkdir(r / op.path),
    "rmdir": lambda r, op: os.rmdir(r / op.path),
    "rename": lambda r, op: os.rename(r / op.path, r / op.arg),
    "rename_dir": lambda r, op: os.rename(r / op.path, r / op.arg),
    "link": lambda r, op: os.link(r / op.path, r / op.arg),
    "symlink": lambda r, op: os.symlink(op.arg, r / op.path),
    "mkfifo": lambda r, op: os.mkfifo(r / op.path),
    "read": lambda r, op: _read(r / op.path),
    "listdir": lambda r, op: os.listdir(r / op.path),
}


def apply_ops(root: Path, ops: list[Op]) -> list[str | None]:
    """Apply every operation; an OSError makes it a no-op. Returns the errno name per operation."""
    out: list[str | None] = []
    for op in ops:
        try:
            APPLY[op.kind](root, op)
            out.append(None)
        except OSError as e:
            out.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
    return out


def _model_step(m: Model, op: Op) -> None:
    """The effect of ``op`` on the model when it succeeds (best effort; failures leave it as is)."""
    k = m.kinds
    if op.kind == "create" and k.get(_parent(op.path)) == "d" and op.path not in k:
        m.add_file(op.path)
    elif op.kind == "unlink" and k.get(op.path) in ("f", "l", "p"):
        m.remove(op.path)
    elif op.kind in ("mkdir", "symlink", "mkfifo") and k.get(_parent(op.path)) == "d" \
            and op.path not in k:
        k[op.path] = {"mkdir": "d", "symlink": "l", "mkfifo": "p"}[op.kind]
    elif op.kind == "rmdir" and k.get(op.path) == "d" and not m.children(op.path):
        m.remove(op.path)
    elif op.kind == "rename" and k.get(op.path) in ("f", "l", "p") \
            and k.get(_parent(op.arg)) == "d" and k.get(op.arg) != "d":
        ino_src, ino_dst = m.inodes.get(op.path), m.inodes.get(op.arg)
        if not (ino_src is not None and ino_src == ino_dst):  # same inode: rename does nothing
            m.move(op.path, op.arg)
    elif op.kind == "rename_dir" and k.get(op.path) == "d" and k.get(_parent(op.arg)) == "d" \
            and not (op.arg + "/").startswith(op.path + "/") \
            and (op.arg not in k or (k[op.arg] == "d" and not m.children(op.arg))):
        m.move(op.path, op.arg)
    elif op.kind == "link" and k.get(op.path) == "f" and k.get(_parent(op.arg)) == "d" \
            and op.arg not in k:
        k[op.arg] = "f"
        m.inodes[op.arg] = m.inodes[op.path]


@st.composite
def new_path(draw: st.DrawFn, m: Model) -> str:
    """A path in an existing directory, usually one that does not exist yet."""
    d = draw(st.sampled_from(m.dirs()))
    free = [n for n in NAMES if _join(d, n) not in m.kinds]
    if free and draw(st.integers(0, 9)) != 5:  # sometimes an existing name (EEXIST, overwrite)
        return _join(d, draw(st.sampled_from(free)))
    return _join(d, draw(st.sampled_from(NAMES)))


@st.composite
def an_op(draw: st.DrawFn, m: Model) -> Op:
    for _ in range(4):
        op = draw(_an_op(m))
        if m.allowed(op) and not _gap3(m.last, op):
            m.last = op
            return op
    m.last = Op("listdir", "")
    return m.last


_CONTENT_OPS = ("create", "write", "append", "truncate", "chmod", "utime", "setxattr", "read")


def _gap3(prev: Op | None, op: Op) -> bool:
    """Excluded pairs of consecutive operations: KNOWN GAP 3 (a content change immediately
    followed by the removal of that name) and KNOWN GAP 4 (see the regression tests below)."""
    if prev is None or prev.kind not in _CONTENT_OPS:
        return False
    if op.kind == "read" and prev.kind in ("create", "write", "append") and op.path == prev.path:
        return True  # KNOWN GAP 4: a write closed and the file read again at once
    return (op.kind == "unlink" and op.path == prev.path) or (op.kind == "rename" and op.arg == prev.path)


@st.composite
def _an_op(draw: st.DrawFn, m: Model) -> Op:
    files, dirs = m.of("f"), m.dirs()
    subdirs = [d for d in dirs if d]
    leaves = m.of("f", "l", "p")
    choices = ["create", "mkdir", "symlink", "mkfifo", "listdir"]
    if files:
        choices += ["write", "append", "truncate", "read", "link"]
    if leaves:
        choices += ["unlink", "rename"]
    choices += ["chmod", "utime", "setxattr"]
    if subdirs:
        choices += ["rmdir", "rename_dir"]
    kind = draw(st.sampled_from(choices))
    if kind == "create":
        p = draw(new_path(m))
        if m.kinds.get(p, "f") != "f":  # not a dir, symlink or fifo: writing would follow/block
            p = draw(st.sampled_from(files)) if files else _join(p, "x")
        return Op(kind, p, draw(st.sampled_from(sorted(DATA))))
    if kind in ("mkdir", "symlink", "mkfifo"):
        p = draw(new_path(m))
        return Op(kind, p, draw(st.sampled_from(SYMLINK_TARGETS)) if kind == "symlink" else None)
    if kind == "listdir":
        return Op(kind, draw(st.sampled_from(dirs)))
    if kind in ("write", "append"):
        return Op(kind, draw(st.sampled_from(files)), draw(st.sampled_from(sorted(DATA))))
    if kind == "truncate":
        return Op(kind, draw(st.sampled_from(files)), draw(st.sampled_from([0, 3, 10000])))
    if kind == "read":
        return Op(kind, draw(st.sampled_from(files)))
    if kind == "link":
        return Op(kind, draw(st.sampled_from(files)), draw(new_path(m)))
    if kind == "unlink":
        return Op(kind, draw(st.sampled_from(leaves)))
    if kind == "rename":
        src = draw(st.sampled_from(leaves))
        if draw(st.booleans()) and len(leaves) > 1:  # overwrite another file
            dst = draw(st.sampled_from([p for p in leaves if p != src]))
        else:
            dst = draw(new_path(m))
        return Op(kind, src, dst)
    if kind in ("chmod", "utime", "setxattr"):
        p = draw(st.sampled_from(files + dirs))
        if kind == "chmod":
            return Op(kind, p, draw(st.sampled_from(MODES)))
        if kind == "utime":
            return Op(kind, p, draw(st.sampled_from(TIMES)))
        return Op(kind, p, (draw(st.sampled_from(["user.k", "user.other"])),
                            draw(st.sampled_from(["v", "w"]))))
    if kind == "rmdir":  # mostly an empty one; else ENOTEMPTY
        empty = [d for d in subdirs if not m.children(d)]
        if empty and draw(st.integers(0, 3)) > 0:
            return Op(kind, draw(st.sampled_from(empty)))
        return Op(kind, draw(st.sampled_from(subdirs)))
    assert kind == "rename_dir"
    src = draw(st.sampled_from(subdirs))
    empty = [d for d in subdirs if d != src and not m.children(d)]
    if empty and draw(st.integers(0, 3)) == 0:  # onto an empty directory
        return Op(kind, src, draw(st.sampled_from(empty)))
    dst = draw(new_path(m))
    if (dst + "/").startswith(src + "/") and draw(st.integers(0, 3)) > 0:  # mostly not EINVAL
        dst = _join(_parent(src), draw(st.sampled_from(NAMES)))
    return Op(kind, src, dst)


@dataclass
class Case:
    tree: list[Op]  # mkdir / create / link / symlink / mkfifo, applied before watching
    watches: list[str]
    ops: list[Op]

    def setup(self, root: Path) -> None:
        errs = apply_ops(root, self.tree)
        assert errs == [None] * len(errs), errs

    def script(self, root: Path) -> None:
        self.errors.append(apply_ops(root, self.ops))

    def __post_init__(self) -> None:
        self.errors: list[list[str | None]] = []


@st.composite
def cases(draw: st.DrawFn) -> Case:
    m = Model()
    tree: list[Op] = []

    def add(op: Op) -> None:
        tree.append(op)
        _model_step(m, op)

    for _ in range(draw(st.integers(0, 3))):
        p = draw(new_path(m))
        if p not in m.kinds:
            add(Op("mkdir", p))
    for _ in range(draw(st.integers(1, 4))):
        p = draw(new_path(m))
        if p not in m.kinds:
            add(Op("create", p, "line"))
    for _ in range(draw(st.integers(0, 2)) if m.of("f") else 0):
        src, dst = draw(st.sampled_from(m.of("f"))), draw(new_path(m))
        if dst not in m.kinds:
            add(Op("link", src, dst))
    if draw(st.integers(0, 3)) == 0:
        p = draw(new_path(m))
        if p not in m.kinds:
            add(Op("symlink", p, draw(st.sampled_from(SYMLINK_TARGETS))))
    if draw(st.integers(0, 3)) == 0:
        p = draw(new_path(m))
        if p not in m.kinds:
            add(Op("mkfifo", p))

    watches = [""] if draw(st.booleans()) else []
    watches += draw(st.lists(st.sampled_from([d for d in m.dirs() if d] or [""]), unique=True,
                             max_size=3))
    if m.of("f"):
        watches += draw(st.lists(st.sampled_from(m.of("f")), unique=True, max_size=2))
    watches = list(dict.fromkeys(watches)) or [""]
    m.watched = set(watches)
    m.protected = {m.inodes[w] for w in watches if w in m.inodes}

    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 15))):
        op = draw(an_op(m))
        ops.append(op)
        _model_step(m, op)
    return Case(tree, watches, ops)


# ---------------------------------------------------------------- the tests


def collapse_repeats(evs: list[Event]) -> list[Event]:
    """KNOWN GAP 1 (timing): the server watches the host's *directories* only, in one inotify
    queue, and the kernel merges an event into an identical one still unread at the queue's tail.
    A guest that watches a file *and* its directory gets every event twice, interleaved
    (dir/name, file, dir/name, file), so its queue never merges them; the server's does when the
    second change comes before it read the first (O_TRUNC then write(); chmod then utime). Both
    lists are therefore compared with every block of 2-3 identical-mask, cookie-less events that
    repeats at once reduced to one copy. (A remote that duplicated such a block is masked too.)"""
    out = list(evs)
    changed = True
    while changed:
        changed = False
        for k in (2, 3):
            i = 0
            while i + 2 * k <= len(out):
                block = out[i:i + k]
                if (out[i + k:i + 2 * k] == block and len({e[1] for e in block}) == 1
                        and all(e[3] is None for e in block) and len({e[0] for e in block}) == k):
                    del out[i + k:i + 2 * k]
                    changed = True
                else:
                    i += 1
    return out


def check_case(case: Case, mask: int, base: Path, exact: bool = False) -> None:
    scn = Scenario("random", case.setup, case.watches, case.script)
    local = run_local(scn, base, mask)
    (base / "src").mkdir()
    case.setup(base / "src")
    share = start_share(base / "src", base / "mnt")
    try:
        remote = run_remote(scn, share.src, share.mnt, mask)
    finally:
        share.stop()
        assert not is_mounted(base / "mnt")
    assert case.errors[0] == case.errors[1], f"operations failed differently: {case.errors}"
    if exact:
        _compare(local, remote)
    else:
        _compare(collapse_repeats(local), collapse_repeats(remote))


def _run_random(mask: int, tmp: Path) -> int:
    ran = [0]

    # shrinking a failure takes minutes (each example mounts a share): only when asked for
    phases = list(Phase) if os.environ.get("NOTIFYFS_RANDOM_SHRINK") else [
        Phase.explicit, Phase.reuse, Phase.generate]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
              print_blob=True, phases=phases)
    @given(case=cases())
    def inner(case: Case) -> None:
        ran[0] += 1
        base = Path(tempfile.mkdtemp(dir=tmp))
        try:
            check_case(case, mask, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    inner()
    return ran[0]


@pytest.mark.timeout(600)
@pytest.mark.xfail(strict=False, reason=(
    "random host sequences still find differences of the 'events are delivered after the fact' "
    "kind (README, Limits): a file created, written and removed before the server looks at it "
    "loses its MODIFY/CLOSE_WRITE. Run with NOTIFYFS_RANDOM_SHRINK=1 -s to see the minimal case"))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_random_changes_match_local(tmp_path: Path, mask_name: str) -> None:
    n = _run_random(MASKS[mask_name], tmp_path)
    print(f"{n} random examples ran under mask {mask_name}")


# ---------------------------------------------------------------- the gaps found, kept as regressions
# Each is the minimal sequence hypothesis found, shrunk and checked by hand with
# ``python -m notifyfs -vv share`` ("host event" / "remote event" / "inject" lines).


def _regression(case: Case, mask: int, tmp_path: Path) -> None:
    check_case(case, mask, tmp_path, exact=True)


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN GAP 1: the host queue (directory watches only) merges identical consecutive events "
    "that a guest watching both the file and its directory gets separately; the log shows one "
    "'host event ATTRIB b'a'' for two changes. Timing-dependent; amplified here to fail always"))
def test_gap1_file_and_dir_watched_repeated_attrib(tmp_path: Path) -> None:
    ops = [Op("chmod", "a", 0o600), Op("utime", "a", (1000, 2000))] * 5
    _regression(Case([Op("create", "a", "line")], ["", "a"], ops), COMMON, tmp_path)


@pytest.mark.timeout(60)
def test_gap2a_watched_file_changed_through_alias_in_unwatched_root(tmp_path: Path) -> None:
    """Was a gap: the server now names the inode behind a name the guest never looked up when
    the guest knows it under another (a hard link), so the watched file's events arrive."""
    tree = [Op("create", "a", "line"), Op("link", "a", "b")]
    _regression(Case(tree, ["a"], [Op("chmod", "b", 0o600)]), COMMON, tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN GAP 2b: a file watched directly is changed on the host through another hard link in a "
    "directory the guest never looked up: the server has no host watch there (no 'host event' "
    "at all), only directories are watched on the host"))
def test_gap2b_watched_file_changed_through_alias_in_unknown_dir(tmp_path: Path) -> None:
    tree = [Op("mkdir", "d"), Op("create", "a", "line"), Op("link", "a", "d/a")]
    _regression(Case(tree, ["a"], [Op("append", "d/a", "line")]), COMMON, tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN GAP 3: a content event on a name that is removed right after it (truncate c; unlink "
    "c) is lost: by the time the server looks the name up it is gone, the MODIFY is dropped and "
    "only the DELETE reaches the guest"))
def test_gap3_modify_then_unlink(tmp_path: Path) -> None:
    ops = [Op("truncate", "c", 10000), Op("unlink", "c")]
    _regression(Case([Op("create", "c", "line")], [""], ops), COMMON, tmp_path)


@pytest.mark.timeout(60)
def test_gap4_write_then_read(tmp_path: Path) -> None:
    """Was a gap: the injector now pairs a host file's OPEN with its later events by name (the
    server could attach an entry to some events and not others), so the open mode is right."""
    ops = [Op("write", "b", "5000y"), Op("read", "b")]
    _regression(Case([Op("create", "b", "line")], [""], ops), ALL, tmp_path)
