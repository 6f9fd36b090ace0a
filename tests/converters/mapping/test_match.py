"""Model-guided matching: Keras models to torch models by type, shape and execution order."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]


def _cnn(keras):
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.99),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])


def _torch_cnn(torch, reverse: bool = False):
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            mods = [("conv", torch.nn.Conv2d(3, 4, 3, stride=2)), ("bn", torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.01)),
                    ("head", torch.nn.Linear(64, 5))]
            for name, m in reversed(mods) if reverse else mods:
                setattr(self, name, m)

        def forward(self, x):
            x = F.pad(x, (0, 1, 0, 1))  # TF 'same' with stride 2 on an even size pads bottom/right only
            return self.head(self.bn(self.conv(x)).flatten(1))

    return Net()


@pytest.mark.parametrize("reverse", [False, True])
def test_flatten_trap_cnn_logits_match(keras, torch, randomize, kweights, totorch, reverse):
    from ckptfmt.converters.mapping import build_mapping, describe_keras_model, find_flatten_dense

    k = _cnn(keras)
    randomize(k)
    layers = describe_keras_model(k)
    dense = layers[-1].name
    assert find_flatten_dense(layers) == {dense: (4, 4, 4)}
    t = _torch_cnn(torch, reverse)
    if reverse:
        assert [n for n, _ in t.named_children()] == ["head", "bn", "conv"]
    mapping = build_mapping(layers, t)  # unique signatures: no example input needed
    arrays = kweights(k)
    t.load_state_dict(totorch(mapping.apply(arrays, t.state_dict())))
    t.eval()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    with torch.no_grad():
        logits = t(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(np.asarray(k(x, training=False)), logits, atol=1e-5, rtol=0)
    assert not any(n.startswith("MISMATCH") for n in mapping.notes)


def test_without_flatten_permutation_logits_differ(keras, torch, randomize, kweights, totorch):
    """The trap is real: a plain transpose of the Dense kernel gives other logits."""
    from ckptfmt.converters.mapping import Mapping, describe_keras_model, layer_rules

    k = _cnn(keras)
    randomize(k)
    t = _torch_cnn(torch)
    names = {"Conv2D": "conv", "BatchNormalization": "bn", "Dense": "head"}
    mapping = Mapping(())
    for layer in describe_keras_model(k):
        if layer.weights:
            mapping = mapping + layer_rules(layer, names[layer.class_name])
    t.load_state_dict(totorch(mapping.apply(kweights(k), t.state_dict())))
    t.eval()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    with torch.no_grad():
        logits = t(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert np.abs(np.asarray(k(x, training=False)) - logits).max() > 1e-2


def _mlp(keras):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(6, activation="relu"),
                             keras.layers.Dense(6), keras.layers.LayerNormalization(epsilon=1e-5)])


def _torch_mlp(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # registered in an order unrelated to the forward pass
            self.norm = torch.nn.LayerNorm(6, eps=1e-5)
            self.c = torch.nn.Linear(6, 6)
            self.a = torch.nn.Linear(6, 6)
            self.b = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.norm(self.c(torch.relu(self.b(torch.relu(self.a(x))))))

    return Net()


def test_shuffled_registration_uses_execution_order(keras, torch, randomize, kweights, totorch):
    from ckptfmt.converters.mapping import build_mapping, describe_keras_model, match_layers
    from ckptfmt.errors import ConversionError

    k = _mlp(keras)
    randomize(k)
    t = _torch_mlp(torch)
    layers = describe_keras_model(k)
    with pytest.raises(ConversionError, match="ambiguous") as e:
        build_mapping(layers, t)
    assert "a, b, c" in str(e.value) or all(n in str(e.value) for n in ("a", "b", "c"))
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    pairs = match_layers(layers, t, torch.from_numpy(x))
    assert [p for _, p in pairs] == ["a", "b", "c", "norm"]
    mapping = build_mapping(layers, t, torch.from_numpy(x))
    t.load_state_dict(totorch(mapping.apply(kweights(k), t.state_dict())))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(k(x)), t(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
    # explicit pairs settle it without a trace, too
    explicit = build_mapping(layers, t, pairs={layers[0].name: "a", layers[1].name: "b", layers[2].name: "c"})
    assert explicit.rules == mapping.rules


def test_mismatched_model_is_refused_with_every_problem(keras, torch):
    from ckptfmt.converters.mapping import build_mapping, describe_keras_model
    from ckptfmt.errors import ConversionError

    k = _mlp(keras)
    t = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 7), torch.nn.LayerNorm(6))
    with pytest.raises(ConversionError) as e:
        build_mapping(describe_keras_model(k), t, torch.zeros(1, 6))
    assert "Dense" in str(e.value) and "1 torch module(s)" in str(e.value)


def test_eps_mismatch_is_noted(keras, torch):
    from ckptfmt.converters.mapping import build_mapping, describe_keras_model

    k = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    t = torch.nn.Sequential(torch.nn.BatchNorm1d(4))  # torch defaults: eps 1e-5, momentum 0.1
    notes = build_mapping(describe_keras_model(k), t).notes
    assert any(n.startswith("MISMATCH") and "eps" in n for n in notes)
    assert any(n.startswith("MISMATCH") and "momentum" in n for n in notes)


def test_torch_keras_torch_round_trip_bit_identical(keras, torch, kweights, totorch):
    """Torch weights -> Keras (inverse plan) -> torch are bit-identical, via a mapping file."""
    from ckptfmt.converters.mapping import Mapping, build_mapping, describe_keras_model

    k = _cnn(keras)
    t = _torch_cnn(torch)
    torch.manual_seed(0)
    for p in t.parameters():
        torch.nn.init.normal_(p)
    t.bn.running_var.uniform_(0.5, 2)
    t.bn.running_mean.normal_()
    mapping = Mapping.from_json(build_mapping(describe_keras_model(k), t).to_json())
    sources = {w.path: tuple(w.shape) for w in k.weights}
    state = {key: v.numpy() for key, v in t.state_dict().items()}
    back_plan = mapping.plan(sources, state).inverse()
    keras_arrays = back_plan.apply(state)
    assert keras_arrays.keys() == sources.keys()
    k.set_weights([keras_arrays[w.path] for w in k.weights])
    again = mapping.apply(kweights(k), state)
    for key, v in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # not a Keras quantity: always 0 on the way in
        assert again[key].dtype == v.dtype
        np.testing.assert_array_equal(again[key], v, err_msg=key)
