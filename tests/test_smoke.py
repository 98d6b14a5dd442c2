"""The share mounts, serves a file both ways, and unmounts on SIGTERM with exit status 0."""

from __future__ import annotations

from conftest import Share, is_mounted


def test_round_trip(share: Share) -> None:
    (share.src / "host.txt").write_text("from host")
    assert (share.mnt / "host.txt").read_text() == "from host"
    (share.mnt / "guest.txt").write_text("from guest")
    assert (share.src / "guest.txt").read_text() == "from guest"
    assert share.stop() == 0
    assert not is_mounted(share.mnt)
