"""Optimizer state across frameworks: Keras-exact torch optimizers, slot conversion both ways.

Every test compares weights after resumed steps, not only shapes. The model has a conv kernel
and a Dense after a Flatten, so slots go through transposes and the Flatten permutation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ckptfmt.adapters.torch import numpy_to_state, state_to_numpy  # noqa: E402
from ckptfmt.converters import optim as co  # noqa: E402
from ckptfmt.converters.mapping import build_mapping, describe_keras_model  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]

CASES = [
    ("Adam", dict(learning_rate=0.01)),
    ("Adam", dict(learning_rate=0.01, amsgrad=True, epsilon=1e-3)),
    ("AdamW", dict(learning_rate=0.01, weight_decay=0.1)),
    ("SGD", dict(learning_rate=0.05)),
    ("SGD", dict(learning_rate=0.05, momentum=0.9)),
    ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("RMSprop", dict(learning_rate=0.01)),
    ("RMSprop", dict(learning_rate=0.01, momentum=0.5, centered=True)),
]
IDS = [f"{c}-{'-'.join(k for k in kw if k != 'learning_rate') or 'plain'}" for c, kw in CASES]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(27, 2)  # registered first on purpose
        self.conv = torch.nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


class Pair:
    """A Keras model and a torch model with the same weights, and the plan between them."""

    def __init__(self, seed: int = 0):
        self.k = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(), keras.layers.Dense(2)])
        rng = np.random.default_rng(seed)
        for w in self.k.weights:
            w.assign(rng.normal(size=tuple(w.shape)).astype("float32"))
        self.t = Net()
        self.mapping = build_mapping(describe_keras_model(self.k), self.t)
        self.plan = self.mapping.plan(self.kweights())
        self.load_keras_weights_into_torch()
        self.names = [n for n, _ in self.t.named_parameters()]
        self.grads = [{w.path: rng.normal(size=tuple(w.shape)).astype("float32") for w in self.k.trainable_weights} for _ in range(5)]

    def load_keras_weights_into_torch(self):
        self.t.load_state_dict({k: torch.from_numpy(v) for k, v in self.plan.apply(self.kweights()).items()})

    def kweights(self):
        return {w.path: np.array(w.numpy()) for w in self.k.weights}

    def keras_step(self, opt, i):
        opt.apply([keras.ops.convert_to_tensor(self.grads[i][w.path]) for w in self.k.trainable_weights], self.k.trainable_weights)

    def torch_step(self, opt, i):
        grads = self.plan.apply(self.grads[i], slots=True)
        params = dict(self.t.named_parameters())
        for n, g in grads.items():
            params[n].grad = torch.from_numpy(g)
        opt.step()

    def max_diff(self):
        want = self.plan.apply(self.kweights())
        got = self.t.state_dict()
        return max(float(np.abs(got[n].numpy() - want[n]).max()) for n in self.names)

    def assert_same_weights(self, atol):
        want = self.plan.apply(self.kweights())
        got = self.t.state_dict()
        for n in self.names:
            np.testing.assert_allclose(got[n].numpy(), want[n], atol=atol, rtol=0, err_msg=n)


def _torch_optimizer(conv, params):
    module, cls = conv.optimizer.rsplit(".", 1)
    factory = getattr(co, cls) if module == "ckptfmt.converters.optim" else getattr(torch.optim, cls)
    opt = factory(params, **conv.hyperparameters)
    opt.load_state_dict(numpy_to_state(conv.state_dict(opt.state_dict())))
    return opt


def _keras_state(pair, opt):
    return co.describe_keras_optimizer(opt, pair.k.trainable_weights)


@pytest.mark.parametrize("cls, kwargs", CASES, ids=IDS)
def test_keras_exact_optimizers_match_keras_and_resume(cls, kwargs):
    pair = Pair()
    kopt = getattr(keras.optimizers, cls)(**kwargs)
    kopt.build(pair.k.trainable_weights)
    fresh = co.keras_to_torch_optimizer(_keras_state(pair, kopt), pair.plan, pair.names, exact=True)
    assert fresh.state == {} and "exactly" in fresh.report
    topt = _torch_optimizer(fresh, pair.t.parameters())
    for i in range(3):
        pair.keras_step(kopt, i)
        pair.torch_step(topt, i)
    pair.assert_same_weights(1e-6)
    # the converted Keras state equals the state the Keras-exact optimizer built itself
    resumed = co.keras_to_torch_optimizer(_keras_state(pair, kopt), pair.plan, pair.names, exact=True)
    own = state_to_numpy(topt.state_dict())[0]["state"]
    assert resumed.state.keys() == own.keys()
    for i, slots in resumed.state.items():
        assert slots.keys() == own[i].keys()
        for name, value in slots.items():
            np.testing.assert_allclose(value, own[i][name], atol=1e-6, rtol=0)
    topt = _torch_optimizer(resumed, pair.t.parameters())  # resume in a fresh optimizer
    for i in range(3, 5):
        pair.keras_step(kopt, i)
        pair.torch_step(topt, i)
    pair.assert_same_weights(1e-6)


@pytest.mark.parametrize("cls, kwargs", CASES, ids=IDS)
def test_stock_torch_optimizers_resume_a_keras_run(cls, kwargs):
    pair = Pair(1)
    kopt = getattr(keras.optimizers, cls)(**kwargs)
    for i in range(3):
        pair.keras_step(kopt, i)
    pair.load_keras_weights_into_torch()
    conv = co.keras_to_torch_optimizer(_keras_state(pair, kopt), pair.plan, pair.names)
    assert conv.optimizer.startswith("torch.optim.")
    topt = _torch_optimizer(conv, pair.t.parameters())
    for i in range(3, 5):
        pair.keras_step(kopt, i)
        pair.torch_step(topt, i)
    if cls == "SGD" and not kwargs.get("weight_decay"):
        pair.assert_same_weights(1e-6)  # -lr * buffer is exact with a constant lr
    elif cls.startswith("Adam"):
        assert "epsilon" in conv.report and "KerasAdam" in conv.report
        if kwargs.get("epsilon"):  # a large epsilon makes the placement difference visible
            assert 1e-5 < pair.max_diff() < 1e-3
        else:
            pair.assert_same_weights(1e-5)
    elif cls == "RMSprop":
        assert "sqrt(v + eps)" in conv.report
        pair.assert_same_weights(1e-5)
    else:  # SGD with Keras's decoupled weight decay: dropped, and the report says so
        assert "weight_decay" in conv.report and "KerasSGD" in conv.report
        assert 1e-4 < pair.max_diff() < 1e-2


@pytest.mark.parametrize("torch_cls, cls, kwargs", [
    ("KerasAdam", "Adam", dict(learning_rate=0.01, amsgrad=True)),
    ("KerasSGD", "SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    ("KerasRMSprop", "RMSprop", dict(learning_rate=0.01, momentum=0.5, centered=True)),
    ("SGD", "SGD", dict(learning_rate=0.05, momentum=0.9)),
    ("AdamW", "AdamW", dict(learning_rate=0.01, weight_decay=0.1)),
])
def test_torch_run_resumes_in_keras(torch_cls, cls, kwargs):
    pair = Pair(2)
    kopt = getattr(keras.optimizers, cls)(**kwargs)
    kopt.build(pair.k.trainable_weights)
    conv = co.keras_to_torch_optimizer(_keras_state(pair, kopt), pair.plan, pair.names, exact=torch_cls.startswith("Keras"))
    assert conv.optimizer.endswith("." + torch_cls)
    topt = _torch_optimizer(conv, pair.t.parameters())
    for i in range(3):
        pair.torch_step(topt, i)
    state, report = co.torch_to_keras_optimizer(torch_cls, state_to_numpy(topt.state_dict())[0], pair.plan, pair.names, iterations=3)
    assert state.iterations == 3 and state.class_name == cls
    # torch weights back into Keras, optimizer state into a new Keras optimizer
    kw = pair.plan.inverse().apply({k: v.numpy() for k, v in pair.t.state_dict().items()})
    for w in pair.k.weights:
        w.assign(kw[w.path])
    kopt = getattr(keras.optimizers, cls)(**{k: v for k, v in state.config.items() if v is not None})
    kopt.build(pair.k.trainable_weights)
    values = state.variables(kopt.name)
    assert {v.path for v in kopt.variables} == set(values)
    for v in kopt.variables:
        v.assign(values[v.path])
    for i in range(3, 5):
        pair.keras_step(kopt, i)
        pair.torch_step(topt, i)
    pair.assert_same_weights(1e-6 if torch_cls != "AdamW" else 1e-5)


def test_keras3_optimizer_variable_names_round_trip():
    pair = Pair()
    kopt = keras.optimizers.RMSprop(momentum=0.5, centered=True)
    pair.keras_step(kopt, 0)
    state = _keras_state(pair, kopt)
    assert state.iterations == 1
    assert set(state.slots) == {w.path for w in pair.k.trainable_weights}
    assert set(next(iter(state.slots.values()))) == {"velocity", "momentum", "average_gradient"}
    names = state.variables(kopt.name)
    assert set(names) == {v.path for v in kopt.variables}
    for v in kopt.variables:
        np.testing.assert_array_equal(names[v.path], np.array(v.numpy()))


def test_unplaceable_slots_are_listed():
    from ckptfmt.errors import UnmappedKeyError

    pair = Pair()
    kopt = keras.optimizers.Adam()
    pair.keras_step(kopt, 0)
    with pytest.raises(UnmappedKeyError) as e:
        co.keras_to_torch_optimizer(_keras_state(pair, kopt), pair.plan, pair.names[:1])
    assert "not in param_names" in str(e.value)
    with pytest.raises(UnmappedKeyError, match="belong to no listed variable"):
        co.keras_optimizer_state("Adam", {}, {v.path: v.numpy() for v in kopt.variables}, [pair.k.trainable_weights[0].path])


def test_ema_is_refused():
    from ckptfmt.errors import ConversionError

    pair = Pair()
    kopt = keras.optimizers.SGD(use_ema=True)
    kopt.build(pair.k.trainable_weights)
    state = co.KerasOptimizerState("SGD", kopt.get_config(), 0, {})
    with pytest.raises(ConversionError, match="EMA"):
        co.keras_to_torch_optimizer(state, pair.plan, pair.names)


@pytest.mark.parametrize("cls, kwargs", [CASES[0], CASES[2], CASES[4], CASES[7]], ids=[IDS[0], IDS[2], IDS[4], IDS[7]])
def test_keras_exact_optimizers_follow_keras_on_embedding_gradients(cls, kwargs):
    """Keras on TF squares an embedding's IndexedSlices gradient per occurrence of an index;
    the Keras-exact optimizers do the same with nn.Embedding(sparse=True)'s uncoalesced gradient."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    init = rng.normal(size=(10, 4)).astype("float32")
    batches = [rng.integers(0, 10, (3, 5)) for _ in range(4)]  # indices repeat within a batch
    emb = keras.layers.Embedding(10, 4)
    emb.build((None,))
    emb.embeddings.assign(init)
    kopt = getattr(keras.optimizers, cls)(**kwargs)
    for x in batches:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.tanh(emb(x)))  # bounded gradients
        grads = tape.gradient(loss, emb.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        kopt.apply_gradients(zip(grads, emb.trainable_variables))
    want = emb.embeddings.numpy()

    from ckptfmt.converters.mapping import Mapping, Rename

    # the hyperparameters as a conversion would write them, from the Keras config
    plan = Mapping((Rename("emb", "weight"),)).plan({"emb": init})
    fresh = getattr(keras.optimizers, cls)(**kwargs)
    conv = co.keras_to_torch_optimizer(co.KerasOptimizerState(cls, fresh.get_config(), 0, {}), plan, ["weight"], exact=True)
    diffs = {}
    for sparse in (True, False):
        w = torch.nn.Parameter(torch.from_numpy(init.copy()))
        topt = _torch_optimizer(conv, [w])
        for x in batches:
            topt.zero_grad()
            torch.tanh(torch.nn.functional.embedding(torch.from_numpy(x), w, sparse=sparse)).sum().backward()
            topt.step()
        diffs[sparse] = float(np.abs(w.detach().numpy() - want).max())
    assert diffs[True] < 1e-6, diffs
    if cls != "SGD":  # linear in the gradient: dense and per-occurrence agree
        assert diffs[False] > 1e-4, diffs  # a dense gradient cannot reproduce Keras here
