"""Shared helpers for the mapping tests: live Keras layers -> weights -> torch modules."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on TensorFlow, imported once per session (skips when absent)."""
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def randomize():
    """Give every weight of a built Keras layer or model random values (variances positive)."""

    def run(obj, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        for w in obj.weights:
            v = rng.normal(0, 0.5, size=tuple(w.shape)).astype("float32")
            if "variance" in w.path:
                v = np.abs(v) + 0.5
            w.assign(v)

    return run


def keras_weights(obj) -> dict[str, np.ndarray]:
    """``{path: array}`` of a Keras layer or model, the source side of every mapping."""
    return {w.path: np.array(w.numpy()) for w in obj.weights}


def to_torch(arrays: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


@pytest.fixture
def copy_layer(torch):
    """Copy a Keras layer's weights into a torch module through ``layer_rules``; returns the plan."""
    from ckptfmt.converters.mapping import describe_keras_layer, layer_rules

    def run(klayer, module, prefix: str = ""):
        arrays = keras_weights(klayer)
        plan = layer_rules(describe_keras_layer(klayer), prefix).plan(arrays, module.state_dict())
        module.load_state_dict(to_torch(plan.apply(arrays)))
        return plan

    return run


@pytest.fixture(scope="session")
def kweights():
    return keras_weights


@pytest.fixture(scope="session")
def totorch(torch):
    return to_torch
