"""`ckptfmt convert tf2torch` DST kinds and --progress, `torch2tf` SRC kinds, through CliRunner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import main
from ckptfmt.converters.tf import TFCheckpointReader

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fixtures" / "examples" / "cnn_adam"
MODELS = str(ROOT / "fixtures" / "examples" / "models.py")


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_help_documents_destination_and_source_kinds():
    r = run("tf2torch", "--help")
    assert r.exit_code == 0
    assert ".safetensors" in r.output and "ckptfmt checkpoint directory" in r.output and "--progress" in r.output
    r = run("torch2tf", "--help")
    assert r.exit_code == 0 and ".safetensors" in r.output and "ckptfmt checkpoint" in r.output


def test_tf2torch_to_a_ckptfmt_directory_and_back(tmp_path):
    out = tmp_path / "torch-ckpt"
    r = run("tf2torch", EXAMPLE, out, "--no-optimizer")
    assert r.exit_code == 0, r.output
    tree = ckptfmt.load(out)
    assert tree["model"]["conv.weight"].shape == (4, 3, 3, 3)
    assert run("tf2torch", EXAMPLE, out, "--no-optimizer").exit_code == 3  # exists
    assert run("tf2torch", EXAMPLE, out, "--no-optimizer", "-f").exit_code == 0
    back = tmp_path / "tf" / "ckpt-1"
    r = run("torch2tf", out, back, "--template", EXAMPLE, "--no-optimizer")
    assert r.exit_code == 0, r.output
    with TFCheckpointReader(EXAMPLE) as a, TFCheckpointReader(back) as b:
        model_keys = [k for k in a.keys() if k.startswith("model/")]
        assert model_keys and all(np.array_equal(a.get(k), b.get(k)) for k in model_keys)


def test_torch2tf_from_safetensors(tmp_path):
    st = tmp_path / "w.safetensors"
    assert run("tf2torch", EXAMPLE, st, "--no-optimizer").exit_code == 0
    r = run("torch2tf", st, tmp_path / "tf" / "ckpt-1", "--template", EXAMPLE, "--no-optimizer")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tf" / "checkpoint").exists()


def test_torch2tf_bad_source_names_the_file(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    r = run("torch2tf", bad, tmp_path / "tf" / "ckpt-1", "--template", EXAMPLE, "--no-optimizer")
    assert r.exit_code != 0 and "junk.safetensors" in r.output
    r = run("torch2tf", EXAMPLE, tmp_path / "tf" / "ckpt-1", "--template", EXAMPLE, "--no-optimizer")
    assert r.exit_code == 3 and "tf checkpoint" in r.output


def test_progress_flag_reaches_the_converter(tmp_path, monkeypatch):
    from ckptfmt.converters import convert

    seen = {}
    real = convert.tf_to_torch

    def spy(*a, **k):
        seen["progress"] = k.get("progress")
        return real(*a, **k)

    monkeypatch.setattr(convert, "tf_to_torch", spy)
    for flag, want in (("--progress", True), ("--no-progress", False), (None, None)):
        args = ["tf2torch", EXAMPLE, tmp_path / "w.safetensors", "--no-optimizer", "-f"] + ([flag] if flag else [])
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert seen["progress"] is want


def test_safetensors_and_ckptfmt_outputs_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from ckptfmt.cli.main import main\n"
        "for dst in sys.argv[2:]:\n"
        "    try:\n"
        "        main(['convert', 'tf2torch', sys.argv[1], dst, '--no-optimizer'])\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(tmp_path / "w.safetensors"), str(tmp_path / "d")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
