"""Keras's own files through tf2torch / torch2tf / keras2keras, compared by numbers.

Files written by Keras itself (fixtures/keras: ModelCheckpoint("....keras") during fit,
save_weights("....weights.h5"), tf.keras model.save("....h5")) go to torch with --model and
--exact-optimizer: logits, one optimizer step on identical gradients, the first resumed losses;
then back to the same kind of file, which Keras loads and continues from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")

from ckptfmt.converters.convert import keras_to_keras, load_factory, tf_to_torch, torch_to_tf  # noqa: E402
from ckptfmt.converters.keras.kerasfile import KerasFileReader, open_keras_checkpoint  # noqa: E402
from ckptfmt.errors import ConversionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = str(ROOT / "fixtures" / "examples" / "models.py")
FIX = ROOT / "fixtures" / "keras"
EXAMPLE = ROOT / "fixtures" / "examples" / "cnn_adam"
FILES = [("k3_cnn_adam.keras", "k3_cnn_adam.npz"), ("k3_cnn_adam.weights.h5", "k3_cnn_adam.npz"),
         ("tfk_cnn_adam.h5", "tfk_cnn_adam.npz")]


@pytest.fixture(scope="session")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    return tf


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def _load(torch, path):
    return torch.load(path, weights_only=True)


def _nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# -- torch only (no TensorFlow) --------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("name, expected", FILES)
def test_keras_files_convert_and_resume_in_torch(torch, tmp_path, name, expected):
    from ckptfmt.converters import optim

    want = np.load(FIX / expected)
    out = tmp_path / "t.pt"
    r = tf_to_torch(FIX / name, out, model_factory=MODELS + ":cnn", exact_optimizer=True)
    assert r.optimizer.endswith("KerasAdam")
    if name != "k3_cnn_adam.weights.h5":  # the config states eps and momentum: no "not stored" note
        assert not any("not stored" in n for n in r.notes), r.notes
    ck = _load(torch, out)
    model = load_factory(MODELS + ":cnn")()[0]
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(_nchw(want["xs"][0]))).numpy()
    np.testing.assert_allclose(got, want["logits"], atol=1e-5, rtol=0)
    opt = optim.KerasAdam(model.parameters(), **ck["optimizer_hyperparameters"])
    opt.load_state_dict(ck["optimizer"])
    model.train()
    losses = []
    for i in (3, 4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(_nchw(want["xs"][i]))), torch.from_numpy(want["ys"][i]))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(losses, want["losses"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(model.state_dict()["stem.weight"].numpy(), want["w:conv/kernel"].transpose(3, 2, 0, 1),
                               atol=1e-5, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("name", [n for n, _ in FILES])
def test_keras_file_through_torch_and_back_is_bit_identical(torch, tmp_path, name):
    tf_to_torch(FIX / name, tmp_path / "t.pt", model_factory=MODELS + ":cnn", exact_optimizer=True)
    back = tmp_path / ("back" + "".join(Path(name).suffixes))
    r = torch_to_tf(tmp_path / "t.pt", back, template=FIX / name, model_factory=MODELS + ":cnn")
    assert r.optimizer == "Adam"
    with KerasFileReader(FIX / name) as r0, KerasFileReader(back) as r1:
        assert r0.keys() == r1.keys()
        for k in r0.keys():
            assert r0.dtype(k) == r1.dtype(k) and np.array_equal(r0.get(k), r1.get(k)), k
        assert r1.config == r0.config


@pytest.mark.torch
def test_config_eps_that_the_torch_model_does_not_have_is_refused(torch, tmp_path):
    def wrong():
        model, x = load_factory(MODELS + ":cnn")()
        model.norm.eps = 1e-5
        return model, x

    with pytest.raises(ConversionError, match="eps"):
        tf_to_torch(FIX / "k3_cnn_adam.keras", tmp_path / "t.pt", model_factory=wrong)


def test_tf_checkpoint_and_keras_files_pair_without_torch(tmp_path):
    out = tmp_path / "x.weights.h5"
    keras_to_keras(EXAMPLE, out, template=FIX / "k3_cnn_adam.weights.h5")
    with open_keras_checkpoint(EXAMPLE) as a, open_keras_checkpoint(out) as b:
        for k in a.keys:
            assert np.array_equal(a.get(a.keys[k]), b.get(b.keys[k])), k
        for v, d in a.slots.items():
            for s, key in d.items():
                assert np.array_equal(a.get(key), b.get(b.slots[v][s])), (v, s)
        assert int(b.get(b.iterations_key)) == int(a.get(a.iterations_key))
    # and back to a TF checkpoint, bit-exact
    keras_to_keras(out, tmp_path / "tf" / "ckpt-1", template=EXAMPLE)
    with open_keras_checkpoint(EXAMPLE) as a, open_keras_checkpoint(tmp_path / "tf" / "ckpt-1") as b:
        assert a.stored_keys() == b.stored_keys()
        for k in a.stored_keys():
            assert np.array_equal(a.get(k), b.get(k)), k


def test_cli_tf2keras_and_tf2torch_on_keras_files(tmp_path):
    from click.testing import CliRunner

    from ckptfmt.cli.main import main

    run = CliRunner()
    r = run.invoke(main, ["convert", "tf2keras", str(EXAMPLE), str(tmp_path / "o.keras"), "--template",
                          str(FIX / "k3_cnn_adam.keras")])
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    r = run.invoke(main, ["verify", str(tmp_path / "o.keras")])
    assert r.exit_code == 0 and "no checksums" in r.output, r.output
    r = run.invoke(main, ["convert", "tf2torch", str(FIX / "k3_cnn_adam.weights.h5"), str(tmp_path / "w.safetensors"),
                          "--no-optimizer"])
    assert r.exit_code == 0, r.output


# -- with Keras 3 (and TensorFlow) -----------------------------------------------------------


def _keras_cnn(keras):
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, strides=2, padding="same", name="conv")(inp)
    h = L.ReLU()(L.BatchNormalization(name="bn")(h))
    model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.tensorflow
@pytest.mark.torch
def test_modelcheckpoint_keras_to_torch_one_step_on_identical_gradients_and_back_to_keras(tf, torch, tmp_path):
    """The acceptance path: ModelCheckpoint's .keras -> torch (logits, one step on Keras's own
    gradients, first resumed loss) -> .keras that Keras loads and continues identically."""
    import keras

    from ckptfmt.converters import optim

    want = np.load(FIX / "k3_cnn_adam.npz")
    src = FIX / "k3_cnn_adam.keras"
    r = tf_to_torch(src, tmp_path / "t.pt", model_factory=MODELS + ":cnn", exact_optimizer=True)
    ck = _load(torch, tmp_path / "t.pt")
    tm = load_factory(MODELS + ":cnn")()[0]
    tm.load_state_dict(ck["model"])
    opt = optim.KerasAdam(tm.parameters(), **ck["optimizer_hyperparameters"])
    opt.load_state_dict(ck["optimizer"])
    km = keras.saving.load_model(src)
    tm.eval()
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.from_numpy(_nchw(want["xs"][0]))).numpy(), km(want["xs"][0], training=False).numpy(),
                                   atol=1e-5, rtol=0)
    # one step on identical gradients: Keras's, carried to torch through the conversion's own plan
    x, y = want["xs"][3], want["ys"][3]
    with tf.GradientTape() as tape:
        loss = km.loss(y, km(x, training=True))
    grads = {v.path: g.numpy() for v, g in zip(km.trainable_variables, tape.gradient(loss, km.trainable_variables))}
    km.optimizer.apply_gradients(zip([tf.constant(grads[v.path]) for v in km.trainable_variables], km.trainable_variables))
    params = dict(tm.named_parameters())
    for e in r.plan.entries:
        if all(s in grads for s in e.sources):
            for t, g in zip(e.targets, e.run(tuple(grads[s] for s in e.sources))):
                if t in params:  # not BatchNorm's num_batches_tracked, which the plan fills
                    params[t].grad = torch.from_numpy(np.ascontiguousarray(g))
    opt.step()
    after = {v.path: v.numpy() for v in km.trainable_variables}
    for e in r.plan.entries:
        if all(s in after for s in e.sources):
            for t, w in zip(e.targets, e.run(tuple(after[s] for s in e.sources))):
                if t in params:
                    np.testing.assert_allclose(params[t].detach().numpy(), w, atol=1e-6, rtol=0, err_msg=t)
    # back to .keras from the torch run: Keras loads it and continues as the torch run does
    sd = {"model": tm.state_dict(), "optimizer": opt.state_dict(), "optimizer_class": "ckptfmt.converters.optim.KerasAdam"}
    torch.save(sd, tmp_path / "resumed.pt")
    out = tmp_path / "resumed.keras"
    torch_to_tf(tmp_path / "resumed.pt", out, template=src, model_factory=MODELS + ":cnn")
    k2 = keras.saving.load_model(out)
    assert int(k2.optimizer.iterations.numpy()) == 4
    tm.train()
    x, y = want["xs"][4], want["ys"][4]
    opt.zero_grad()
    tl = torch.nn.functional.cross_entropy(tm(torch.from_numpy(_nchw(x))), torch.from_numpy(y))
    tl.backward()
    opt.step()
    kl = float(k2.train_on_batch(x, y))
    np.testing.assert_allclose(kl, tl.item(), rtol=1e-5)
    np.testing.assert_allclose(kl, want["losses"][1], rtol=1e-5)


@pytest.mark.tensorflow
def test_tf_checkpoint_to_weights_h5_loads_in_keras3_with_identical_outputs(tf, tmp_path):
    import keras

    expected = np.load(EXAMPLE / "expected.npz")
    ref = _keras_cnn(keras)
    tf.train.Checkpoint(model=ref, optimizer=ref.optimizer).read(str(EXAMPLE / "ckpt-1")).expect_partial()
    # Keras 3 cannot read a TF checkpoint itself
    with pytest.raises(Exception):  # noqa: B017 - Keras raises a plain ValueError or its own; either is the point
        _keras_cnn(keras).load_weights(str(EXAMPLE / "ckpt-1"))
    template = tmp_path / "template.weights.h5"
    _keras_cnn(keras).save_weights(template)
    out = tmp_path / "converted.weights.h5"
    keras_to_keras(EXAMPLE, out, template=template)
    fresh = _keras_cnn(keras)
    fresh.load_weights(out)
    np.testing.assert_array_equal(fresh(expected["x"], training=False).numpy(), ref(expected["x"], training=False).numpy())
    np.testing.assert_allclose(fresh(expected["x"], training=False).numpy(), expected["logits"], atol=1e-6)
    assert int(fresh.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == 3
    for a, b in zip(fresh.optimizer.variables, ref.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.tensorflow
@pytest.mark.torch
@pytest.mark.parametrize("name, expected", FILES[1:])
def test_weights_h5_and_tf_keras_h5_back_from_torch_load_in_keras_and_continue(tf, torch, tmp_path, name, expected):
    want = np.load(FIX / expected)
    tf_to_torch(FIX / name, tmp_path / "t.pt", model_factory=MODELS + ":cnn", exact_optimizer=True)
    back = tmp_path / ("back" + "".join(Path(name).suffixes))
    torch_to_tf(tmp_path / "t.pt", back, template=FIX / name, model_factory=MODELS + ":cnn")
    if name.startswith("tfk"):
        import tf_keras

        model = tf_keras.models.load_model(back)
    else:
        import keras

        model = _keras_cnn(keras)
        model.load_weights(back)
    assert int(model.optimizer.iterations.numpy()) == 3
    np.testing.assert_allclose(model(want["xs"][0], training=False).numpy(), want["logits"], atol=1e-5, rtol=0)
    loss = float(model.train_on_batch(want["xs"][3], want["ys"][3]))
    np.testing.assert_allclose(loss, want["losses"][0], rtol=1e-5)


@pytest.mark.torch
def test_diff_tf2torch_compares_a_keras_file_through_the_conversion(torch, tmp_path):
    from ckptfmt.converters.convert import diff_converted

    tf_to_torch(FIX / "k3_cnn_adam.keras", tmp_path / "t.pt", model_factory=MODELS + ":cnn")
    assert diff_converted(FIX / "k3_cnn_adam.keras", tmp_path / "t.pt", model_factory=MODELS + ":cnn").identical
    r = diff_converted(FIX / "k3_cnn_adam.weights.h5", tmp_path / "t.pt", model_factory=MODELS + ":cnn")
    assert r.identical  # the same state, saved by save_weights


TORCH_BACKEND_RUN = r'''
import os, sys
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np, keras
out = sys.argv[1]
keras.utils.set_random_seed(5)
L = keras.layers
inp = keras.Input((8, 8, 3))
h = L.Conv2D(4, 3, strides=2, padding="same", name="conv")(inp)
h = L.ReLU()(L.BatchNormalization(name="bn")(h))
model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)))
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(5)
x = rng.standard_normal((24, 8, 8, 3)).astype("float32")
y = rng.integers(0, 3, 24)
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
          callbacks=[keras.callbacks.ModelCheckpoint(os.path.join(out, "m.keras"))])
logits = keras.ops.convert_to_numpy(model(x[:8], training=False))
loss = float(model.train_on_batch(x[8:16], y[8:16]))
np.savez(os.path.join(out, "want.npz"), x=x[:8], x2=x[8:16], y2=y[8:16], logits=logits, loss=loss)
'''


@pytest.mark.torch
@pytest.mark.slow
def test_a_keras_file_written_under_the_torch_backend_converts_the_same(torch, tmp_path):
    """.keras files are backend-agnostic: one trained by Keras on the torch backend converts as well."""
    import subprocess
    import sys

    from ckptfmt.converters import optim

    pytest.importorskip("keras")
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", TORCH_BACKEND_RUN, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    want = np.load(tmp_path / "want.npz")
    tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=MODELS + ":cnn", exact_optimizer=True)
    ck = _load(torch, tmp_path / "t.pt")
    model = load_factory(MODELS + ":cnn")()[0]
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(_nchw(want["x"]))).numpy(), want["logits"], atol=1e-5, rtol=0)
    opt = optim.KerasAdam(model.parameters(), **ck["optimizer_hyperparameters"])
    opt.load_state_dict(ck["optimizer"])
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(_nchw(want["x2"]))), torch.from_numpy(want["y2"]))
    np.testing.assert_allclose(loss.item(), float(want["loss"]), rtol=1e-5)


def test_an_optimizer_the_file_cannot_place_is_refused_not_dropped(tmp_path):
    from ckptfmt.errors import UnmappedKeyError

    with pytest.raises(UnmappedKeyError, match="do not tell which layer"):
        tf_to_torch(FIX / "k3_sub_adam.weights.h5", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    r = tf_to_torch(FIX / "k3_sub_adam.weights.h5", tmp_path / "w.safetensors", optimizer=False)
    assert sorted(r.plan.target_specs) == ["aa.bias", "aa.weight", "zz.bias", "zz.weight"]
