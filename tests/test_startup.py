"""Start-up: a command imports only what it needs (ml_dtypes, torch, TF, onnx, tqdm when used).

Each case runs in a fresh interpreter and lists the heavy modules it ended up importing.
``benchmarks/bench_startup.py`` measures the wall time these imports cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ckptfmt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_FIXTURE = os.path.join(ROOT, "fixtures", "tf", "tf_module", "ckpt-1")
HEAVY = ("torch", "tensorflow", "ml_dtypes", "onnx", "tqdm", "keras", "h5py")


def _imported_after(code: str, cwd: str) -> list[str]:
    probe = (
        "import sys, json\n"
        f"{code}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(args: list[str]) -> str:
    # standalone_mode=False: the command returns instead of calling sys.exit, so the probe
    # still runs; a failing command raises and fails the subprocess (check=True).
    return (
        "from ckptfmt.cli.main import main\n"
        f"rc = main({args!r}, prog_name='ckptfmt', standalone_mode=False)\n"
        "assert rc in (None, 0), rc\n"
    )


def test_import_ckptfmt_imports_no_framework(tmp_path):
    assert _imported_after("import ckptfmt", str(tmp_path)) == []


def test_help_imports_no_framework(tmp_path):
    assert _imported_after(_cli(["--help"]), str(tmp_path)) == []
    assert _imported_after(_cli(["convert", "--help"]), str(tmp_path)) == []


def test_import_and_help_do_not_even_import_numpy(tmp_path):
    """The package's functions are imported on first use: --help and --version cost only
    the interpreter, click and our command table."""
    for code in ("import ckptfmt; ckptfmt.FORMAT_VERSION; ckptfmt.CkptFmtError", _cli(["--help"]), _cli(["--version"])):
        probe = code + "\nimport sys\nprint('numpy' in sys.modules)\n"
        out = subprocess.run([sys.executable, "-c", probe], cwd=str(tmp_path), capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "False", code
    code = "import ckptfmt\nfrom ckptfmt import save, CheckpointManager\nprint(sorted(n for n in ckptfmt.__all__ if not hasattr(ckptfmt, n)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["ckptfmt", "safetensors", "tf"])
def test_verify_and_inspect_import_no_framework(tmp_path, kind):
    if kind == "ckptfmt":
        path = str(tmp_path / "ck")
        ckptfmt.save({"w": np.ones((2, 3), np.float32), "step": 3}, path)
    elif kind == "safetensors":
        from safetensors.numpy import save_file

        path = str(tmp_path / "w.safetensors")
        save_file({"w": np.ones((2, 3), np.float32)}, path)
    else:
        path = TF_FIXTURE
    assert _imported_after(_cli(["verify", path]), str(tmp_path)) == []
    assert _imported_after(_cli(["inspect", path]), str(tmp_path)) == []


def test_bfloat16_checkpoint_still_loads_in_a_fresh_process(tmp_path):
    """ml_dtypes is imported on demand: reading a bfloat16 tensor in a process that never
    imported it returns a real bfloat16 array (not raw bytes)."""
    import ml_dtypes

    path = str(tmp_path / "bf")
    ckptfmt.save({"w": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}, path)
    code = (
        "import ckptfmt, sys\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"w = ckptfmt.load({path!r})['w']\n"
        "print(w.dtype.name, w.astype('float32').tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["bfloat16", "[0.0,", "1.0,", "2.0,", "3.0]"]


def test_tf_bfloat16_read_in_a_fresh_process():
    code = (
        "import sys, json\n"
        "from ckptfmt.converters.tf.bundle import TFCheckpointReader\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"r = TFCheckpointReader({os.path.join(ROOT, 'fixtures', 'tf', 'all_dtypes', 'dtypes')!r})\n"
        "names = [k for k in r.keys() if r.dtype(k).name == 'bfloat16']\n"
        "print(json.dumps([names, 'ml_dtypes' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, imported = json.loads(out.stdout)
    assert names and imported
