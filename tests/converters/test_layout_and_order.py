"""Layouts and layer orders the weights cannot tell: converted right, or refused (review of issues 11/13/14).

Real Keras 3 models saved by Keras, converted to hand-written torch twins, compared by logits:

* a Dense fed by a map the torch model moves to channels-last and then passes through an
  activation or a LayerNorm before flattening (no row permutation), and an op of unknown
  layout effect before a flatten (refused);
* a LayerNormalization over several axes into a LayerNorm on a channels-first map
  (gamma/beta transposed), refused from a TF checkpoint, which does not say which axes;
* a subclassed model's same-shape layers in a ``.weights.h5``, which lists layers by name,
  not in the model's order: refused, settled by ``pairs``; also as a tf2keras template.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("h5py")
torch = pytest.importorskip("torch")
nn = torch.nn

from ckptfmt.converters.convert import keras_to_keras, tf_to_torch  # noqa: E402
from ckptfmt.errors import ConversionError  # noqa: E402

HERE = os.path.abspath(__file__)


# -- torch twins (loaded by the converter as HERE:factory) -------------------------------------


class _PermuteReluFlatten(nn.Module):  # conv -> NHWC -> relu -> flatten: Keras's order already
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Linear(64, 3)

    def forward(self, x):
        return self.d(torch.relu(self.c(x).permute(0, 2, 3, 1)).flatten(1))


class _TransposeLayerNormFlatten(nn.Module):  # conv1d -> NLC -> LayerNorm over (L, C) -> flatten
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3)
        self.ln = nn.LayerNorm([6, 6], eps=1e-3)
        self.d = nn.Linear(36, 3)

    def forward(self, x):
        return self.d(self.ln(self.c(x).transpose(1, 2)).flatten(1))


class _PermuteLayerNormFlatten(nn.Module):  # non-square map: conv -> NHWC -> LayerNorm(C) -> flatten
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.ln = nn.LayerNorm(4, eps=1e-3)
        self.d = nn.Linear(24, 3)

    def forward(self, x):
        return self.d(self.ln(self.c(x).permute(0, 2, 3, 1)).flatten(1))


class _FlipFlatten(nn.Module):  # an op whose layout effect the converter does not know
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Linear(64, 3)

    def forward(self, x):
        return self.d(torch.relu(self.c(x)).flip(1).flatten(1))


class _LayerNormCHW(nn.Module):  # LayerNorm over (C, H, W) of a channels-first map
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.ln = nn.LayerNorm([4, 4, 4], eps=1e-3)
        self.d = nn.Linear(4, 3)

    def forward(self, x):
        return self.d(self.ln(self.c(x)).mean((2, 3)))


class _TwoSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def permute_relu_flatten():
    return _PermuteReluFlatten(), torch.zeros(2, 3, 6, 6)


def transpose_layernorm_flatten():
    return _TransposeLayerNormFlatten(), torch.zeros(2, 4, 8)


def permute_layernorm_flatten():
    return _PermuteLayerNormFlatten(), torch.zeros(2, 3, 4, 5)


def flip_flatten():
    return _FlipFlatten(), torch.zeros(2, 3, 6, 6)


def layernorm_chw():
    return _LayerNormCHW(), torch.zeros(2, 3, 6, 6)


def two_same():
    return _TwoSame(), torch.zeros(2, 6)


# -- the Keras side -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


def _keras_model(keras, name):
    L = keras.layers
    if name == "permute_relu_flatten":
        i = keras.Input((6, 6, 3))
        x = L.Flatten()(L.Conv2D(4, 3, activation="relu", name="c")(i))
    elif name == "transpose_layernorm_flatten":
        i = keras.Input((8, 4))
        x = L.Flatten()(L.LayerNormalization(axis=[-2, -1], name="ln")(L.Conv1D(6, 3, name="c")(i)))
    elif name == "permute_layernorm_flatten":
        i = keras.Input((4, 5, 3))
        x = L.Flatten()(L.LayerNormalization(name="ln")(L.Conv2D(4, 3, name="c")(i)))
    elif name == "flip_flatten":
        i = keras.Input((6, 6, 3))
        x = L.Flatten()(L.Conv2D(4, 3, activation="relu", name="c")(i))
    else:
        i = keras.Input((6, 6, 3))
        x = L.LayerNormalization(axis=[1, 2, 3], name="ln")(L.Conv2D(4, 3, name="c")(i))
        x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(i, L.Dense(3, name="d")(x))
    rng = np.random.default_rng(0)
    # random gammas and betas too: at their initial ones and zeros a wrong layout would not show
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()])
    return model


def _logits(keras_model, torch_model, shape):
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype("float32")
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    torch_model.eval()
    with torch.no_grad():
        return keras_model(x, training=False).numpy(), torch_model(xt).numpy()


@pytest.mark.tensorflow
@pytest.mark.parametrize("name", ["permute_relu_flatten", "transpose_layernorm_flatten", "permute_layernorm_flatten",
                                  "layernorm_chw"])
def test_layouts_the_torch_dataflow_shows_convert_to_equal_logits(keras, tmp_path, name):
    km = _keras_model(keras, name)
    km.save(tmp_path / "m.keras")
    r = tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=f"{HERE}:{name}")
    tm = globals()[name]()[0]
    tm.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True)["model"])
    want, got = _logits(km, tm, km.input_shape[1:])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 0.1
    # no permutation claimed where the torch model flattens in Keras's order
    assert not any(n.startswith("Flatten:") for n in r.notes)


@pytest.mark.tensorflow
def test_an_op_of_unknown_layout_effect_before_a_flatten_is_refused(keras, tmp_path):
    km = _keras_model(keras, "flip_flatten")
    km.save(tmp_path / "m.keras")
    with pytest.raises(ConversionError, match=r"flip, whose effect on the layout is unknown.*--map"):
        tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=f"{HERE}:flip_flatten")
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.tensorflow
def test_multi_axis_layernorm_from_a_tf_checkpoint_is_refused(keras, tmp_path):
    import tensorflow as tf

    km = _keras_model(keras, "layernorm_chw")
    prefix = tf.train.Checkpoint(model=km).write(str(tmp_path / "ckpt"))
    with pytest.raises(ConversionError, match=r"LayerNormalization .*does not say which"):
        tf_to_torch(prefix, tmp_path / "t.pt", model_factory=f"{HERE}:layernorm_chw", optimizer=False)


def _subclassed(keras):
    class Sub(keras.Model):  # attributes created (and called) zz then aa: the alphabet says aa first
        def __init__(self):
            super().__init__()
            self.zz = keras.layers.Dense(6, activation="tanh")
            self.aa = keras.layers.Dense(6)

        def call(self, x):
            return self.aa(self.zz(x))

    model = Sub()
    model(np.zeros((1, 6), "float32"))
    rng = np.random.default_rng(0)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.mark.tensorflow
def test_same_shape_layers_of_a_weights_h5_are_refused_then_settled_by_pairs(keras, tmp_path):
    km = _subclassed(keras)
    km.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ConversionError, match=r"does not record the order.*--pair"):
        tf_to_torch(tmp_path / "m.weights.h5", tmp_path / "t.pt", model_factory=f"{HERE}:two_same", optimizer=False)
    assert not (tmp_path / "t.pt").exists()
    names = {id(layer): layer.name for layer in km.layers}
    pairs = {names[id(km.zz)]: "first", names[id(km.aa)]: "second"}
    tf_to_torch(tmp_path / "m.weights.h5", tmp_path / "t.pt", model_factory=f"{HERE}:two_same", optimizer=False, pairs=pairs)
    tm = two_same()[0]
    tm.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True)["model"])
    x = np.random.default_rng(1).standard_normal((3, 6)).astype("float32")
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.from_numpy(x)).numpy(), km(x).numpy(), atol=1e-5, rtol=0)


@pytest.mark.tensorflow
def test_tf2keras_into_a_weights_h5_template_refuses_same_shape_layers(keras, tmp_path):
    import tensorflow as tf

    km = _subclassed(keras)
    prefix = tf.train.Checkpoint(model=km).write(str(tmp_path / "ckpt"))
    _subclassed(keras).save_weights(tmp_path / "tmpl.weights.h5")
    with pytest.raises(ConversionError, match=r"does not record the order.*same shapes"):
        keras_to_keras(prefix, tmp_path / "out.weights.h5", template=tmp_path / "tmpl.weights.h5", optimizer=False)
    assert not (tmp_path / "out.weights.h5").exists()


def keras_permute_relu_flatten():
    import keras

    return _keras_model(keras, "permute_relu_flatten")


@pytest.mark.tensorflow
def test_check_reads_a_keras_file_source(keras, tmp_path):
    """--check with a .keras source: the Keras model gets the file's weights (it used to look for a TF checkpoint)."""
    km = _keras_model(keras, "permute_relu_flatten")
    km.save(tmp_path / "m.keras")
    r = tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=f"{HERE}:permute_relu_flatten",
                    keras_model=f"{HERE}:keras_permute_relu_flatten", check=True)
    assert r.check is not None and r.check.passed
    assert r.check.outputs and all(diff < 1e-4 < scale for _, diff, scale in r.check.outputs)


