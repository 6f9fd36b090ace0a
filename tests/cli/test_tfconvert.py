"""`ckptfmt convert tf2torch` / `torch2tf` through CliRunner: output, exit codes, numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckptfmt.cli.main import main
from ckptfmt.converters.mapping import Mapping, Rename
from ckptfmt.converters.tf import build_object_graph, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fixtures" / "examples" / "cnn_adam"
MODELS = str(ROOT / "fixtures" / "examples" / "models.py")
FIX = ROOT / "fixtures" / "tf"


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_dry_run_prints_table_and_unused_keys(tmp_path):
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "conv/kernel" in r.output and "conv.weight" in r.output and "Transpose((3, 2, 0, 1))" in r.output
    assert "(3, 3, 3, 4) -> (4, 3, 3, 3)" in r.output
    assert "unused source keys" in r.output and "optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE" in r.output
    assert not (tmp_path / "o.pt").exists()


def test_strict_errors_list_all_unmapped_keys(tmp_path):
    m = tmp_path / "m.json"
    Mapping((Rename("head/bias", "head.bias"),)).save(m)
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--map", m, "--no-optimizer")
    assert r.exit_code == 3
    for k in ("conv/kernel", "bn/gamma", "bn/moving_variance", "head/kernel"):
        assert k in r.output
    assert "hint:" in r.output


def test_unknown_layer_fails_naming_it(tmp_path):
    keys = {"model/prelu/alpha/.ATTRIBUTES/VARIABLE_VALUE": np.ones((4,), np.float32)}
    write_checkpoint(tmp_path / "ck", keys, object_graph=build_object_graph(keys))
    r = run("tf2torch", tmp_path / "ck", tmp_path / "o.pt", "--no-optimizer")
    assert r.exit_code == 3
    assert "'prelu'" in r.output and "--map" in r.output


def test_optimizer_needs_model(tmp_path):
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt")
    assert r.exit_code == 3 and "--model" in r.output and "--no-optimizer" in r.output


def test_bad_optimizer_config_is_an_error(tmp_path):
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--model", MODELS + ":cnn", "--optimizer-config", "{nope")
    assert r.exit_code == 3 and "--optimizer-config" in r.output


def test_safetensors_weights_only(tmp_path):
    r = run("tf2torch", EXAMPLE, tmp_path / "w.safetensors", "--no-optimizer")
    assert r.exit_code == 0, r.output
    from safetensors.numpy import load_file

    w = load_file(tmp_path / "w.safetensors")
    assert w["conv.weight"].shape == (4, 3, 3, 3) and "head.weight" in w
    assert run("tf2torch", EXAMPLE, tmp_path / "w.safetensors", "--no-optimizer").exit_code == 3  # exists
    assert run("tf2torch", EXAMPLE, tmp_path / "w.safetensors", "--no-optimizer", "--overwrite").exit_code == 0


@pytest.mark.torch
def test_tf2torch_bundled_example_logits_and_resume(tmp_path):
    torch = pytest.importorskip("torch")
    from ckptfmt.converters.convert import load_factory
    from ckptfmt.converters.optim import KerasAdam

    out = tmp_path / "cnn.pt"
    r = run("tf2torch", EXAMPLE, out, "--model", MODELS + ":cnn", "--exact-optimizer")
    assert r.exit_code == 0, r.output
    assert "KerasAdam" in r.output
    exp = np.load(EXAMPLE / "expected.npz")
    ck = torch.load(out, weights_only=True)
    model = load_factory(MODELS + ":cnn")()[0]
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(exp["x"].transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, exp["logits"], atol=1e-5, rtol=0)
    opt = KerasAdam(model.parameters(), **ck["optimizer_hyperparameters"])
    opt.load_state_dict(ck["optimizer"])
    model.train()
    losses = []
    for x, y in zip(exp["next_x"], exp["next_y"]):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(losses, exp["next_losses"], atol=1e-5, rtol=0)


@pytest.mark.torch
def test_stock_adam_report_states_epsilon(tmp_path):
    pytest.importorskip("torch")
    r = run("tf2torch", EXAMPLE, tmp_path / "cnn.pt", "--model", MODELS + ":cnn")
    assert r.exit_code == 0, r.output
    assert "torch.optim.Adam" in r.output and "epsilon" in r.output


@pytest.mark.torch
def test_torch2tf_round_trip_via_cli(tmp_path):
    torch = pytest.importorskip("torch")
    a = tmp_path / "a.pt"
    assert run("tf2torch", EXAMPLE, a, "--model", MODELS + ":cnn", "--exact-optimizer").exit_code == 0
    r = run("torch2tf", a, tmp_path / "tf" / "ckpt-1", "--template", EXAMPLE, "--model", MODELS + ":cnn")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tf" / "checkpoint").exists()
    b = tmp_path / "b.pt"
    assert run("tf2torch", tmp_path / "tf", b, "--model", MODELS + ":cnn", "--exact-optimizer").exit_code == 0
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(v, cb["optimizer"]["state"][i][n]) for i, s in ca["optimizer"]["state"].items() for n, v in s.items())


@pytest.mark.tensorflow
@pytest.mark.torch
def test_torch2tf_output_restores_in_keras(tmp_path):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    import keras

    pytest.importorskip("torch")
    a = tmp_path / "a.pt"
    assert run("tf2torch", EXAMPLE, a, "--model", MODELS + ":cnn", "--exact-optimizer").exit_code == 0
    r = run("torch2tf", a, tmp_path / "tf" / "ckpt-1", "--template", EXAMPLE, "--model", MODELS + ":cnn")
    assert r.exit_code == 0, r.output
    import importlib.util

    spec = importlib.util.spec_from_file_location("_make_examples", ROOT / "fixtures" / "examples" / "make_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    km, opt = mod.keras_cnn(), keras.optimizers.Adam(1e-2)
    opt.build(km.trainable_variables)
    tf.train.Checkpoint(model=km, optimizer=opt).read(tf.train.latest_checkpoint(str(tmp_path / "tf"))).assert_consumed()
    exp = np.load(EXAMPLE / "expected.npz")
    np.testing.assert_allclose(km(exp["x"], training=False).numpy(), exp["logits"], atol=1e-6)
    assert int(opt.iterations.numpy()) == 3


@pytest.mark.torch
def test_dry_run_with_model_plans_optimizer(tmp_path):
    pytest.importorskip("torch")
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--dry-run", "--model", MODELS + ":cnn")
    assert r.exit_code == 0, r.output
    assert "stem.weight" in r.output and "classifier.weight" in r.output and "permuted" in r.output
    assert "optimizer: torch.optim.Adam" in r.output and "assumed Keras defaults" in r.output
    assert "unused source keys" not in r.output
    assert not (tmp_path / "o.pt").exists()


def test_torch2tf_bad_source_is_one_clear_error(tmp_path):
    """A non-torch SRC gives our error (exit 3) naming the file; a missing one is a usage error (2)."""
    from click.testing import CliRunner

    from ckptfmt.cli.main import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    for src, code in ((bad, 3), (tmp_path / "missing.pt", 2)):
        r = CliRunner().invoke(main, ["convert", "torch2tf", str(src), str(tmp_path / "out" / "ckpt"),
                                      "--template", "fixtures/examples/cnn_adam", "--model", "fixtures/examples/models.py:cnn"])
        assert r.exit_code == code, r.output
        assert str(src) in r.output and "Traceback" not in r.output


def test_tf_module_preset_via_cli(tmp_path):
    r = run("tf2torch", FIX / "tf_module", tmp_path / "m.safetensors", "--preset", "tf-module", "--no-optimizer")
    assert r.exit_code == 0, r.output
    from safetensors.numpy import load_file

    assert "blocks.1.w" in load_file(tmp_path / "m.safetensors")
    r = run("tf2torch", FIX / "tf_module", tmp_path / "x.safetensors", "--preset", "nope")
    assert r.exit_code == 2 and "nope" in r.output  # click's usage error lists the choices


def test_tf_keras2_checkpoint_dry_run_plans_its_optimizer(tmp_path):
    r = run("tf2torch", FIX / "tfkeras2_cnn_adam", tmp_path / "o.pt", "--model", MODELS + ":cnn", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "stem.weight" in r.output and "optimizer: torch.optim.Adam" in r.output
    assert "unused source keys (1)" in r.output  # save_counter only: every slot was placed


def test_diff_through_tf2torch(tmp_path):
    from ckptfmt.cli.main import main as cli_main

    assert run("tf2torch", EXAMPLE, tmp_path / "w.safetensors", "--no-optimizer").exit_code == 0
    r = CliRunner().invoke(cli_main, ["diff", "--tf2torch", str(EXAMPLE), str(tmp_path / "w.safetensors")])
    assert r.exit_code == 0 and "identical: 9 same" in r.output, r.output
    r = CliRunner().invoke(cli_main, ["diff", str(EXAMPLE), str(tmp_path / "w.safetensors"), "--json"])
    assert r.exit_code == 1  # without --tf2torch the names differ
    r = CliRunner().invoke(cli_main, ["diff", str(EXAMPLE), str(tmp_path / "w.safetensors"), "--model", MODELS + ":cnn"])
    assert r.exit_code == 2 and "--tf2torch" in r.output


@pytest.mark.torch
def test_inspect_shortens_long_metadata(tmp_path):
    from ckptfmt.cli.main import main as cli_main

    assert run("tf2torch", EXAMPLE, tmp_path / "c.pt", "--model", MODELS + ":cnn").exit_code == 0
    r = CliRunner().invoke(cli_main, ["inspect", str(tmp_path / "c.pt")])
    line = next(l for l in r.output.splitlines() if l.startswith("metadata:"))
    assert len(line) < 300 and "--json shows all" in line
    r = CliRunner().invoke(cli_main, ["inspect", str(tmp_path / "c.pt"), "--json"])
    assert "conversion_report" in json.loads(r.output)["metadata"]


def test_pair_option_is_parsed(tmp_path):
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--model", MODELS + ":cnn", "--dry-run", "--pair", "conv=stem")
    assert r.exit_code == 0, r.output
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--model", MODELS + ":cnn", "--dry-run", "--pair", "conv")
    assert r.exit_code == 2 and "KERAS_LAYER=TORCH_MODULE" in r.output
    r = run("tf2torch", EXAMPLE, tmp_path / "o.pt", "--model", MODELS + ":cnn", "--dry-run", "--pair", "conv=stem", "--pair", "conv=norm")
    assert r.exit_code == 2 and "paired twice" in r.output
