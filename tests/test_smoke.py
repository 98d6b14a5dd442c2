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


def test_demo_shows_remote_events() -> None:
    """The README's first command: a share of a temporary directory with events arriving live."""
    import subprocess

    from conftest import NOTIFYFS, can_mount

    if can_mount():
        import pytest

        pytest.skip(can_mount() or "")
    r = subprocess.run([*NOTIFYFS, "demo"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "guest watcher: CREATE             notes.txt" in r.stdout
    assert "MOVED_TO           docs/notes.md" in r.stdout