@pytest.mark.tensorflow
def test_cli_tf2keras_and_keras2tf_take_a_tf_prefix(keras, tmp_path):
    """A TF checkpoint prefix (no file of that name) as SRC and as --template, as the help's examples show."""
    import tensorflow as tf
    from click.testing import CliRunner

    from ckptfmt.cli.main import main

    km = _keras_model(keras, "permute_relu_flatten")
    prefix = tf.train.Checkpoint(model=km).write(str(tmp_path / "ckpt"))
    km.save_weights(tmp_path / "tmpl.weights.h5")
    r = CliRunner().invoke(main, ["convert", "tf2keras", prefix, str(tmp_path / "out.weights.h5"),
                                  "--template", str(tmp_path / "tmpl.weights.h5"), "--no-optimizer"])
    assert r.exit_code == 0, r.output
    k2 = _keras_model(keras, "permute_relu_flatten")
    k2.load_weights(tmp_path / "out.weights.h5")
    for a, b in zip(km.get_weights(), k2.get_weights()):
        np.testing.assert_array_equal(a, b)
    r = CliRunner().invoke(main, ["convert", "keras2tf", str(tmp_path / "out.weights.h5"), str(tmp_path / "back" / "ckpt-1"),
                                  "--template", prefix, "--no-optimizer"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["convert", "tf2keras", str(tmp_path / "nothing" / "ckpt-9"), str(tmp_path / "x.weights.h5"),
                                  "--template", str(tmp_path / "tmpl.weights.h5")])
    assert r.exit_code != 0 and "no TensorFlow checkpoint here" in r.output


@pytest.mark.tensorflow
def test_mixed_precision_keras_file_with_its_optimizer_is_refused_with_the_loss_scale_message(keras, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        km = _subclassed(keras)
        km.compile(keras.optimizers.Adam(1e-2), "mse")
        km.fit(np.ones((4, 6), "float32"), np.ones((4, 6), "float32"), verbose=0)
        km.save_weights(tmp_path / "m.weights.h5")
        names = {id(layer): layer.name for layer in km.layers}
        pairs = {names[id(km.zz)]: "first", names[id(km.aa)]: "second"}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ConversionError, match=r"LossScaleOptimizer.*--no-optimizer"):
        tf_to_torch(tmp_path / "m.weights.h5", tmp_path / "t.pt", model_factory=f"{HERE}:two_same", pairs=pairs)


class _ConvPoolLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Linear(4, 3)

    def forward(self, x):
        return self.d(torch.relu(self.c(x)).mean((2, 3)))


class _ConvFlattenLinear(nn.Module):  # channels-first flatten: the Dense's rows are permuted
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Linear(64, 3)

    def forward(self, x):
        return self.d(torch.relu(self.c(x)).flatten(1))


def conv_pool_linear():
    return _ConvPoolLinear(), torch.zeros(2, 3, 6, 6)


def conv_flatten_linear():
    return _ConvFlattenLinear(), torch.zeros(2, 3, 6, 6)


def conv_flatten_linear_no_example():
    return _ConvFlattenLinear()


@pytest.mark.tensorflow
@pytest.mark.parametrize("name, head", [("conv_pool_linear", "pool"), ("conv_flatten_linear", "flatten")])
def test_weights_h5_without_layer_order_lets_the_torch_dataflow_decide_each_dense(keras, tmp_path, name, head):
    L = keras.layers
    i = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, activation="relu", name="c")(i)
    x = L.GlobalAveragePooling2D()(x) if head == "pool" else L.Flatten()(x)
    km = keras.Model(i, L.Dense(3, name="d")(x))
    rng = np.random.default_rng(0)
    km.set_weights([rng.standard_normal(w.shape).astype("float32") for w in km.get_weights()])
    km.save_weights(tmp_path / "m.weights.h5")
    tf_to_torch(tmp_path / "m.weights.h5", tmp_path / "t.pt", model_factory=f"{HERE}:{name}", optimizer=False)
    tm = globals()[name]()[0]
    tm.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True)["model"])
    want, got = _logits(km, tm, (6, 6, 3))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if head == "flatten":  # without an example input nothing decides: refused
        with pytest.raises(ConversionError, match=r"does not record the order.*example input"):
            tf_to_torch(tmp_path / "m.weights.h5", tmp_path / "t2.pt", model_factory=f"{HERE}:conv_flatten_linear_no_example",
                        optimizer=False)


