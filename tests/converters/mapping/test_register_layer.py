"""A Keras layer kind added in one call (register_layer) converts end to end: inferred from a
checkpoint's weights, matched with the torch model, converted and converted back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckptfmt.converters.convert import describe_checkpoint_layers, tf_to_torch, torch_to_tf
from ckptfmt.converters.mapping import LAYER_CONVERTERS, LAYER_KINDS, Mapping, Rename, register_layer, unregister_layer
from ckptfmt.converters.tf import TFCheckpointReader, build_object_graph, write_checkpoint
from ckptfmt.errors import ConversionError


def _group_norm_rules(layer, p, **_):
    roles = layer.roles()
    return Mapping(tuple(Rename(roles[k].key, f"{p}.{t}" if p else t) for k, t in (("gamma", "weight"), ("beta", "bias")) if k in roles))


@pytest.fixture
def group_norm():
    """Keras's GroupNormalization stores gamma and beta, as LayerNormalization does."""
    kind = register_layer(
        "GroupNormalization",
        _group_norm_rules,
        signature=lambda probe, shapes: {} if shapes and set(shapes) <= {"gamma", "beta"} else None,
        accepts=lambda layer, module: type(module).__name__ == "GroupNorm",
        keeps_channels=True,
    )
    yield kind
    unregister_layer("GroupNormalization")


def test_the_record_is_what_every_step_reads(group_norm):
    assert LAYER_KINDS["GroupNormalization"] is group_norm
    assert LAYER_CONVERTERS["GroupNormalization"] is _group_norm_rules
    with pytest.raises(ValueError, match="registered already"):
        register_layer("GroupNormalization", _group_norm_rules)
    with pytest.raises(TypeError):
        LAYER_CONVERTERS["Other"] = _group_norm_rules  # read-only: a kind is registered whole or not at all


def _checkpoint(path):
    rng = np.random.default_rng(0)
    keys = {
        "model/conv/kernel/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
        "model/conv/bias/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(4).astype(np.float32),
        "model/gn/gamma/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(4).astype(np.float32),
        "model/gn/beta/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(4).astype(np.float32),
        "model/head/kernel/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal((4, 3)).astype(np.float32),
        "model/head/bias/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(3).astype(np.float32),
    }
    write_checkpoint(path, keys, object_graph=build_object_graph(keys))
    return {k.split("/.ATTRIBUTES")[0]: v for k, v in keys.items()}


def _twin(torch):
    nn = torch.nn
    m = nn.Module()
    m.head, m.norm, m.stem = nn.Linear(4, 3), nn.GroupNorm(2, 4, eps=1e-3), nn.Conv2d(3, 4, 3)
    return m


@pytest.mark.torch
def test_group_norm_registered_in_one_call_converts_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    values = _checkpoint(tmp_path / "ck")
    # not registered: the weights read as a LayerNormalization, which no torch module takes
    with pytest.raises(ConversionError, match="LayerNormalization"):
        tf_to_torch(tmp_path / "ck", tmp_path / "before.pt", model_factory=lambda: _twin(torch), optimizer=False)

    kind = register_layer(
        "GroupNormalization",
        _group_norm_rules,
        signature=lambda probe, shapes: {} if shapes and set(shapes) <= {"gamma", "beta"} else None,
        accepts=lambda layer, module: isinstance(module, torch.nn.GroupNorm),
        keeps_channels=True,
    )
    try:
        # the checkpoint alone cannot tell the two: kept as an alternative, settled by the model
        gn = next(l for l in describe_checkpoint_layers(tmp_path / "ck") if l.name.endswith("gn"))
        assert (gn.class_name, gn.config["alternatives"]) == ("LayerNormalization", ["GroupNormalization"])

        r = tf_to_torch(tmp_path / "ck", tmp_path / "o.pt", model_factory=lambda: _twin(torch), optimizer=False)
        assert r.plan.entry_for("model/gn/gamma").targets == ("norm.weight",)
        sd = torch.load(tmp_path / "o.pt", weights_only=True)["model"]
        np.testing.assert_array_equal(sd["norm.weight"].numpy(), values["model/gn/gamma"])
        np.testing.assert_array_equal(sd["norm.bias"].numpy(), values["model/gn/beta"])
        np.testing.assert_array_equal(sd["stem.weight"].numpy(), values["model/conv/kernel"].transpose(3, 2, 0, 1))

        # and back, into the same checkpoint's layout: every value bit-identical
        torch_to_tf(tmp_path / "o.pt", tmp_path / "back" / "ckpt-1", template=tmp_path / "ck",
                    model_factory=lambda: _twin(torch), optimizer=False)
        with TFCheckpointReader(tmp_path / "back" / "ckpt-1") as back:
            for key, value in values.items():
                np.testing.assert_array_equal(back.get(key + "/.ATTRIBUTES/VARIABLE_VALUE"), value)
    finally:
        assert unregister_layer("GroupNormalization") is kind
    assert "GroupNormalization" not in LAYER_KINDS


@pytest.mark.tensorflow
@pytest.mark.torch
def test_keras_group_normalization_logits_match_after_conversion(tmp_path, group_norm):
    """A Keras model with a GroupNormalization, trained and checkpointed by TensorFlow itself."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    torch = pytest.importorskip("torch")
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = keras.layers.GroupNormalization(groups=2, name="gn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    opt = keras.optimizers.Adam(1e-2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    for _ in range(2):  # move gamma/beta away from their initial ones and zeros
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
    want = model(x, training=False).numpy()

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.norm, self.stem = torch.nn.Linear(4, 3), torch.nn.GroupNorm(2, 4, eps=1e-3), torch.nn.Conv2d(3, 4, 3)

        def forward(self, t):
            return self.head(self.norm(self.stem(t)).mean((2, 3)))

    group_norm_accepts = LAYER_KINDS["GroupNormalization"].accepts
    assert group_norm_accepts(None, torch.nn.GroupNorm(2, 4)) and not group_norm_accepts(None, torch.nn.LayerNorm(4))
    r = tf_to_torch(prefix, tmp_path / "o.pt", model_factory=lambda: Twin(), exact_optimizer=True)
    assert r.plan.entry_for("gn/gamma").targets == ("norm.weight",)
    assert r.optimizer.endswith("KerasAdam")
    twin = Twin()
    twin.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True)["model"])
    with torch.no_grad():
        got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
