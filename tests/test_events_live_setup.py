"""A directory the host creates and fills while the guest is mounted, watched by the guest right after.

Found by the VM run (tests/vm): the oracle suite makes each scenario's directory before mounting,
so it never sees this. Here one long-lived share runs the scenarios with the setup made while
mounted. Two bugs showed here: the injector took the filling's events to a guest watch added
after them (it now counts a mark only for events that reached the agent after the last /proc
scan that did not see it), and the unwatched CREATE of the directory invalidated the dentry the
guest had just looked up, after which the directory could not be opened by handle (ESTALE: FUSE
without export support cannot reconnect a directory's dentry) and every event in it was lost (the
injector now looks such a directory up again by the path the guest knew).

The guest cannot order a host change and its own new watch closer than the time the change
takes to reach it (as with any network file system): a watch added within that window may or
may not be told of the change. So the test adds each watch a moment after the setup (SETTLE),
not in the same millisecond.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from conftest import can_mount, start_share
from oracle import ALL, Recorder, run_local
from test_events_oracle import SCENARIOS

pytestmark = pytest.mark.skipif(can_mount() is not None, reason=can_mount() or "")

SETTLE = 0.3  # seconds: far more than a host change takes to reach the agent here
NAMES = ("write-existing", "append", "truncate-down", "chmod", "setxattr", "unlink", "mkdir",
         "rename-same-dir", "hardlink", "file-watched-modify")


@pytest.mark.timeout(120)
def test_directory_filled_while_mounted(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    share = start_share(tmp_path / "src", tmp_path / "mnt")
    differ = []
    try:
        for scn in [s for s in SCENARIOS if s.name in NAMES]:
            local = run_local(scn, Path(tempfile.mkdtemp(dir=tmp_path)), ALL)
            d = share.src / scn.name
            d.mkdir()
            scn.setup(d)  # while mounted: the server may already watch d
            time.sleep(SETTLE)
            rec = Recorder(share.mnt / scn.name, scn.watches, ALL)
            try:
                scn.script(d)
                rec.drain(scn.quiet)
                remote = rec.events()
            finally:
                rec.close()
            if remote != local:
                differ.append(f"{scn.name}: local {local}\n    remote {remote}")
    finally:
        share.stop()
    assert not differ, "\n".join(differ)
