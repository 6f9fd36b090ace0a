"""Our TF writer's output is restored by TensorFlow into a fresh Keras model + optimizer.

The TF checkpoint stores only variables and the object graph; the graph is taken from a
template checkpoint of the target model (as a conversion into TF does), the values come
from elsewhere (here: changed on purpose so the test sees they were really loaded).
"""

from __future__ import annotations

import numpy as np
import pytest

from ckptfmt.converters.tf.bundle import OBJECT_GRAPH_KEY, TFCheckpointReader, write_checkpoint


@pytest.mark.tensorflow
def test_keras_model_and_optimizer_restore_with_assert_consumed(tmp_path):
    tf = pytest.importorskip("tensorflow")
    import keras

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, strides=2, padding="same"),
                                  keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dense(4)])
        opt = keras.optimizers.Adam(1e-3)
        model.compile(optimizer=opt, loss="mse")
        return model, opt

    model, opt = build()
    x, y = np.ones((2, 6, 6, 2), np.float32), np.zeros((2, 4), np.float32)
    model.train_on_batch(x, y)  # creates the optimizer's slots and iterations
    template = str(tmp_path / "template" / "ckpt")
    tf.train.Checkpoint(model=model, optimizer=opt).write(template)

    src = TFCheckpointReader(template)
    values = {k: src.get(k) for k in src.keys() if k != OBJECT_GRAPH_KEY}
    values = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in values.items()}  # our own values
    ours = str(tmp_path / "ours" / "ckpt")
    write_checkpoint(ours, {**values, OBJECT_GRAPH_KEY: src.get(OBJECT_GRAPH_KEY)})

    fresh, fresh_opt = build()
    fresh.train_on_batch(x, y)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).read(ours)
    status.assert_consumed()
    # Every weight (incl. BatchNorm statistics) and every Adam slot holds our values.
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy() + 1)
    for a, b in zip(fresh_opt.variables, opt.variables):
        if np.asarray(a.numpy()).dtype.kind == "f":
            np.testing.assert_array_equal(a.numpy(), b.numpy() + 1)
    assert int(fresh_opt.iterations.numpy()) == int(opt.iterations.numpy())
