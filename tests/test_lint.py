"""Lint and layering, as CI runs them: ruff over the linted paths, import-linter's contracts
(pyproject.toml: the layers format -> storage -> adapters -> api -> converters -> cli, and no
import cycles) over the package as installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Paths ruff checks: the whole tree.
RUFF_PATHS = ["."]


def test_ruff_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *RUFF_PATHS], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _stage(tmp: Path) -> Path:
    """ckptfmt/ as installed: the core with converters/ and cli/ inside it (package-dir), linked."""
    pkg = tmp / "ckptfmt"
    pkg.mkdir()
    for entry in (ROOT / "ckptfmt").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "converters").symlink_to(ROOT / "converters")
    (pkg / "cli").symlink_to(ROOT / "cli")
    (tmp / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return tmp


def test_import_contracts_are_kept(tmp_path):
    stage = _stage(tmp_path)
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    env = {**os.environ, "PYTHONPATH": str(stage), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=stage, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "Analyzed" in r.stdout
    # the staged tree, not the editable install, was analysed: converters and cli are in it
    assert int(r.stdout.split("Analyzed ")[1].split(" files")[0]) > 60