@pytest.mark.tensorflow
def test_a_frozen_keras_layer_is_named_in_the_report(keras, tmp_path):
    L = keras.layers
    i = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, activation="relu", name="c")
    km = keras.Model(i, L.Dense(3, name="d")(L.GlobalAveragePooling2D()(conv(i))))
    conv.trainable = False
    km.save(tmp_path / "m.keras")
    r = tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=f"{HERE}:conv_pool_linear", optimizer=False)
    frozen = [n for n in r.notes if n.startswith("FROZEN:")]
    assert len(frozen) == 1 and "(c)" in frozen[0] and "model.c.requires_grad_(False)" in frozen[0]


def keras_conv_pool():
    import keras

    i = keras.Input((6, 6, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3, name="c")(i))
    return keras.Model(i, keras.layers.Dense(3, name="d")(x))


@pytest.mark.tensorflow
def test_a_check_that_cannot_run_is_refused_before_the_output_is_written(keras, tmp_path):
    """A Keras model whose variables do not fit the checkpoint: --check could not run, so
    nothing is written (no unchecked output left looking like a success)."""
    km = _keras_model(keras, "permute_relu_flatten")
    km.save(tmp_path / "m.keras")
    with pytest.raises(ConversionError, match=r"the Keras model's variables do not fit the checkpoint .*m\.keras"):
        tf_to_torch(tmp_path / "m.keras", tmp_path / "t.pt", model_factory=f"{HERE}:permute_relu_flatten",
                    keras_model=f"{HERE}:keras_conv_pool", check=True)
    assert not (tmp_path / "t.pt").exists()


def test_a_flattened_model_input_is_related_to_keras_only_with_one_channel():
    from ckptfmt.converters.mapping._dataflow import TorchDataflow

    class M(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.d = nn.Linear(n, 3)

        def forward(self, x):
            return self.d(torch.relu(x).flatten(1))

    one = TorchDataflow.trace(M(784), torch.zeros(2, 1, 28, 28)).linear_input("d")
    assert one.known and one.flattened == (28, 28, 1)  # the permutation is the identity with C = 1
    three = TorchDataflow.trace(M(12), torch.zeros(2, 3, 2, 2)).linear_input("d")
    assert not three.known and "the model's input" in three.how  # NCHW or NHWC: the caller's, refused
