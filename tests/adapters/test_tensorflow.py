"""ckptfmt.tensorflow and ckptfmt.adapters.tensorflow: object-graph keys, resumed training."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import ckptfmt  # noqa: E402
import ckptfmt.tensorflow as ckt  # noqa: E402
from ckptfmt.adapters import tensorflow as tfa  # noqa: E402
from ckptfmt.errors import ConversionError, FormatError, UnsupportedDtypeError  # noqa: E402

pytestmark = pytest.mark.tensorflow

_RNG = np.random.default_rng(0)
DATA = [(_RNG.normal(size=(4, 6, 6, 2)).astype("float32"), _RNG.normal(size=(4, 2)).astype("float32")) for _ in range(5)]


def make_model(seed: int):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="relu"),
        keras.layers.Dense(2),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def values(obj) -> dict[str, np.ndarray]:
    return {name: np.array(v.numpy()) for name, v in tfa.walk_variables(obj)}


def assert_same_values(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_keras_resumed_run_matches_uninterrupted_run(tmp_path):
    model = make_model(seed=0)
    for x, y in DATA[:2]:
        model.train_on_batch(x, y)
    ckt.save(tmp_path / "ck", model, metadata={"step": 2})
    expected = [float(model.train_on_batch(x, y)) for x, y in DATA[2:]]

    fresh = make_model(seed=1)  # other initial weights, optimizer not built yet
    assert not fresh.optimizer.built
    ckt.restore(tmp_path / "ck", fresh)
    assert int(fresh.optimizer.iterations.numpy()) == 2
    resumed = [float(fresh.train_on_batch(x, y)) for x, y in DATA[2:]]

    assert resumed == expected
    assert_same_values(values(fresh), values(model))
    assert ckptfmt.open(tmp_path / "ck").metadata == {"step": 2}


def test_keras_keys_follow_the_object_graph_and_slots_their_owner(tmp_path):
    model = make_model(seed=0)
    model.train_on_batch(*DATA[0])
    ckt.save(tmp_path / "ck", model)
    keys = set(ckptfmt.open(tmp_path / "ck").keys())
    conv = "_functional/_operations/1"
    assert {f"variables/{conv}/_kernel", f"variables/{conv}/bias"} <= keys
    bn = "_functional/_operations/2"
    assert {f"variables/{bn}/moving_mean", f"variables/{bn}/moving_variance"} <= keys
    assert {"variables/optimizer/_iterations", "variables/optimizer/_learning_rate"} <= keys
    assert f"optimizers/optimizer/slots/momentums/{conv}/_kernel" in keys
    assert f"optimizers/optimizer/slots/velocities/{conv}/bias" in keys
    # Moving statistics are not trained, so they have no slots; nothing is stored twice.
    assert not any(k.startswith("optimizers/") and k.endswith("moving_mean") for k in keys)
    assert len(keys) == len(list(tfa.walk_variables(model)))
    tree = ckptfmt.load(tmp_path / "ck")
    assert tree["optimizers"]["optimizer"]["trainable_variables"][0] == f"{conv}/_kernel"


class Block(tf.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3) * scale)
        self.half = tf.Variable(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16))
        self.steps = tf.Variable(np.int64(7) * int(scale))
        self.flags = tf.Variable([True, scale > 0])
        self.z = tf.Variable(np.array([1 + 2j], dtype=np.complex64) * scale)


class Net(tf.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.blocks = [Block(scale), Block(2 * scale)]
        self.shared = self.blocks[0].w  # the same variable along a second path
        self.scalar = tf.Variable(np.float64(scale))


def test_tf_module_round_trip(tmp_path):
    src, dst = Net(1.0), Net(0.0)
    ckt.save(tmp_path / "ck", src)
    keys = ckptfmt.open(tmp_path / "ck").keys()
    # Stored once, under its shortest path (breadth first, as TensorFlow's own checkpoints).
    assert "variables/shared" in keys and "variables/blocks/0/w" not in keys
    ckt.restore(tmp_path / "ck", dst)
    assert_same_values(values(dst), values(src))
    assert dst.shared is dst.blocks[0].w
    assert dst.blocks[0].half.dtype == tf.bfloat16


def test_tf_train_checkpoint_round_trip_with_custom_loop(tmp_path):
    def make(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
        opt = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
        return tf.train.Checkpoint(model=model, optimizer=opt, epoch=tf.Variable(0, dtype=tf.int64))

    def step(ck, i):
        x = tf.constant(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3) * (i + 1))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ck.model(x) ** 2)
        grads = tape.gradient(loss, ck.model.trainable_variables)
        ck.optimizer.apply_gradients(zip(grads, ck.model.trainable_variables))
        ck.epoch.assign_add(1)
        return float(loss)

    a = make(0)
    for i in range(2):
        step(a, i)
    ckt.save(tmp_path / "ck", a)
    expected = [step(a, i) for i in range(2, 4)]

    b = make(1)
    ckt.restore(tmp_path / "ck", b)
    assert int(b.epoch.numpy()) == 2
    assert [step(b, i) for i in range(2, 4)] == expected
    assert_same_values(values(b), values(a))
    keys = ckptfmt.open(tmp_path / "ck").keys()
    assert "variables/epoch" in keys and "variables/save_counter" in keys
    assert "optimizers/optimizer/slots/momentums/model/_functional/_operations/1/_kernel" in keys


def test_strict_restore_lists_every_missing_and_unexpected_key(tmp_path):
    src = tf.Module()
    src.a, src.b = tf.Variable(1.0), tf.Variable([1.0, 2.0])
    ckt.save(tmp_path / "ck", src)

    dst = tf.Module()
    dst.a, dst.c, dst.d = tf.Variable(0.0), tf.Variable(0.0), tf.Variable(0.0)
    with pytest.raises(ConversionError) as info:
        ckt.restore(tmp_path / "ck", dst)
    msg = str(info.value)
    assert "missing from checkpoint: variables/c, variables/d" in msg
    assert "variables/b" in msg
    assert float(dst.a.numpy()) == 0.0  # nothing assigned

    ckt.restore(tmp_path / "ck", dst, strict=False)
    assert float(dst.a.numpy()) == 1.0 and float(dst.c.numpy()) == 0.0


def test_shape_mismatch_is_named_even_when_not_strict(tmp_path):
    src = tf.Module()
    src.w = tf.Variable(np.zeros((2, 3), np.float32))
    ckt.save(tmp_path / "ck", src)
    dst = tf.Module()
    dst.w = tf.Variable(np.zeros((3, 2), np.float32))
    with pytest.raises(ConversionError, match=r"variables/w: checkpoint \(2, 3\) vs variable \(3, 2\)"):
        ckt.restore(tmp_path / "ck", dst, strict=False)


def test_unbuilt_model_gets_a_helpful_error(tmp_path):
    ckt.save(tmp_path / "ck", make_model(0))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ConversionError, match="call a Keras model once"):
        ckt.restore(tmp_path / "ck", unbuilt)


def test_string_variables_and_foreign_checkpoints_are_refused(tmp_path):
    m = tf.Module()
    m.s = tf.Variable("text")
    with pytest.raises(UnsupportedDtypeError, match="variables/s"):
        ckt.save(tmp_path / "ck", m)
    ckptfmt.save({"w": np.zeros(2)}, tmp_path / "plain")
    with pytest.raises(FormatError, match="ckptfmt.tensorflow"):
        ckt.restore(tmp_path / "plain", tf.Module())
