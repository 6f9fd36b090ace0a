"""The README's training loops: CheckpointManager with the torch and TensorFlow adapters."""

from __future__ import annotations

import numpy as np
import pytest

from ckptfmt.manager import CheckpointManager


@pytest.mark.torch
def test_torch_loop_resumes_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from ckptfmt.adapters import torch as ck_torch

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1, generator=torch.Generator().manual_seed(2))

    def step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    model, opt = make()
    reference = [step(model, opt) for _ in range(10)]

    model, opt = make()
    with CheckpointManager(tmp_path, save_interval_steps=5, async_save=True) as mgr:
        for s in range(1, 6):
            step(model, opt)
            mgr.save(s, ck_torch.to_state(model=model, optimizer=opt))
    model, opt = make()  # a new process would start here
    with CheckpointManager(tmp_path) as mgr:
        ck_torch.from_state(mgr.restore(), model=model, optimizer=opt)
        resumed = [step(model, opt) for _ in range(5)]
    assert resumed == reference[5:]


@pytest.mark.tensorflow
def test_keras_loop_resumes_exactly(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from ckptfmt.adapters import tensorflow as ck_tf

    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((16, 1)).astype(np.float32)

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        return model

    def step(model):
        return float(model.train_on_batch(x, y))

    model = make()
    reference = [step(model) for _ in range(6)]
    model = make()
    with CheckpointManager(tmp_path) as mgr:
        for s in range(1, 4):
            step(model)
            mgr.save(s, ck_tf.to_state(model))
    model = make()
    with CheckpointManager(tmp_path) as mgr:
        ck_tf.from_state(mgr.restore(), model)
    resumed = [step(model) for _ in range(3)]
    np.testing.assert_allclose(resumed, reference[3:], rtol=0, atol=0)
