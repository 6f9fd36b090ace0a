"""The scripts in examples/ run and print what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_quickstart(tmp_path):
    r = _run("quickstart.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.torch
def test_resume_in_torch_matches_keras_losses(tmp_path):
    pytest.importorskip("torch")
    r = _run("resume_in_torch.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "largest difference" in r.stdout and r.stdout.count("torch loss") == 3
    assert (tmp_path / "tf" / "ckpt-1.index").is_file()
