"""The package's shape: core imports without frameworks; every package dir is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_core_imports_without_frameworks():
    code = (
        "import sys\n"
        "for m in ('torch', 'tensorflow', 'onnx', 'keras'): sys.modules[m] = None\n"
        "import ckptfmt, numpy as np, tempfile, os\n"
        "p = os.path.join(tempfile.mkdtemp(), 'c')\n"
        "ckptfmt.save({'a': np.ones(3)}, p); assert ckptfmt.load(p)['a'].sum() == 3\n"
        "assert ckptfmt.verify(p).ok\n"
        "bad = [m for m in ('torch', 'tensorflow', 'onnx', 'fsspec', 's3fs', 'botocore') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_every_package_directory_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, base)
                name = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
                if not any(name.startswith(other + ".") and other != pkg and other.startswith(pkg + ".") for other in mapping):
                    found.add(name)
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_no_top_level_cli_or_converters_installed():
    import importlib.util

    code = "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; print(importlib.util.find_spec('cli'), importlib.util.find_spec('converters'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd="/", capture_output=True, text=True).stdout
    assert out.strip() == "None None"
    assert importlib.util.find_spec("ckptfmt.converters") is not None and importlib.util.find_spec("ckptfmt.cli") is not None
