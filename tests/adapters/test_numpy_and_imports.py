"""The numpy adapter, and how the framework modules behave when a framework is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ckptfmt
from ckptfmt.adapters import numpy as npa
from ckptfmt.errors import UnsupportedDtypeError


def test_to_state_normalises_scalars_and_containers_without_copying():
    w = np.ones((2, 3), np.float32)
    tree = npa.to_state(OrderedDict(w=w, lr=np.float32(0.5), opt={0: (np.bool_(True), "x", None)}))
    assert type(tree) is dict and tree["w"] is w
    assert tree["lr"].shape == () and tree["lr"].dtype == np.float32
    assert tree["opt"][0][0].dtype == np.bool_ and tree["opt"][0][1:] == ("x", None)


@pytest.mark.parametrize(
    "bad, where",
    [({"a": [np.array(["s"])]}, "a/0"), ({"a": {(1, 2): 1}}, "'a'"), ({"x": object()}, "'x'"), ({"a": {True: 1}}, "'a'")],
)
def test_to_state_names_the_bad_path(bad, where):
    with pytest.raises(UnsupportedDtypeError, match=where):
        npa.to_state(bad)


def test_numpy_round_trip_through_the_core_api(tmp_path):
    tree = npa.to_state({"b": np.array([1, 2], ml_dtypes.bfloat16), "t": (np.float64(2.0), 3)})
    ckptfmt.save(tree, tmp_path / "ck")
    back = npa.from_state(ckptfmt.load(tmp_path / "ck"))
    assert back["b"].dtype == np.dtype(ml_dtypes.bfloat16) and back["t"][1] == 3
    assert isinstance(back["t"], tuple)


def _run_without(framework: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``framework`` cannot be imported."""
    src = Path(ckptfmt.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    prelude = f"import sys; sys.modules[{framework!r}] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("framework, module", [("torch", "ckptfmt.torch"), ("tensorflow", "ckptfmt.tensorflow"),
                                               ("torch", "ckptfmt.adapters.torch"),
                                               ("tensorflow", "ckptfmt.adapters.tensorflow")])
def test_missing_framework_raises_framework_not_available(framework, module):
    code = f"""
import ckptfmt
from ckptfmt.errors import FrameworkNotAvailableError
try:
    import {module}
except FrameworkNotAvailableError as e:
    assert isinstance(e, ImportError)
    print(e.framework, e.extra)
    print(e)
else:
    raise SystemExit("no error")
"""
    result = _run_without(framework, code)
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.strip().splitlines()
    assert first == f"{framework} {framework}"
    assert f"pip install 'ckptfmt[{framework}]'" in message


def test_core_package_imports_no_framework():
    code = "import sys, ckptfmt, ckptfmt.adapters, ckptfmt.adapters.numpy\n" \
           "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(Path(ckptfmt.__file__).resolve().parent.parent)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
