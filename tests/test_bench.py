"""`notifyfs bench --quick` runs end to end and writes every file and section (a smoke test: the
figures are not checked, a benchmark reports and does not fail on a missed target)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import can_mount, fuse_mounts

SECTIONS = ("latency", "throughput", "scale", "datapath")


@pytest.mark.timeout(900)
def test_bench_quick(tmp_path: Path) -> None:
    reason = can_mount()
    if reason:
        pytest.skip(reason)
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "notifyfs", "bench", "--quick", "--out", str(out),
                        "--work", str(work)], capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [m for m in fuse_mounts() if m.startswith(str(work))], "bench left a mount behind"
    for name in ("results.json", "results.md"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick"
    for section in SECTIONS:
        assert "error" not in res[section], res[section].get("traceback")
    for method in ("local", "notifyfs", "poll", "touch"):
        assert set(res["latency"][method]) >= {"create", "modify", "rename", "delete"}
    assert {"create", "modify", "delete"} <= set(res["throughput"])
    assert res["scale"]["points"]
    assert {"local", "notifyfs"} <= set(res["datapath"]["targets"])
    # sshfs is measured, or its absence is explained in the output
    assert "sshfs" in res["datapath"]["targets"] or res["datapath"]["sshfs_skipped"]
    md = (out / "results.md").read_text()
    for heading in ("Event latency", "Throughput", "Watch scale", "Data path"):
        assert heading in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for png in ("latency-cdf.png", "scale.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
