"""The fuzz harness (fuzz/fuzz_notifyfs.py) in a short run: the decoder and the server's request
handling take inputs for a few seconds each and must only ever produce ProtocolError or an error
reply (the harness asserts that, plus no fd leak and nothing changed outside the export).

The long run and its count are documented in fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_notifyfs.py"
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


def _run(args: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(HARNESS.parent.parent / "src")}
    r = subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["decode", "server"])
def test_random_inputs(target: str) -> None:
    """Seeded random inputs (no atheris needed): always runs."""
    out = _run([target, "--random", "30000", "--seed", "11"], 150)
    assert f"fuzz: {target}: 30000 inputs" in out


@pytest.mark.timeout(180)
@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris is not installed for this Python "
                    "(scripts/install.sh installs it where a wheel exists)")
@pytest.mark.parametrize("target", ["decode", "server"])
def test_atheris_short_run(target: str, tmp_path: Path) -> None:
    """Coverage-guided: 50000 inputs each."""
    out = _run([target, "-runs=50000", f"-artifact_prefix={tmp_path}/"], 170)
    assert "Done 50000 runs" in out, out[-2000:]
