"""tf2torch on real published architectures (keras.applications, reduced) and torch twins in
torchvision's layout: logits, one optimizer step on identical gradients, the way back to TF,
and each former silent failure either exact now or refused.

The Keras side is trained 2 Adam steps and checkpointed at test time (a few seconds per
model); the torch side is ``fixtures/realarch/models.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ckptfmt.errors import CheckFailedError, ConversionError

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]

ROOT = Path(__file__).resolve().parents[2]
MODELS = str(ROOT / "fixtures" / "realarch" / "models.py")
NAMES = ("densenet", "resnet", "mobilenet", "convnext", "vgg")


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    pytest.importorskip("torch")
    return tf


@pytest.fixture(scope="module")
def models():
    from ckptfmt.converters.convert import load_factory

    return lambda name: load_factory(f"{MODELS}:{name}")


@pytest.fixture(scope="module")
def runs(tf, models, tmp_path_factory):
    """Per architecture: a Keras model trained 2 Adam steps, its checkpoint and its eval logits."""
    import keras

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            keras.utils.set_random_seed(0)
            km = models(f"keras_{name}")()
            opt = keras.optimizers.Adam(1e-3)
            rng = np.random.default_rng(0)
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            for _ in range(2):
                x, y = rng.standard_normal((4, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 4)
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, km(x, training=True))
                opt.apply_gradients(zip(tape.gradient(loss, km.trainable_variables), km.trainable_variables))
            d = tmp_path_factory.mktemp(name)
            prefix = tf.train.Checkpoint(model=km, optimizer=opt).write(str(d / "ckpt"))
            x = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
            cache[name] = dict(prefix=prefix, keras=km, x=x, logits=km(x, training=False).numpy(), dir=d)
        return cache[name]

    return get


def _convnext_rules(tmp_path: Path) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_realarch_models", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "layer_scale.json"
    path.write_text(json.dumps(mod.CONVNEXT_RULES))
    return str(path)


def _torch_logits(torch, models, name, state, x):
    model = models(name)()[0]
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_real_architecture_converts_exactly_checks_itself_and_goes_back(name, runs, models, tmp_path):
    import keras
    import tensorflow as tf
    import torch

    from ckptfmt.converters.convert import tf_to_torch, torch_to_tf

    run = runs(name)
    out = tmp_path / f"{name}.pt"
    report = tf_to_torch(run["prefix"], out, model_factory=f"{MODELS}:{name}", keras_model=f"{MODELS}:keras_{name}",
                         mapping=_convnext_rules(tmp_path) if name == "convnext" else None, check=True)
    # the self-check's figures: outputs and one optimizer step on identical gradients
    assert report.check.passed
    (_, diff, scale), = report.check.outputs
    assert diff <= 1e-5 * max(scale, 1.0)
    assert report.check.step is not None and report.check.step[0] <= 1e-6 < report.check.step[1]
    # and independently of the check: the converted file's logits are Keras's
    ck = torch.load(out, weights_only=True)
    logits = _torch_logits(torch, models, name, ck["model"], run["x"])
    assert np.abs(logits - run["logits"]).max() <= 1e-5 * max(np.abs(run["logits"]).max(), 1.0)
    # notes a person reads: grouped, one line per convention
    assert len(report.notes) <= 8, report.notes

    # back to TF: the Keras model restores every variable and computes the same outputs
    back = tmp_path / "back" / "ckpt-1"
    torch_to_tf(out, back, template=run["prefix"], model_factory=f"{MODELS}:{name}", keras_model=f"{MODELS}:keras_{name}",
                mapping=_convnext_rules(tmp_path) if name == "convnext" else None)
    k2 = models(f"keras_{name}")()
    o2 = keras.optimizers.Adam(1e-3)
    o2.build(k2.trainable_variables)
    tf.train.Checkpoint(model=k2, optimizer=o2).read(str(back)).assert_consumed()
    np.testing.assert_allclose(k2(run["x"], training=False).numpy(), run["logits"], atol=1e-5 * max(np.abs(run["logits"]).max(), 1))
    assert int(o2.iterations.numpy()) == 2


# -- the former silent failures: exact now, or refused ------------------------------------------


def test_densenet_head_is_not_taken_for_a_flatten(runs, models, tmp_path):
    """BN (96 = 3 x 32 channels, after a concatenation) -> GAP -> Dense: the rows are not permuted."""
    import torch

    from ckptfmt.converters.convert import tf_to_torch

    run = runs("densenet")
    r = tf_to_torch(run["prefix"], tmp_path / "d.pt", model_factory=f"{MODELS}:densenet", optimizer=False)
    assert not any("Flatten" in n for n in r.notes)
    logits = _torch_logits(torch, models, "densenet", torch.load(tmp_path / "d.pt", weights_only=True)["model"], run["x"])
    assert np.abs(logits - run["logits"]).max() <= 1e-5 * max(np.abs(run["logits"]).max(), 1.0)
    # without an example input (no dataflow, no execution order) it is refused, never guessed
    with pytest.raises(ConversionError, match=r"example[_ ]input"):
        tf_to_torch(run["prefix"], tmp_path / "e.pt", model_factory=lambda: models("densenet")()[0], optimizer=False)
    # the preset (no torch model) guesses, and says so
    r = tf_to_torch(run["prefix"], tmp_path / "f.pt", optimizer=False, dry_run=True)
    assert any(n.startswith("ASSUMED predictions") for n in r.notes)


def test_resnet_shortcut_beside_main_branch_is_refused_without_the_keras_graph(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("resnet")
    with pytest.raises(ConversionError, match="parallel branches") as e:
        tf_to_torch(run["prefix"], tmp_path / "r.pt", model_factory=f"{MODELS}:resnet", optimizer=False)
    assert "conv2_block1_0_bn" in str(e.value) and "layer1.0.downsample.1" in str(e.value) and "--keras-model" in str(e.value)
    assert not (tmp_path / "r.pt").exists()


def test_resnet_with_conv_bias_into_bias_free_torch_model_says_why(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("resnet")

    with pytest.raises(ConversionError) as e:
        tf_to_torch(run["prefix"], tmp_path / "r.pt", model_factory=f"{MODELS}:resnet_no_bias", keras_model=f"{MODELS}:keras_resnet",
                    optimizer=False)
    msg = str(e.value)
    assert "same weight shape but differ in bias" in msg and "--fold-conv-bias" in msg
    # the offer, taken: exact, and reported
    r = tf_to_torch(run["prefix"], tmp_path / "r.pt", model_factory=f"{MODELS}:resnet_no_bias", keras_model=f"{MODELS}:keras_resnet",
                    optimizer=False, fold_conv_bias=True, check=True)
    assert r.check.passed and r.check.outputs[0][1] <= 1e-5 * max(r.check.outputs[0][2], 1)
    assert any(n.startswith("FOLDED: the bias of 15 Keras convolution(s)") for n in r.notes)
    # the bias's optimizer state has nowhere to go: refused, not dropped
    with pytest.raises(ConversionError, match="--no-optimizer"):
        tf_to_torch(run["prefix"], tmp_path / "s.pt", model_factory=f"{MODELS}:resnet_no_bias", keras_model=f"{MODELS}:keras_resnet",
                    fold_conv_bias=True)


def _load_models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_realarch_models2", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_layers_are_all_listed_with_a_rule_file_to_edit(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch
    from ckptfmt.converters.mapping import Mapping

    run = runs("convnext")
    with pytest.raises(ConversionError) as e:
        tf_to_torch(run["prefix"], tmp_path / "c.pt", model_factory=f"{MODELS}:convnext", optimizer=False)
    msg = str(e.value)
    assert msg.startswith("2 layer(s) with weights the converter does not know")
    assert "'block0_layer_scale': block0_layer_scale/variable (16,)" in msg and "'block1_layer_scale'" in msg
    # the rule file in the message loads as a mapping once its TODOs are filled
    text = msg[msg.index('{"format"'):]
    (tmp_path / "m.json").write_text(text.replace("TODO.torch.key", "features.1.0.layer_scale"))
    assert len(Mapping.load(tmp_path / "m.json").rules) == 2
    # the one-rule file extends the matching (it does not replace it)
    r = tf_to_torch(run["prefix"], tmp_path / "c.pt", model_factory=f"{MODELS}:convnext", mapping=_convnext_rules(tmp_path),
                    optimizer=False)
    (entry,) = [e for e in r.plan.entries if e.targets == ("features.1.1.layer_scale",)]
    assert entry.sources[0].startswith("block1_layer_scale/")


def test_check_fails_with_the_figures_when_the_torch_model_differs(runs, tmp_path):
    """A torch twin with another BatchNorm eps: the weights fit, the outputs do not: exit non-zero."""
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")

    def other():
        model, x = _load_models().vgg()
        model.classifier[1] = __import__("torch").nn.Tanh()  # not the Keras model's ReLU
        return model, x

    with pytest.raises(CheckFailedError, match=r"check FAILED: output 0: max \|keras - torch\|") as e:
        tf_to_torch(run["prefix"], tmp_path / "v.pt", model_factory=other, keras_model=f"{MODELS}:keras_vgg", check=True)
    # no output that fails its check is left at DST (nor its staged copy), and the message says so
    assert "this run did not write" in str(e.value) and "v.pt" in str(e.value) and not list(tmp_path.iterdir())


def test_check_from_the_command_line(runs, tmp_path):
    from click.testing import CliRunner

    from ckptfmt.cli.main import main

    run = runs("vgg")
    res = CliRunner().invoke(main, ["convert", "tf2torch", run["prefix"], str(tmp_path / "v.pt"), "--model", f"{MODELS}:vgg",
                                    "--keras-model", f"{MODELS}:keras_vgg", "--check"])
    assert res.exit_code == 0, res.output
    assert "check passed: output 0: max |keras - torch|" in res.output
    assert "one optimizer step on identical gradients" in res.output


def test_densenet_dry_run_fits_on_a_screen(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("densenet")
    r = tf_to_torch(run["prefix"], tmp_path / "d.pt", model_factory=f"{MODELS}:densenet", dry_run=True)
    notes = list(r.notes)
    assert sum("BatchNormalization" in n for n in notes) == 3  # epsilon, momentum, variance: one line each
    assert any(n.startswith("UNKNOWN BatchNormalization epsilon of 19 layer(s)") and "eps=1.001e-05" in n for n in notes)
    assert any("biased batch variance" in n for n in notes)


def test_a_mapping_file_covering_part_of_a_layer_or_missing_keys_is_refused(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"format": "ckptfmt-mapping", "version": 1, "rules": [
        {"rule": "Rename", "src_pattern": "fc2/bias", "dst_pattern": "classifier.3.bias"}]}))
    with pytest.raises(ConversionError, match="covers some but not all weights of layer.*fc2"):
        tf_to_torch(run["prefix"], tmp_path / "v.pt", model_factory=f"{MODELS}:vgg", mapping=str(part), optimizer=False)
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"format": "ckptfmt-mapping", "version": 1, "rules": [
        {"rule": "Rename", "src_pattern": "fc2/bias", "dst_pattern": "classifier.9.bias"},
        {"rule": "Convert", "sources": ["fc2/kernel"], "targets": ["classifier.3.weight"], "ops": [{"op": "Transpose", "axes": [1, 0]}]}]}))
    with pytest.raises(ConversionError, match="does not have: classifier.9.bias"):
        tf_to_torch(run["prefix"], tmp_path / "v.pt", model_factory=f"{MODELS}:vgg", mapping=str(stray), optimizer=False)


def test_a_keras_model_that_is_not_the_checkpoints_is_refused(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("resnet")
    with pytest.raises(ConversionError, match="not the checkpoint's model"):
        tf_to_torch(run["prefix"], tmp_path / "r.pt", model_factory=f"{MODELS}:resnet", keras_model=f"{MODELS}:keras_vgg",
                    optimizer=False)


def test_command_line_refusals_exit_non_zero_and_write_nothing(runs, tmp_path):
    from click.testing import CliRunner

    from ckptfmt.cli.main import main

    run = runs("resnet")
    out = tmp_path / "r.pt"
    res = CliRunner().invoke(main, ["convert", "tf2torch", run["prefix"], str(out), "--model", f"{MODELS}:resnet"])
    assert res.exit_code != 0 and "parallel branches" in res.output and not out.exists()
    res = CliRunner().invoke(main, ["convert", "tf2torch", run["prefix"], str(out), "--model", f"{MODELS}:resnet",
                                    "--keras-model", f"{MODELS}:keras_resnet", "--check", "--check-tolerance", "1e-12"])
    # a check that ran and failed: exit 1 (as the help and README say), the output it wrote removed
    assert res.exit_code == 1 and "check FAILED" in res.output and "this run did not write" in res.output, res.output
    assert not list(tmp_path.iterdir())


# -- --check that cannot run: refused before writing, or the output removed -------------------


def test_a_check_that_cannot_run_is_refused_before_anything_is_written(runs, tmp_path, monkeypatch):
    import sys

    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    dst = tmp_path / "v.pt"

    def broken_factory():
        raise ValueError("no such weights file")

    with pytest.raises(ConversionError, match="the Keras model factory .* failed: ValueError: no such weights file"):
        tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", keras_model=broken_factory, check=True)
    assert not dst.exists()
    # a Keras model that is not the checkpoint's: its variables are paired before writing
    with pytest.raises(ConversionError, match="the checkpoint's model"):
        tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_resnet", check=True)
    assert not dst.exists()
    # Keras not installed: the factory cannot import it, and the message says what --check needs
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(ConversionError, match=r"ModuleNotFoundError.*needs Keras 3 installed"):
        tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True)
    assert not dst.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("dst_kind", ["pt", "new_dir", "interrupted"])
def test_a_check_that_fails_to_run_after_writing_removes_the_output(runs, tmp_path, monkeypatch, dst_kind):
    """An error inside the check (a framework, the user's model) or an interrupt, after the output
    was written to its staging name beside DST: the staged output is removed, DST never written,
    and the error says why."""
    from ckptfmt.converters import check
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / ("v.pt" if dst_kind in ("pt", "interrupted") else "ck")
    seen = []

    def broken(keras_model, torch_model, *a, **k):
        seen.append(sorted(p.name for p in out.iterdir()))  # the staged output, not DST, when the check ran
        if dst_kind == "interrupted":
            raise KeyboardInterrupt
        raise RuntimeError("the Keras backend failed")

    monkeypatch.setattr(check, "check_conversion", broken)
    kwargs = dict(model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True)
    if dst_kind == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            tf_to_torch(run["prefix"], dst, **kwargs)
    else:
        with pytest.raises(ConversionError, match=r"--check could not run: RuntimeError: the Keras backend failed; "
                                                  r"this run did not write .* \(the staged output was removed\)") as e:
            tf_to_torch(run["prefix"], dst, **kwargs)
        assert not isinstance(e.value, CheckFailedError)
    staged = f".v.check-{os.getpid()}.pt" if dst.suffix == ".pt" else f".ck.check-{os.getpid()}"
    assert seen == [[staged]]
    assert not list(out.iterdir())


def test_a_check_that_cannot_run_exits_3_from_the_command_line(runs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ckptfmt.cli.main import main
    from ckptfmt.converters import check

    def broken(*a, **k):
        raise RuntimeError("the Keras backend failed")

    monkeypatch.setattr(check, "check_conversion", broken)
    run = runs("vgg")
    out = tmp_path / "v.pt"
    res = CliRunner().invoke(main, ["convert", "tf2torch", run["prefix"], str(out), "--model", f"{MODELS}:vgg",
                                    "--keras-model", f"{MODELS}:keras_vgg", "--check"])
    assert res.exit_code == 3 and "--check could not run" in res.output and "this run did not write" in res.output, res.output
    assert f"wrote {out} (" not in res.output and not list(tmp_path.iterdir())


# -- --check writes DST only on a pass: a previous DST survives anything else ----------------------


def _vgg_other():
    model, x = _load_models().vgg()
    model.classifier[1] = __import__("torch").nn.Tanh()  # not the Keras model's ReLU: the check fails
    return model, x


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_failing_check_with_overwrite_keeps_the_previous_file_and_a_passing_one_replaces_it(runs, tmp_path):
    import torch

    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    dst = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 41}, dst)  # the user's own file
    before = dst.read_bytes()
    kw = dict(keras_model=f"{MODELS}:keras_vgg", check=True, overwrite=True)
    with pytest.raises(CheckFailedError, match=r"this run did not write .*model\.pt, which is left as it was"):
        tf_to_torch(run["prefix"], dst, model_factory=_vgg_other, **kw)
    assert dst.read_bytes() == before and _names(tmp_path) == ["model.pt"]
    # a second run to the same DST whose check passes replaces it; the report (also the one in the file) names DST
    r = tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", **kw)
    assert r.check.passed and r.destination == str(dst) and _names(tmp_path) == ["model.pt"]
    written = dst.read_bytes()
    assert written != before
    assert torch.load(dst, weights_only=True)["conversion_report"].splitlines()[0].endswith(f" -> {dst}")
    # a third, failing again, leaves the second's checked output
    with pytest.raises(CheckFailedError):
        tf_to_torch(run["prefix"], dst, model_factory=_vgg_other, **kw)
    assert dst.read_bytes() == written and _names(tmp_path) == ["model.pt"]


def test_check_refuses_an_existing_directory_and_leaves_it_as_it_was(runs, tmp_path, monkeypatch):
    """The checked checkpoint is renamed into place: onto an existing (even empty) directory that
    would replace the user's directory itself (inode, mode, owner), and "." would be staged outside
    the directory given. Refused before anything is written; a new name works."""
    import ckptfmt
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    dst = tmp_path / "ck"
    dst.mkdir(mode=0o700)
    before = (dst.stat().st_ino, dst.stat().st_mode)
    kw = dict(model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True, overwrite=True)
    for given in (dst, "."):
        monkeypatch.chdir(dst)
        with pytest.raises(ConversionError, match=r"is an existing directory: --check .* DST must not exist yet"):
            tf_to_torch(run["prefix"], given, **kw)
    assert (dst.stat().st_ino, dst.stat().st_mode) == before and not _names(dst) and _names(tmp_path) == ["ck"]
    r = tf_to_torch(run["prefix"], tmp_path / "new", **kw)
    assert r.check.passed and "classifier.3.weight" in ckptfmt.load(tmp_path / "new")["model"]


def test_a_file_put_at_dst_during_the_check_is_not_replaced_without_overwrite(runs, tmp_path, monkeypatch):
    from ckptfmt.converters import check
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    dst = tmp_path / "out.pt"
    real = check.check_conversion

    def meanwhile(*a, **k):
        dst.write_bytes(b"the user's own file")
        return real(*a, **k)

    monkeypatch.setattr(check, "check_conversion", meanwhile)
    with pytest.raises(ConversionError, match=r"the check passed but the output could not be put at .*out.pt"):
        tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True)
    assert dst.read_bytes() == b"the user's own file" and _names(tmp_path) == ["out.pt"]


def test_a_directory_another_writer_fills_during_the_check_is_not_replaced(runs, tmp_path, monkeypatch):
    from ckptfmt.converters import check
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    dst = tmp_path / "ck"
    real = check.check_conversion

    def meanwhile(*a, **k):
        dst.mkdir()
        (dst / "theirs.txt").write_text("another writer")
        return real(*a, **k)

    monkeypatch.setattr(check, "check_conversion", meanwhile)
    with pytest.raises(ConversionError, match=r"the check passed but the output could not be put at .*ck \(.*\); "
                                              r"this run did not write .*ck \(the staged output was removed\)"):
        tf_to_torch(run["prefix"], dst, model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True)
    assert _names(tmp_path) == ["ck"] and _names(dst) == ["theirs.txt"]


def test_an_interrupted_check_leaves_dst_unchanged_and_nothing_staged(runs, tmp_path):
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 2:  # the check's call (the first one plans the conversion)
            raise KeyboardInterrupt
        return _load_models().vgg()

    dst = tmp_path / "out.pt"
    dst.write_bytes(b"the previous file")
    with pytest.raises(KeyboardInterrupt):
        tf_to_torch(run["prefix"], dst, model_factory=factory, keras_model=f"{MODELS}:keras_vgg", check=True, overwrite=True)
    assert len(calls) == 2 and dst.read_bytes() == b"the previous file" and _names(tmp_path) == ["out.pt"]


def test_check_refuses_an_object_store_dst_and_overwriting_a_checkpoint_directory(runs, tmp_path):
    import ckptfmt
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("vgg")
    kw = dict(model_factory=f"{MODELS}:vgg", keras_model=f"{MODELS}:keras_vgg", check=True)
    with pytest.raises(ConversionError, match=r"s3://bucket/run/ck: --check cannot write an object store.*"
                                              r"convert to a local path with --check, then copy it"):
        tf_to_torch(run["prefix"], "s3://bucket/run/ck", overwrite=True, **kw)
    ck = tmp_path / "ck"
    ckptfmt.save({"w": np.ones(3, np.float32)}, ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    with pytest.raises(ConversionError, match=r"ck is a ckptfmt checkpoint, which --check --overwrite cannot replace "
                                              r"atomically.*convert to a new directory with --check, then replace"):
        tf_to_torch(run["prefix"], ck, overwrite=True, **kw)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before and _names(tmp_path) == ["ck"]
    # without --overwrite the existing checkpoint is refused as ever; a new directory is written
    from ckptfmt.errors import CheckpointExistsError

    with pytest.raises(CheckpointExistsError, match="already exists"):
        tf_to_torch(run["prefix"], ck, **kw)
    assert tf_to_torch(run["prefix"], tmp_path / "ck2", **kw).check.passed and _names(tmp_path) == ["ck", "ck2"]


# -- --check when NHWC and NCHW have the same shape (8x8x8) -------------------------------------


def _keras_cube():
    import keras

    i = keras.Input((8, 8, 8))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(i)
    return keras.Model(i, keras.layers.Conv2D(8, 3, padding="same", name="head")(x))


def _torch_cube(relu: bool = False):
    import torch

    class Cube(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(torch.relu(x) if relu else x)

    return Cube(), torch.zeros(2, 8, 8, 8)


def test_check_of_an_8x8x8_model_compares_in_the_layout_that_matches(tf, tmp_path):
    """Input and output are 8x8x8: the shapes cannot tell NHWC from NCHW. The input goes
    channels-first (the torch model starts with a Conv2d), the output is compared in both
    layouts, and the one that matches is named; a torch model that computes something else fails."""
    import keras

    from ckptfmt.converters.convert import tf_to_torch

    keras.utils.set_random_seed(1)
    prefix = tf.train.Checkpoint(model=_keras_cube()).write(str(tmp_path / "ck" / "ckpt"))
    r = tf_to_torch(prefix, tmp_path / "cube.pt", model_factory=_torch_cube, keras_model=_keras_cube, check=True)
    ((name, diff, scale),) = r.check.outputs
    assert r.check.passed and "torch NCHW read as NHWC" in name and diff < 1e-4 < scale, r.check
    with pytest.raises(CheckFailedError, match=r"check FAILED: output 0 \(torch NCHW read as NHWC"):
        tf_to_torch(prefix, tmp_path / "bad.pt", model_factory=lambda: _torch_cube(relu=True), keras_model=_keras_cube, check=True)
    assert not (tmp_path / "bad.pt").exists()


def test_an_input_whose_layout_the_torch_model_does_not_settle_is_refused(tf):
    import torch

    from ckptfmt.converters.check import _to_torch_layout

    x = np.arange(2 * 8 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 8)
    np.testing.assert_array_equal(_to_torch_layout(x, (2, 8, 8, 8), torch.nn.Conv2d(8, 8, 1)), x.transpose(0, 3, 1, 2))
    assert _to_torch_layout(x, (2, 8, 8, 8), torch.nn.Linear(8, 8)) is x
    with pytest.raises(ConversionError, match=r"first weighted module \(LayerNorm\) does not say which"):
        _to_torch_layout(x, (2, 8, 8, 8), torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Conv2d(8, 8, 1)))


# -- diff --tf2torch with the Keras graph --------------------------------------------------------


def test_diff_settles_parallel_branches_with_the_keras_model(runs, tmp_path):
    """``diff --tf2torch`` takes ``--keras-model`` as tf2torch does: a ResNet's shortcut BN and
    ``bn3`` (same shapes, parallel branches) are refused without it and settled with it, so a
    file with them swapped (the former silent failure) is found."""
    import torch
    from click.testing import CliRunner

    from ckptfmt.cli.main import main
    from ckptfmt.converters.convert import tf_to_torch

    run = runs("resnet")
    out = tmp_path / "r.pt"
    tf_to_torch(run["prefix"], out, model_factory=f"{MODELS}:resnet", keras_model=f"{MODELS}:keras_resnet", optimizer=False)
    diff = ["diff", "--tf2torch", run["prefix"], str(out), "--model", f"{MODELS}:resnet"]
    res = CliRunner().invoke(main, diff)
    assert res.exit_code == 3 and "parallel branches" in res.output and "--keras-model" in res.output, res.output
    res = CliRunner().invoke(main, diff + ["--keras-model", f"{MODELS}:keras_resnet"])
    assert res.exit_code == 0 and "identical" in res.output, res.output
    res = CliRunner().invoke(main, ["diff", run["prefix"], str(out), "--keras-model", f"{MODELS}:keras_resnet"])
    assert res.exit_code == 2 and "need --tf2torch" in res.output

    state = torch.load(out, weights_only=True)["model"]
    swapped = []
    for s in ("weight", "bias", "running_mean", "running_var"):
        a, b = f"layer1.0.bn3.{s}", f"layer1.0.downsample.1.{s}"
        if not torch.equal(state[a], state[b]):  # the betas are equal: both branches get the same gradient
            swapped += [a, b]
        state[a], state[b] = state[b], state[a]
    assert len(swapped) >= 6
    torch.save({"model": state}, tmp_path / "swapped.pt")
    res = CliRunner().invoke(main, ["diff", "--tf2torch", run["prefix"], str(tmp_path / "swapped.pt"), "--model", f"{MODELS}:resnet",
                                    "--keras-model", f"{MODELS}:keras_resnet", "--json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.output)
    assert sorted(c["name"] for c in report["changed"]) == sorted(f"model/{k}" for k in swapped)
