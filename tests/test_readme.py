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
    assert "ckptfmt convert tf2torch fixtures/examples/cnn_adam" in install


def test_readme_tf_snippet_runs(monkeypatch):
    """The README's TF-reader snippet runs as printed, from the repository root."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("## TensorFlow checkpoints without TensorFlow", 1)[1]
    code = re.findall(r"```python\n(.*?)```", block, re.S)[0]
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["kernel"].ndim == 4
    assert scope["graph"].info("optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE").slot.slot_name == "momentum"
