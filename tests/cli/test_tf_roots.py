"""`convert tf2torch` finds the model whatever attribute it was saved under (issue 12).

Checkpoints are written by TensorFlow itself, the way its training-checkpoints guide does
it: ``tf.train.Checkpoint(net=model, optimizer=opt)``, ``tf.train.Checkpoint(bag=module)``
and two models in one checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

import ckptfmt
from ckptfmt.cli.main import EXIT_ERROR, EXIT_OK, main
from ckptfmt.converters import convert as conv

pytestmark = pytest.mark.tensorflow

TORCH_FACTORY = """
import torch

def make():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
"""


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)], env={"CKPTFMT_DEBUG": ""})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("tfroots")
    keras.utils.set_random_seed(0)

    def mlp():
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu", name="d1"), keras.layers.Dense(2, name="d2")])
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        m.fit(np.ones((8, 4), np.float32), np.zeros((8, 2), np.float32), epochs=1, verbose=0)
        return m

    net = mlp()
    out = {"net": tf.train.Checkpoint(net=net, optimizer=net.optimizer).save(str(root / "net" / "ckpt")), "weights": net}

    class Bag(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
            self.b = tf.Variable(np.ones(3, np.float32))

    out["bag"] = tf.train.Checkpoint(bag=Bag()).save(str(root / "bag" / "ckpt"))
    out["two"] = tf.train.Checkpoint(gen=mlp(), disc=mlp()).save(str(root / "two" / "ckpt"))
    factory = root / "factory.py"
    factory.write_text(TORCH_FACTORY)
    out["factory"] = f"{factory}:make"
    return out


def test_model_saved_as_net_is_found(ckpts, tmp_path):
    dst = tmp_path / "w.safetensors"
    r = run("tf2torch", ckpts["net"], dst, "--no-optimizer")
    assert r.exit_code == EXIT_OK, r.output
    assert "(4 tensors" in r.output
    from safetensors.numpy import load_file

    got = load_file(str(dst))
    kernel = ckpts["weights"].get_layer("d1").kernel.numpy()
    assert any(v.shape == kernel.T.shape and np.array_equal(v, kernel.T) for v in got.values())


@pytest.mark.torch
def test_net_with_optimizer_converts(ckpts, tmp_path):
    pytest.importorskip("torch")
    dst = tmp_path / "resumed.pt"
    r = run("tf2torch", ckpts["net"], dst, "--model", ckpts["factory"])
    assert r.exit_code == EXIT_OK, r.output
    assert "slots belong to no model variable" not in r.output
    import torch

    saved = torch.load(dst, weights_only=True)
    assert len(saved["model"]) == 4 and saved["optimizer"]["state"]


def test_tf_module_under_any_name(ckpts, tmp_path):
    dst = tmp_path / "bag.safetensors"
    r = run("tf2torch", ckpts["bag"], dst, "--preset", "tf-module", "--no-optimizer")
    assert r.exit_code == EXIT_OK, r.output
    from safetensors.numpy import load_file

    got = load_file(str(dst))
    assert sorted(got) == ["b", "w"] and np.array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_several_models_need_root(ckpts, tmp_path):
    dst = tmp_path / "g.safetensors"
    r = run("tf2torch", ckpts["two"], dst, "--no-optimizer")
    assert r.exit_code == EXIT_ERROR and "several models" in r.output and "gen" in r.output and "disc" in r.output
    assert "--root" in r.output and not dst.exists()
    r = run("tf2torch", ckpts["two"], dst, "--no-optimizer", "--root", "gen")
    assert r.exit_code == EXIT_OK, r.output
    r = run("tf2torch", ckpts["two"], tmp_path / "x.safetensors", "--no-optimizer", "--root", "nope")
    assert r.exit_code == EXIT_ERROR and "'nope'" in r.output and "gen (model" in r.output


def test_library_root_and_nothing_to_convert(ckpts, tmp_path):
    from ckptfmt.converters.tf import TFCheckpointReader

    with TFCheckpointReader(ckpts["two"]) as reader:
        kc = conv.read_keras_checkpoint(reader, root="disc")
    assert kc.root == "disc" and len(kc.keys) == 4
    from ckptfmt.converters.tf.object_graph import read_object_graph, root_objects

    with TFCheckpointReader(ckpts["net"]) as reader:
        kinds = {o.name: o.kind for o in root_objects(read_object_graph(reader))}
    assert kinds["net"] == "model" and kinds["optimizer"] == "optimizer" and kinds["save_counter"] == "variable"
    with pytest.raises(ckptfmt.ConversionError, match="no model attribute 'optimizer'") as e:
        conv.tf_to_torch(ckpts["net"], tmp_path / "z.safetensors", root="optimizer", optimizer=False)
    assert "net (model, 4 variables)" in str(e.value) and not (tmp_path / "z.safetensors").exists()
