"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("## Quick start", 1)[1]
    return [c.strip() for c in re.findall(r"```(?:bash|sh)\n(.*?)```", block, re.S)][:2]


def test_ci_runs_the_readme_test_command_verbatim():
    install, tests = _readme_commands()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f]
    assert tests in ci, f"{tests!r} is not a line of .ci/run"
    assert "pip install" in install and "torch==2.13.0" in install and "-m venv" in install
